"""The energy score's axes at CPU scale: draws per scoring N, exponent alpha, targets per token M.

    python benchmarks/energy_score.py                 # about 45 minutes on 2 CPU cores
    python benchmarks/energy_score.py --epochs 1 --out /tmp/es    # a smoke run, a few minutes

Every run is the quick start (`main_ear.py @configs/digits_quickstart.args`: ear_tiny on the
digits, --score_batch_mul 2, 1,000 samples scored without guidance and at cfg 2) with one axis
moved from the paper's setting (N 2, alpha 1, M 1):
- N in {2, 4, 8} (`--score_samples`) for --epochs, and N 4 and 8 again for the epochs that take
  N 2's training time (from the seconds per step the first runs measured);
- alpha in {0.5, 1.5} (`--alpha`);
- M in {1, 4, 16} (`--score_targets`), the targets drawn from the digits' dequantisation noise
  (`--target_dequantize 0.125`: 17 grey levels, 0.125 apart): M 1 is that noise alone;
- N 2 again with the seeds of --base_seeds, for the spread over training seeds that the other
  cells' differences are read against.
One thread per run, --jobs runs at once. A finished run (both evaluations written) is kept and a
stopped one resumes, so an interrupted benchmark continues where it stopped. Writes to --out:
energy_score.json (every run), energy_score.md (the table) and energy_score.png.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_quickstart.args"
TRAIN_DIGITS = 1437  # the quick start's training split
DEQUANTIZE = ("--target_dequantize", "0.125")
# name -> (axis, value, flags); the N 2 run is every axis's reference point.
RUNS = {
    "N2": ("N", 2, ()),
    "N4": ("N", 4, ("--score_samples", "4")),
    "N8": ("N", 8, ("--score_samples", "8")),
    "alpha0.5": ("alpha", 0.5, ("--alpha", "0.5")),
    "alpha1.5": ("alpha", 1.5, ("--alpha", "1.5")),
    "M1": ("M", 1, DEQUANTIZE),
    "M4": ("M", 4, (*DEQUANTIZE, "--score_targets", "4")),
    "M16": ("M", 16, (*DEQUANTIZE, "--score_targets", "16")),
}


def finished(out: Path, epochs: int) -> bool:
    """Both evaluations of a run of `epochs` epochs are written in `out`."""
    path = out / "eval_results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return len(rows) == 2 and all(r["epoch"] == epochs - 1 for r in rows)


def train(out: Path, flags: list) -> dict:
    """One quick-start run into `out` (kept if finished, resumed if stopped, started again if it
    had another budget); its record. Seconds per step are those of the process that finished the
    run: time a resumed run again from an empty folder."""
    epochs = int(flags[flags.index("--epochs") + 1])
    if not finished(out, epochs):
        if (out / "metrics.json").exists():  # finished with another budget
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run([sys.executable, str(REPO / "main_ear.py"), f"@{CONFIG}", *flags,
                            "--output_dir", str(out), "--log_dir", str(out), "--resume", str(out)],
                           check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    steps = epochs * (TRAIN_DIGITS // 64)  # the quick start's batch of 64
    record = {"flags": flags, "epochs": epochs, "seed": metrics["seed"],
              "train_seconds_per_step": metrics["train_seconds"] / steps,
              "ceiling": metrics["results"][0]["ceiling"]}
    for r in metrics["results"]:
        record[f"cfg{r['cfg']:g}"] = {"accuracy": r["accuracy"], "frechet": r["frechet"]}
    record["grid"] = metrics["results"][-1]["grid"]
    return record


def run_all(args) -> dict:
    """Every run of the benchmark: {name: record}."""
    common = ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    jobs = {name: [*common, *flags] for name, (_, _, flags) in RUNS.items()}
    jobs.update({f"N2_seed{s}": ["--epochs", str(args.epochs), "--seed", str(s)]
                 for s in args.base_seeds if s != args.seed})
    with ThreadPoolExecutor(args.jobs) as pool:
        # The N runs first: their seconds per step set the equal-time budgets.
        order = ["N2", "N4", "N8"] + [n for n in jobs if n not in ("N2", "N4", "N8")]
        futures = {name: pool.submit(train, args.out / name, jobs[name]) for name in order}
        records = {name: f.result() for name, f in futures.items()}
        base = records["N2"]["train_seconds_per_step"]
        timed = {}
        for n in (4, 8):
            epochs = max(1, round(args.epochs * base / records[f"N{n}"]["train_seconds_per_step"]))
            name = f"N{n}_time"
            flags = ["--epochs", str(epochs), "--seed", str(args.seed), "--score_samples", str(n)]
            timed[name] = pool.submit(train, args.out / name, flags)
        records.update({name: f.result() for name, f in timed.items()})
    return records


def cells(record: dict) -> str:
    return " | ".join(f"{record[c]['accuracy']:.3f} / {record[c]['frechet']:.2f}" for c in ("cfg1", "cfg2"))


def table(records: dict, seeds: list) -> str:
    lines = ["| axis | setting | epochs | accuracy / Frechet, cfg 1 | accuracy / Frechet, cfg 2 | "
             "train s / step |", "|---|---|---|---|---|---|"]
    rows = [("N", "2 (the paper)", "N2"), ("N", "4", "N4"), ("N", "8", "N8"),
            ("N", "4, N 2's time", "N4_time"), ("N", "8, N 2's time", "N8_time"),
            ("alpha", "0.5", "alpha0.5"), ("alpha", "1 (the paper; = N 2)", "N2"),
            ("alpha", "1.5", "alpha1.5"),
            ("M (dequantised)", "1", "M1"), ("M (dequantised)", "4", "M4"),
            ("M (dequantised)", "16", "M16")]
    for axis, setting, name in rows:
        r = records[name]
        lines.append(f"| {axis} | {setting} | {r['epochs']} | {cells(r)} | "
                     f"{r['train_seconds_per_step']:.3f} |")
    base = [records["N2"]] + [records[f"N2_seed{s}"] for s in seeds if f"N2_seed{s}" in records]
    if len(base) > 1:
        spread = []
        for cfg in ("cfg1", "cfg2"):
            for metric, digits in (("accuracy", 3), ("frechet", 2)):
                values = [r[cfg][metric] for r in base]
                spread.append(f"{statistics.fmean(values):.{digits}f} ± "
                              f"{statistics.stdev(values):.{digits}f}")
        lines.append(f"| N 2 over {len(base)} seeds | mean ± sd | {base[0]['epochs']} | "
                     f"{spread[0]} / {spread[1]} | {spread[2]} / {spread[3]} | |")
    ceiling = records["N2"]["ceiling"]
    lines.append(f"| held-out real digits | | | {ceiling['accuracy']:.3f} / {ceiling['frechet']:.2f} | | |")
    return "\n".join(lines) + "\n"


def picture(records: dict, seeds: list, path: Path) -> Path:
    """Frechet distance (cfg 1 and 2) along each axis, one panel per axis, on a log scale (the
    equal-time runs can be ten times worse), with N 2's range over the training seeds shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    axes = {"N (draws per scoring)": [("2", "N2"), ("4", "N4"), ("8", "N8")],
            "alpha": [("0.5", "alpha0.5"), ("1", "N2"), ("1.5", "alpha1.5")],
            "M (targets, dequantised)": [("1", "M1"), ("4", "M4"), ("16", "M16")]}
    base = [records["N2"]] + [records[f"N2_seed{s}"] for s in seeds if f"N2_seed{s}" in records]
    fig, panels = plt.subplots(1, 3, figsize=(11, 3.4), dpi=120, sharey=True)
    for ax, (title, points) in zip(panels, axes.items()):
        for cfg, colour in (("cfg1", "C0"), ("cfg2", "C1")):
            values = [r[cfg]["frechet"] for r in base]
            ax.axhspan(min(values), max(values), color=colour, alpha=0.12, lw=0,
                       label=f"N 2, {len(base)} seeds" if cfg == "cfg1" else None)
        for cfg, style in (("cfg1", "o-"), ("cfg2", "s--")):
            ax.plot([p for p, _ in points], [records[n][cfg]["frechet"] for _, n in points], style,
                    label=cfg.replace("cfg", "cfg "))
        if title.startswith("N"):
            for n, marker in (("N4_time", "4"), ("N8_time", "8")):
                ax.plot([marker], [records[n]["cfg1"]["frechet"]], "x", color="k",
                        label="cfg 1 at N 2's time" if n == "N4_time" else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    panels[0].set_yscale("log")
    panels[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    panels[0].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    panels[0].set_ylabel("Frechet distance (lower is better)")
    panels[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base_seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of the N 2 run, for the spread over training seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", type=Path, default=REPO / "output_energy_score")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    records = run_all(args)
    text = table(records, args.base_seeds)
    (args.out / "energy_score.md").write_text(text)
    (args.out / "energy_score.json").write_text(json.dumps(
        {"settings": {"config": CONFIG.name, "epochs": args.epochs, "seed": args.seed,
                      "base_seeds": args.base_seeds, "jobs": args.jobs}, "runs": records},
        indent=2) + "\n")
    print(text + f"\npicture: {picture(records, args.base_seeds, args.out / 'energy_score.png')}\n"
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
