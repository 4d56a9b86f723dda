"""Draw samples from a trained EAR and save them as one grid (a row per class).

    python sample_ear.py --resume ${OUTPUT_DIR} --class_ids 207 360 387 974 \
        --samples_per_class 8 --cfg 3.0 --infer_temperature 0.7 --num_iter 64 --out samples.png

The network (size, head, tokenizer) comes from the checkpoint's saved arguments; it loads the
EMA weights (--no_ema: the raw ones). Network flags given anyway are checked against the
checkpoint when they shape the weights (e.g. --model) and used otherwise (e.g. the diffusion
head's --num_sampling_steps); training flags (e.g. from @configs/digits_quickstart.args) are
ignored.
--save_individual DIR also writes every image.
"""
import argparse
from pathlib import Path

import torch

from engine_ear import generate
from util import pretrained
from util.args import (ArgsFileParser, add_device_args, add_precision_arg, add_sampling_args,
                       add_vae_path_arg, architecture_flags, check_positive, check_sampling_args,
                       explicit_flags, network_settings, train_parser)
from util.builders import build_model, make_tokenizer, settings_from_checkpoint
from util.settings import check_same_config, check_settings_fit
from util.errors import one_line_errors
from util.fileio import check_writable
from util.images import save_grid, save_png, to_uint8
from util.precision import set_up_cuda
from util.weights import load_state_dict_strict


def parser() -> ArgsFileParser:
    p = ArgsFileParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("checkpoint")
    g.add_argument("--resume", required=True,
                   help="a folder with checkpoint-last.pth, an exported folder (model.safetensors "
                        "+ config.json, export_ear.py) or a Hugging Face Hub repo id (user/name)")
    g.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit")
    g.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    add_vae_path_arg(g)
    g = p.add_argument_group("sampling")
    g.add_argument("--class_ids", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="classes to draw, one grid row each (the dataset's ids, also for a model "
                        "trained on --classes)")
    g.add_argument("--samples_per_class", type=int, default=8)
    add_sampling_args(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="samples.png", help="grid PNG to write")
    g.add_argument("--save_individual", default="", help="also write every image to this folder")
    g = p.add_argument_group("system")
    add_device_args(g)
    add_precision_arg(g)
    return p


def parse_args(argv=None) -> tuple:
    """(sampling args, the other training flags given). Words neither parser knows are errors."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    given, unknown = explicit_flags(train_parser(), rest)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, given


def load_checkpoint(args, given: dict) -> tuple:
    """(model with the weights of --resume, its training settings, epoch). Every file is
    checked, and the settings compared with the weights' shapes, before the network is built:
    a bad file raises ValueError (or FileNotFoundError) naming it and the key."""
    saved, state, epoch, source = pretrained.read(args.resume, args.revision, not args.no_ema)
    settings = settings_from_checkpoint(saved)
    shaping = {n: v for n, v in given.items() if n in architecture_flags(settings.head)}
    check_same_config(saved, argparse.Namespace(**shaping), shaping, source)
    # Other settings of the network may change, e.g. the diffusion head's --num_sampling_steps.
    overrides = {n: v for n, v in given.items() if n in network_settings(settings.head)
                 and n not in shaping}
    vars(settings).update({**shaping, **overrides})
    check_settings_fit(settings, state, source)
    model = build_model(settings)
    load_state_dict_strict(model, state, source)
    ignored = sorted(set(given) - set(shaping) - set(overrides))
    if ignored:
        print(f"note: ignoring training flags {', '.join('--' + n for n in ignored)}: the network "
              f"comes from {source}")
    return model, settings, epoch


def model_labels(class_ids: list, settings) -> torch.Tensor:
    """The model's labels for --class_ids, which are the dataset's class ids: for a model
    trained on `--classes`, its label i is the dataset's class classes[i]."""
    classes = getattr(settings, "dataset_classes", None) or list(range(settings.class_num))
    missing = [c for c in class_ids if c not in classes]
    if missing:
        raise SystemExit(f"error: --class_ids {missing} are not among the checkpoint's classes "
                         f"({classes if len(classes) <= 20 else f'0..{len(classes) - 1}'})")
    return torch.tensor([classes.index(c) for c in class_ids])


def check_outputs(args) -> None:
    """--out (a picture file PIL can write) and --save_individual, before anything is loaded."""
    from PIL import Image
    check_writable(args.out, "--out")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: no picture file extension (expected e.g. .png)")
    if args.save_individual:
        check_writable(args.save_individual, "--save_individual", folder=True)


def set_up(args, given: dict, device) -> tuple:
    """(model on `device`, tokenizer, the model's labels of the images, settings, epoch), every
    flag and file checked first; a bad one ends the process with one line."""
    check_sampling_args(args)
    check_positive(args, "samples_per_class")
    with one_line_errors():
        check_outputs(args)
        model, settings, epoch = load_checkpoint(args, given)
        if args.num_iter > model.seq_len:
            raise ValueError(f"--num_iter {args.num_iter}: the checkpoint's images have "
                             f"{model.seq_len} tokens (expected at most one step per token)")
        labels = model_labels(args.class_ids, settings)
        tokenizer = make_tokenizer({**vars(settings), "vae_path": args.vae_path,
                                    "use_cached": False}, device)
    return model.to(device).eval(), tokenizer, labels, settings, epoch


def main(args, given: dict) -> None:
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    set_up_cuda(device, tf32=True)  # as main_ear.py --evaluate samples by default (--tf32)
    torch.manual_seed(args.seed)
    model, tokenizer, labels, settings, epoch = set_up(args, given, device)
    labels = labels.repeat_interleave(args.samples_per_class)
    images = torch.cat([generate(model, tokenizer.decode, chunk, args.cfg, args.infer_temperature,
                                 args, device)
                        for chunk in labels.split(args.eval_bsz)])
    images = to_uint8(images)
    grid = save_grid(images, args.samples_per_class, args.out)
    if args.save_individual:
        folder = Path(args.save_individual)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels.tolist())):
            row, col = divmod(i, args.samples_per_class)
            save_png(img, folder / f"row{row:02d}_class{label:04d}_{col:02d}.png")
    print(f"{settings.model} ({settings.head} head), epoch {epoch} checkpoint, cfg {args.cfg}, "
          f"temperature {args.infer_temperature}, {args.num_iter} steps: wrote {grid} "
          f"({len(args.class_ids)} classes x {args.samples_per_class})")


if __name__ == "__main__":
    main(*parse_args())
