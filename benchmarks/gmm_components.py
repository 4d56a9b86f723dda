"""Does the mixture head mix? How far apart its components are, per token, on the quick-start
mixture models.

    python benchmarks/gmm_components.py                     # about 20 minutes on 2 CPU cores
    python benchmarks/gmm_components.py --epochs 1 --out /tmp/gmm    # a smoke run, two minutes

The head's output layer starts at zero (GIVT's initialisation), so all k components start as the
same Gaussian, with the same weight; identical components get identical gradients, so only
rounding can tell them apart. This measures whether they come apart. For each budget E of
--epochs it trains (or keeps) `main_ear.py @configs/digits_quickstart.args --head gmm --epochs E`
(as benchmarks/heads.py does), the same with each --extra's flags (by default --gmm_init_spread
0.5: the means start apart), and --gmm_components 1 at the largest budget. Then, for each
run's EMA weights, it reads the mixture the head gives every masked token of the held-out digits
(--repeats passes, each with its own random order and a mask ratio drawn as in training; seeded):
- effective components: exp(entropy of the weights), 1 (one component carries all the weight)
  to k (equal weights); and the largest weight;
- separation: sqrt(sum_j w_j ||mu_j - mu||^2) / sqrt(sum_j w_j ||sigma_j||^2), with mu the
  weighted mean of the component means: 0 when every component is the same Gaussian;
- the largest distance between two components' means over the mean component scale;
- the negative log-likelihood of the held-out tokens (nats per token, targets dequantised as in
  training), to set beside the single Gaussian's.
Writes gmm_components.json and gmm_components.md to --out.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.gmmloss import mixture_log_prob  # noqa: E402
from util.builders import build_model, settings_from_checkpoint  # noqa: E402
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint  # noqa: E402
from util.digits import digits_split  # noqa: E402

CONFIG = REPO / "configs" / "digits_quickstart.args"


def train(out: Path, flags: list) -> Path:
    """One quick-start mixture run into `out`, kept once it finished (metrics.json written)."""
    if not (out / "metrics.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run([sys.executable, str(REPO / "main_ear.py"), f"@{CONFIG}", "--head", "gmm",
                            *flags, "--output_dir", str(out), "--log_dir", str(out),
                            "--resume", str(out)],
                           check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@torch.no_grad()
def mixtures(run: Path, repeats: int, seed: int) -> tuple:
    """The EMA model's mixture for every masked held-out token: (logits (T, k), means (T, k, D),
    scales (T, k, D), targets (T, D)) and the dequantisation width it was trained with."""
    ckpt = load_training_checkpoint(run / CHECKPOINT_NAME)
    settings = settings_from_checkpoint(ckpt["args"])
    model = build_model(settings)
    model.load_state_dict(ckpt["model_ema"])
    model.eval()
    _, _, images, labels = digits_split()
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    labels = torch.from_numpy(labels).long()
    tokens = model.patchify(x)
    torch.manual_seed(seed)
    out = []
    for _ in range(repeats):
        orders = model.random_orders(len(x), x.device)
        num_masked = math.ceil(model.seq_len * model.sample_mask_ratio())
        mask = model.mask_by_order(orders, num_masked)
        z = model.forward_transformer(tokens, model.class_embedding(labels, len(x), x.device), mask)
        logits, means, scales = model.head.net(z[mask])
        out.append((logits, means, scales, tokens[mask]))
    return [torch.cat(t) for t in zip(*out)], settings.gmm_dequantize


def spread(run: Path, repeats: int, seed: int) -> dict:
    (logits, means, scales, targets), dequantize = mixtures(run, repeats, seed)
    w = logits.softmax(-1)
    effective = torch.exp(-(w * w.clamp(min=1e-30).log()).sum(-1))
    centre = (w[..., None] * means).sum(1, keepdim=True)
    between = (w * ((means - centre) ** 2).sum(-1)).sum(-1)
    within = (w * (scales ** 2).sum(-1)).sum(-1)
    pairwise = torch.cdist(means, means).amax((1, 2)) / scales.mean((1, 2))
    generator = torch.Generator().manual_seed(seed)
    noisy = targets + dequantize * (torch.rand(targets.shape, generator=generator) - 0.5)
    nll = -mixture_log_prob(logits, means, scales, noisy)
    return {"tokens": len(targets), "components": logits.shape[1],
            "effective_components": effective.mean().item(),
            "largest_weight": w.amax(-1).mean().item(),
            "separation_median": (between / within).sqrt().median().item(),
            "separation_mean": (between / within).sqrt().mean().item(),
            "largest_mean_gap_over_scale": pairwise.median().item(),
            "nll_per_token": nll.mean().item()}


def quality(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {f"cfg{r['cfg']:g}": {"accuracy": r["accuracy"], "frechet": r["frechet"]}
            for r in metrics["results"]}


def table(rows: list) -> str:
    lines = ["| run | epochs | effective components (of k) | largest weight | separation, median (mean) "
             "| largest mean gap / scale | held-out NLL, nats / token | accuracy / Frechet cfg 1 | cfg 2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = [f"{r[c]['accuracy']:.3f} / {r[c]['frechet']:.2f}" for c in ("cfg1", "cfg2")]
        lines.append(f"| {r['run'].rsplit('_e', 1)[0]} | {r['epochs']} | {r['effective_components']:.2f} "
                     f"(of {r['components']}) | {r['largest_weight']:.3f} | "
                     f"{r['separation_median']:.3f} ({r['separation_mean']:.3f}) | "
                     f"{r['largest_mean_gap_over_scale']:.3f} | {r['nll_per_token']:.3f} | "
                     f"{q[0]} | {q[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[20, 40, 80])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=4, help="masked passes over the held-out digits")
    p.add_argument("--extra", nargs="*", default=["spread0.5=--gmm_init_spread 0.5"],
                   help="more runs at every budget, as NAME=FLAGS (default: the components' "
                        "means started 0.5 apart)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", type=Path, default=REPO / "output_gmm_components")
    args = p.parse_args()
    largest = max(args.epochs)
    jobs = {f"k16_e{e}": ["--epochs", str(e)] for e in args.epochs}
    jobs[f"k1_e{largest}"] = ["--epochs", str(largest), "--gmm_components", "1"]
    for item in args.extra:
        name, _, flags = item.partition("=")
        jobs.update({f"{name}_e{e}": ["--epochs", str(e), *flags.split()] for e in args.epochs})
    seed = ["--seed", str(args.seed)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(jobs, pool.map(lambda n: train(args.out / n, [*jobs[n], *seed]), jobs)))
    rows = [{"run": name, "flags": jobs[name], "epochs": int(jobs[name][1]),
             **spread(run, args.repeats, args.seed), **quality(run)} for name, run in runs.items()]
    text = table(rows)
    (args.out / "gmm_components.md").write_text(text)
    (args.out / "gmm_components.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
