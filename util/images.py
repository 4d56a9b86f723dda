"""Turning model output into pictures: uint8 conversion, PNG files, and sample grids."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C) (C = 1 gives grayscale)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path, compress_level: int = 6) -> None:
    """uint8 (H, W, C) as a PNG (C = 1: grayscale). PNG is lossless at every compress_level;
    the level trades file size for time (docs/performance.md: level 1 is 2.5x faster than
    PIL's default 6 on 256 px photos, for 9% larger files)."""
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        path, compress_level=compress_level)


class PngWriter:
    """Writes sample PNGs on background threads while the GPU samples the next batch: 50,000
    images at 256 px take minutes to compress on the main thread. Level 1 (lossless, as every
    level; larger files than the default). `with` waits for every file; a failed write raises
    there (or at the next `save`)."""

    def __init__(self, threads: int = 4, compress_level: int = 1):
        from concurrent.futures import ThreadPoolExecutor
        self.pool, self.level, self.pending = ThreadPoolExecutor(threads), compress_level, []

    def save(self, image: np.ndarray, path) -> None:
        done = [f for f in self.pending if f.done()]
        for f in done:
            f.result()  # a failed write raises here
        self.pending = [f for f in self.pending if f not in done]
        self.pending.append(self.pool.submit(save_png, image, path, self.level))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        if exc[0] is None:
            for f in self.pending:
                f.result()


def save_grid(images: np.ndarray, nrow: int, path, pad: int = 2) -> Path:
    """Tile uint8 images (N, H, W, C) into rows of `nrow` with `pad` white pixels between."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
    return path


def sample_file(folder, index: int) -> Path:
    """Where evaluation keeps generated image number `index`: <folder>/<index, 5+ digits>.png."""
    return Path(folder) / f"{index:05d}.png"


def read_sample(folder, index: int, mode: str = None) -> np.ndarray:
    """Generated image number `index` as uint8 (H, W) or (H, W, C); `mode` converts (PIL)."""
    with Image.open(sample_file(folder, index)) as image:
        return np.asarray(image.convert(mode) if mode else image)


# Seed of the fixed permutation of an ADM `.npz` export: recorded in every evaluation result.
NPZ_PERMUTATION_SEED = 0


def npz_order(num_images: int, seed: int = NPZ_PERMUTATION_SEED) -> np.ndarray:
    """The sample indices in the order an ADM `.npz` holds them: one fixed random permutation.

    ADM's evaluator takes the Inception Score over consecutive splits of its `arr_0` without
    shuffling; in class order each split would see a tenth of the classes and the score would
    come out several times too low. Shuffled, every split sees nearly every class."""
    return np.random.default_rng(seed).permutation(num_images)


def write_adm_npz(folder, labels: np.ndarray, stem, seed: int = NPZ_PERMUTATION_SEED) -> Path:
    """The PNGs <folder>/00000.png ... as the `.npz` ADM's evaluation suite reads, written
    atomically to <stem>_<N>x<H>x<W>x3.npz:

    - `arr_0`: uint8 (N, H, W, 3), the images in the order `npz_order(N, seed)`;
    - `arr_1`: int64 (N,), the class id of each image of `arr_0` (`labels[i]` for image i).

    Uncompressed, and streamed one image at a time (50,000 at 256 px are 9.8 GB), so memory
    stays at one image. FID, sFID and precision/recall do not depend on the order."""
    import zipfile

    from util.fileio import atomic_write
    labels = np.asarray(labels, dtype=np.int64)
    order = npz_order(len(labels), seed)
    first = read_sample(folder, 0, "RGB")
    shape = (len(labels), *first.shape)
    path = Path(f"{stem}_{'x'.join(map(str, shape))}.npz")

    def write_array(zf, name: str, dtype, array_shape, chunks) -> None:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as npy:
            np.lib.format.write_array_header_1_0(
                npy, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": array_shape})
            for chunk in chunks:
                npy.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())

    def images():
        for i in order.tolist():
            image = read_sample(folder, i, "RGB")
            if image.shape != first.shape:
                raise ValueError(f"{sample_file(folder, i)}: shape {image.shape}, expected {first.shape}")
            yield image

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            write_array(zf, "arr_0", np.uint8, shape, images())
            write_array(zf, "arr_1", np.int64, (len(labels),), [labels[order]])
    atomic_write(path, write)
    return path
