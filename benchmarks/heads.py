"""The paper's comparison at CPU scale: the energy, diffusion and Gaussian-mixture heads on one
Transformer, trained on the built-in digits with the same budgets and seed.

    python benchmarks/heads.py                                         # ~1 hour on 2 idle CPU cores
    python benchmarks/heads.py --epochs 1 --diffusion_steps 5 --out /tmp/heads   # a smoke run

Everything goes through the user's commands: for each head and each budget in --epochs,
`main_ear.py @configs/digits_quickstart.args --head NAME --epochs E` (ear_tiny, seed 0; after
training, 100 images per class without guidance and with cfg 2.0, scored by the quick start's
classifier); then, for the diffusion head at the largest budget, `main_ear.py --evaluate
--num_sampling_steps N` for each N of the sweep. A run that finished (its metrics.json is
written) and a sweep point already in its eval_results.jsonl are kept, so an interrupted
benchmark picks up where it stopped; --fresh starts over. Writes to --out: heads.json,
heads.md (the tables) and heads.png (a block of rows per head, one row per class, cfg 2.0, at
each head's default settings and the largest budget).
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


def results(out: Path) -> list:
    path = out / "eval_results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(head: str, epochs: int, out: Path, seed: int) -> dict:
    """Train one head for one budget (the quick start's evaluation runs at the end); its
    metrics.json. A finished run in `out` is kept."""
    if not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)  # no rows or checkpoints from an unfinished run
        main_ear("--head", head, "--epochs", epochs, "--seed", seed,
                 "--output_dir", out, "--log_dir", out)
    return json.loads((out / "metrics.json").read_text())


def sweep(out: Path, steps: list, seed: int) -> None:
    """Evaluate the diffusion run in `out` at each sampling-step count, cfg 1 and 2."""
    done = {(r.get("num_sampling_steps"), r["cfg"]) for r in results(out)}
    for n in steps:
        for cfg in (1.0, 2.0):
            if (n, cfg) not in done:
                main_ear("--head", "diffusion", "--output_dir", out, "--resume", out, "--evaluate",
                         "--num_sampling_steps", n, "--cfg", cfg, "--seed", seed)


def run_head(head: str, args) -> list:
    """Every budget of one head; the rows of the tables."""
    rows = []
    for epochs in args.epochs:
        out = args.out / head / f"epochs{epochs}"
        summary = train(head, epochs, out, args.seed)
        if epochs == max(args.epochs):
            shutil.copy(summary["results"][-1]["grid"], args.out / f"grid-{head}.png")  # cfg 2.0
            if head == "diffusion":
                sweep(out, args.diffusion_steps, args.seed)
        settings = settings_from_checkpoint(load_training_checkpoint(out / "checkpoint-last.pth")["args"])
        head_params = sum(q.numel() for q in build_model(settings).head.parameters())
        steps = epochs * (TRAIN_DIGITS // settings.batch_size)
        rows += [{"head": head, "epochs": epochs, "sampling_steps": r.get("num_sampling_steps", "-"),
                  "cfg": r["cfg"], "accuracy": r["accuracy"], "frechet": r["frechet"],
                  "seconds_per_image": r["seconds_per_image"],
                  "train_seconds_per_step": summary["train_seconds"] / steps,
                  "head_parameters": head_params} for r in results(out)]
    return rows


def default_rows(rows: list) -> list:
    """Each head at its default sampling settings: the rows written by the training run."""
    return [r for r in rows if r["head"] != "diffusion" or r["sampling_steps"] == 100]


def budget_table(rows: list) -> str:
    """Accuracy / Frechet distance per head and budget, without guidance and with cfg 2."""
    budgets = sorted({r["epochs"] for r in rows})
    lines = ["| head | " + " | ".join(f"{e} epochs, cfg 1 | {e} epochs, cfg 2" for e in budgets) + " |",
             "|---|" + "---|" * 2 * len(budgets)]
    for head in HEADS:
        cells = {(r["epochs"], r["cfg"]): f"{r['accuracy']:.3f} / {r['frechet']:.2f}"
                 for r in default_rows(rows) if r["head"] == head}
        lines.append(f"| {head} | " + " | ".join(cells.get((e, c), "") for e in budgets
                                                  for c in (1.0, 2.0)) + " |")
    return "\n".join(lines) + "\n"


def full_table(rows: list, ceiling: dict) -> str:
    """Every row of the largest budget, with timings and sizes."""
    lines = ["| head | sampling steps | cfg | accuracy | Frechet distance | s / image | train s / step | head parameters |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (HEADS.index(r["head"]), str(r["sampling_steps"]).zfill(5), r["cfg"])):
        lines.append(f"| {r['head']} | {r['sampling_steps']} | {r['cfg']} | {r['accuracy']:.3f} | "
                     f"{r['frechet']:.2f} | {r['seconds_per_image']:.4f} | "
                     f"{r['train_seconds_per_step']:.3f} | {r['head_parameters']:,} |")
    lines.append(f"| held-out real digits | | | {ceiling['accuracy']:.3f} | {ceiling['frechet']:.2f} | | | |")
    return "\n".join(lines) + "\n"


def equal_quality(rows: list, ceiling: dict) -> dict:
    """Without guidance: the fewest diffusion sampling steps whose samples are at least as
    good as the energy head's, and the energy head's sampling speed-up over it there. At least
    as good: a Frechet distance no larger and an accuracy no lower, accuracy counted only up to
    the held-out real digits' (samples more recognisable than real digits are not better
    samples; the energy head's are). None where no step count of the sweep gets there."""
    energy = next(r for r in rows if r["head"] == "energy" and r["cfg"] == 1.0)
    accuracy = min(energy["accuracy"], ceiling["accuracy"])
    good = sorted((r for r in rows if r["head"] == "diffusion" and r["cfg"] == 1.0
                   and r["accuracy"] >= accuracy and r["frechet"] <= energy["frechet"]),
                  key=lambda r: r["sampling_steps"])
    if not good:
        return {"diffusion_steps": None, "energy_speedup": None}
    return {"diffusion_steps": good[0]["sampling_steps"],
            "energy_speedup": good[0]["seconds_per_image"] / energy["seconds_per_image"]}


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
    p.add_argument("--epochs", type=int, nargs="+", default=[20, 40, 80],
                   help="training budgets (the quick start's is 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diffusion_steps", type=int, nargs="+", default=[10, 25, 250, 500, 1000],
                   help="the diffusion head's sampling steps to sweep at the largest budget, "
                        "besides its default 100")
    p.add_argument("--out", type=Path, default=Path("output_heads"))
    p.add_argument("--fresh", action="store_true", help="discard finished runs in --out first")
    args = p.parse_args()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for head in HEADS for row in run_head(head, args)]
    largest = [r for r in rows if r["epochs"] == max(args.epochs)]
    ceiling = json.loads((args.out / "energy" / f"epochs{max(args.epochs)}" / "metrics.json")
                         .read_text())["results"][0]["ceiling"]
    match = equal_quality(largest, ceiling)
    text = budget_table(rows) + "\n" + full_table(largest, ceiling) + "\n" + (
        f"without guidance, the diffusion head matches the energy head from "
        f"{match['diffusion_steps']} sampling steps, where the energy head samples "
        f"{match['energy_speedup']:.1f}x faster\n" if match["diffusion_steps"] else
        "without guidance, no sampling-step count of the sweep matches the energy head\n")
    (args.out / "heads.md").write_text(text)
    (args.out / "heads.json").write_text(json.dumps(
        {"settings": {"config": CONFIG.name, "epochs": args.epochs, "seed": args.seed},
         "ceiling": ceiling, "equal_quality": match, "rows": rows}, indent=2) + "\n")
    print(text + f"\npicture: {picture(args.out)}")


if __name__ == "__main__":
    main()
