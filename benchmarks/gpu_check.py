"""One command that proves the GPU path and measures it, in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU: EAR-B
    python benchmarks/gpu_check.py --device cpu --quick            # tiny sizes (the test suite)

1. Training EAR-B at batch 64 on random latents, in fp16 and bf16, eager, with
   --grad_checkpointing and with --compile: images/s, model FLOPs utilisation (the forward and
   backward matmul FLOPs of one eager step, counted by torch's FlopCounterMode, per second,
   over the GPU's dense peak; on the CPU over this machine's measured fp32 matmul rate) and
   peak memory.
2. Sampling with guidance (cfg 2.0, 64 steps) at batch 64 and 256: images/s, decoded by a
   KL-16 VAE of random weights (the same compute as the real one; nothing is downloaded).
3. main_ear.py itself, on the built-in digits: a one-GPU torchrun run of one epoch, resumed
   for a second, against a straight two-epoch run: the weights and the EMA must be the same
   bit for bit.
Prints a table and writes every number to --out (JSON). --quick leaves out --compile and the
main_ear.py runs (the default test suite's check that the rest runs).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine_ear import generate, optimizer_step  # noqa: E402
from util.args import train_parser  # noqa: E402
from util.builders import build_model, build_train_state, resolve_args  # noqa: E402
from util.distributed import DistInfo  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of the GPUs we expect, by a word of the device name.
GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
# EAR-B as the paper trains it (256 px, KL-16 latents), and a CPU stand-in of the same code.
SIZES = {
    "cuda": ["--model", "ear_base", "--img_size", 256, "--vae_stride", 16, "--vae_embed_dim", 16,
             "--class_num", 1000, "--buffer_size", 64, "--batch_size", 64],
    "cpu": ["--model", "ear_tiny", "--img_size", 32, "--vae_stride", 16, "--vae_embed_dim", 16,
            "--class_num", 10, "--buffer_size", 4, "--batch_size", 8, "--decoder_depth", 2],
}
COMMON = ["--score_batch_mul", 2, "--lr", 1e-4, "--warmup_epochs", 0, "--num_workers", 0]


def settings(device: str, *extra):
    args = train_parser().parse_args([str(a) for a in [*SIZES[device], *COMMON, "--device", device,
                                                       *extra]])
    resolve_args(args, DistInfo(device=torch.device(device)))
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's, in KiB


def peak_flops(device: torch.device) -> tuple:
    """(FLOP/s the utilisation is measured against, what it is)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK.items() if k in name), None)
        return peak, f"{name} dense bf16/fp16 peak" if peak else f"{name}: peak unknown"
    a = torch.randn(1024, 1024)
    a @ a
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    return 2 * 1024**3 * reps / (time.perf_counter() - start), "measured fp32 matmul rate"


def random_batch(args, device):
    side = args.img_size // args.vae_stride
    tokens = torch.randn(args.batch_size, args.vae_embed_dim, side, side, device=device)
    return [(tokens, torch.randint(0, args.class_num, (args.batch_size,), device=device), None)]


def step_flops(args, device, steps: int = 4) -> float:
    """Matmul FLOPs of an eager optimizer step (forward and backward, without recomputation),
    the mean of `steps` (the head's rows follow each step's random mask ratio)."""
    torch.manual_seed(0)
    state = build_train_state(build_model(args).to(device), args, DistInfo(device=device))
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            optimizer_step(state, random_batch(args, device), args)
    return counter.get_total_flops() / steps


def train_row(device: torch.device, precision: str, variant: str, steps: int, flops: int,
              peak: float) -> dict:
    flags = {"eager": [], "grad_checkpointing": ["--grad_checkpointing"], "compile": ["--compile"]}
    args = settings(device.type, "--precision", precision, *flags[variant])
    torch.manual_seed(0)
    state = build_train_state(build_model(args).to(device), args, DistInfo(device=device))
    batch = random_batch(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    # Warm-up: allocation, autotuning and compilation (the head's, for a row count that varies
    # with the mask ratio, settles after a few shapes).
    for _ in range(8 if variant == "compile" else 3):
        optimizer_step(state, batch, args)
    synchronize(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = optimizer_step(state, batch, args)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"part": "train", "precision": precision, "variant": variant,
            "images_per_s": round(steps * args.batch_size / seconds, 2),
            "mfu": round(flops * steps / seconds / peak, 4) if peak else None,
            "peak_memory_gib": round(peak_memory_gib(device), 2), "warmup_s": round(warmup, 1),
            "loss": round(float(loss), 4)}


@torch.no_grad()
def sample_row(device: torch.device, batch: int, decode) -> dict:
    args = settings(device.type, "--precision", "bf16", "--num_iter",
                    64 if device.type == "cuda" else 4)
    model = build_model(args).to(device).eval()
    labels = torch.arange(batch) % args.class_num
    generate(model, decode, labels[:2], 2.0, 1.0, args, device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    generate(model, decode, labels, 2.0, 1.0, args, device)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"part": "sample", "batch": batch, "cfg": 2.0, "num_iter": args.num_iter,
            "images_per_s": round(batch / seconds, 2)}


def vae_decoder(device: torch.device):
    from models.vae import LATENT_SCALE, AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL().to(device).eval()
    return lambda tokens: vae.decode(tokens / LATENT_SCALE)


def main_ear_resume_check(device: str, workdir: Path) -> dict:
    """Two digits epochs straight; one epoch under one-process torchrun, then a resumed second:
    the same weights and EMA bit for bit."""
    from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
    flags = ["--dataset", "digits", "--tokenizer", "pixel", "--img_size", 8, "--vae_stride", 1,
             "--vae_embed_dim", 1, "--patch_size", 2, "--class_num", 10, "--model", "ear_tiny",
             "--buffer_size", 4, "--attn_dropout", 0, "--proj_dropout", 0, "--batch_size", 256,
             "--lr", 1e-3, "--warmup_epochs", 1, "--num_workers", 0, "--seed", 0,
             "--save_last_freq", 1, "--device", device]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    runs, start = {}, time.perf_counter()
    for name, launcher, epochs in (("straight", [], 2), ("split", torchrun, 1), ("split", [], 2)):
        out = workdir / name
        cmd = [sys.executable, *launcher, str(REPO / "main_ear.py"), *map(str, flags), "--epochs",
               str(epochs), "--output_dir", str(out), "--log_dir", str(out), "--resume", str(out)]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        runs[name] = load_training_checkpoint(out / CHECKPOINT_NAME)
    same = all(torch.equal(runs["straight"][key][k], runs["split"][key][k])
               for key in ("model", "model_ema") for k in runs["straight"][key])
    return {"part": "main_ear", "torchrun_one_process": True, "resume_bit_identical": same,
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list) -> str:
    lines = []
    for r in rows:
        if r["part"] == "train":
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"train  {r['precision']:<5} {r['variant']:<18} {r['images_per_s']:>9} img/s"
                         f"  MFU {mfu:>6}  peak {r['peak_memory_gib']:>6} GiB  warm-up "
                         f"{r['warmup_s']} s")
        elif r["part"] == "sample":
            lines.append(f"sample batch {r['batch']:<4} cfg {r['cfg']} {r['num_iter']} steps "
                         f"{r['images_per_s']:>9} img/s")
        else:
            lines.append(f"main_ear.py under torchrun (1 process), resumed run bit-identical to "
                         f"the straight one: {r['resume_bit_identical']} ({r['seconds']} s)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true",
                   help="leave out --compile and the main_ear.py runs")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no GPU visible (for the CPU check pass --device cpu)")
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    precisions = ("fp16", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    variants = ["eager", "grad_checkpointing"] + ([] if args.quick else ["compile"])
    peak, peak_name = peak_flops(device)
    flops = step_flops(settings(device.type), device)
    rows = [train_row(device, precision, variant, steps, flops, peak)
            for precision in precisions for variant in variants]
    decode = vae_decoder(device) if device.type == "cuda" else (lambda t: t)
    rows += [sample_row(device, batch, decode) for batch in ((64, 256) if device.type == "cuda"
                                                             else (4, 8))]
    if not args.quick:
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(main_ear_resume_check(args.device, Path(workdir)))
    header = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch "
              f"{torch.__version__}; MFU against the {peak_name} ({peak / 1e12:.2f} TFLOP/s); "
              f"{flops / 1e9:.1f} GFLOP per training step")
    print(header + "\n" + table(rows))
    Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
