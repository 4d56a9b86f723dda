"""Files we write: atomic, with the user's permissions, and a clear error on a full disk."""
import errno
import os
import stat

import numpy as np
import pytest
import torch

import util.fileio as fileio
from util.checkpoint import save_training_checkpoint
from util.fileio import atomic_write
from util.weights import read_weights


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.npz", lambda f: np.savez(f, x=np.zeros(3)))
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what an ordinary open() gives, for comparison
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.npz").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)


class FullDisk:
    """A file object that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 4000])
def test_full_disk_is_named_and_keeps_the_old_file(tmp_path, monkeypatch, room):
    target = tmp_path / "checkpoint-last.pth"
    atomic_write(target, lambda f: torch.save({"w": torch.ones(3)}, f))
    before = target.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room))
    # torch.save alone would report "unexpected pos ..." from its zip writer.
    with pytest.raises(OSError, match=f"no space left .* writing {target}"):
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temporary left


def test_garbage_safetensors_names_the_file(tmp_path):
    path = tmp_path / "kl16.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="kl16.safetensors: not a readable .safetensors file"):
        read_weights(path)


def test_training_checkpoint_loads_with_plain_torch_load(tmp_path):
    import argparse
    from pathlib import Path
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())

    class NoEMA:
        def state_dict(self):
            return model.state_dict()

    args = argparse.Namespace(output_dir=Path(tmp_path), lr=1e-3, class_ids=[1, 2], log_dir=None)
    save_training_checkpoint(tmp_path, model, NoEMA(), opt, torch.amp.GradScaler("cpu", enabled=False),
                             0, args)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth")  # torch's default: weights_only=True
    assert ckpt["args"] == {"output_dir": str(tmp_path), "lr": 1e-3, "class_ids": [1, 2], "log_dir": None}
