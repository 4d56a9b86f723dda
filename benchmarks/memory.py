"""Peak memory of one EAR training step, without and with --grad_checkpointing.

    python benchmarks/memory.py                 # EAR-B's width and head, 2 blocks, CPU (~40 s)
    python benchmarks/memory.py --smallest      # ~10 s: what the tests run
    python benchmarks/memory.py --model ear_base --batch_size 64 --score_batch_mul 2 --device cuda

Takes every flag of main_ear.py (after the defaults below). Each setting runs in a fresh process
from the same seed (so the same mask ratio): one optimizer step first (the optimizer's state,
lazy initialisation), then the measured one. Printed is the step's peak memory above what the
process held just before it (weights, optimizer state): activations, gradients, temporaries.
On CUDA that is torch.cuda.max_memory_allocated; on the CPU (Linux only) the peak resident set
size, VmHWM, reset through /proc/self/clear_refs, with glibc told to map every block above
64 KiB on its own, so that freed memory goes back to the system and is counted again when reused.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["--model", "ear_base", "--decoder_depth", "2", "--img_size", "256",
           "--batch_size", "1", "--score_batch_mul", "2", "--device", "cpu"]
SMALLEST = ["--model", "ear_tiny", "--decoder_depth", "1", "--img_size", "64",
            "--batch_size", "2", "--device", "cpu"]
RESET_PEAK_RSS = "5"  # written to /proc/self/clear_refs


def proc_status_bytes(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return 1024 * int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))


def training_setup(argv) -> tuple:
    """(args, train state, one micro-batch of random latents) for the flags in argv."""
    sys.path.insert(0, str(REPO))
    import torch
    from util.args import train_parser
    from util.builders import build_model, build_train_state, resolve_args
    from util.distributed import DistInfo

    args = train_parser().parse_args(argv)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    info = DistInfo(device=torch.device(args.device if cuda else "cpu"))
    resolve_args(args, info)
    torch.manual_seed(args.seed)
    state = build_train_state(build_model(args).to(info.device), args, info)
    side = args.img_size // args.vae_stride
    latents = torch.randn(args.batch_size, args.vae_embed_dim, side, side, device=info.device)
    labels = torch.randint(0, args.class_num, (args.batch_size,), device=info.device)
    return args, state, [(latents, labels, None)]


def measure(argv) -> dict:
    """In this process: two training steps; the second's peak memory above the memory held
    before it (bytes), with what describes the run."""
    import torch
    from engine_ear import optimizer_step
    args, state, batch = training_setup(argv)
    device = state.device
    optimizer_step(state, batch, args)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text(RESET_PEAK_RSS)
        before = proc_status_bytes("VmRSS")
    optimizer_step(state, batch, args)[0].item()  # .item(): waits for the device
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else proc_status_bytes("VmHWM"))
    params = list(state.model.parameters())
    return {"model": args.model, "params": sum(p.numel() for p in params),
            "grads": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "batch": args.batch_size, "score_batch_mul": args.score_batch_mul,
            "precision": state.precision, "device": str(device), "held": before,
            "step_peak": peak - before}


def run_settings(argv) -> list:
    """measure() without and with --grad_checkpointing, each in a fresh process (both at once:
    each counts only its own memory)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    settings = [argv, [*argv, "--grad_checkpointing"]]
    procs = [subprocess.Popen([sys.executable, __file__, "--measure", *flags], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for flags in settings]
    results = []
    for flags, proc in zip(settings, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(flags)} failed:\n{out}{err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv) -> None:
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(argv[1:])))
        return
    base = SMALLEST if "--smallest" in argv else DEFAULT
    argv = [*base, *(a for a in argv if a != "--smallest")]
    plain, checkpointed = run_settings(argv)
    mib = 2 ** 20
    print(f"flags: {' '.join(argv)}")
    print(f"{plain['model']} ({plain['params'] / 1e6:.1f}M params), batch {plain['batch']}, "
          f"score_batch_mul {plain['score_batch_mul']}, {plain['precision']} on "
          f"{plain['device']}; held before the step: {plain['held'] / mib:.0f} MiB; peak of one "
          f"training step above it (the gradients' {plain['grads'] / mib:.0f} MiB included):")
    for name, r in (("without", plain), ("with", checkpointed)):
        print(f"  {name} --grad_checkpointing: {r['step_peak'] / mib:8.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
