"""Editing measured on the digits: complete held-out digits from part of their pixels.

    python main_ear.py @configs/digits_quickstart.args            # the quick start's checkpoint
    python benchmarks/edit_digits.py --resume output_digits --out output_edit   # ~5 min, 2 cores

Held-out digits (--per_class of each class) with one region to regenerate: the bottom half, the
right half, or the centre 4x4 square (8, 8 and 4 of the 16 tokens). Each is completed
(what sample_ear.py --edit_npz runs) (a) as its own class and (b) as another class (image i of
class y as class (y + 1 + i mod 9) mod 10, so every other class equally often), at cfg 1 and 2.
Scored by the quick start's classifier: accuracy for the requested class, Frechet distance to
the held-out real digits; also the mean absolute difference from the real digit over the
regenerated pixels, and the share of completions whose kept pixels are exactly the input's. Baseline: a digit of the requested class drawn from nothing (the ordinary sampler)
with the kept pixels pasted over it, which is what editing without the model's help gives.
Writes edit.json, edit.md (the table) and edit.png (one row per case) to --out.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_ear import complete, generate  # noqa: E402
from util.builders import make_tokenizer  # noqa: E402
from util.pretrained import load_sampling_model  # noqa: E402
from util.digits import DigitClassifier, digits_split  # noqa: E402
from util.editing import paste, to_unit  # noqa: E402
from util.images import save_grid, to_uint8  # noqa: E402

REGIONS = {"bottom half": (slice(4, 8), slice(0, 8)), "right half": (slice(0, 8), slice(4, 8)),
           "centre square": (slice(2, 6), slice(2, 6))}


def held_out(per_class: int) -> tuple:
    """The first `per_class` held-out digits of each class: uint8 (N, 8, 8), labels (N,)."""
    _, _, images, labels = digits_split()
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return images[picks], labels[picks]


def baseline(model, tokenizer, images, keep, labels, args, device) -> torch.Tensor:
    """Digits of the requested classes from nothing, the kept pixels pasted over them."""
    drawn = torch.cat([generate(model, tokenizer.decode, chunk, args.cfg, 1.0, args, device).cpu()
                       for chunk in labels.split(args.eval_bsz)])
    return paste(drawn.float(), images, keep)


def score(done: np.ndarray, images: np.ndarray, keep: np.ndarray, requested: np.ndarray,
          classifier: DigitClassifier) -> dict:
    """The classifier's scores, the share of completions whose kept pixels are the input's, and
    the mean absolute difference from the real digit over the regenerated pixels (0-255 scale:
    how well the completion continues the kept part; meaningful for the digit's own class)."""
    exact = (done == images) | ~keep
    error = np.abs(done.astype(float) - images)[~keep].mean()
    return {**classifier.quality(done, requested), "region_error": float(error),
            "kept_exact": float(exact.reshape(len(done), -1).all(axis=1).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resume", default="output_digits", help="the quick start's run folder")
    p.add_argument("--per_class", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("output_edit"))
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    # What sample_ear.py --edit_npz would be given: the quick start's sampling settings.
    args = argparse.Namespace(num_iter=16, cfg=1.0, cfg_schedule="linear", infer_temperature=1.0,
                              precision="fp32", eval_bsz=500, mask_rule="all", paste=False)
    device = torch.device("cpu")
    model, settings, epoch = load_sampling_model(opts.resume)
    model.eval()
    tokenizer = make_tokenizer({**vars(settings), "use_cached": False}, device)
    classifier = DigitClassifier()
    digits, own = held_out(opts.per_class)
    other = (own + 1 + np.arange(len(own)) % 9) % 10
    images = to_unit(digits)
    opts.out.mkdir(parents=True, exist_ok=True)
    rows, pictures = [], []
    for region, (ys, xs) in REGIONS.items():
        keep = np.ones_like(digits, bool)
        keep[:, ys, xs] = False
        for case, requested in (("own class", own), ("another class", other)):
            labels = torch.from_numpy(requested).long()
            for cfg in (1.0, 2.0):
                args.cfg = cfg
                for method in ("editing", "baseline"):
                    torch.manual_seed(opts.seed)
                    fill = complete if method == "editing" else baseline
                    done = to_uint8(fill(model, tokenizer, images, torch.from_numpy(keep), labels,
                                         args, device))[..., 0]
                    rows.append({"region": region, "case": case, "cfg": cfg, "method": method,
                                 **score(done, digits, keep, requested, classifier)})
                    if method == "editing" and cfg == 2.0:
                        shown = digits[:10 * opts.per_class:opts.per_class].copy()
                        shown[:, ys, xs] = shown[:, ys, xs] // 4  # the region to regenerate, dimmed
                        pictures.append(np.concatenate([shown, done[::opts.per_class]]))
            print(json.dumps(rows[-4:]), flush=True)
    (opts.out / "edit.json").write_text(json.dumps({"epoch": epoch, "rows": rows}, indent=2))
    lines = ["| region | as | method | accuracy cfg 1 / 2 | Frechet cfg 1 / 2 | error in the region "
             "cfg 1 / 2 | kept pixels exact |", "|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 4):
        for method in ("editing", "baseline"):
            one, two = (r for r in rows[i:i + 4] if r["method"] == method)
            lines.append(f"| {one['region']} | {one['case']} | {method} | {one['accuracy']:.3f} / "
                         f"{two['accuracy']:.3f} | {one['frechet']:.2f} / {two['frechet']:.2f} | "
                         f"{one['region_error']:.1f} / {two['region_error']:.1f} | "
                         f"{one['kept_exact']:.2f} / {two['kept_exact']:.2f} |")
    (opts.out / "edit.md").write_text("\n".join(lines) + "\n")
    # One row per case: the ten inputs (region dimmed) above their completions at cfg 2.
    save_grid(np.concatenate(pictures)[..., None], 10, opts.out / "edit.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
