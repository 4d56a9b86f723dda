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
