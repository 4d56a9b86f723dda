"""Mixed precision as a plain flag: --precision auto|fp32|bf16|fp16 (training and sampling) and
--vae_precision fp32|bf16|fp16 (the VAE encoder)."""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means fp16 on CUDA, as the reference's autocast (with a loss scaler in training),
    and fp32 on the CPU, where half precision is slow. Training, --evaluate and sample_ear.py
    all resolve it here, so the same flags give the same precision."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
