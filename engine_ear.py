"""The EAR training loop (one epoch at a time) and the pieces it shares with evaluation."""
import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from models.vae import LATENT_SCALE, DiagonalGaussian
from util.optim import EMA, lr_at, set_lr
from util.precision import autocast


class LatentBatches:
    """Turns a loader batch into (scaled latents (B, C, h, w), labels (B,)) on the device.

    Cached batches hold VAE moments (B, 2C, h, w); image batches hold pixels in [-1, 1] and are
    encoded here (no gradient). Either way a latent is one posterior sample times LATENT_SCALE.
    """

    def __init__(self, device: torch.device, precision: str, vae: nn.Module = None):
        self.device, self.precision, self.vae = device, precision, vae

    @torch.no_grad()
    def __call__(self, batch):
        data, labels = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
        if self.vae is None:
            moments = data
        else:
            with autocast(self.device, self.precision):
                moments = self.vae.encode(data).parameters
        return DiagonalGaussian(moments.float()).sample() * LATENT_SCALE, labels


@dataclass
class TrainState:
    """Everything an optimizer step touches.

    model: the bare EAR (state dicts, EMA, sampling); train_model: what the forward pass runs
    through (the same model, or DDP and/or torch.compile around it); ddp: the DDP wrapper, if any.
    """
    model: nn.Module
    train_model: nn.Module
    ddp: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device


class NonFiniteLoss(RuntimeError):
    pass


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when `value` is finite on every rank (one tiny all-reduce), so all ranks agree."""
    flag = torch.isfinite(value).all().float()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def optimizer_step(state: TrainState, micro_batches, args) -> tuple:
    """Forward/backward over the micro-batches, then one update. Returns (loss, grad norm).

    Gradients are all-reduced only on the last micro-batch (DDP no_sync before it). The loss
    returned is the mean micro-batch loss, not divided by the accumulation count.
    """
    k = len(micro_batches)
    loss_sum = torch.zeros((), device=state.device)
    for i, (x, labels) in enumerate(micro_batches):
        sync = state.ddp is None or i == k - 1
        with contextlib.nullcontext() if sync else state.ddp.no_sync():
            with autocast(state.device, state.precision):
                loss = state.train_model(x, labels)
            state.scaler.scale(loss / k).backward()
        loss_sum += loss.detach().float()
    loss = loss_sum / k
    if not all_ranks_finite(loss):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss("loss is not finite")
    state.scaler.unscale_(state.optimizer)
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update()
    return loss, grad_norm


def train_one_epoch(state: TrainState, loader, to_latents: LatentBatches, epoch: int, args,
                    log_writer=None, is_main: bool = True) -> dict:
    """One pass over the loader: len(loader) // accumulation_steps optimizer steps (a remainder
    smaller than one step is left out). Returns the epoch's mean loss and last lr."""
    state.train_model.train(True)
    k = args.accumulation_steps
    steps = len(loader) // k
    batches = iter(loader)
    images_per_step = args.batch_size * k * args.world_size
    bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True)
    total_loss, tick, last_logged = 0.0, time.time(), -1
    for step in bar:
        lr = lr_at(epoch + step / steps, args.lr, args.warmup_epochs, args.epochs,
                   args.lr_schedule, args.min_lr)
        set_lr(state.optimizer, lr)
        micro_batches = [to_latents(next(batches)) for _ in range(k)]
        try:
            loss, grad_norm = optimizer_step(state, micro_batches, args)
        except NonFiniteLoss:
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch}, step {step}: training stopped on every rank. "
                f"The last checkpoint in {args.output_dir} is intact; resume from it with a "
                "lower --blr, --precision bf16/fp32 or a smaller --grad_clip") from None
        loss_value = loss.item()
        total_loss += loss_value
        if step % args.print_freq == 0 or step == steps - 1:
            now = time.time()
            rate = images_per_step * (step - last_logged) / (now - tick)
            tick, last_logged = now, step
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            global_loss = mean_over_ranks(loss)
            if log_writer is not None:
                x = int((epoch + step / steps) * 1000)  # the reference's epoch_1000x axis
                log_writer.add_scalar("train_loss", global_loss, x)
                log_writer.add_scalar("lr", lr, x)
                log_writer.add_scalar("grad_norm", float(grad_norm), x)
                log_writer.add_scalar("images_per_sec", rate, x)
    bar.close()
    return {"loss": total_loss / max(steps, 1), "lr": lr if steps else float("nan")}
