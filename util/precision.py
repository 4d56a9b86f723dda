"""Mixed precision as a plain flag: --precision auto|fp32|bf16|fp16 (training and sampling) and
--vae_precision fp32|bf16|fp16 (the VAE encoder); on CUDA, TF32 (--tf32) and cuDNN autotuning."""
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


def set_up_cuda(device: torch.device, tf32: bool) -> None:
    """A CUDA run's speed settings (nothing on the CPU): cuDNN benchmarks the convolution
    algorithms once per input shape (the VAE's and the sampling batches' repeat) and keeps the
    fastest; float32 matmuls and cuDNN convolutions run in TF32 (float32 range, 10-bit mantissa)
    with `tf32`, in full float32 without. Metrics turn TF32 off while they compute features
    (util/fid.py exact_float32)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    # The API whose state torch.compile reads back (torch.get_float32_matmul_precision): set
    # through torch.backends.cuda.matmul.fp32_precision, those reads raise in this torch.
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def describe_precision(precision: str, device: torch.device, tf32: bool) -> str:
    """A resolved --precision as a run prints it: fp32 on CUDA says whether matmuls are TF32."""
    if precision == "fp32" and device.type == "cuda":
        return "fp32 with TF32 matmuls" if tf32 else "fp32 (TF32 off)"
    return precision
