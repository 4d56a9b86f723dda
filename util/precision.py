"""Mixed precision as a plain flag: --precision auto|fp32|bf16|fp16."""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, cuda_default: str) -> str:
    """`auto` means fp32 on the CPU (where half precision is slow) and `cuda_default` on CUDA."""
    if precision == "auto":
        return cuda_default if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
