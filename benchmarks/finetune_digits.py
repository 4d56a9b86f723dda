"""Fine-tuning against training from scratch, on a CPU, over seeds: the workflow of docs/finetune.md.

    python benchmarks/finetune_digits.py                 # 3 seeds; about 90 minutes on 2 CPU cores
    python benchmarks/finetune_digits.py --seeds 0 --budgets 1 --pretrain_epochs 1 \\
        --out /tmp/ft                                    # smoke test, a minute
    # the remedies of docs/finetune.md, at 20 epochs, beside the default:
    python benchmarks/finetune_digits.py --budgets 20 --variants scratch fixed warmup --name remedies \\
        --extra 'scratchwarm=--ema_warmup on'
    python benchmarks/finetune_digits.py --budgets 20 --seeds 0 --variants warmup --name remedies_seed0 \\
        --extra 'freeze=--finetune {pre} --freeze transformer' 'drop=--finetune {pre} --label_drop_prob 0.2'

Through the user's commands only (`main_ear.py @configs/digits_quickstart.args`), per seed:
1. pre-train on digits 0-4 (`--classes 0,1,2,3,4 --class_num 5`, --pretrain_epochs, that seed);
2. for each budget E in --budgets, train on digits 5-9 (`--classes 5,6,7,8,9 --class_num 5
   --epochs E`, that seed) once per variant: from scratch, and fine-tuned from step 1's checkpoint
   with each way of starting the new classes (VARIANTS). The same steps, data order and seed.
Each run ends with the quick start's evaluation: 200 samples per class (labelled 5-9) without
guidance and with cfg 2.0, scored by the classifier trained on real digits (accuracy; Frechet
distance to the held-out real 5-9s). Runs that finished are kept, so an interrupted benchmark
continues where it stopped. Writes NAME.json (every run, and the class embedding's norms) and
NAME.md (mean and sample standard deviation over the seeds) to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "digits_quickstart.args"
SOURCE = ("--classes", "0,1,2,3,4", "--class_num", "5")
TARGET = ("--classes", "5,6,7,8,9", "--class_num", "5")
# key -> (what the table calls it, flags of the runs on 5-9; {pre}: the seed's pre-trained run).
VARIANTS = {
    "scratch": ("from scratch", ()),
    "fixed": ("fine-tuned, EMA rate fixed (before)", ("--finetune", "{pre}", "--ema_warmup", "off")),
    "warmup": ("fine-tuned, EMA warm-up (default)", ("--finetune", "{pre}")),
}


def finished(out: Path) -> bool:
    path = out / "eval_results.jsonl"
    return path.is_file() and len(path.read_text().splitlines()) == 2


def main_ear(out: Path, flags: list) -> float:
    """One quick-start run with these flags into `out` (kept if it finished); its wall time.
    One thread per run: the numbers do not depend on --jobs, and two runs share 2 cores well."""
    record = out / "seconds.txt"
    if finished(out):
        return float(record.read_text()) if record.is_file() else float("nan")
    start = time.time()
    log = out.with_suffix(".log")
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        # --resume: a run stopped part-way continues from its last checkpoint.
        subprocess.run([sys.executable, str(REPO / "main_ear.py"), f"@{CONFIG}", *flags,
                        "--output_dir", str(out), "--log_dir", str(out), "--resume", str(out)],
                       check=True, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.time() - start
    record.write_text(f"{seconds:.1f}")
    return seconds


def scores(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    return {f"cfg{r['cfg']:g}": {"accuracy": r["accuracy"], "frechet": r["frechet"]} for r in rows}


def class_rows(out: Path) -> dict:
    """What the evaluated (EMA) class embedding looks like (finetune_probe.embedding)."""
    from benchmarks.finetune_probe import embedding
    from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
    return embedding(load_training_checkpoint(out / CHECKPOINT_NAME)["model_ema"])


def spread(values: list, digits: int) -> str:
    """Mean ± sample standard deviation over the seeds."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def table(runs: list, variants: list, budgets: list) -> list:
    lines = ["| epochs on 5-9 | start | accuracy cfg 1 | accuracy cfg 2 | Frechet cfg 1 | "
             "Frechet cfg 2 | seeds |", "|---|---|---|---|---|---|---|"]
    for epochs in budgets:
        for name in variants:
            cell = [r for r in runs if r["epochs"] == epochs and r["variant"] == name]
            if not cell:
                continue
            values = [spread([r[cfg][m] for r in cell], digits)
                      for m, digits in (("accuracy", 3), ("frechet", 2)) for cfg in ("cfg1", "cfg2")]
            lines.append(f"| {epochs} | {name} | " + " | ".join(values) + f" | {len(cell)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain_epochs", type=int, default=40)
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40], help="epochs on 5-9")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--extra", nargs="*", default=[],
                   help="more variants as KEY=FLAGS ({pre}: the pre-trained run), e.g. "
                        "'drop=--finetune {pre} --label_drop_prob 0.2'")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--name", default="finetune", help="the result files: NAME.json and NAME.md")
    p.add_argument("--out", type=Path, default=REPO / "output_finetune")
    args = p.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants}
    for item in args.extra:
        key, _, flags = item.partition("=")
        variants[key] = (flags.replace("--finetune {pre}", "fine-tuned,"), tuple(flags.split()))
    args.out.mkdir(parents=True, exist_ok=True)
    pre = {s: args.out / f"pre{args.pretrain_epochs}_s{s}" for s in args.seeds}
    with ThreadPoolExecutor(args.jobs) as pool:
        pre_seconds = dict(zip(args.seeds, pool.map(
            lambda s: main_ear(pre[s], [*SOURCE, "--epochs", str(args.pretrain_epochs),
                                        "--seed", str(s)]), args.seeds)))
        jobs = [(key, epochs, s) for epochs in args.budgets for s in args.seeds
                for key in variants]

        def run(job):
            key, epochs, s = job
            out = args.out / f"{key}_e{epochs}_s{s}"
            flags = [f.format(pre=pre[s]) for f in variants[key][1]]
            seconds = main_ear(out, [*TARGET, "--epochs", str(epochs), "--seed", str(s), *flags])
            return {"variant": variants[key][0], "epochs": epochs, "seed": s, "flags": flags,
                    "seconds": seconds, **scores(out), "class_rows": class_rows(out)}
        runs = list(pool.map(run, jobs))
    results = {"pretrain": {s: {"seconds": pre_seconds[s], **scores(pre[s]),
                                "class_rows": class_rows(pre[s])} for s in args.seeds},
               "runs": runs}
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    lines = table(runs, [label for label, _ in variants.values()], args.budgets)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for s in args.seeds:
        print(f"pre-training on 0-4, seed {s}: {results['pretrain'][s]}")


if __name__ == "__main__":
    main()
