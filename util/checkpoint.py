"""The training checkpoint, `checkpoint-last.pth`, in the reference release's format.

A dict with `model` and `model_ema` (full state dicts, the EMA values in the second),
`optimizer`, `epoch`, `args` and, when fp16's loss scaler is in use, `scaler`. A checkpoint
written inside an epoch (on a signal or by the clock) adds `step` (the epoch's next
micro-batch), `epoch_loss_sum` and `rng` (each rank's generator states, in rank order); one
written at an epoch's end before its online evaluation adds `evaluation_due` (the epoch's log
line, {"loss", "lr"}: a resumed run evaluates that epoch first); one of a run with
`--ema_warmup on` adds `ema_updates` (the EMA's update count, its warm-up clock). The
reference's resume ignores these keys and goes on at the next epoch. Files written here hold `args` as a plain dict, so `torch.load(path)` at torch's default (weights_only=True)
reads them; the reference's files hold an `argparse.Namespace`, which is allow-listed for them.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn

from util.fileio import atomic_write, remove_stale_temporaries
from util.settings import check_head_format, check_same_config
from util.weights import load_failure

CHECKPOINT_NAME = "checkpoint-last.pth"
PLAIN = (str, int, float, bool, type(None), list, tuple, dict)


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as a dict of plain values (anything else, e.g. a Path, as its string)."""
    return {k: v if isinstance(v, PLAIN) else str(v) for k, v in vars(args).items()}


def save_training_checkpoint(output_dir, model: nn.Module, ema, optimizer, scaler, epoch: int,
                             args: argparse.Namespace, extra: dict = None) -> Path:
    """Write `checkpoint-last.pth` atomically. The scaler is saved only when it is enabled: the
    reference's resume rejects the empty state of a disabled one. `extra`: the keys of a
    checkpoint taken part-way through `epoch` (`step`, `epoch_loss_sum`, `rng`) or before its
    evaluation (`evaluation_due`), which the reference's resume ignores."""
    ckpt = {"model": model.state_dict(), "model_ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, **(extra or {})}
    if scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    ckpt["args"] = plain_args(args)
    path = Path(output_dir) / CHECKPOINT_NAME
    remove_stale_temporaries(output_dir, CHECKPOINT_NAME)  # rank 0 is the only writer
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return path


def load_training_checkpoint(path, mmap: bool = False) -> dict:
    """Load a training checkpoint with weights_only=True; `args` comes back as a dict (or None),
    its head checked to be in today's format (check_head_format).

    mmap: map the file instead of reading it, so that only the tensors used are paged in (the
    EMA weights of an EAR-H checkpoint are a quarter of its 15 GB; each sampling rank would
    otherwise hold all of it)."""
    path = Path(path)

    def load(mapped: bool):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    try:
        try:
            ckpt = load(mmap)
        except RuntimeError:  # a file in torch's legacy format cannot be mapped: read it
            if not mmap:
                raise
            ckpt = load(False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training checkpoint ({load_failure(e)})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: a training checkpoint needs entries 'model' and 'epoch'; "
                         f"found {found}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    check_head_format(ckpt.get("args"), path)
    return ckpt


def open_checkpoint(folder, args: argparse.Namespace, model_args) -> tuple:
    """(path, checkpoint) for `<folder>/checkpoint-last.pth`, with the arguments that define the
    network checked against `args`; (path or None, None) when there is no such file. The file
    is mapped, not read: every rank resumes from it, and each would otherwise hold all of it
    in host memory at once (some 120 GB per node of eight for EAR-H)."""
    if folder and Path(folder).exists() and not Path(folder).is_dir():
        raise FileNotFoundError(f"--resume {folder}: a file, not a folder (expected the folder "
                                f"that holds {CHECKPOINT_NAME}, e.g. the run's --output_dir)")
    path = Path(folder) / CHECKPOINT_NAME if folder else None
    if path is None or not path.is_file():
        return path, None
    ckpt = load_training_checkpoint(path, mmap=True)
    check_same_config(ckpt.get("args"), args, model_args, path)
    return path, ckpt

