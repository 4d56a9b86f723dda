"""What a digits run's class embedding and EMA do: the diagnosis behind --ema_warmup.

    python benchmarks/finetune_probe.py output_finetune/fixed_e20_s0 output_finetune/scratch_e20_s0

For each run folder (a training checkpoint of the quick start's model, e.g. from
benchmarks/finetune_digits.py), with the EMA weights and with the raw ones:
- accuracy of --per_class samples per class at cfg 1 and 2, scored as the evaluation scores them;
- the label's pull: the mean pixel change when only the label changes (same noise, each label
  moved to the next class), as a share of the change between two noise seeds at the same label
  (0: the label is ignored; about 1: the label moves a sample as far as new noise does);
- the class embedding: mean row norm, mean distance between rows and to `fake_latent`.
Prints a markdown table; --json writes the numbers too.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.builders import build_model  # noqa: E402
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint  # noqa: E402
from util.digits import DigitClassifier  # noqa: E402
from util.images import to_uint8  # noqa: E402


@torch.no_grad()
def samples(model, labels: torch.Tensor, cfg: float, seed: int) -> np.ndarray:
    """uint8 digits (N, 8, 8) for these labels, the noise fixed by `seed`."""
    torch.manual_seed(seed)
    tokens = model.sample_tokens(len(labels), num_iter=16, cfg=cfg, cfg_schedule="linear",
                                 labels=labels, infer_temperature=1.0)
    return to_uint8(tokens.clamp(-1, 1))[..., 0]


def embedding(state: dict) -> dict:
    """The class embedding of a state dict: mean row norm, mean distance between rows, mean
    distance of the rows from `fake_latent` (the unconditional embedding), and its norm."""
    rows, fake = state["class_emb.weight"].float(), state["fake_latent"].float()
    k = len(rows)
    return {"row_norm": rows.norm(dim=1).mean().item(),
            "between_rows": (torch.cdist(rows, rows).sum() / (k * (k - 1))).item(),
            "to_fake_latent": (rows - fake).norm(dim=1).mean().item(),
            "fake_latent_norm": fake.norm().item()}


def probe(folder: Path, weights: str, per_class: int, classifier: DigitClassifier) -> dict:
    ckpt = load_training_checkpoint(folder / CHECKPOINT_NAME)
    model = build_model(ckpt["args"]).eval()
    model.load_state_dict(ckpt[weights])
    classes = np.asarray(ckpt["args"].get("dataset_classes") or range(model.class_emb.num_embeddings))
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    result = {"run": folder.name, "weights": weights, **embedding(ckpt[weights])}
    for cfg in (1.0, 2.0):
        first = samples(model, labels, cfg, seed=1)
        result[f"accuracy_cfg{cfg:g}"] = classifier.accuracy(first, classes[labels.numpy()])
        moved = samples(model, (labels + 1) % len(classes), cfg, seed=1)
        reseeded = samples(model, labels, cfg, seed=2)
        change = np.abs(first.astype(float) - moved).mean()
        result[f"label_pull_cfg{cfg:g}"] = change / np.abs(first.astype(float) - reseeded).mean()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders with checkpoint-last.pth")
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    classifier = DigitClassifier()
    rows = [probe(run, w, args.per_class, classifier) for run in args.runs
            for w in ("model_ema", "model")]
    print("| run | weights | accuracy cfg 1 / 2 | label's pull cfg 1 / 2 | class row norm | "
          "between rows | rows to fake_latent |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {'EMA' if r['weights'] == 'model_ema' else 'raw'} | "
              f"{r['accuracy_cfg1']:.3f} / {r['accuracy_cfg2']:.3f} | {r['label_pull_cfg1']:.2f} / "
              f"{r['label_pull_cfg2']:.2f} | {r['row_norm']:.3f} | {r['between_rows']:.3f} | "
              f"{r['to_fake_latent']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
