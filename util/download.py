"""Fetch the pretrained KL-16 VAE, the ADM ImageNet-256 FID statistics and the Inception
weights, and verify them.

    python util/download.py              # all three
    python util/download.py --vae        # only the VAE
    python util/download.py --fid_stats  # only the statistics
    python util/download.py --inception  # only the Inception weights (for offline FID/IS)
    python util/download.py --ref_batch  # ADM's reference batch (1.6 GB, for precision/recall)

The VAE is the original `kl16.ckpt` of the Hugging Face repo `jadechoghari/mar`, pinned to one
revision and checked against its size and SHA-256 before it is read; it is then load-tested
strictly and also written as `kl16.safetensors`. The statistics are checked for `mu` (2048,) and
`sigma` (2048, 2048). The Inception weights (torch-fidelity's `inception-v3-compat`) are checked
against the SHA-256 prefix in their file name. The SHA-256 of every file is printed.
"""
import argparse
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as `python util/download.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.vae import DEFAULT_VAE_PATH, AutoencoderKL  # noqa: E402
from util.fid import DEFAULT_INCEPTION, INCEPTION_FILE, load_fid_stats  # noqa: E402
from util.fileio import atomic_write, sha256  # noqa: E402
from util.weights import load_state_dict_strict, read_weights  # noqa: E402

VAE_REPO = "jadechoghari/mar"
VAE_FILE = Path(DEFAULT_VAE_PATH).name  # the file name in the Hub repo and on disk
# The repo's revision holding the original kl16.ckpt, and that file's size and SHA-256.
VAE_REVISION = "773c9bdcd98740c7b876ce0d66f684a0e2468990"
VAE_SIZE = 265_900_046
VAE_SHA256 = "34ce001bcfffb7af67ec8af1e683a30d7bd45760855ddc7deedc1330f2cfd38f"
# The ADM statistics as distributed with MAR (mu and sigma only, ~32 MB). ADM's own reference
# batch (VIRTUAL_imagenet256_labeled.npz, 1.6 GB, also holds mu and sigma) works as --fid_url too.
FID_URL = "https://raw.githubusercontent.com/LTH14/mar/main/fid_stats/adm_in256_stats.npz"
# ADM's ImageNet-256 reference batch: 10,000 real images (arr_0) with mu/sigma, 1.6 GB; what
# precision/recall (and FD_DINOv2) compare the samples with.
REF_BATCH_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                 "imagenet/256/VIRTUAL_imagenet256_labeled.npz")


def check_file(path: Path, source: str, size: int = None, digest: str = None) -> str:
    """Raise unless `path` has the expected size and SHA-256; return its SHA-256."""
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"{source}: {path.stat().st_size} bytes, expected {size}")
    actual = sha256(path)
    if digest is not None and actual != digest:
        raise ValueError(f"{source}: sha256 {actual} does not match the pinned {digest}")
    return actual


def fetch_vae(dest_dir=Path(DEFAULT_VAE_PATH).parent, repo_id=VAE_REPO, revision=VAE_REVISION,
              size=VAE_SIZE, digest=VAE_SHA256) -> Path:
    """Download the pinned kl16.ckpt, verify size and hash before reading it, load it strictly,
    and write `kl16.ckpt` and `kl16.safetensors` into dest_dir."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import save
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    source = f"{repo_id}/{VAE_FILE}@{revision[:12]}"
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        downloaded = Path(hf_hub_download(repo_id=repo_id, filename=VAE_FILE, revision=revision,
                                          local_dir=tmp))
        check_file(downloaded, source, size, digest)
        state_dict = read_weights(downloaded, nested_keys=("model",))
        # The load test: every key and shape of KL-16, nothing extra, all values finite.
        load_state_dict_strict(AutoencoderKL(), state_dict, source=source)
        bad = [k for k, v in state_dict.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{source}: non-finite values in {bad[:5]}")
        atomic_write(dest_dir / "kl16.safetensors",
                     lambda f: f.write(save(dict(state_dict))))
        shutil.move(str(downloaded), dest_dir / VAE_FILE)
    for f in (dest_dir / VAE_FILE, dest_dir / "kl16.safetensors"):
        print(f"{f}: {f.stat().st_size / 1e6:.1f} MB, sha256 {sha256(f)}")
    return dest_dir / VAE_FILE


def download(url: str, dest: Path) -> str:
    """Stream `url` to `dest`; return the SHA-256 of what arrived."""
    with urllib.request.urlopen(url) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)
    return sha256(dest)


def fetch_inception(dest=DEFAULT_INCEPTION, url=None) -> Path:
    """Download torch-fidelity's Inception weights; the file name carries a SHA-256 prefix."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected_prefix = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "download.pth"
        digest = download(url or URL_INCEPTION_V3, raw)
        if not digest.startswith(expected_prefix):
            raise ValueError(f"{url or URL_INCEPTION_V3}: sha256 {digest} does not start with "
                             f"{expected_prefix}")
        read_weights(raw)  # plain tensors only
        shutil.move(str(raw), dest)
    print(f"{dest}: sha256 {digest}")
    return dest


def fetch_fid_stats(dest="fid_stats/adm_in256_stats.npz", url=FID_URL, expected_sha256=None,
                    resolution: int = None) -> Path:
    """Download the statistics, check them, and keep `mu` and `sigma` at `dest`, with the
    `resolution` they are for when it is known (evaluation then checks the samples')."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "download.npz"
        digest = download(url, raw)
        if expected_sha256 and digest != expected_sha256:
            raise ValueError(f"{url}: sha256 {digest} does not match the expected {expected_sha256}")
        mu, sigma = load_fid_stats(raw)
    known = {} if resolution is None else {"resolution": np.int64(resolution)}
    atomic_write(dest, lambda f: np.savez(f, mu=mu, sigma=sigma, **known))
    print(f"{dest}: from {url} (sha256 {digest}); mu {mu.shape}, sigma {sigma.shape}")
    return dest


def fetch_ref_batch(dest="fid_stats/VIRTUAL_imagenet256_labeled.npz", url=REF_BATCH_URL,
                    expected_sha256=None) -> Path:
    """Download ADM's reference batch and check it: real images `arr_0` (N, H, W, 3) uint8 and
    the FID statistics `mu`/`sigma` beside them."""
    from util.fid import ReferenceBatch
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / dest.name
        digest = download(url, raw)
        if expected_sha256 and digest != expected_sha256:
            raise ValueError(f"{url}: sha256 {digest} does not match the expected {expected_sha256}")
        images = ReferenceBatch(raw).images()
        load_fid_stats(raw)
        shutil.move(str(raw), dest)
    print(f"{dest}: from {url} (sha256 {digest}); {len(images)} images of {images.shape[1:]}")
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", action="store_true", help="fetch only the VAE")
    p.add_argument("--fid_stats", action="store_true", help="fetch only the FID statistics")
    p.add_argument("--inception", action="store_true", help="fetch only the Inception weights")
    p.add_argument("--ref_batch", action="store_true",
                   help="fetch ADM's reference batch (1.6 GB; for precision/recall; not by default)")
    p.add_argument("--vae_dir", default=str(Path(DEFAULT_VAE_PATH).parent))
    p.add_argument("--fid_dest", default="fid_stats/adm_in256_stats.npz")
    p.add_argument("--fid_url", default=FID_URL)
    p.add_argument("--fid_resolution", type=int, default=256,
                   help="image side the statistics are for, recorded in the file (ADM's: 256)")
    p.add_argument("--fid_sha256", default=None, help="expected SHA-256 of the statistics download")
    p.add_argument("--ref_batch_sha256", default=None,
                   help="expected SHA-256 of the reference batch download")
    args = p.parse_args(argv)
    everything = not (args.vae or args.fid_stats or args.inception or args.ref_batch)
    if args.vae or everything:
        fetch_vae(args.vae_dir)
    if args.fid_stats or everything:
        fetch_fid_stats(args.fid_dest, args.fid_url, args.fid_sha256, args.fid_resolution)
    if args.inception or everything:
        fetch_inception()
    if args.ref_batch:
        fetch_ref_batch(expected_sha256=args.ref_batch_sha256)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
