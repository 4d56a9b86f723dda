"""One place for process-group set-up and the collective helpers the entry points use.

Works in a single process, under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), under SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT set by the job script)
and on Azure ITP / OpenMPI (`--dist_on_itp`). NCCL on CUDA, gloo on CPU.
"""
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_env(dist_on_itp: bool):
    """(rank, world_size, local_rank) from the launcher's environment, or None if single."""
    env = os.environ
    if dist_on_itp:
        env.setdefault("MASTER_ADDR", env.get("AZ_BATCH_MASTER_NODE", "").split(":")[0] or "127.0.0.1")
        env.setdefault("MASTER_PORT", env.get("AZ_BATCH_MASTER_NODE", ":29500").split(":")[-1])
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env["OMPI_COMM_WORLD_LOCAL_RANK"]))
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("running under SLURM with several tasks: export MASTER_ADDR and "
                               "MASTER_PORT in the job script (e.g. the first node's host name)")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed(device: str = "cuda", dist_url: str = "env://", dist_on_itp: bool = False,
                     timeout_minutes: float = 120) -> DistInfo:
    """Join the process group if a launcher started us; pick this process's device.

    device: "cuda" or "cpu" (or "cuda:N" in a single process). Falls back to the CPU, with a
    warning, when CUDA was asked for but is not available. timeout_minutes: how long a rank
    waits for the others in a collective (rank 0 measures FID on 50,000 images alone while the
    others wait; NCCL's own default, 10 minutes, can be too short for that).
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"warning: --device {device} requested but CUDA is not available; using the CPU")
        device = "cpu"
    launched = _launcher_env(dist_on_itp)
    if launched is None:
        dev = torch.device(device)
        if dev.type == "cuda":  # also the current device: torch-fidelity moves its batches there by default
            dev = torch.device("cuda", dev.index or 0)
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank, world_size, local_rank = launched
    if device.startswith("cuda"):
        # The local rank modulo the GPUs this process sees: srun --gpus-per-task=1 (or
        # --gpu-bind=single:1) shows each task only its own GPU, as device 0.
        dev, backend = torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=dev if backend == "nccl" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values, device) -> list:
    """Element-wise sum over ranks of a list of numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flags: list, device) -> list:
    """Element-wise AND over ranks of booleans (bools or 0-d tensors), with one tiny MIN
    all-reduce for all of them, so every rank takes the same decisions."""
    t = torch.stack([torch.as_tensor(f, device=device) for f in flags]).float()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(f) for f in t.tolist()]


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class MainRankFailed(RuntimeError):
    pass


def run_on_main(is_main: bool, fn, expected: tuple = ()):
    """fn() on rank 0 alone, which gets its result (the others None); if it fails, every rank
    raises MainRankFailed with its error, so that no rank waits forever for one that failed
    (rank 0 prints the traceback, except for the `expected` kinds of error, whose message says
    it all). Also a barrier."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except Exception as e:
            if not isinstance(e, expected):
                traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
    error = all_gather_objects(error)[0]
    if error is not None:
        raise MainRankFailed(error)
    return result


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ReplicasDiffer(RuntimeError):
    pass


@torch.no_grad()
def check_replicas_in_sync(model: torch.nn.Module, ema_params=()) -> str:
    """Compare checksums of the weights and of the EMA across ranks; raise ReplicasDiffer if any
    rank has drifted (the replicas are meant to be bit-identical)."""
    def checksum(tensors):
        # One float64 copy at a time (not of all the weights at once), summed in the same
        # order: the same numbers on every rank. The totals stay on the device until the end.
        total = total_abs = 0
        for t in tensors:
            t = t.detach().double()
            total, total_abs = total + t.sum(), total_abs + t.abs().sum()
        return [float(total), float(total_abs)]
    local = checksum(model.parameters()) + checksum(ema_params)
    sums = all_gather_objects(local)
    if any(s != sums[0] for s in sums):
        raise ReplicasDiffer(f"model replicas differ across ranks (per rank: weight sum, |weight| "
                             f"sum, EMA sum, |EMA| sum = {sums})")
    return (f"weights and EMA identical on all {len(sums)} rank(s) (checksums {sums[0][0]:.10g}, "
            f"EMA {sums[0][2]:.10g})")
