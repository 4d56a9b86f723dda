"""Fine-tuning against training from scratch, on a CPU: the workflow of docs/finetune.md.

    python benchmarks/finetune_digits.py                     # ~15 minutes on 2 CPU cores
    python benchmarks/finetune_digits.py --budgets 1 --pretrain_epochs 1 --out /tmp/ft  # smoke

Through the user's commands only (`main_ear.py @configs/digits_quickstart.args`):
1. pre-train on digits 0-4 (`--classes 0,1,2,3,4 --class_num 5`, --pretrain_epochs);
2. for each budget E in --budgets: fine-tune on digits 5-9 from that checkpoint
   (`--classes 5,6,7,8,9 --class_num 5 --finetune <pre> --epochs E`), and train 5-9 from scratch
   with the same flags but no --finetune. The same number of steps, the same seed.
Each run ends with the quick start's evaluation: 200 samples per class (labelled 5-9) without
guidance and with cfg 2.0, scored by the classifier trained on real digits. Writes
finetune.json and finetune.md (the table) to --out.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_quickstart.args"
TARGET = ("--classes", "5,6,7,8,9", "--class_num", 5)


def main_ear(out: Path, *flags) -> float:
    """One run of the quick start with these flags into `out`; returns its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    subprocess.run([sys.executable, str(REPO / "main_ear.py"), f"@{CONFIG}", *map(str, flags),
                    "--output_dir", out, "--log_dir", out], check=True, cwd=REPO)
    return time.time() - start


def scores(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    return {f"cfg{r['cfg']}": {"accuracy": r["accuracy"], "frechet": r["frechet"]} for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain_epochs", type=int, default=80)
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40], help="epochs on 5-9")
    p.add_argument("--out", type=Path, default=REPO / "output_finetune")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pre = args.out / "pre"
    results = {"pretrain_seconds": main_ear(pre, "--classes", "0,1,2,3,4", "--class_num", 5,
                                            "--epochs", args.pretrain_epochs),
               "pretrain": scores(pre), "runs": []}
    for epochs in args.budgets:
        for kind, extra in (("fine-tuned", ("--finetune", pre)), ("from scratch", ())):
            out = args.out / f"{kind.split()[0].replace('-', '')}{epochs}"
            seconds = main_ear(out, *TARGET, "--epochs", epochs, *extra)
            results["runs"].append({"epochs": epochs, "kind": kind, "seconds": seconds, **scores(out)})
    (args.out / "finetune.json").write_text(json.dumps(results, indent=2))
    lines = ["| epochs on 5-9 | start | accuracy (cfg 1 / 2) | Frechet (cfg 1 / 2) | time |",
             "|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['epochs']} | {r['kind']} | {r['cfg1.0']['accuracy']:.3f} / "
                     f"{r['cfg2.0']['accuracy']:.3f} | {r['cfg1.0']['frechet']:.2f} / "
                     f"{r['cfg2.0']['frechet']:.2f} | {r['seconds']:.0f} s |")
    (args.out / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"pre-training on 0-4: {results['pretrain_seconds']:.0f} s, {results['pretrain']}")


if __name__ == "__main__":
    main()
