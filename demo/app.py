"""EAR in the browser: draw samples from a trained model, or complete a painted-over region.

    pip install -r demo/requirements.txt
    python demo/app.py --resume RUN_OR_EXPORT_OR_HUB_ID [--device cpu] [--port 7860]

--resume (changeable in the page) is what sample_ear.py --resume takes: a run folder with
checkpoint-last.pth, an exported folder (model.safetensors + config.json) or a Hugging Face Hub
repo id. The page's settings become sample_ear.py's flags, and the work is done by the
project's code (sample_ear.set_up and edit_image, util.builders.model_labels,
engine_ear.generate). Each request seeds the random generator just before it samples (so a seed
gives the same pictures whatever ran before). docs/demo.md shows the page.
"""
import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python demo/app.py` from anywhere

from engine_ear import generate  # noqa: E402
from sample_ear import edit_image, parse_args, set_up  # noqa: E402
from util.args import check_positive, check_sampling_args  # noqa: E402
from util.builders import model_labels  # noqa: E402
from util.editing import check_token_mask, read_edit, token_mask  # noqa: E402
from util.errors import INPUT_ERRORS, one_line  # noqa: E402
from util.images import save_grid, to_uint8  # noqa: E402
from util.precision import set_up_cuda  # noqa: E402

# Pictures in the page are magnified (nearest neighbour) until an image is at least this many
# pixels wide: an 8x8 digit becomes 128x128 in a grid, 256x256 in the editor.
GRID_SIDE = 128
EDITOR_SIDE = 256
MAX_CLASSES = 16
MAX_PER_CLASS = 16
DEFAULT_CLASSES = 10  # the page starts with the model's first classes, up to this many


def magnification(img_size: int, side: int) -> int:
    return max(1, side // img_size)


def magnify(picture: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (H, W[, C]) -> (H * factor, W * factor[, C]), every pixel a factor x factor block."""
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def parse_class_ids(text: str) -> list:
    """'3, 7 1' -> [3, 7, 1] (the dataset's class ids, as sample_ear.py --class_ids takes them)."""
    words = (text or "").replace(",", " ").split()
    if not words:
        raise ValueError("classes: none given (expected the dataset's class ids, e.g. 3, 7)")
    try:
        ids = [int(w) for w in words]
    except ValueError:
        raise ValueError(f"classes {text!r}: expected whole numbers separated by commas") from None
    if len(ids) > MAX_CLASSES:
        raise ValueError(f"classes: {len(ids)} given, the page draws at most {MAX_CLASSES} rows")
    return ids


def number(value, name: str, kind=float):
    """A page field as the flag's value; an emptied field is an input error, not a crash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name}: no value (expected a number)")
    if kind is int and float(value) != int(value):
        raise ValueError(f"{name} {value}: expected a whole number")
    return kind(value)


class Loaded:
    def __init__(self, key, model, tokenizer, settings, epoch):
        self.key, self.model, self.tokenizer = key, model, tokenizer
        self.settings, self.epoch = settings, epoch

    def describe(self, device: torch.device) -> str:
        s, classes = self.settings, self.classes()
        listed = (", ".join(map(str, classes)) if len(classes) <= 20
                  else f"{classes[0]} .. {classes[-1]}")
        return (f"{s.model} ({s.head} head, {s.tokenizer} tokens), epoch {self.epoch}: "
                f"{s.img_size}x{s.img_size} px images of {self.model.seq_len} tokens, "
                f"{len(classes)} classes ({listed}); on {device.type}")

    def classes(self) -> list:
        """The dataset's class ids the model draws (model_labels maps them to its labels)."""
        s = self.settings
        return getattr(s, "dataset_classes", None) or list(range(s.class_num))


class Demo:
    """What the page asks of the model, without the page: `sample`, `edit`, `sample_input`.

    The model of a source is loaded on first use (sample_ear.set_up checks every file) and kept
    until another source is asked for. One request runs at a time, and each seeds the random
    generator first, so a seed gives the same pictures whatever ran before it."""

    def __init__(self, device: torch.device, revision: str = None):
        self.device, self.revision = device, revision
        self.loaded = None
        self.lock = threading.Lock()

    def arguments(self, source: str, out: Path, class_ids: list, **flags) -> tuple:
        """sample_ear.py's (args, given) for these page settings; `=` keeps a value that starts
        with '-' or '@' from reading as a flag or a file of flags."""
        source = (source or "").strip()
        if not source:
            raise ValueError("model: none given (expected a run folder, an exported folder or a "
                             "Hugging Face Hub repo id)")
        argv = [f"--resume={source}", f"--device={self.device}", f"--out={out}"]
        if self.revision:
            argv.append(f"--revision={self.revision}")
        argv += [f"--{name}" if value is True else f"--{name}={value}"
                 for name, value in flags.items() if value is not False]
        args, given = parse_args(argv)
        args.class_ids = class_ids
        return args, given

    def model(self, args, given, fresh: bool = False) -> Loaded:
        """The loaded model of args.resume, loading it if another (or none) is loaded, or if
        `fresh` (the files may have changed: a run goes on training)."""
        key = (args.resume, args.revision)
        if fresh or self.loaded is None or self.loaded.key != key:
            self.loaded = None  # let the old one go before the new one takes memory
            # The classes and steps of this request are checked by `check`, for every request.
            neutral = argparse.Namespace(**{**vars(args), "class_ids": [], "num_iter": 1,
                                            "samples_per_class": 1, "edit": "", "mask": ""})
            model, tokenizer, _, settings, epoch = set_up(neutral, given, self.device)
            self.loaded = Loaded(key, model, tokenizer, settings, epoch)
        return self.loaded

    def load(self, source: str, fresh: bool = False) -> Loaded:
        with self.lock, tempfile.TemporaryDirectory(prefix="ear-demo-") as tmp:
            return self.model(*self.arguments(source, Path(tmp) / "grid.png", []), fresh)

    def check(self, args, loaded: Loaded) -> torch.Tensor:
        """The checks sample_ear.set_up makes of its sampling flags; the model's labels."""
        check_sampling_args(args)
        check_positive(args, "samples_per_class")
        if args.samples_per_class > MAX_PER_CLASS:
            raise ValueError(f"{args.samples_per_class} per class: the page draws at most "
                             f"{MAX_PER_CLASS}")
        if args.num_iter > loaded.model.seq_len:
            raise ValueError(f"steps {args.num_iter}: the model's images have "
                             f"{loaded.model.seq_len} tokens (expected at most one step per token)")
        return model_labels(args.class_ids, loaded.settings)

    def draw(self, source, classes, cfg, temperature, steps, seed, per_class, out) -> tuple:
        """(images uint8 (N, H, W, C): per_class of each class in turn; the args; the loaded
        model; seconds taken), drawn from nothing as sample_ear.py draws them."""
        class_ids = parse_class_ids(classes)
        flags = sampling_flags(cfg, temperature, steps, seed, per_class)
        args, given = self.arguments(source, out, class_ids, **flags)
        loaded = self.model(args, given)
        labels = self.check(args, loaded).repeat_interleave(args.samples_per_class)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        with torch.no_grad():
            images = torch.cat([generate(loaded.model, loaded.tokenizer.decode, chunk, args.cfg,
                                         args.infer_temperature, args, self.device)
                                for chunk in labels.split(args.eval_bsz)])
        return to_uint8(images), args, loaded, time.perf_counter() - start

    def sample(self, source, classes, cfg, temperature, steps, seed, per_class) -> tuple:
        """(grid uint8 (H, W, C): a row per class, magnified; a summary)."""
        with self.lock, tempfile.TemporaryDirectory(prefix="ear-demo-") as tmp:
            images, args, loaded, seconds = self.draw(source, classes, cfg, temperature, steps,
                                                      seed, per_class, Path(tmp) / "grid.png")
            grid = read_picture(save_grid(images, args.samples_per_class, args.out))
        factor = magnification(loaded.settings.img_size, GRID_SIDE)
        return magnify(grid, factor), (
            f"{len(args.class_ids)} classes x {args.samples_per_class} samples, cfg {args.cfg}, "
            f"temperature {args.infer_temperature}, {args.num_iter} steps, seed {args.seed}: "
            f"{seconds:.2f} s on {self.device.type}; shown {factor}x magnified")

    def sample_input(self, source, classes, cfg, temperature, steps, seed) -> np.ndarray:
        """One sample of the first class, uint8 (H, W, C) magnified for painting: an image to
        edit."""
        first = str(parse_class_ids(classes)[0])
        with self.lock, tempfile.TemporaryDirectory(prefix="ear-demo-") as tmp:
            images, _, loaded, _ = self.draw(source, first, cfg, temperature, steps, seed, 1,
                                             Path(tmp) / "grid.png")
        image = images[0] if images.shape[-1] == 3 else images[0].repeat(3, axis=-1)
        return magnify(image, magnification(loaded.settings.img_size, EDITOR_SIDE))

    def edit(self, source, image: np.ndarray, regenerate: np.ndarray, classes, cfg, temperature,
             steps, seed, completions, mask_rule: str = "all", paste: bool = False) -> tuple:
        """image uint8 (H, W[, C]) and regenerate (H, W) bool, any size (centre-cropped as
        sample_ear.py --edit does) -> (grid: a row per class of [input, mask, completions],
        magnified; a summary). mask_rule, paste: sample_ear.py's --mask_rule and --paste."""
        class_ids = parse_class_ids(classes)
        flags = {**sampling_flags(cfg, temperature, steps, seed, completions),
                 "mask_rule": mask_rule, "paste": bool(paste)}
        with self.lock, tempfile.TemporaryDirectory(prefix="ear-demo-") as tmp:
            tmp = Path(tmp)
            Image.fromarray(image).save(tmp / "image.png")
            Image.fromarray(np.where(regenerate, 255, 0).astype(np.uint8)).save(tmp / "mask.png")
            args, given = self.arguments(source, tmp / "grid.png", class_ids, **flags,
                                         edit=tmp / "image.png", mask=tmp / "mask.png")
            loaded = self.model(args, given)
            labels = self.check(args, loaded)
            side = loaded.settings.img_size
            _, keep = read_edit(args.edit, args.mask, side, loaded.tokenizer.image_channels)
            kept = token_mask(keep, side // loaded.model.seq_h, args.mask_rule)
            check_token_mask(kept, f"the painted region (the image cropped to {side}x{side} px)")
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            with torch.no_grad():
                edit_image(loaded.model, loaded.tokenizer, labels, loaded.settings, args,
                           self.device)
            seconds = time.perf_counter() - start
            grid = read_picture(args.out)
        factor = magnification(side, GRID_SIDE)
        return magnify(grid, factor), (
            f"{len(class_ids)} classes x {args.samples_per_class} completions, "
            f"{int(kept.sum())} of {loaded.model.seq_len} tokens kept, cfg {args.cfg}, "
            f"temperature {args.infer_temperature}, {args.num_iter} steps, seed {args.seed}: "
            f"{seconds:.2f} s on {self.device.type}; shown {factor}x magnified (first columns: "
            "the input and the mask, white: regenerated)")


def sampling_flags(cfg, temperature, steps, seed, per_class) -> dict:
    return {"cfg": number(cfg, "cfg"), "infer_temperature": number(temperature, "temperature"),
            "num_iter": number(steps, "steps", int), "seed": number(seed, "seed", int),
            "samples_per_class": number(per_class, "samples per class", int)}


def read_picture(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def editor_inputs(value, mask) -> tuple:
    """The Edit tab's fields -> (image uint8 (H, W, C), regenerate (H, W) bool): the editor's
    background, and whatever was painted on its layers (any colour) or is white (>= half grey)
    in the optional mask picture."""
    background = (value or {}).get("background")
    if background is None:
        raise ValueError("no image to edit: upload one, or take a sample with 'Use a sample'")
    size = background.shape[:2]
    regenerate = np.zeros(size, dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        if layer.shape[:2] != size:
            raise ValueError(f"a painted layer of {layer.shape[1]}x{layer.shape[0]} px over an "
                             f"image of {size[1]}x{size[0]} px (expected the image's size)")
        if layer.ndim == 3 and layer.shape[2] == 4:
            regenerate |= layer[..., 3] > 0  # painted: not transparent
        else:
            regenerate |= (layer if layer.ndim == 2 else layer.max(-1)) > 0
    if mask is not None:
        if mask.shape[:2] != size:
            raise ValueError(f"the mask picture is {mask.shape[1]}x{mask.shape[0]} px, expected "
                             f"the image's size ({size[1]}x{size[0]} px)")
        regenerate |= (mask if mask.ndim == 2 else mask[..., :3].mean(-1)) >= 128
    if not regenerate.any():
        raise ValueError("nothing to regenerate: paint over the region to regenerate (or add "
                         "a mask picture, white where to regenerate)")
    if background.ndim == 3 and background.shape[2] == 4:
        background = background[..., :3]
    return background, regenerate


def page(demo: Demo, source: str):
    import gradio as gr

    def shown(fn):
        """Run fn; an input error (sample_ear's SystemExit or ValueError/OSError) becomes a
        message in the page; anything else (a bug) keeps its traceback in the server's log."""
        def run(*values):
            try:
                return fn(*values)
            except SystemExit as e:
                raise gr.Error(str(e.code).removeprefix("error: ") if isinstance(e.code, str)
                               else "the settings were not understood (see the server's log)")
            except INPUT_ERRORS as e:
                raise gr.Error(one_line(e))
        return run

    def load(text, fresh=True):
        """Load (again: the files may have changed) and fit the class and step fields."""
        loaded = demo.load(text, fresh)
        classes = ", ".join(map(str, loaded.classes()[:DEFAULT_CLASSES]))
        steps = gr.Slider(maximum=loaded.model.seq_len, value=min(64, loaded.model.seq_len))
        return loaded.describe(demo.device), classes, steps, classes, steps

    def open_page(text):
        """When the page opens: the model of the box (the loaded one, if it is), if any."""
        if not (text or "").strip():
            return "no model yet: type a run folder, an exported folder or a Hub repo id", \
                *[gr.skip()] * 4
        return load(text, fresh=False)

    def edit(text, value, mask, *settings):
        return demo.edit(text, *editor_inputs(value, mask), *settings)

    def sample_input(text, classes, cfg, temperature, steps, seed):
        picture = demo.sample_input(text, classes, cfg, temperature, steps, seed)
        return {"background": picture, "layers": [], "composite": picture}

    with gr.Blocks(title="EAR", analytics_enabled=False) as blocks:
        gr.Markdown("# EAR: continuous visual autoregressive generation\n"
                    "Draw images of chosen classes, or paint over part of an image and let the "
                    "model complete it. The settings are those of `sample_ear.py`.")
        with gr.Row():
            source_box = gr.Textbox(source, label="Model (--resume): a run folder, an exported "
                                    "folder or a Hugging Face Hub repo id", scale=4,
                                    elem_id="source")
            load_button = gr.Button("Load", scale=1, elem_id="load")
        info = gr.Markdown("not loaded yet: loads on first use", elem_id="info")

        def settings(prefix: str, many: str):
            with gr.Row():
                classes = gr.Textbox("", label="Classes (--class_ids, the dataset's ids), "
                                     "one row each", elem_id=f"{prefix}_classes")
                count = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label=many,
                                  elem_id=f"{prefix}_count")
            with gr.Row():
                cfg = gr.Number(1.0, label="Guidance (--cfg; 1: none)", minimum=0,
                                elem_id=f"{prefix}_cfg")
                temperature = gr.Number(1.0, label="Temperature (--temperature)", minimum=0,
                                        elem_id=f"{prefix}_temperature")
                steps = gr.Slider(1, 256, value=64, step=1, label="Steps (--num_iter)",
                                  elem_id=f"{prefix}_steps")
                seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}_seed")
            return classes, cfg, temperature, steps, seed, count

        with gr.Tab("Sample", elem_id="tab_sample"):
            s_classes, s_cfg, s_temp, s_steps, s_seed, s_count = settings("sample",
                                                                          "Samples per class")
            s_button = gr.Button("Sample", variant="primary", elem_id="sample_run")
            s_grid = gr.Image(label="Samples: a row per class", format="png", interactive=False,
                              elem_id="sample_grid")
            s_note = gr.Markdown(elem_id="sample_note")
        with gr.Tab("Edit", elem_id="tab_edit"):
            gr.Markdown("Upload an image (other sizes are centre-cropped to the model's) and paint "
                        "over what to regenerate: any painted stroke is regenerated, the rest "
                        "kept. Instead of painting, or as well, add a mask picture of the image's "
                        "size, white where to regenerate (as `sample_ear.py --edit IMAGE --mask "
                        "MASK`).")
            with gr.Row():
                editor = gr.ImageEditor(label="Image; paint the region to regenerate",
                                        type="numpy", image_mode="RGBA", format="png",
                                        brush=gr.Brush(colors=["#ffffff", "#ff3366"],
                                                       default_size=24),
                                        transforms=("crop",), elem_id="edit_image")
                mask = gr.Image(label="Mask picture (optional; white: regenerate)", type="numpy",
                                image_mode="L", format="png", sources=["upload"],
                                elem_id="edit_mask")
            e_classes, e_cfg, e_temp, e_steps, e_seed, e_count = settings("edit",
                                                                          "Completions per class")
            with gr.Row():
                e_rule = gr.Radio(["all", "any"], value="all", elem_id="edit_rule",
                                  label="Keep a token when all / any of its pixels are unpainted "
                                  "(--mask_rule)")
                e_paste = gr.Checkbox(False, elem_id="edit_paste",
                                      label="Paste the kept pixels back over the completions "
                                      "(--paste; a VAE changes the pixels it re-encodes)")
            with gr.Row():
                e_input = gr.Button("Use a sample of the first class as the image",
                                    elem_id="edit_sample_input")
                e_button = gr.Button("Complete", variant="primary", elem_id="edit_run")
            e_grid = gr.Image(label="Completions: a row per class, after the input and the mask",
                              format="png", interactive=False, elem_id="edit_grid")
            e_note = gr.Markdown(elem_id="edit_note")

        loaded_outputs = [info, s_classes, s_steps, e_classes, e_steps]
        load_button.click(shown(load), source_box, loaded_outputs)
        blocks.load(shown(open_page), source_box, loaded_outputs)
        s_button.click(shown(demo.sample), [source_box, s_classes, s_cfg, s_temp, s_steps, s_seed,
                                            s_count], [s_grid, s_note])
        e_input.click(shown(sample_input), [source_box, e_classes, e_cfg, e_temp, e_steps, e_seed],
                      editor)
        e_button.click(shown(edit), [source_box, editor, mask, e_classes, e_cfg, e_temp, e_steps,
                                     e_seed, e_count, e_rule, e_paste], [e_grid, e_note])
    return blocks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resume", default="", help="the model shown first (changeable in the page): "
                   "a run folder, an exported folder or a Hugging Face Hub repo id")
    p.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.device == "cuda" and not torch.cuda.is_available()
                          else args.device)
    set_up_cuda(device, tf32=True)  # as sample_ear.py samples
    page(Demo(device, args.revision), args.resume).queue().launch(
        server_name=args.host, server_port=args.port, show_error=False)


if __name__ == "__main__":
    main()
