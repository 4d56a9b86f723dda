"""Datasets: ImageNet-style image folders and the cached-latent folder `main_cache.py` writes.

Both index classes by the sorted class-folder names, as torchvision's ImageFolder does, so a
label means the same class whether training reads images or cached latents.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import DatasetFolder, ImageFolder

from util.crop import center_crop_arr

CACHE_KEYS = ("moments", "moments_flip")


def draw_flip() -> int:
    """0 (the image) or 1 (its flip), p = 1/2: the one random draw a cached sample costs. Both
    cache forms call it, so the same seed makes the same flip choices from either."""
    return int(torch.randint(0, 2, ()))


def train_folder(data_path) -> Path:
    """Training images live in `<data_path>/train/<class>/<image>`, as in ImageNet's layout."""
    return Path(data_path) / "train"


def image_transform(img_size: int, random_flip: bool) -> transforms.Compose:
    """ADM centre crop -> optional random horizontal flip -> tensor in [-1, 1], (3, S, S)."""
    steps = [transforms.Lambda(lambda im: center_crop_arr(im, img_size))]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


# Single-channel modes with 16 (or, for "I", up to 32) bits per pixel: PIL's convert("RGB")
# clips them at 255, which turns nearly every pixel of a 16-bit grayscale PNG white. 16-bit RGB(A)
# PNGs open as 8-bit RGB(A) already.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path: str) -> Image.Image:
    """Open any PIL-readable image (grayscale, palette, RGBA, 16-bit grayscale ...) as 8-bit RGB."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    if image.mode in SIXTEEN_BIT_MODES:  # 0..65535 -> 0..255
        scaled = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
    return image.convert("RGB")


class ImageFolderWithFilename(ImageFolder):
    """ImageFolder returning (image, label, relative path, error).

    relative path: "<class folder>/<file name>". With `skip_bad`, an unreadable image gives
    image None and the error text instead of raising, so one bad file does not end a long job.
    """

    def __init__(self, root, transform, skip_bad: bool = False):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skip_bad = skip_bad

    def relative_path(self, index: int) -> str:
        return os.path.relpath(self.samples[index][0], self.root)

    def __getitem__(self, index):
        path, label = self.samples[index]
        rel = self.relative_path(index)
        try:
            image = self.transform(self.loader(path))
        except Exception as e:
            if not self.skip_bad:
                raise RuntimeError(f"cannot read image {path}: {e} "
                                   "(pass --skip_bad to log it and continue)") from e
            return None, label, rel, f"{type(e).__name__}: {e}"
        return image, label, rel, None


def load_cached_moments(path: str, expected_shape=None) -> dict:
    """Both moment arrays of one cache file, checked for keys, dtype and shape."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise ValueError(f"{path}: unreadable cache file ({e}); delete it and rerun main_cache.py") from e
    if set(arrays) != set(CACHE_KEYS):
        raise ValueError(f"{path}: expected keys {list(CACHE_KEYS)}, found {sorted(arrays)}")
    for key in CACHE_KEYS:
        a = arrays[key]
        if a.dtype != np.float32:
            raise ValueError(f"{path}: '{key}' has dtype {a.dtype}, expected float32")
        if a.ndim != 3 or (expected_shape is not None and tuple(a.shape) != tuple(expected_shape)):
            want = tuple(expected_shape) if expected_shape is not None else "(2*C, h, w)"
            raise ValueError(f"{path}: '{key}' has shape {a.shape}, expected {want} "
                             "(check --img_size and --vae_embed_dim against the cache)")
    return arrays


class CachedFolder(DatasetFolder):
    """Cached VAE moments: `<root>/<class>/<file>.npz` -> (moments (2C, h, w) float32, label).

    Each read picks the plain or the flipped image's moments with probability 1/2, so training
    on the cache sees the same random horizontal flips as training on images.
    expected_shape: (2C, h, w) to check every file against, or None.
    """

    def __init__(self, root, expected_shape=None):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--cached_path {root}: no such folder; create the cache with "
                                    "main_cache.py")
        self.expected_shape = expected_shape
        # allow_empty: a class folder that ended up empty keeps its index.
        super().__init__(root, loader=None, extensions=(".npz",), allow_empty=True)
        if len(self.samples) == 0:
            raise FileNotFoundError(f"--cached_path {root}: no .npz files found under it")

    def __getitem__(self, index):
        path, label = self.samples[index]
        arrays = load_cached_moments(path, self.expected_shape)
        return torch.from_numpy(arrays[CACHE_KEYS[draw_flip()]]), label


def parse_classes(text: str, class_names: list = None) -> list:
    """`--classes` as dataset class indices: comma-separated indices into the sorted class list
    (`5,6,7`) or class folder names (`n01440764,n01443537`), in the order given. Without the
    dataset's class names (evaluation without the data), indices only."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise SystemExit(f"error: --classes {text!r}: expected class ids or folder names, "
                         "separated by commas")
    index = {name: i for i, name in enumerate(class_names or [])}
    ids = []
    for token in tokens:
        if token in index:  # a folder name (the digits' names are their ids)
            ids.append(index[token])
        elif token.isdigit() and (class_names is None or int(token) < len(class_names)):
            ids.append(int(token))
        else:
            known = (f"an index below {len(class_names)} (the dataset's class count)"
                     if class_names is not None else "a class index (without the dataset in "
                     "--data_path, folder names cannot be looked up)")
            raise SystemExit(f"error: --classes: {token!r} is neither a class folder name nor {known}")
    if len(set(ids)) != len(ids):
        raise SystemExit(f"error: --classes {text}: a class is named twice")
    return ids


class ClassSubset(torch.utils.data.Dataset):
    """The samples of some of a dataset's classes, relabelled 0..k-1 in the order of
    `class_ids` (dataset class indices). `classes` are the chosen classes' names."""

    def __init__(self, dataset, class_ids: list):
        new_label = {c: i for i, c in enumerate(class_ids)}
        targets = [int(t) for t in dataset.targets]
        self.dataset = dataset
        self.indices = [i for i, t in enumerate(targets) if t in new_label]
        self.targets = [new_label[targets[i]] for i in self.indices]
        self.classes = [dataset.classes[c] for c in class_ids]
        self.channels = getattr(dataset, "channels", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        data = self.dataset[self.indices[i]]
        return (data[0], self.targets[i], *data[2:])
