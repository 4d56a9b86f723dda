"""main_cache.py end to end, and the loaders that read what it writes (the reference release's cache format)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_image_folder, run_script
from models.vae import load_vae
from util.loader import CachedFolder, ImageFolderWithFilename, image_transform, load_cached_moments

IMG = 32  # small images keep the real KL-16 architecture fast on CPU


def cache_args(data, cache, vae, *extra):
    return ["--img_size", IMG, "--vae_path", vae, "--vae_embed_dim", 16, "--batch_size", 2,
            "--num_workers", 0, "--device", "cpu", "--data_path", data, "--cached_path", cache, *extra]


def all_images(data: Path):
    train = data / "train"
    return sorted(p.relative_to(train).as_posix() for p in train.glob("*/*") if p.is_file())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root / "train")
    return root


@pytest.mark.slow  # 50 s; the packed form's torchrun test runs the same exactly-once split
def test_torchrun_two_processes_write_each_image_once(image_folder, tmp_path, random_vae_ckpt, capsys):
    cache = tmp_path / "cache"
    proc = run_script("main_cache.py", cache_args(image_folder, cache, random_vae_ckpt), nproc=2)
    images = all_images(image_folder)
    written = sorted(p.relative_to(cache).as_posix()[:-4] for p in cache.glob("*/*.npz"))
    assert written == images  # one file per image, nothing else
    assert f'"written": {len(images)}, "skipped": 0, "failed": 0' in proc.stdout

    vae = load_vae(random_vae_ckpt)
    dataset = ImageFolderWithFilename(image_folder / "train", image_transform(IMG, random_flip=False))
    for i in range(len(dataset)):
        img, _, rel, _ = dataset[i]
        arrays = load_cached_moments(cache / f"{rel}.npz", expected_shape=(32, IMG // 16, IMG // 16))
        with torch.no_grad():
            plain = vae.encode(img[None]).parameters[0].numpy()
            flipped = vae.encode(img.flip(dims=[2])[None]).parameters[0].numpy()
        np.testing.assert_allclose(arrays["moments"], plain, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(arrays["moments_flip"], flipped, atol=1e-4, rtol=1e-4)
        assert not np.allclose(arrays["moments"], arrays["moments_flip"])

    # A rerun skips everything; --overwrite redoes everything (in this process: no start-up).
    import main_cache
    from util.args import cache_parser
    for extra, expected in (([], f'"written": 0, "skipped": {len(images)}'),
                            (["--overwrite"], f'"written": {len(images)}, "skipped": 0')):
        capsys.readouterr()
        main_cache.main(cache_parser().parse_args(
            [str(a) for a in cache_args(image_folder, cache, random_vae_ckpt, *extra)]))
        assert expected in capsys.readouterr().out


@pytest.mark.slow  # 25 s; the packed form's kill -9 test runs the same write loop
def test_killed_job_resumes_without_corrupt_or_missing_files(tmp_path, random_vae_ckpt):
    data = tmp_path / "images"
    make_image_folder(data / "train", per_class=20)
    cache = tmp_path / "cache"
    args = cache_args(data, cache, random_vae_ckpt, "--batch_size", 1)
    cmd = [sys.executable, str(REPO / "main_cache.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(cache.glob("*/*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    partial = len(list(cache.glob("*/*.npz")))
    assert 3 <= partial < 60

    rerun = run_script("main_cache.py", args)
    assert f'"skipped": {partial}' in rerun.stdout
    files = sorted(cache.glob("*/*.npz"))
    assert [p.relative_to(cache).as_posix()[:-4] for p in files] == all_images(data)
    for f in files:
        load_cached_moments(f, expected_shape=(32, 2, 2))
    assert list(cache.rglob("*.tmp")) == []


def test_unreadable_image_stops_or_is_skipped(tmp_path, random_vae_ckpt, capsys):
    import main_cache
    from util.args import cache_parser
    run = lambda *extra: main_cache.main(cache_parser().parse_args(
        [str(a) for a in cache_args(data, cache, random_vae_ckpt, *extra)]))
    data = tmp_path / "images"
    make_image_folder(data / "train", per_class=2)
    (data / "train" / "dog" / "broken.JPEG").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match="broken.JPEG.*--skip_bad"):
        run()
    run("--skip_bad")
    assert '"failed": 1' in capsys.readouterr().out
    assert (cache / "failed_images.txt").read_text().startswith("dog/broken.JPEG\t")
    assert len(list(cache.glob("*/*.npz"))) == 6
    # Once the image is fixed, a clean rerun leaves no stale list naming it.
    (data / "train" / "dog" / "broken.JPEG").unlink()
    run("--skip_bad")
    assert '"failed": 0' in capsys.readouterr().out and not (cache / "failed_images.txt").exists()


def test_cached_and_image_loaders_agree_on_classes(image_folder, tmp_path):
    images = ImageFolderWithFilename(image_folder / "train", image_transform(IMG, random_flip=False))
    for cls in images.classes:
        (tmp_path / cls).mkdir()
    for path, label in images.samples:
        rel = Path(path).relative_to(image_folder / "train").as_posix()
        arr = np.zeros((32, 2, 2), np.float32)
        np.savez(tmp_path / f"{rel}.npz", moments=arr + label, moments_flip=arr - label)
    cached = CachedFolder(tmp_path, expected_shape=(32, 2, 2))
    assert cached.class_to_idx == images.class_to_idx
    for i, (path, label) in enumerate(cached.samples):
        moments, got = cached[i]
        assert got == label and abs(moments[0, 0, 0].item()) == label
    # The flip is chosen at random, about half the time each.
    torch.manual_seed(0)
    signs = [np.sign(cached[len(cached) - 1][0][0, 0, 0].item()) for _ in range(400)]
    assert 150 < signs.count(1.0) < 250


@pytest.mark.parametrize("arrays, msg", [
    ({"moments": np.zeros((32, 2, 2), np.float32)}, "expected keys"),
    ({"moments": np.zeros((32, 2, 2), np.float64), "moments_flip": np.zeros((32, 2, 2), np.float64)}, "float32"),
    ({"moments": np.zeros((32, 4, 4), np.float32), "moments_flip": np.zeros((32, 4, 4), np.float32)}, "shape"),
])
def test_bad_cache_file_is_named(tmp_path, arrays, msg):
    (tmp_path / "cls").mkdir()
    np.savez(tmp_path / "cls" / "x.png.npz", **arrays)
    cached = CachedFolder(tmp_path, expected_shape=(32, 2, 2))
    with pytest.raises(ValueError, match=f"x.png.npz.*{msg}"):
        cached[0]


def test_empty_or_missing_cache_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CachedFolder(tmp_path / "missing")
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no .npz files"):
        CachedFolder(tmp_path)


def test_data_path_without_train_folder_is_a_clear_error(tmp_path, random_vae_ckpt):
    proc = run_script("main_cache.py", cache_args(tmp_path, tmp_path / "c", random_vae_ckpt), check=False)
    assert proc.returncode != 0 and "/train/<class>/<image>" in proc.stderr


def test_cache_help_lists_the_reference_flags():
    out = run_script("main_cache.py", ["--help"]).stdout
    for flag in ("--img_size", "--vae_path", "--vae_embed_dim", "--batch_size", "--data_path",
                 "--cached_path", "--num_workers", "--pin_mem", "--seed", "--device",
                 "--world_size", "--local_rank", "--dist_url", "--overwrite", "--skip_bad"):
        assert flag in out


def png16(path, values: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (PIL writes 16-bit grayscale only): color_type 0 gray, 2 RGB."""
    import struct
    import zlib
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("color_type", [0, 2])
def test_sixteen_bit_pngs_keep_their_brightness(tmp_path, color_type):
    from util.loader import load_rgb
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    values = ramp if color_type == 0 else np.stack([ramp, ramp // 2, ramp // 4], -1)
    png16(tmp_path / "x.png", values, color_type)
    rgb = np.asarray(load_rgb(str(tmp_path / "x.png"))).astype(np.int64)
    expected = values / 257.0 if color_type == 2 else np.repeat(values[..., None] / 257.0, 3, -1)
    assert np.abs(rgb - expected).max() <= 1.0  # not clipped to 255 (white) as convert("RGB") does
    assert (rgb == 255).mean() < 0.01


def test_vae_precision_defaults_to_fp32_and_lower_precision_is_a_flag(tmp_path, random_vae_ckpt):
    from util.args import cache_parser, train_parser
    assert cache_parser().parse_args([]).vae_precision == "fp32"
    assert train_parser().parse_args([]).vae_precision == "fp32"
    assert cache_parser().parse_args(["--precision", "bf16"]).vae_precision == "bf16"
    # One image: bf16 convolutions are slow on this CPU (52 s for the nine of `image_folder`).
    make_image_folder(tmp_path / "data" / "train", per_class=1, classes=("a",))
    proc = run_script("main_cache.py", cache_args(tmp_path / "data", tmp_path / "c", random_vae_ckpt,
                                                   "--vae_precision", "bf16"))
    assert "encoding in bf16" in proc.stdout and len(list((tmp_path / "c").glob("*/*.npz"))) == 1
