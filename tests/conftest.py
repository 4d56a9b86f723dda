import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Key -> shape of the reference ear_base/large/huge and KL-16 VAE checkpoints, read from the
# released files and kept here so the suite runs on any clone.
MANIFEST = REPO / "tests" / "data" / "reference_state_dict_manifest.json"
SHARED_MANIFEST = REPO.parent / "shared" / "reference" / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args, nproc: int = 1, timeout: float = 300, check: bool = True,
               cwd=REPO, env=None):
    """Run an entry point of this repo as a user would: `python script` or `torchrun`.
    `env` adds to (or, with None values, removes from) the environment."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"]
    cmd += [str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def make_image_folder(root: Path, per_class: int = 3, classes=("cat", "dog", "zebra")) -> Path:
    """A small ImageNet-style folder: JPEG and PNG, non-square, grayscale, RGBA and palette."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    kinds = [("RGB", ".JPEG", (40, 29)), ("L", ".png", (33, 50)), ("RGBA", ".png", (64, 64)),
             ("P", ".png", (37, 37)), ("RGB", ".jpg", (90, 45))]
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode, ext, size = kinds[(c + i) % len(kinds)]
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(mode)
            img.save(root / cls / f"{cls}_{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def random_vae_ckpt(tmp_path_factory):
    """A KL-16 VAE with random weights, saved in the reference .ckpt format ({"model": sd})."""
    from models.vae import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL()
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    torch.save({"model": vae.state_dict()}, path)
    return path
