"""The CUDA paths, held on the CPU (issue 23): which GPU each process binds to under SLURM and
torchrun, with the device count and the process-group set-up mocked."""
import pytest
import torch
import torch.distributed as dist

from util import distributed


@pytest.fixture
def fake_gpus(monkeypatch):
    """`n` visible GPUs (call the fixture's result with n); records what init_distributed binds."""
    bound = {}

    def setup(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.__setitem__("set_device", d))
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, **kw: bound.update(backend=backend, **kw))
        return bound
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    return setup


@pytest.mark.parametrize("visible, expected", [(1, 0), (8, 5)])
def test_slurm_task_binds_its_local_rank_modulo_the_visible_gpus(fake_gpus, monkeypatch,
                                                                 visible, expected):
    """srun --gpus-per-task=1 shows task 5 of a node one GPU (device 0); a whole node, eight."""
    bound = fake_gpus(visible)
    for var, value in (("SLURM_PROCID", "13"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "5")):
        monkeypatch.setenv(var, value)
    info = distributed.init_distributed("cuda")
    want = torch.device("cuda", expected)
    assert info.device == want and bound["set_device"] == want and bound["device_id"] == want
    assert (info.rank, info.world_size, info.local_rank, bound["backend"]) == (13, 16, 5, "nccl")


def test_torchrun_rank_binds_modulo_the_visible_gpus(fake_gpus, monkeypatch):
    bound = fake_gpus(4)
    for var, value in (("RANK", "6"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "6")):
        monkeypatch.setenv(var, value)
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 2)
    assert bound["set_device"] == torch.device("cuda", 2)


@pytest.mark.parametrize("device, expected", [("cuda:1", 1), ("cuda", 0)])
def test_a_single_process_makes_its_gpu_the_current_one(fake_gpus, device, expected):
    """torch-fidelity moves its batches to the current CUDA device: it must be --device's."""
    bound = fake_gpus(2)
    info = distributed.init_distributed(device)
    assert info.device == torch.device("cuda", expected) == bound["set_device"]
    assert "backend" not in bound  # no process group


def test_sample_pngs_written_in_the_background_keep_every_pixel(tmp_path):
    """PngWriter: level-1 PNGs on worker threads read back as the exact pixels; a write that
    fails raises when the writer is closed, not silently."""
    import numpy as np
    from PIL import Image

    from util.images import PngWriter
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(6)]
    images.append(np.zeros((8, 8, 1), np.uint8) + 7)  # grayscale (digits)
    with PngWriter() as pngs:
        for i, image in enumerate(images):
            pngs.save(image, tmp_path / f"{i}.png")
    for i, image in enumerate(images):
        with Image.open(tmp_path / f"{i}.png") as read:
            assert np.array_equal(np.asarray(read).reshape(image.shape), image)
    with pytest.raises(FileNotFoundError):
        with PngWriter() as pngs:
            pngs.save(images[0], tmp_path / "no such folder" / "x.png")


def run_gpu_check(tmp_path, *flags) -> tuple:
    import json

    from conftest import run_script
    out = tmp_path / "check.json"
    proc = run_script("benchmarks/gpu_check.py", ["--device", "cpu", "--out", out, *flags],
                      timeout=900)
    return json.loads(out.read_text())["rows"], proc.stdout


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py in its CPU mode (tiny sizes), --quick: training in both
    precisions, eager and with --grad_checkpointing, and guided sampling at two batch sizes."""
    rows, _ = run_gpu_check(tmp_path, "--quick")
    train = [r for r in rows if r["part"] == "train"]
    assert [(r["precision"], r["variant"]) for r in train] == [
        ("fp32", "eager"), ("fp32", "grad_checkpointing"), ("bf16", "eager"),
        ("bf16", "grad_checkpointing")]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    assert [r["batch"] for r in rows if r["part"] == "sample"] == [4, 8]


@pytest.mark.slow  # 1-3 min: compiles, and three main_ear.py processes
def test_the_whole_gpu_check_runs_on_the_cpu(tmp_path):
    """Also --compile, and main_ear.py's resumed one-process torchrun run equal to the straight
    one bit for bit."""
    rows, stdout = run_gpu_check(tmp_path, "--steps", 2)
    assert [r["variant"] for r in rows if r["part"] == "train"].count("compile") == 2
    assert rows[-1]["resume_bit_identical"] is True
    assert "resumed run bit-identical to the straight one: True" in stdout
