"""Draw samples from a trained EAR and save them as one grid (a row per class).

    python sample_ear.py --resume ${OUTPUT_DIR} --model ear_base --class_ids 207 360 387 974 \
        --samples_per_class 8 --cfg 3.0 --infer_temperature 0.7 --num_iter 64 --out samples.png

Uses the checkpoint's EMA weights (--no_ema: the raw ones). Model flags must match training
(they are checked against the checkpoint). --save_individual DIR also writes every image.
"""
from pathlib import Path

import torch

from engine_ear import generate
from main_ear import build_decoder, build_model, resolve_args
from models.vae import load_vae
from util.args import MODEL_ARGS, train_parser
from util.checkpoint import load_sampling_weights
from util.distributed import DistInfo
from util.images import save_grid, save_png, to_uint8


def parser():
    p = train_parser()
    p.description = __doc__.split("\n")[0]
    g = p.add_argument_group("sampling")
    g.add_argument("--class_ids", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="classes to draw, one grid row each")
    g.add_argument("--samples_per_class", type=int, default=8)
    g.add_argument("--out", default="samples.png", help="grid PNG to write")
    g.add_argument("--save_individual", default="", help="also write every image to this folder")
    g.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    return p


def main(args) -> None:
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    resolve_args(args, DistInfo(device=device))
    torch.manual_seed(args.seed)
    model = build_model(args).to(device).eval()
    try:
        epoch = load_sampling_weights(model, args.resume, args, MODEL_ARGS, use_ema=not args.no_ema)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    vae = load_vae(args.vae_path, args.vae_embed_dim).to(device) if args.tokenizer == "vae" else None
    decode = build_decoder(args, vae)
    labels = torch.tensor(args.class_ids).repeat_interleave(args.samples_per_class)
    images = torch.cat([generate(model, decode, chunk, args.cfg, args, device)
                        for chunk in labels.split(args.eval_bsz)])
    images = to_uint8(images)
    grid = save_grid(images, args.samples_per_class, args.out)
    if args.save_individual:
        folder = Path(args.save_individual)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels.tolist())):
            row, col = divmod(i, args.samples_per_class)
            save_png(img, folder / f"row{row:02d}_class{label:04d}_{col:02d}.png")
    print(f"epoch {epoch} checkpoint, cfg {args.cfg}, temperature {args.infer_temperature}, "
          f"{args.num_iter} steps: wrote {grid} ({len(args.class_ids)} classes x {args.samples_per_class})")


if __name__ == "__main__":
    main(parser().parse_args())
