"""Cache VAE moments of a training image folder, once, so training skips the encoder.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 \
        --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 --batch_size 128 \
        --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH} [--cache_format packed]
    python main_cache.py --convert_cache ${PER_FILE_CACHE} --cached_path ${PACKED_CACHE}

The images are read from `<data_path>/train/<class>/<file>`. Every image is encoded with its
horizontal flip; the two moment arrays (float32 (2C, h, w)) are written either to
`<cached_path>/<class>/<file name>.npz` (keys `moments`, `moments_flip`; the default, as the
reference) or, with `--cache_format packed`, as records of a few large files plus an index
(format: util/packed_cache.py). `--convert_cache` packs an existing per-file cache (ours or the
reference's) without the VAE, checking every file.
Ranks take disjoint slices of the sorted list, so each image is written exactly once; every
file (per-file form) or batch of records (packed form) is committed atomically, so a killed job
simply reruns and skips what is already there.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.tokenizer import build_tokenizer
from util.args import cache_parser, check_positive
from util.distributed import all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from util.errors import one_line_errors
from util.fileio import atomic_write, check_writable, remove_stale_temporaries
from util.loader import (CachedFolder, ImageFolderWithFilename, image_transform, load_cached_moments,
                         train_folder)
from util.packed_cache import (INDEX_NAME, SegmentWriter, committed_names, remove_packed,
                               remove_uncommitted, write_index)

FAILED_LIST = "failed_images.txt"


def cache_file(cached_path: str, relative_path: str) -> Path:
    return Path(cached_path) / (relative_path + ".npz")


def existing_cache_files(cached_path: str, classes) -> set:
    """Relative image paths whose cache file is complete (one listing per class folder)."""
    done = set()
    for cls in classes:
        folder = Path(cached_path) / cls
        if folder.is_dir():
            done.update(f"{cls}/{e.name[:-4]}" for e in os.scandir(folder)
                        if e.name.endswith(".npz") and not e.name.startswith("."))
    return done


def write_cache_file(path: Path, moments: np.ndarray, moments_flip: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, moments=moments, moments_flip=moments_flip))


# ----- where the records come from: images (encoded) or a per-file cache (--convert_cache) --------

def collate(batch):
    """Stack the readable images; pass unreadable ones on as (path, error)."""
    good = [(img, rel) for img, _, rel, err in batch if err is None]
    failed = [(rel, err) for _, _, rel, err in batch if err is not None]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, [rel for _, rel in good], failed


def encode_with_flip(tokenizer, images: torch.Tensor) -> np.ndarray:
    """Records of the images (B, 3, H, W): (B, 2, 2C, h, w) float32, [:, 0] their moments,
    [:, 1] their flips'. Two passes of B images, as the reference: one of 2B would need twice
    the fp32 encoder's activation memory."""
    halves = [tokenizer.moments(x).cpu().numpy() for x in (images, images.flip(dims=[3]))]
    return np.stack(halves, axis=1)


class ImageSource:
    """The training images, encoded with their flips by the VAE. names: "<class>/<file>"."""

    def __init__(self, args, info):
        with one_line_errors():  # first: a bad VAE fails before anything is listed or written
            self.tokenizer = build_tokenizer(vars(args), info.device)
        if not self.tokenizer.cacheable:
            raise SystemExit(f"error: --tokenizer {args.tokenizer} has nothing to cache")
        self.args, self.device = args, info.device
        self.dataset = ImageFolderWithFilename(train_folder(args.data_path),
                                               image_transform(args.img_size, random_flip=False))
        self.classes = self.dataset.classes
        self.names = [self.dataset.relative_path(i) for i in range(len(self.dataset))]
        self.record_shape = (2, *self.tokenizer.cache_shape(args.img_size // self.tokenizer.stride))
        self.action = f"encoding in {args.vae_precision} on {info.device}"

    def batches(self, indices):
        """(records (B, 2, 2C, h, w) or None, their names, [(name, error) of unreadable ones])."""
        loader = DataLoader(Subset(self.dataset, indices), batch_size=self.args.batch_size,
                            shuffle=False, num_workers=self.args.num_workers, collate_fn=collate,
                            pin_memory=self.args.pin_mem and self.device.type == "cuda")
        for images, names, failed in loader:
            if failed and not self.args.skip_bad:
                path = os.path.join(self.dataset.root, failed[0][0])
                raise SystemExit(f"error: {path}: cannot read image ({failed[0][1]}) "
                                 "(pass --skip_bad to list it and go on)")
            records = None if images is None else encode_with_flip(
                self.tokenizer, images.to(self.device, non_blocking=True))
            yield records, names, failed


class PerFileSource:
    """An existing per-file cache (ours or the reference's), each file checked: keys, dtype,
    shape (that of the flags) and finite values."""

    def __init__(self, args, info):
        self.root = Path(args.convert_cache or args.cached_path)
        tokenizer = build_tokenizer(vars(args), info.device, load=False)
        shape = tokenizer.cache_shape(args.img_size // args.vae_stride)  # what training checks
        self.folder = CachedFolder(self.root, expected_shape=shape)  # its listing fixes the order
        self.classes = self.folder.classes
        self.names = [Path(p).relative_to(self.root).as_posix()[:-4] for p, _ in self.folder.samples]
        self.record_shape = (2, *shape)
        self.batch_size, self.skip_bad = args.batch_size, args.skip_bad
        self.action = f"packing the per-file cache {self.root} (no encoding)"

    def record(self, index: int) -> np.ndarray:
        path = self.folder.samples[index][0]
        arrays = load_cached_moments(path, self.record_shape[1:])
        for key, a in arrays.items():
            if not np.isfinite(a).all():
                raise ValueError(f"{path}: '{key}' holds {np.size(a) - np.isfinite(a).sum()} "
                                 "non-finite values")
        return np.stack([arrays["moments"], arrays["moments_flip"]])

    def batches(self, indices):
        for start in range(0, len(indices), self.batch_size):
            records, names, failed = [], [], []
            for i in indices[start:start + self.batch_size]:
                try:
                    records.append(self.record(i))
                    names.append(self.names[i])
                except ValueError as e:
                    if not self.skip_bad:
                        raise SystemExit(f"error: {e} (pass --skip_bad to list it and go on)") from None
                    failed.append((self.names[i], str(e)))
            yield (np.stack(records) if records else None), names, failed


# ----- where the records go: the per-file or the packed form -----------------------------------

class FileForm:
    """`<cached_path>/<class>/<file>.npz`, one atomic file per image. (The two forms share their
    constructor's and methods' signatures, so the job below does not care which it writes.)"""

    def __init__(self, root: Path, record_shape, rank: int):
        self.root = root  # a file's name and content say everything: no shape or rank needed

    def prepare(self, classes, is_main: bool, overwrite: bool) -> None:
        for cls in classes:
            (self.root / cls).mkdir(parents=True, exist_ok=True)
        if is_main:  # temporaries of a killed run; only safe before any rank writes
            for cls in classes:
                remove_stale_temporaries(self.root / cls)

    def committed(self, classes) -> set:
        return existing_cache_files(self.root, classes)

    def write(self, names, records: np.ndarray) -> None:
        for name, record in zip(names, records):
            write_cache_file(cache_file(self.root, name), record[0], record[1])

    def close(self) -> None:
        pass

    def finish(self, classes, record_shape) -> tuple:
        """(layout line, summary counts); rank 0, once every rank is done."""
        files = sum(1 for _ in self.root.glob("*/*.npz"))
        sample = next(self.root.glob("*/*.npz"), None)
        size_gb = files * sample.stat().st_size / 1e9 if sample else 0.0
        return (f"layout: {self.root}/<class>/<file>.npz with keys moments, moments_flip "
                f"(float32, {'x'.join(map(str, record_shape[1:]))}); {files} files, "
                f"{size_gb:.2f} GB"), {"files": files}


class PackedForm:
    """Records in this rank's segment files, indexed once every rank is done (util/packed_cache.py)."""

    def __init__(self, root: Path, record_shape, rank: int):
        self.root, self.record_shape = root, record_shape
        self.writer = SegmentWriter(root, rank, record_shape)

    def prepare(self, classes, is_main: bool, overwrite: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if is_main:  # only safe before any rank writes
            if overwrite:
                remove_packed(self.root)
            remove_stale_temporaries(self.root)

    def committed(self, classes) -> set:
        return committed_names(self.root, self.record_shape)

    def write(self, names, records: np.ndarray) -> None:
        self.writer.append(names, records)

    def close(self) -> None:
        self.writer.close()

    def finish(self, classes, record_shape) -> tuple:
        remove_uncommitted(self.root)
        records = write_index(self.root, classes, record_shape)
        segments = sorted(self.root.glob("seg-r*.bin"))
        size_gb = sum(s.stat().st_size for s in segments) / 1e9
        return (f"layout: packed, {self.root / INDEX_NAME} indexing {records} records of "
                f"float32 {'x'.join(map(str, record_shape))} in {len(segments)} segment file(s), "
                f"{size_gb:.2f} GB"), {"records": records, "segments": len(segments)}


# ----- the job --------------------------------------------------------------------------------------

def check_args(args) -> None:
    check_positive(args, "batch_size", "img_size")
    if args.img_size % args.vae_stride != 0:
        raise SystemExit(f"error: --img_size must be a multiple of --vae_stride {args.vae_stride}, "
                         f"got {args.img_size}")
    if not args.cached_path:
        raise SystemExit("error: --cached_path is required: the folder to write the cache to")
    if args.convert_cache is not None:
        if args.cache_format == "files":
            raise SystemExit("error: --convert_cache writes the packed form; drop --cache_format files")
        args.cache_format = "packed"
    elif not train_folder(args.data_path).is_dir():
        raise SystemExit(f"error: --data_path {args.data_path}: expected the training images in "
                         f"{train_folder(args.data_path)}/<class>/<image> (the ImageNet layout)")
    args.cache_format = args.cache_format or "files"


def encode_all(source, form, todo, info) -> tuple:
    """Write the records of `todo` (indices into source.names); (written, [(name, error)])."""
    written, failures = 0, []
    # closed on the way out too, so that an error line starts a line of its own
    with tqdm(total=len(todo), unit="img", disable=not info.is_main, smoothing=0.1) as bar:
        for records, names, failed in source.batches(todo):
            failures += failed
            for rel, err in failed:
                print(f"[rank {info.rank}] skipping unreadable {rel}: {err}")
            if names:
                form.write(names, records)
                written += len(names)
            bar.update(len(names) + len(failed))
            bar.set_postfix(all_ranks=f"{(bar.format_dict['rate'] or 0) * info.world_size:.0f} img/s")
    form.close()
    return written, failures


def write_failed_list(root: Path, failures) -> None:
    failed_list = root / FAILED_LIST
    if failures:
        text = "".join(f"{rel}\t{err}\n" for rel, err in sorted(failures))
        atomic_write(failed_list, lambda f: f.write(text.encode()))
    else:  # a list from an earlier run would name images that are cached by now
        failed_list.unlink(missing_ok=True)


def report(layout: str, summary: dict, counts, root: Path, seconds: float) -> None:
    written, skipped, failed = (int(c) for c in counts)
    print(f"cache done in {seconds:.0f} s: {written} written, {skipped} already cached, "
          f"{failed} failed")
    print(layout)
    if failed:
        print(f"unreadable images listed in {root / FAILED_LIST}")
    print(json.dumps({"written": written, "skipped": skipped, "failed": failed, **summary}))


def main(args) -> None:
    check_args(args)
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.dist_timeout)
    root = Path(args.cached_path)
    with one_line_errors():  # a bad VAE, image folder or existing cache: before anything is written
        check_writable(root, "--cached_path", folder=True)
        source = (PerFileSource if args.convert_cache is not None else ImageSource)(args, info)
        form = (PackedForm if args.cache_format == "packed" else FileForm)(root, source.record_shape,
                                                                           info.rank)
        done = set() if args.overwrite else form.committed(source.classes)
    torch.manual_seed(args.seed + info.rank)
    form.prepare(source.classes, info.is_main, args.overwrite)
    barrier()  # every rank sees the same cache state before anyone writes

    shard = range(info.rank, len(source.names), info.world_size)  # disjoint, no padding
    todo = [i for i in shard if source.names[i] not in done]
    if info.is_main:
        print(f"{len(source.names)} images in {len(source.classes)} classes, {info.world_size} "
              f"process(es), {len(done)} already cached; {source.action}")
    start = time.time()
    written, failures = encode_all(source, form, todo, info)

    counts = all_reduce_sum([written, len(shard) - len(todo), len(failures)], info.device)
    all_failures = [f for rank_failures in all_gather_objects(failures) for f in rank_failures]
    if info.is_main:  # the collectives above: every rank has committed everything
        write_failed_list(root, all_failures)
        layout, summary = form.finish(source.classes, source.record_shape)
        report(layout, summary, counts, root, time.time() - start)
    cleanup()


if __name__ == "__main__":
    main(cache_parser().parse_args())
