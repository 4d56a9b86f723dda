"""Optimiser set-up for EAR: parameter groups, the learning-rate schedule, and the EMA."""
import contextlib
import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, score_lrscale: float) -> list:
    """AdamW groups in the reference's order (its saved optimizer state loads only into groups
    in this order), each group's parameters in `named_parameters()` order:

    - 1-D parameters and biases (the head's included), and every parameter of a head that
      declares `decay_matrices = False` (the diffusion head: MAR excludes everything under
      `diffloss` from weight decay): no weight decay, full lr;
    - the other weight matrices (the Transformer's; the mixture head's): weight decay;
    - if the head asks for a group of its own (`own_optimizer_group`, the energy head as in the
      reference): its weight matrices, with no weight decay and lr * score_lrscale.
    Each group carries `lr_scale`, applied by `set_lr`.
    """
    head = model.head
    own = {id(p) for p in head.parameters()} if head.own_optimizer_group else set()
    # A head without the attribute (the energy head) is unaffected: its matrices go to `own`.
    undecayed = set() if getattr(head, "decay_matrices", True) else {id(p) for p in head.parameters()}
    no_decay, decay, generator = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or id(p) in undecayed:
            no_decay.append(p)
        elif id(p) in own:
            generator.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0}]
    if head.own_optimizer_group:
        groups.append({"params": generator, "weight_decay": 0.0, "lr_scale": score_lrscale})
    return groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, source: str,
                         hint: str = "") -> None:
    """Take the per-parameter state (moments, step counts) from `state_dict` and keep this run's
    hyper-parameters (weight decay, lr scale, betas ...): `Optimizer.load_state_dict` would
    replace them with the saved ones, and a reference checkpoint's groups carry no `lr_scale`.
    A state that does not fit raises ValueError naming `source`, with `hint` (what to do)."""
    saved = state_dict.get("param_groups", [])
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in saved]
    if ours != theirs:
        raise ValueError(f"{source}: the optimizer state has parameter groups of sizes {theirs}, "
                         f"this model's are {ours} (order: no decay, decay, generator)"
                         + (f"; {hint}" if hint else ""))
    # The groups torch loads carry this run's settings: it keeps the groups it is given, and it
    # places each `step` by their `fused` flag (fused: on the parameter's device), so a fused
    # (CUDA) optimizer and an unfused one each load the other's state where they use it.
    groups = [{**g, **{k: v for k, v in mine.items() if k != "params"}}
              for g, mine in zip(saved, optimizer.param_groups)]
    try:  # torch compares each parameter's state with the parameter itself
        optimizer.load_state_dict({**state_dict, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{source}: the optimizer state does not fit this model ({e})"
                         + (f"; {hint}" if hint else "")) from None
    # From a checkpoint read with mmap, torch keeps tensors that need no cast as they are (on the
    # CPU: `step`, and the moments of a CPU run): they would keep the file mapped, and on disk
    # after it is replaced (15 GB for EAR-H), for the whole run. The optimizer owns copies.
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                state[key] = value.clone()


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


# An update count past any warm-up: (1 + n) / (10 + n) exceeds every usable rate (1 - 1e-8).
EMA_WARM = 10 ** 9


class EMA:
    """Exponential moving average of a model's parameters, kept in float32; with `warmup` its
    rate grows with the number of updates (current_rate).

    `state_dict()` is the model's full state dict with the EMA values in place of the
    parameters, on the CPU: the reference's `model_ema` checkpoint entry.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = False):
        self.model, self.rate, self.warmup = model, rate, warmup
        self.updates = 0  # updates made in this run: the warm-up's clock (saved with warm-up on)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.live = [p for _, p in named]  # the model's own tensors, updated in place by training
        self.params = [p.detach().float().clone() for p in self.live]

    def current_rate(self) -> float:
        """The rate of the next update. With warm-up, min(rate, (1 + n) / (10 + n)) after n
        updates, the schedule of TensorFlow's ExponentialMovingAverage(num_updates=n): the
        average reaches back about n / 10 steps early on instead of 1 / (1 - rate), so a short
        run (fine-tuning) is not averaged with the weights it started from."""
        if not self.warmup:
            return self.rate
        return min(self.rate, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.params, [p.detach().float() for p in self.live],
                             1.0 - self.current_rate())
        self.updates += 1

    def state_dict(self) -> dict:
        """{name: CPU tensor}, in the model's state-dict order and dtypes, copied tensor by
        tensor: a copy of the whole model on its device first would cost the saving rank's
        GPU that much memory at every checkpoint."""
        ema = dict(zip(self.names, self.params))
        return {k: ema.get(k, v).to(device="cpu", dtype=v.dtype, copy=True)
                for k, v in self.model.state_dict().items()}

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

    @contextlib.contextmanager
    def applied(self):
        """Run the block with the EMA values in the model; the raw weights come back after it,
        whether it ends normally or with an exception."""
        self.swap()
        try:
            yield self.model
        finally:
            self.swap()
