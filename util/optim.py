"""Optimiser set-up for EAR: parameter groups, the learning-rate schedule, and the EMA."""
import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, score_lrscale: float) -> list:
    """Three AdamW groups, as in the reference:

    - 1-D parameters and biases (generator's included): no weight decay, full lr;
    - the generator's (`scoreloss.`) weight matrices: no weight decay, lr * score_lrscale;
    - everything else: weight decay.
    Each group carries `lr_scale`, applied by `set_lr`.
    """
    no_decay, generator, decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias"):
            no_decay.append(p)
        elif name.startswith("scoreloss."):
            generator.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": generator, "weight_decay": 0.0, "lr_scale": score_lrscale},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
    ]


def lr_at(epoch: float, base_lr: float, warmup_epochs: float, epochs: int,
          schedule: str = "constant", min_lr: float = 0.0) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then constant or half-cosine."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if schedule == "constant":
        return base_lr
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class EMA:
    """Exponential moving average of a model's parameters, kept in float32.

    `state_dict()` is the model's full state dict with the EMA values in place of the
    parameters: the reference's `model_ema` checkpoint entry.
    """

    def __init__(self, model: nn.Module, rate: float):
        self.model, self.rate = model, rate
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.live = [p for _, p in named]  # the model's own tensors, updated in place by training
        self.params = [p.detach().float().clone() for p in self.live]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.params, [p.detach().float() for p in self.live], 1.0 - self.rate)

    def state_dict(self) -> dict:
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, value in zip(self.names, self.params):
            sd[name] = value.to(sd[name].dtype).clone()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for i, name in enumerate(self.names):
            self.params[i].copy_(sd[name])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's parameters and the EMA values (call twice to undo)."""
        for p, ema in zip(self.live, self.params):
            tmp = p.detach().float().clone()
            p.copy_(ema)
            ema.copy_(tmp)
