"""Datasets: ImageNet-style image folders and the cached-latent folder `main_cache.py` writes.

Both are listed by `list_folder`, which indexes classes by the sorted class-folder names and
orders files as torchvision's ImageFolder does, so a label means the same class whether training
reads images or cached latents, and caches made with torchvision's listing keep their order.
"""
import heapq
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.crop import center_crop_arr
from util.errors import with_kind

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


IMAGE_LAYOUT = "<data_path>/train/<class>/<image>"


def is_folder(entry: os.DirEntry) -> bool:
    """entry.is_dir(), except that a link loop (`a -> a`) is no folder, as for os.walk."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_folder(root: str, extensions: tuple) -> tuple:
    """`<root>/<class>/.../<file>` -> (class names, samples [(path, label)], repeats [(path, the
    path listed for the same folder or file)]).

    Classes are root's folders (or links to folders), sorted. Files whose name ends in one of
    `extensions` (any case) are found at any depth below a class folder and ordered as
    torchvision's DatasetFolder orders a tree without links: by class, folder path, file name.
    Links are followed, but each folder is listed once, by its real path, so a loop ends: folders
    in place claim theirs before links do (a link to another class's folder adds nothing), then
    those reached through fewer links, then by path. A file link to a file listed already is not
    listed again if both are in one class; in two classes, the label would be ambiguous:
    ValueError naming both paths.
    """
    classes = sorted(e.name for e in os.scandir(root) if is_folder(e))
    # (links followed, path, label); a sorted list is a heap already
    queue = [(0, os.path.join(root, name), label) for label, name in enumerate(classes)]
    folder_paths, folders, names, file_links, repeats = {}, [], {}, [], []
    while queue:
        links, path, label = heapq.heappop(queue)
        real = os.path.realpath(path)
        if real in folder_paths:
            repeats.append((path, folder_paths[real]))
            continue
        folder_paths[real] = path
        folders.append((label, path, real))
        names[path] = []
        try:
            entries = list(os.scandir(path))
        except OSError as e:
            raise ValueError(f"{path}: cannot list the folder ({e.strerror}) (expected a readable "
                             "folder)") from None
        for entry in entries:
            if is_folder(entry):
                heapq.heappush(queue, (links + entry.is_symlink(), entry.path, label))
            elif entry.name.lower().endswith(extensions):
                if entry.is_symlink():
                    file_links.append((entry.path, label, path, entry.name))
                else:
                    names[path].append(entry.name)
    if file_links:  # after every file in place, which a link may repeat (rare: costs a dict)
        owners = {os.path.join(real, name): (os.path.join(path, name), label)
                  for label, path, real in folders for name in names[path]}
        for link, label, path, name in sorted(file_links):
            owner, owner_label = owners.setdefault(os.path.realpath(link), (link, label))
            if owner == link:
                names[path].append(name)
            elif owner_label == label:
                repeats.append((link, owner))
            else:
                raise ValueError(f"{link}: the same file as {owner}, in class "
                                 f"{classes[owner_label]!r} (expected each file in one class)")
    return classes, [(os.path.join(path, name), label) for label, path, _ in sorted(folders)
                     for name in sorted(names[path])], repeats


class FolderFiles(torch.utils.data.Dataset):
    """The files of `<root>/<class>/...` (`list_folder`): `classes` (sorted folder names),
    `class_to_idx`, `samples` [(path, label)] and `targets` [label], as torchvision's folders."""

    def __init__(self, root, extensions: tuple):
        self.root = os.fspath(root)
        self.classes, self.samples, repeats = list_folder(self.root, extensions)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        if repeats and not (dist.is_initialized() and dist.get_rank()):  # once per job
            path, first = repeats[0]
            print(f"note: {self.root}: {len(repeats)} link(s) to folders or files listed already "
                  f"were not counted again (e.g. {path}, the same as {first})")

    def __len__(self):
        return len(self.samples)


class ImageFolder(FolderFiles):
    """Images of `<root>/<class>/...` -> (transform(RGB image), label). ValueError if there is no
    class folder or a class has no image."""

    def __init__(self, root, transform):
        super().__init__(root, IMG_EXTENSIONS)
        self.transform = transform
        if not self.classes:
            raise ValueError(f"{self.root}: no class folders (expected images in {IMAGE_LAYOUT})")
        counts = np.bincount(self.targets, minlength=len(self.classes))
        if counts.min() == 0:
            empty = os.path.join(self.root, self.classes[counts.argmin()])
            raise ValueError(f"{empty}: no images (expected {IMAGE_LAYOUT}, files ending in "
                             f"{' '.join(IMG_EXTENSIONS)})")

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


class ImageFolderWithFilename(ImageFolder):
    """ImageFolder returning (image, label, relative path, error).

    relative path: "<class folder>/<file name>". An unreadable image gives image None and the
    error text instead of raising: the caller names the file (or, with --skip_bad, lists it and
    goes on), where an exception in a loader worker would end in its traceback.
    """

    def relative_path(self, index: int) -> str:
        return os.path.relpath(self.samples[index][0], self.root)

    def __getitem__(self, index):
        label, rel = self.samples[index][1], self.relative_path(index)
        try:
            image = super().__getitem__(index)[0]
        except Exception as e:
            return None, label, rel, with_kind(e)
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


class CachedFolder(FolderFiles):
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
        # An empty class folder is allowed: it keeps its index, so the labels stay the images'.
        super().__init__(root, (".npz",))
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
