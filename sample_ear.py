"""Draw samples from a trained EAR and save them as one grid (a row per class).

    python sample_ear.py --resume ${OUTPUT_DIR} --class_ids 207 360 387 974 \
        --samples_per_class 8 --cfg 3.0 --infer_temperature 0.7 --num_iter 64 --out samples.png

The network (size, head, tokenizer) comes from the checkpoint's saved arguments; it loads the
EMA weights (--no_ema: the raw ones). Network flags given anyway are checked against the
checkpoint when they shape the weights (e.g. --model) and used otherwise (e.g. the diffusion
head's --num_sampling_steps); training flags (e.g. from @configs/digits_quickstart.args) are
ignored.
--save_individual DIR also writes every image.

Editing (docs/editing.md): `--edit IMAGE --mask MASK` (white: regenerate) completes the image
as each of --class_ids (its own class: inpainting; another: re-classing the region),
--samples_per_class times; the grid's rows start with the input and the mask. `--edit_npz FILE`
completes many (`images`, `masks`, `labels`) and writes them with `completions` to --out (.npz).
"""
from pathlib import Path

import numpy as np
import torch

from engine_ear import complete, generate
from util.args import (ArgsFileParser, add_device_args, add_precision_arg, add_sampling_args,
                       add_vae_path_arg, check_positive, check_sampling_args, explicit_flags,
                       train_parser)
from util.builders import make_tokenizer, model_labels
from util.errors import one_line_errors
from util.editing import (MASK_RULES, check_npz_out, check_token_mask, read_edit, read_edit_npz,
                          token_mask)
from util.fileio import atomic_write, check_writable
from util.images import save_grid, save_png, to_uint8
from util.precision import set_up_cuda
from util.pretrained import load_sampling_model


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
    g = p.add_argument_group("editing (docs/editing.md)")
    g.add_argument("--edit", default="", help="complete this image (PNG/JPEG) instead of drawing "
                   "from nothing; other sizes are centre-cropped as training images are")
    g.add_argument("--mask", default="", help="with --edit: a picture of its size, white where "
                   "to regenerate, black where to keep")
    g.add_argument("--edit_npz", default="",
                   help="complete many: an .npz with images (N,H,W,3 or N,H,W uint8), masks "
                        "(N,H,W bool, True: regenerate) and labels (N,); --out gets an .npz")
    g.add_argument("--mask_rule", default="all", choices=MASK_RULES,
                   help="a token is kept when all (default) / any of its pixels are kept")
    g.add_argument("--paste", action="store_true",
                   help="paste the kept pixels back over the decoded completion (a VAE changes "
                        "the pixels it re-encodes)")
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


def check_outputs(args) -> None:
    """--out (a picture file PIL can write) and --save_individual, before anything is loaded."""
    from PIL import Image
    check_writable(args.out, "--out")
    if args.edit_npz:
        check_npz_out(args.out)
    elif Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: no picture file extension (expected e.g. .png)")
    if args.save_individual:
        check_writable(args.save_individual, "--save_individual", folder=True)


def set_up(args, given: dict, device) -> tuple:
    """(model on `device`, tokenizer, the model's labels of the images, settings, epoch), every
    flag and file checked first; a bad one ends the process with one line."""
    check_sampling_args(args)
    check_positive(args, "samples_per_class")
    if bool(args.edit) != bool(args.mask) or (args.edit and args.edit_npz):
        raise SystemExit("error: --edit IMAGE needs --mask MASK (and the other way round); "
                         "--edit_npz takes the place of both")
    with one_line_errors():
        check_outputs(args)
        model, settings, epoch = load_sampling_model(args.resume, args.revision, not args.no_ema,
                                                     given)
        if args.num_iter > model.seq_len:
            raise ValueError(f"--num_iter {args.num_iter}: the checkpoint's images have "
                             f"{model.seq_len} tokens (expected at most one step per token)")
        labels = None if args.edit_npz else model_labels(args.class_ids, settings)
        tokenizer = make_tokenizer({**vars(settings), "vae_path": args.vae_path,
                                    "use_cached": False}, device)
    return model.to(device).eval(), tokenizer, labels, settings, epoch


def edit_image(model, tokenizer, labels: torch.Tensor, settings, args, device) -> str:
    """--edit/--mask: one grid row per class, [input, mask, completions]; returns a summary."""
    image, keep = read_edit(args.edit, args.mask, settings.img_size, tokenizer.image_channels)
    token_keep = token_mask(keep, settings.img_size // model.seq_h, args.mask_rule)
    check_token_mask(token_keep, f"--mask {args.mask}")
    n = len(labels) * args.samples_per_class
    completions = complete(model, tokenizer, image.expand(n, -1, -1, -1), keep.expand(n, -1, -1),
                           labels.repeat_interleave(args.samples_per_class), args, device)
    shown_mask = (~keep[:, None]).float().mul(2).sub(1).expand_as(image)  # white: regenerated
    rows = [torch.cat([image, shown_mask, chunk]) for chunk in completions.split(args.samples_per_class)]
    grid = save_grid(to_uint8(torch.cat(rows)), args.samples_per_class + 2, args.out)
    kept = int(token_keep.sum())
    return (f"completed {args.edit} ({kept} of {model.seq_len} tokens kept): wrote {grid} "
            f"({len(labels)} classes x {args.samples_per_class}, after the input and the mask)")


def edit_npz(model, tokenizer, settings, args, device) -> str:
    """--edit_npz: every image completed --samples_per_class times as its label; --out gets the
    input arrays and `completions` (N, samples_per_class, H, W[, C]) uint8."""
    images, keep, class_ids, arrays = read_edit_npz(args.edit_npz, settings.img_size,
                                                    tokenizer.image_channels)
    check_token_mask(token_mask(keep, settings.img_size // model.seq_h, args.mask_rule),
                     f"--edit_npz {args.edit_npz}")
    labels = model_labels(class_ids.tolist(), settings)
    s = args.samples_per_class
    completions = complete(model, tokenizer, images.repeat_interleave(s, 0),
                           keep.repeat_interleave(s, 0), labels.repeat_interleave(s), args, device)
    out = to_uint8(completions)
    out = out.reshape(len(images), s, *out.shape[1:])
    if out.shape[-1] == 1:
        out = out[..., 0]
    atomic_write(Path(args.out), lambda f: np.savez(f, **arrays, completions=out))
    return f"completed {len(images)} images x {s} from {args.edit_npz}: wrote {args.out}"


def main(args, given: dict) -> None:
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    set_up_cuda(device, tf32=True)  # as main_ear.py --evaluate samples by default (--tf32)
    model, tokenizer, labels, settings, epoch = set_up(args, given, device)
    torch.manual_seed(args.seed)  # after building the network: its initial draws do not count
    if args.edit or args.edit_npz:
        with one_line_errors():
            done = (edit_image(model, tokenizer, labels, settings, args, device) if args.edit
                    else edit_npz(model, tokenizer, settings, args, device))
        print(f"{settings.model} ({settings.head} head), epoch {epoch} checkpoint, cfg {args.cfg}, "
              f"temperature {args.infer_temperature}, {args.num_iter} steps: {done}")
        return
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
