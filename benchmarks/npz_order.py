"""How ADM's evaluator scores our `.npz` export: the Inception Score over consecutive splits.

    python benchmarks/npz_order.py [--margin 11]

Simulated classifier outputs for 50,000 images of 1,000 classes (50 each, as evaluation
generates them): logits N(0, 1) plus `margin` on the image's class. Prints ADM's IS (10
consecutive splits, no shuffling) for the images in class order (how the PNGs are numbered), in
the order `--save_npz` writes them, and in a random order (the true value).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.images import npz_order  # noqa: E402


def adm_inception_score(preds: np.ndarray, splits: int = 10) -> float:
    """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), as ADM's evaluator."""
    scores = []
    for part in np.array_split(preds.astype(np.float64), splits):
        marginal = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(marginal))).sum(1).mean()))
    return float(np.mean(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--margin", type=float, default=11.0, help="logit added to the true class")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    labels = np.arange(50_000) // 50
    logits = rng.normal(0, 1, (50_000, 1000)).astype(np.float32)
    logits[np.arange(50_000), labels] += args.margin
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    for name, order in (("class order (the PNGs)", np.arange(50_000)),
                        ("--save_npz order", npz_order(50_000)),
                        ("random order (true value)", rng.permutation(50_000))):
        print(f"{name:28s} IS {adm_inception_score(preds[order]):8.1f}")


if __name__ == "__main__":
    main()
