"""Reading weights without running code from the file, and loading them strictly."""
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn


def load_failure(error: Exception) -> str:
    """What torch.load's error says about the file, in a few words: for a weights-only refusal,
    the unpickler's reason (e.g. "Unsupported global: GLOBAL x.Y was not an allowed global"),
    without torch's page of advice around it (which includes loading unsafely)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the doc")[0].split())
        return f"refused by the safe loader: {reason.split('. Please use')[0]}"
    return " ".join(text.strip().split("\n")[0].split()) or type(error).__name__


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
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError and friends do not name the file
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({load_failure(e)})") from e
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


def check_values(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                 source: str) -> None:
    """Every tensor of `given` can stand for the model's: floating point where the model's is
    (an integer tensor would be truncated or misread, so it is refused), the same dtype where
    the model's is not, and finite. Float tensors of another precision are cast on loading
    (by `load_state_dict`); one line says so."""
    cast = set()
    for key, want in expected.items():
        value = given[key]
        if want.is_floating_point() != value.is_floating_point() or (
                not want.is_floating_point() and value.dtype != want.dtype):
            raise ValueError(f"{source}: {key} is {value.dtype}, expected {want.dtype}")
        if want.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{source}: {key} holds non-finite values (NaN or inf)")
            if value.dtype != want.dtype:
                cast.add((str(value.dtype), str(want.dtype)))
    if cast:
        print(f"note: {source}: " + ", ".join(f"{a} tensors cast to {b}" for a, b in sorted(cast)))


def check_weights(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                  source: str, owner: str) -> None:
    """`check_state_dict` (keys, shapes), then `check_values` (dtypes, finiteness)."""
    check_state_dict(expected, given, source, owner)
    check_values(expected, given, source)


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """Load every tensor; any missing, unexpected or mis-shaped key, an integer tensor where
    the model has a float one, or a non-finite value is an error naming the key."""
    check_weights(module.state_dict(), state_dict, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)
