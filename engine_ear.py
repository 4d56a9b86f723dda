"""The EAR training loop (one epoch at a time) and the pieces it shares with evaluation."""
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from models.heads import HEADS
from util.builders import TrainState, batches_per_epoch, dataset_class_ids
from util.distributed import MainRankFailed, all_ranks_true, all_reduce_sum, barrier, run_on_main
from util.editing import paste, token_mask
from util.fileio import nearest_existing
from util.images import (NPZ_PERMUTATION_SEED, PngWriter, read_sample, sample_file, save_grid,
                          to_uint8, write_adm_npz)
from util.loggers import Loggers
from util.optim import lr_at, set_lr
from util.precision import autocast, resolve_precision
from util.resumable import EpochPosition, Preempted, SaveRequests


class TokenBatches:
    """Turns a loader batch into (token map (B, C, h, w), labels (B,), targets) on the device:
    cached moments through `tokenizer.from_moments`, images through `tokenizer.encode`. The
    targets are None (the tokens are their own), unless the loss takes `targets` > 1 draws per
    token or the tokenizer dequantises: then (B, targets, C, h, w) from the tokenizer, drawn
    from this rank's generator after the tokens (so a resumed run draws the same)."""

    def __init__(self, tokenizer, cached: bool, device: torch.device, targets: int = 1):
        self.tokenizer, self.cached, self.device, self.targets = tokenizer, cached, device, targets

    @torch.no_grad()
    def __call__(self, batch):
        data = batch[0].to(self.device, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True)
        if self.targets > 1 or getattr(self.tokenizer, "dequantize", 0):
            tokens, targets = self.tokenizer.tokens_and_targets(data, self.cached, self.targets)
            return tokens, labels, targets
        to_tokens = self.tokenizer.from_moments if self.cached else self.tokenizer.encode
        return to_tokens(data), labels, None


class NonFiniteLoss(RuntimeError):
    pass


class MetricsUnavailable(RuntimeError):
    """Something the metrics need (statistics, weights, reference batch) is missing."""


def all_ranks_finite(*values: torch.Tensor) -> list:
    """For each tensor, True when it is finite on every rank (one tiny all-reduce for all of
    them), so every rank takes the same decision."""
    return all_ranks_true([torch.isfinite(v).all() for v in values], values[0].device)


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def optimizer_step(state: TrainState, micro_batches, args, requests: SaveRequests = None) -> tuple:
    """Forward/backward over the micro-batches, then one update. Returns (loss, grad norm).

    Gradients are all-reduced only on the last micro-batch (DDP no_sync before it). The loss
    returned is the mean micro-batch loss, not divided by the accumulation count.
    Raises NonFiniteLoss on every rank, before the weights change, when the loss or (without a
    loss scaler) the gradient norm is NaN or infinite on any rank. With fp16 the scaler owns
    non-finite gradients: it skips that update and lowers its scale, as AMP intends.
    The ranks' votes on `requests` (a signal, rank 0's save clock) ride in the same all-reduce
    as the finiteness check, so agreeing on a checkpoint costs no extra collective.
    """
    k = len(micro_batches)
    loss_sum = torch.zeros((), device=state.device)
    for i, (x, labels, targets) in enumerate(micro_batches):
        sync = state.ddp is None or i == k - 1
        with contextlib.nullcontext() if sync else state.ddp.no_sync():
            with autocast(state.device, state.precision):
                # Without targets, the reference's call: the model's own tokens are the targets.
                loss = (state.train_model(x, labels) if targets is None
                        else state.train_model(x, labels, targets))
            state.scaler.scale(loss / k).backward()
        loss_sum += loss.detach().float()
    loss = loss_sum / k
    state.scaler.unscale_(state.optimizer)
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    votes = requests.votes() if requests is not None else []
    loss_ok, grad_ok, *carry_on = all_ranks_true(
        [torch.isfinite(loss), torch.isfinite(grad_norm), *votes], state.device)
    if requests is not None:
        requests.agree(carry_on)
    if not loss_ok or not (grad_ok or state.scaler.is_enabled()):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss("loss" if not loss_ok else "gradient norm")
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update()
    return loss, grad_norm


def epoch_lr(epoch: int, step: int, steps: int, args) -> float:
    """The learning rate of optimizer step `step` of `steps` in `epoch`."""
    return lr_at(epoch + step / steps, args.lr, args.warmup_epochs, args.epochs, args.lr_schedule,
                 args.min_lr)


def train_one_epoch(state: TrainState, loader, to_tokens: TokenBatches, position: EpochPosition,
                    args, loggers: Loggers, is_main: bool, requests: SaveRequests, save) -> dict:
    """The rest of epoch `position.epoch`, from its micro-batch `position.step` (the loader is
    set to start there): batches_per_epoch // accumulation_steps optimizer steps in a whole
    epoch (a remainder smaller than one step is left out). After a step on which the ranks
    agreed on a save request, save(EpochPosition after that step); on a signal, then raise
    Preempted. Returns the epoch's mean loss (rank 0's) and last lr."""
    state.train_model.train(True)
    epoch, k = position.epoch, args.accumulation_steps
    steps, first = batches_per_epoch(loader) // k, position.step // k
    images_per_step = args.batch_size * k * args.world_size
    bar = tqdm(range(first, steps), initial=first, total=steps, desc=f"epoch {epoch}",
               disable=not is_main, dynamic_ncols=True)
    # The epoch's loss sum stays on the device (a float64 sum of the float32 step losses, as
    # Python's float sum was): read at --print_freq, saves and the epoch's end, not every step.
    total_loss = torch.tensor(position.loss_sum, dtype=torch.float64, device=state.device)
    tick, last_logged = time.time(), first - 1
    with requests.batches(loader) as batches:
        for step in bar:
            lr = epoch_lr(epoch, step, steps, args)
            set_lr(state.optimizer, lr)
            micro_batches = [to_tokens(next(batches)) for _ in range(k)]
            try:
                loss, grad_norm = optimizer_step(state, micro_batches, args, requests)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(
                    f"non-finite {e} at epoch {epoch}, step {step}: training stopped on every "
                    f"rank. The last checkpoint in {args.output_dir} is intact; resume from it "
                    "with a lower --blr, --precision bf16/fp32 or a smaller --grad_clip") from None
            total_loss += loss.double()
            if step % args.print_freq == 0 or step == steps - 1:
                now = time.time()
                rate = images_per_step * (step - last_logged) / (now - tick)
                tick, last_logged = now, step
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                                grad_norm=f"{float(grad_norm):.3f}", img_s=f"{rate:.1f}")
                global_loss = mean_over_ranks(loss)
                x = int((epoch + step / steps) * 1000)  # the reference's epoch_1000x axis
                loggers.scalars({"train_loss": global_loss, "lr": lr, "grad_norm": float(grad_norm),
                                 "images_per_sec": rate}, x, "epoch_1000x")
            if requests.save:
                save_inside_epoch(EpochPosition(epoch, (step + 1) * k, total_loss.item()),
                                  requests, save, bar)
    bar.close()
    return {"loss": total_loss.item() / max(steps, 1),
            "lr": epoch_lr(epoch, steps - 1, steps, args) if steps else float("nan")}


def save_inside_epoch(position: EpochPosition, requests: SaveRequests, save, bar) -> None:
    """Every rank: save(position) (the ranks agreed on it); after a signal, stop training."""
    save(position)
    requests.saved()
    if requests.stop:
        bar.close()
        raise Preempted(f"stopped by {requests.cause()} at epoch {position.epoch}, micro-batch "
                        f"{position.step}")


# ----- generation and evaluation ----------------------------------------------------------------

def balanced_labels(indices: range, num_images: int, class_num: int) -> torch.Tensor:
    """Labels (len(indices),) of these global image indices, num_images / class_num consecutive
    images per class. Only the indices asked for become a tensor: nothing is allocated in
    proportion to --num_images before the images are."""
    if num_images <= 0 or num_images % class_num:
        raise ValueError(f"--num_images must be a positive multiple of --class_num ({class_num}) "
                         f"so every class gets the same count, got {num_images}")
    return torch.arange(indices.start, indices.stop, indices.step) // (num_images // class_num)


@torch.no_grad()
def generate(model, decode, labels: torch.Tensor, cfg: float, temperature: float, args,
             device, known: torch.Tensor = None, known_mask: torch.Tensor = None) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) for the given labels, decoded from sampled latents, in
    the precision --precision gives (the same for --evaluate, online evaluation and sample_ear).
    known, known_mask: tokens to keep (editing; EAR.sample_tokens)."""
    with autocast(device, resolve_precision(args.precision, device)):
        latents = model.sample_tokens(len(labels), num_iter=args.num_iter, cfg=cfg,
                                      cfg_schedule=args.cfg_schedule, labels=labels.to(device),
                                      infer_temperature=temperature, known=known,
                                      known_mask=known_mask)
        return decode(latents.float())


def complete(model, tokenizer, images: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
             args, device) -> torch.Tensor:
    """Completions (N, C, H, W) in [-1, 1] of images (N, C, H, W) in [-1, 1], keeping the
    tokens under the kept pixels `keep` (N, H, W) (--mask_rule), as the model's classes `labels`
    (N,). Sampled in batches of at most --eval_bsz that keep the same number of tokens (one
    schedule per batch); --paste puts the kept pixels back."""
    kept = token_mask(keep, images.shape[-1] // model.seq_h, args.mask_rule)
    out = torch.empty_like(images)
    counts = kept.sum(dim=1)
    for count in counts.unique().tolist():
        for rows in (counts == count).nonzero().flatten().split(args.eval_bsz):
            known = tokenizer.encode_mean(images[rows].to(device))
            out[rows] = generate(model, tokenizer.decode, labels[rows], args.cfg,
                                 args.infer_temperature, args, device, known,
                                 kept[rows].to(device)).float().cpu()
    return paste(out, images, keep) if args.paste else out


def rank_share(num_images: int, rank: int, world_size: int) -> range:
    """The global indices one rank generates: every world_size-th from its rank, so the ranks
    together cover each index exactly once, with no padding. A range: sliced per batch."""
    return range(rank, num_images, world_size)


def check_room_for_samples(args) -> None:
    """Refuse a --num_images that cannot be written, before anything is: every image is one
    PNG file in a folder under --output_dir, so its file system needs that many free inodes
    (file systems that report no inode limit are not checked). A trillion images is a typo, and
    would otherwise end after hours with a full disk."""
    fs = os.statvfs(nearest_existing(args.output_dir))
    if fs.f_files and args.num_images > fs.f_favail:
        raise ValueError(f"--num_images {args.num_images}: the samples are written as that many "
                         f"PNG files under --output_dir {args.output_dir}, whose file system has "
                         f"room for {fs.f_favail} more files (expected at most that many)")


def head_sampling_settings(args) -> dict:
    """The head's settings that change its samples (the diffusion head's num_sampling_steps)."""
    return {name: getattr(args, name) for name in getattr(HEADS[args.head], "SAMPLING", ())}


def samples_name(args, cfg: float, temperature: float) -> str:
    head = "".join(f"-{name}{value}" for name, value in head_sampling_settings(args).items())
    return (f"ariter{args.num_iter}{head}-temp{temperature}-{args.cfg_schedule}cfg{cfg}"
            f"-image{args.num_images}")


# Metric names logged to TensorBoard and printed (ImageNet: fid, is, precision, recall,
# fd_dinov2; digits: accuracy, frechet).
SCORES = ("fid", "is", "precision", "recall", "fd_dinov2", "accuracy", "frechet")


def grid_indices(num_images: int, class_num: int, rows: int = 10, cols: int = 10) -> list:
    """Global indices for a sample grid: the first `rows` classes, `cols` images each."""
    per_class = num_images // class_num
    return [c * per_class + j for c in range(min(rows, class_num)) for j in range(min(cols, per_class))]


def check_metric_inputs(metrics, info) -> None:
    """Before generating anything, rank 0 makes sure the metrics can be computed (statistics
    file, Inception weights, reference features, classifier); on failure every rank stops with
    rank 0's message."""
    try:
        run_on_main(info.is_main, metrics.check)
    except MainRankFailed as e:
        raise MetricsUnavailable(f"cannot measure the samples: {e}") from None


def fallback_counts(head) -> list:
    """[guided draws, of them unguided fallbacks] of a head that samples guidance by rejection
    (the mixture head), since it was built; [0, 0] for the others."""
    return [getattr(head, "guided_draws", 0), getattr(head, "exhausted", 0)]


@torch.no_grad()
def generate_share(model, decode, folder: Path, cfg: float, temperature: float, batch_size: int,
                   args, info, requests: SaveRequests = None) -> tuple:
    """This rank's images (index i written once, as <i>.png, by rank i % world_size), with
    `model` as it is. With `requests` (online evaluation) the ranks agree after every batch
    whether a save signal came, and stop with Preempted (the checkpoint was written before the
    evaluation). Returns (seconds per image, measured after the first batch (which includes
    warm-up: allocation, compilation) or, with a single batch, that batch; this rank's
    fallback_counts for these images)."""
    counts_before = fallback_counts(model.head)
    mine = rank_share(args.num_images, info.rank, info.world_size)
    # As many batches on every rank as on rank 0, which has the most images: they agree after each.
    batches = -(-len(rank_share(args.num_images, 0, info.world_size)) // batch_size)
    torch.manual_seed(args.seed + info.rank)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    timed_images, timed_seconds, first_batch = 0, 0.0, (1, 0.0)
    bar = tqdm(total=len(mine), unit="img", desc=f"sampling cfg {cfg}, temperature {temperature}",
               disable=not info.is_main)
    try:
        with PngWriter() as pngs:
            for b in range(batches):
                index = mine[b * batch_size:(b + 1) * batch_size]
                if len(index):
                    labels = balanced_labels(index, args.num_images, args.class_num)
                    start = time.perf_counter()
                    images = to_uint8(generate(model, decode, labels, cfg, temperature, args, device))
                    if b == 0:
                        first_batch = (len(index), time.perf_counter() - start)
                    else:
                        timed_images += len(index)
                        timed_seconds += time.perf_counter() - start
                    for i, img in zip(index, images):
                        pngs.save(img, sample_file(folder, i))
                    bar.update(len(index))
                if requests is not None:
                    requests.stop_if_signalled(device, f"while sampling (cfg {cfg}) for the evaluation")
    finally:
        bar.close()
        model.train(was_training)
    counts = [a - b for a, b in zip(fallback_counts(model.head), counts_before)]
    return timed_seconds / timed_images if timed_images else first_batch[1] / first_batch[0], counts


def evaluate(model, decode, metrics, args, info, epoch: int, cfg: float, temperature: float,
             batch_size: int, loggers: Loggers = None, requests: SaveRequests = None) -> dict:
    """Generate args.num_images images with `model` as it is (the caller puts the EMA weights
    in) across ranks, then on rank 0: a grid (a row per class), the measurement by `metrics`
    (FID/IS/precision/recall for ImageNet, classifier scores for the digits), with --save_npz
    the images as one ADM-format .npz, and one JSON line in <output_dir>/eval_results.jsonl.

    Returns the result on rank 0 (None elsewhere).
    """
    check_metric_inputs(metrics, info)
    name = samples_name(args, cfg, temperature)
    folder = Path(args.output_dir) / f"samples-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    seconds, counts = generate_share(model, decode, folder, cfg, temperature, batch_size, args, info,
                                     requests)
    guided, fallbacks = map(int, all_reduce_sum(counts, next(model.parameters()).device))
    barrier()
    # The mixture head's guidance by rejection: how many draws fell back to unguided ones.
    rejection = {"guided_draws": guided, "unguided_fallbacks": fallbacks} if guided else {}

    def measure():
        result = measure_samples(folder, name, metrics, args, epoch, seconds, loggers,
                                 {"cfg": cfg, "infer_temperature": temperature, **rejection})
        if not args.keep_samples:
            shutil.rmtree(folder)
        return result
    return run_on_main(info.is_main, measure)


def measure_samples(folder: Path, name: str, metrics, args, epoch: int, seconds: float,
                    loggers: Loggers, point: dict) -> dict:
    """Rank 0's part of `evaluate`: grid, metrics, ADM export, JSON line, TensorBoard/W&B."""
    out = Path(args.output_dir)
    grid = np.stack([read_sample(folder, i) for i in grid_indices(args.num_images, args.class_num)])
    grid = grid[..., None] if grid.ndim == 3 else grid
    grid_path = save_grid(grid, min(10, args.num_images // args.class_num), out / f"grid-{name}.png")
    # Scores, the .npz and the JSON line speak of the dataset's classes (--classes relabels).
    every = range(args.num_images)
    labels = dataset_class_ids(args, balanced_labels(every, args.num_images, args.class_num).numpy())
    measured = metrics.measure(folder, labels, name)
    result = {"epoch": epoch, "model": args.model, "head": args.head,
              **head_sampling_settings(args), **point, "cfg_schedule": args.cfg_schedule,
              **({"classes": args.dataset_classes} if getattr(args, "dataset_classes", None) else {}),
              "num_iter": args.num_iter, **measured, "seconds_per_image": seconds,
              "grid": str(grid_path)}
    if args.save_npz:
        result["npz"] = str(write_adm_npz(folder, labels, out / f"samples-{name}"))
        result["npz_permutation_seed"] = NPZ_PERMUTATION_SEED
    scores = {k: v for k, v in measured.items() if k in SCORES}
    print(f"epoch {epoch}, cfg {point['cfg']}, temperature {point['infer_temperature']}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f" over {measured['num_images']} images; {seconds:.4f} s/image per device; grid {grid_path}"
          + (f"; {point['unguided_fallbacks']} of {point['guided_draws']} guided draws fell back to "
             f"unguided ones" if "guided_draws" in point else ""))
    with open(out / "eval_results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    if loggers is not None:
        suffix = "_ema" + (f"_cfg{point['cfg']}" if point["cfg"] != 1.0 else "")
        if len(args.infer_temperature) > 1:
            suffix += f"_temp{point['infer_temperature']}"
        loggers.scalars({f"{key}{suffix}": value for key, value in scores.items()}, epoch, "epoch")
        loggers.result(name, result)
    return result
