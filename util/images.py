"""Turning model output into pictures: uint8 conversion, PNG files, and sample grids."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C) (C = 1 gives grayscale)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path) -> None:
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


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


def write_adm_npz(folder, num_images: int, stem) -> Path:
    """The PNGs <folder>/00000.png ... as one `arr_0` uint8 (N, H, W, 3) array in an uncompressed
    .npz, the file ADM's evaluation suite reads: <stem>_<N>x<H>x<W>x3.npz, written atomically.
    Streams one image at a time (50,000 at 256px are 9.8 GB), so memory stays at one image."""
    import zipfile

    from util.fileio import atomic_write
    folder = Path(folder)
    first = np.asarray(Image.open(folder / "00000.png").convert("RGB"))
    shape = (num_images, *first.shape)
    path = Path(f"{stem}_{'x'.join(map(str, shape))}.npz")

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf, \
                zf.open("arr_0.npy", "w", force_zip64=True) as npy:
            np.lib.format.write_array_header_1_0(
                npy, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                      "fortran_order": False, "shape": shape})
            for i in range(num_images):
                image = np.asarray(Image.open(folder / f"{i:05d}.png").convert("RGB"))
                if image.shape != first.shape:
                    raise ValueError(f"{folder / f'{i:05d}.png'}: shape {image.shape}, expected {first.shape}")
                npy.write(np.ascontiguousarray(image).tobytes())
    atomic_write(path, write)
    return path
