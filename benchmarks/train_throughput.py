"""Training throughput and peak memory of one EAR configuration, on random latents.

    python benchmarks/train_throughput.py --model ear_base --batch_size 32 --precision bf16 --device cuda
    python benchmarks/train_throughput.py --model ear_base --batch_size 4 --device cpu --steps 3

Takes every model/optimisation flag of main_ear.py, runs `--warmup_steps` untimed optimizer steps,
then times `--steps` more, and prints images/s for this device and the peak memory.
"""
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine_ear import optimizer_step  # noqa: E402
from util.args import train_parser  # noqa: E402
from util.builders import build_model, build_train_state, resolve_args  # noqa: E402
from util.distributed import DistInfo  # noqa: E402


def main() -> None:
    p = train_parser()
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    g.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first")
    args = p.parse_args()
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    info = DistInfo(device=device)
    resolve_args(args, info)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    state = build_train_state(model, args, info)
    side = args.img_size // args.vae_stride
    shape = (args.batch_size, args.vae_embed_dim, side, side)
    micro = [(torch.randn(shape, device=device), torch.randint(0, args.class_num, (args.batch_size,), device=device), None)
             for _ in range(args.accumulation_steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup_steps):
        optimizer_step(state, micro, args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = optimizer_step(state, micro, args)
    loss.item()  # waits for the device
    seconds = time.perf_counter() - start
    images = args.steps * args.batch_size * args.accumulation_steps
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        peak = f"peak process memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model} ({n_params:.1f}M params), batch {args.batch_size} x {args.accumulation_steps}, "
          f"{state.precision}, grad_checkpointing={args.grad_checkpointing}, compile={args.compile}, "
          f"on {device}: {images / seconds:.2f} images/s per device; {peak}")


if __name__ == "__main__":
    main()
