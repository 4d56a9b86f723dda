"""The paper's comparison at CPU scale: the energy, diffusion and Gaussian-mixture heads on one
Transformer, trained on the built-in digits with the same budget and seed.

    python benchmarks/heads.py                               # ~25 minutes on 2 idle CPU cores
    python benchmarks/heads.py --epochs 1 --diffusion_steps 5 --out /tmp/heads   # a smoke run

Everything goes through the user's commands: for each head, `main_ear.py
@configs/digits_quickstart.args --head NAME` (ear_tiny, 80 epochs, seed 0; after training, 100
images per class without guidance and with cfg 2.0, scored by the quick start's classifier),
then, for the diffusion head, `main_ear.py --evaluate --num_sampling_steps N` for each N of the
sweep. Writes to --out: heads.json, heads.md (the table) and heads.png (a block of rows per
head, one row per class, cfg 2.0, at each head's default settings).
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.builders import build_model, settings_from_checkpoint  # noqa: E402
from util.checkpoint import load_training_checkpoint  # noqa: E402

CONFIG = REPO / "configs" / "digits_quickstart.args"
HEADS = ("energy", "diffusion", "gmm")
TRAIN_DIGITS = 1437  # the quick start's training split


def main_ear(*flags) -> None:
    subprocess.run([sys.executable, str(REPO / "main_ear.py"), f"@{CONFIG}", *map(str, flags)],
                   check=True, cwd=REPO)


def summary_settings(out: Path):
    """The training flags saved in the run's checkpoint."""
    return settings_from_checkpoint(load_training_checkpoint(out / "checkpoint-last.pth")["args"])


def results(out: Path) -> list:
    return [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]


def run_head(head: str, args) -> list:
    """Train one head (with the quick start's evaluation at the end); rows of the table."""
    out = args.out / head
    shutil.rmtree(out, ignore_errors=True)  # no rows or checkpoints from an earlier run
    main_ear("--head", head, "--epochs", args.epochs, "--seed", args.seed,
             "--output_dir", out, "--log_dir", out)
    summary = json.loads((out / "metrics.json").read_text())
    shutil.copy(summary["results"][-1]["grid"], args.out / f"grid-{head}.png")  # cfg 2.0
    if head == "diffusion":
        for steps in args.diffusion_steps:
            for cfg in (1.0, 2.0):
                main_ear("--head", head, "--output_dir", out, "--resume", out, "--evaluate",
                         "--num_sampling_steps", steps, "--cfg", cfg, "--seed", args.seed)
    settings = summary_settings(out)
    head_params = sum(q.numel() for q in build_model(settings).head.parameters())
    steps = args.epochs * (TRAIN_DIGITS // settings.batch_size)
    return [{"head": head, "sampling_steps": r.get("num_sampling_steps", "-"), "cfg": r["cfg"],
             "accuracy": r["accuracy"], "frechet": r["frechet"],
             "seconds_per_image": r["seconds_per_image"],
             "train_seconds_per_step": summary["train_seconds"] / steps,
             "head_parameters": head_params} for r in results(out)]


def table(rows: list, ceiling: dict) -> str:
    lines = ["| head | sampling steps | cfg | accuracy | Frechet distance | s / image | train s / step | head parameters |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (HEADS.index(r["head"]), str(r["sampling_steps"]).zfill(5), r["cfg"])):
        lines.append(f"| {r['head']} | {r['sampling_steps']} | {r['cfg']} | {r['accuracy']:.3f} | "
                     f"{r['frechet']:.2f} | {r['seconds_per_image']:.4f} | "
                     f"{r['train_seconds_per_step']:.3f} | {r['head_parameters']:,} |")
    lines.append(f"| held-out real digits | | | {ceiling['accuracy']:.3f} | {ceiling['frechet']:.2f} | | | |")
    return "\n".join(lines) + "\n"


def picture(out: Path) -> Path:
    """The heads' cfg-2.0 grids stacked, each under its name."""
    import numpy as np
    from PIL import Image, ImageDraw
    tiles = []
    for head in HEADS:
        grid = Image.open(out / f"grid-{head}.png").convert("L")
        label = Image.new("L", (grid.width, 12), 255)
        ImageDraw.Draw(label).text((2, 0), head, fill=0)
        tiles += [np.asarray(label), np.asarray(grid)]
    picture = Image.fromarray(np.concatenate(tiles))
    path = out / "heads.png"
    picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST).save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=80, help="training budget (the quick start's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diffusion_steps", type=int, nargs="+", default=[10, 25, 250, 500, 1000],
                   help="the diffusion head's sampling steps to sweep, besides its default 100")
    p.add_argument("--out", type=Path, default=Path("output_heads"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for head in HEADS for row in run_head(head, args)]
    ceiling = json.loads((args.out / "energy" / "metrics.json").read_text())["results"][0]["ceiling"]
    text = table(rows, ceiling)
    (args.out / "heads.md").write_text(text)
    (args.out / "heads.json").write_text(json.dumps(
        {"settings": {"config": CONFIG.name, "epochs": args.epochs, "seed": args.seed},
         "ceiling": ceiling, "rows": rows}, indent=2) + "\n")
    print(text + f"\npicture: {picture(args.out)}")


if __name__ == "__main__":
    main()
