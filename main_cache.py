"""Cache VAE moments of a training image folder, once, so training skips the encoder.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 \
        --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 --batch_size 128 \
        --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}

The images are read from `<data_path>/train/<class>/<file>`. Every image is encoded with its horizontal flip and written to
`<cached_path>/<class>/<file name>.npz` (keys `moments`, `moments_flip`, float32 (2C, h, w)).
Ranks take disjoint slices of the sorted file list, so each image is written exactly once;
every file appears atomically, so a killed job simply reruns and skips what is already there.
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
from util.fileio import atomic_write, remove_stale_temporaries
from util.loader import ImageFolderWithFilename, image_transform, train_folder

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


def collate(batch):
    """Stack the readable images; pass unreadable ones on as (path, error)."""
    good = [(img, rel) for img, _, rel, err in batch if err is None]
    failed = [(rel, err) for _, _, rel, err in batch if err is not None]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, [rel for _, rel in good], failed


def encode_with_flip(tokenizer, images: torch.Tensor):
    """Moments of the images and of their horizontal flips: two float32 arrays (B, 2C, h, w)."""
    moments = tokenizer.moments(torch.cat([images, images.flip(dims=[3])]))
    return moments.cpu().numpy().reshape(2, images.shape[0], *moments.shape[1:])


def write_cache_file(path: Path, moments: np.ndarray, moments_flip: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, moments=moments, moments_flip=moments_flip))


def check_args(args) -> None:
    check_positive(args, "batch_size", "img_size")
    if args.img_size % args.vae_stride != 0:
        raise SystemExit(f"error: --img_size must be a multiple of --vae_stride {args.vae_stride}, "
                         f"got {args.img_size}")
    if not args.cached_path:
        raise SystemExit("error: --cached_path is required: the folder to write the cache to")
    if not train_folder(args.data_path).is_dir():
        raise SystemExit(f"error: --data_path {args.data_path}: expected the training images in "
                         f"{train_folder(args.data_path)}/<class>/<image> (the ImageNet layout)")


def report(args, tokenizer, counts, failures, seconds: float) -> None:
    written, skipped, failed = (int(c) for c in counts)
    files = sum(1 for _ in Path(args.cached_path).glob("*/*.npz"))
    sample = next(Path(args.cached_path).glob("*/*.npz"), None)
    size_gb = files * sample.stat().st_size / 1e9 if sample else 0.0
    print(f"cache done in {seconds:.0f} s: {written} written, {skipped} already cached, "
          f"{failed} failed")
    print(f"layout: {args.cached_path}/<class>/<file>.npz with keys moments, moments_flip "
          f"(float32, {'x'.join(map(str, tokenizer.cache_shape(args.img_size // tokenizer.stride)))}); "
          f"{files} files, {size_gb:.2f} GB")
    if failures:
        print(f"unreadable images listed in {Path(args.cached_path) / FAILED_LIST}")
    print(json.dumps({"written": written, "skipped": skipped, "failed": failed, "files": files}))


def main(args) -> None:
    check_args(args)
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.dist_timeout)
    try:  # loaded first: a missing or wrong VAE fails before anything is listed or written
        tokenizer = build_tokenizer(vars(args), info.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not tokenizer.cacheable:
        raise SystemExit(f"error: --tokenizer {args.tokenizer} has nothing to cache")
    torch.manual_seed(args.seed + info.rank)
    dataset = ImageFolderWithFilename(train_folder(args.data_path), image_transform(args.img_size, random_flip=False),
                                      skip_bad=args.skip_bad)
    for cls in dataset.classes:
        (Path(args.cached_path) / cls).mkdir(parents=True, exist_ok=True)
    if info.is_main:  # temporaries of a killed run; only safe before any rank writes
        for cls in dataset.classes:
            remove_stale_temporaries(Path(args.cached_path) / cls)
    barrier()  # every rank sees the same cache state before anyone writes

    done = set() if args.overwrite else existing_cache_files(args.cached_path, dataset.classes)
    shard = range(info.rank, len(dataset), info.world_size)  # disjoint, no padding
    todo = [i for i in shard if dataset.relative_path(i) not in done]
    loader = DataLoader(Subset(dataset, todo), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=collate,
                        pin_memory=args.pin_mem and info.device.type == "cuda")
    if info.is_main:
        print(f"{len(dataset)} images in {len(dataset.classes)} classes, {info.world_size} "
              f"process(es), {len(done)} already cached; encoding in {args.vae_precision} on "
              f"{info.device}")

    start, written, failures = time.time(), 0, []
    bar = tqdm(total=len(todo), unit="img", disable=not info.is_main, smoothing=0.1)
    for images, paths, failed in loader:
        failures += failed
        for rel, err in failed:
            print(f"[rank {info.rank}] skipping unreadable image {rel}: {err}")
        if images is not None:
            both = encode_with_flip(tokenizer, images.to(info.device, non_blocking=True))
            for i, rel in enumerate(paths):
                write_cache_file(cache_file(args.cached_path, rel), both[0, i], both[1, i])
            written += len(paths)
        bar.update(len(paths) + len(failed))
        bar.set_postfix(all_ranks=f"{(bar.format_dict['rate'] or 0) * info.world_size:.0f} img/s")
    bar.close()

    counts = all_reduce_sum([written, len(shard) - len(todo), len(failures)], info.device)
    all_failures = [f for rank_failures in all_gather_objects(failures) for f in rank_failures]
    if info.is_main:
        failed_list = Path(args.cached_path) / FAILED_LIST
        if all_failures:
            text = "".join(f"{rel}\t{err}\n" for rel, err in sorted(all_failures))
            atomic_write(failed_list, lambda f: f.write(text.encode()))
        else:  # a list from an earlier run would name images that are cached by now
            failed_list.unlink(missing_ok=True)
        report(args, tokenizer, counts, all_failures, time.time() - start)
    cleanup()


if __name__ == "__main__":
    main(cache_parser().parse_args())
