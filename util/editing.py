"""Editing images with a trained EAR: keep a region, let the sampler complete the rest.

A pixel mask (True: keep) becomes a mask over the model's token grid (`token_mask`); the image
is encoded with the tokenizer's posterior mean (the pixels themselves for pixel tokens);
`EAR.sample_tokens` fills the unknown tokens (models/ear.py); after decoding, the kept pixels
can be pasted back (`paste`), since a VAE changes the pixels it re-encodes.
"""
from pathlib import Path

import numpy as np
import torch

# How a pixel mask becomes a token mask: a token is kept when all / any of its pixels are.
MASK_RULES = ("all", "any")


def token_mask(keep: torch.Tensor, cell: int, rule: str = "all") -> torch.Tensor:
    """keep (B, H, W) bool, True at pixels to keep -> (B, L) bool over the grid of cell x cell
    pixel tokens (cell = vae_stride * patch_size), row by row as EAR.patchify orders tokens.
    `all` (default): a token is kept only if every pixel under it is, so nothing to regenerate
    is ever kept; `any`: if one is, so nothing to keep is ever regenerated."""
    if rule not in MASK_RULES:
        raise ValueError(f"--mask_rule {rule!r}: expected one of {', '.join(MASK_RULES)}")
    b, h, w = keep.shape
    if h % cell or w % cell:
        raise ValueError(f"a {h}x{w} mask does not divide into tokens of {cell}x{cell} pixels")
    cells = keep.reshape(b, h // cell, cell, w // cell, cell)
    kept = cells.all(dim=4).all(dim=2) if rule == "all" else cells.any(dim=4).any(dim=2)
    return kept.flatten(1)


def paste(decoded: torch.Tensor, original: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """decoded, original (B, C, H, W); keep (B, H, W) bool -> the original's kept pixels over
    the decoded image."""
    return torch.where(keep[:, None], original.to(decoded.dtype), decoded)


def check_token_mask(kept: torch.Tensor, source: str) -> None:
    """Refuse a mask that regenerates nothing or keeps nothing (per image), naming `source`."""
    per_image = kept.sum(dim=1)
    for i, n in enumerate(per_image.tolist()):
        where = f"{source} (image {i})" if len(per_image) > 1 else source
        if n == kept.shape[1]:
            raise ValueError(f"{where}: the mask regenerates no whole token, so nothing would "
                             "change (expected white over the region to regenerate)")
        if n == 0:
            raise ValueError(f"{where}: the mask keeps no whole token (expected black over the "
                             "region to keep; to draw from nothing, leave out --edit)")


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0)  # a copy: writable
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


def read_edit(image_path, mask_path, side: int, channels: int) -> tuple:
    """(image (1, C, side, side) in [-1, 1], keep (1, side, side) bool) from an image file and
    a mask file of the same size (white, >= half grey: regenerate). Other sizes are
    centre-cropped and resized as training images are, the mask thresholded before and after."""
    from util.crop import center_crop_arr
    image, mask = (open_picture(p, flag) for p, flag in ((image_path, "--edit"), (mask_path, "--mask")))
    if image.size != mask.size:
        raise ValueError(f"--mask {mask_path}: {mask.size[0]}x{mask.size[1]} pixels, expected "
                         f"the size of --edit {image_path} ({image.size[0]}x{image.size[1]})")
    image = image.convert("L" if channels == 1 else "RGB")
    mask = mask.convert("L")
    if image.size != (side, side):
        image = center_crop_arr(image, side)
        mask = center_crop_arr(mask.point(lambda v: 255 * (v >= 128)), side)
    keep = torch.from_numpy(np.asarray(mask) < 128)[None]
    return to_unit(np.asarray(image)[None]), keep


def open_picture(path, flag: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path}: not a readable image ({e})") from None


def read_edit_npz(path, side: int, channels: int) -> tuple:
    """(images (N, C, side, side) in [-1, 1], keep (N, side, side) bool, labels (N,), the raw
    arrays) from an .npz with `images` (N, H, W, 3) or (N, H, W) uint8, `masks` (N, H, W)
    bool (True: regenerate) and `labels` (N,) (the dataset's class ids)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("images", "masks", "labels") if k in f}
    except (OSError, ValueError) as e:
        raise ValueError(f"--edit_npz {path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("images", "masks", "labels") if k not in arrays]
    if missing:
        raise ValueError(f"--edit_npz {path}: no {', '.join(missing)} (expected images, masks "
                         "and labels)")
    images, masks, labels = arrays["images"], arrays["masks"], arrays["labels"]
    n = len(images)
    shape = (n, side, side) if channels == 1 else (n, side, side, channels)
    checks = [("images", images, shape, np.uint8), ("masks", masks, (n, side, side), np.bool_),
              ("labels", labels, (n,), None)]
    for key, value, expected, dtype in checks:
        if value.shape != expected or (dtype is not None and value.dtype != dtype) \
                or (dtype is None and not np.issubdtype(value.dtype, np.integer)):
            raise ValueError(f"--edit_npz {path}: {key} is {value.dtype} {value.shape}, expected "
                             f"{np.dtype(dtype).name if dtype else 'integers'} {expected}")
    return to_unit(images), torch.from_numpy(~masks), torch.from_numpy(labels).long(), arrays


def check_npz_out(path) -> None:
    if Path(path).suffix != ".npz":
        raise ValueError(f"--out {path}: with --edit_npz the completions go to an .npz file "
                         "(expected a name ending in .npz)")
