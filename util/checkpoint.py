"""Reading weights safely, loading them strictly, writing files atomically, and the training
checkpoint (`checkpoint-last.pth`, the reference format)."""
import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn


def atomic_write(path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never half of one (a killed
    writer leaves a `.<name>.*.tmp` file: see `remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder, name: str = "*") -> int:
    """Delete the temporaries `atomic_write` left in `folder` for targets matching `name` when
    its process was killed. Only safe while nothing is writing those targets."""
    removed = 0
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def save_atomic(obj, path) -> None:
    """torch.save with atomic replacement."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_weights(path, nested_keys: Iterable[str] = ()) -> Mapping[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a torch checkpoint (loaded with weights_only=True).

    A torch checkpoint may hold the state dict directly or under one of `nested_keys`
    (the reference `kl16.ckpt` keeps it under `model`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    for key in nested_keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: expected a state dict or a dict with one of {list(nested_keys)}, "
                     f"found {found}")


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     source: str, owner: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped key of `given`."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: file {tuple(given[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in given and given[k].shape != v.shape]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ValueError(f"{source} does not match {owner}: " + "; ".join(problems))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """Load every tensor; any missing, unexpected or mis-shaped key is an error naming it."""
    check_state_dict(module.state_dict(), state_dict, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)


CHECKPOINT_NAME = "checkpoint-last.pth"


def save_training_checkpoint(output_dir, model, ema, optimizer, scaler, epoch: int,
                             args: argparse.Namespace) -> Path:
    """Write `checkpoint-last.pth` atomically: model, model_ema, optimizer, epoch, scaler, args."""
    path = Path(output_dir) / CHECKPOINT_NAME
    remove_stale_temporaries(output_dir, CHECKPOINT_NAME)  # rank 0 is the only writer
    save_atomic({"model": model.state_dict(), "model_ema": ema.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "scaler": scaler.state_dict(), "args": args}, path)
    return path


def load_training_checkpoint(path) -> dict:
    """Load a training checkpoint with weights_only=True; `args` (a Namespace) is allow-listed."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training checkpoint ({e})") from e
    missing = [k for k in ("model", "epoch") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: missing entries {missing}; found {sorted(ckpt)}")
    return ckpt


def check_same_config(saved: argparse.Namespace, current: argparse.Namespace, names, source) -> None:
    """Resuming must not change the network: compare the arguments that define it."""
    if saved is None:
        return
    saved = vars(saved)
    diffs = [f"--{n} is {getattr(current, n)!r} here but {saved[n]!r} in the checkpoint"
             for n in names if n in saved and saved[n] != getattr(current, n)]
    if diffs:
        raise ValueError(f"cannot resume from {source}: " + "; ".join(diffs))


def open_checkpoint(folder, args: argparse.Namespace, model_args) -> tuple:
    """(path, checkpoint) for `<folder>/checkpoint-last.pth`, with the arguments that define the
    network checked against `args`; (path or None, None) when there is no such file."""
    path = Path(folder) / CHECKPOINT_NAME if folder else None
    if path is None or not path.is_file():
        return path, None
    ckpt = load_training_checkpoint(path)
    check_same_config(ckpt.get("args"), args, model_args, path)
    return path, ckpt
