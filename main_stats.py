"""FID statistics and a reference batch of your own image folder, to evaluate on your own data.

    torchrun --nproc_per_node=8 main_stats.py --data_path ${DATA_PATH} --img_size 256 \
        --out fid_stats/mydata_256.npz [--classes 5,6,7] [--fd_dinov2]

Every image of <data_path>/train/<class>/<image> (or of the --classes) is centre-cropped to
--img_size as training images are (ADM's crop), and passed through the Inception network that
evaluation uses, in full float32. Each rank reads a disjoint slice, so every image is read once.
Written atomically to --out, for `main_ear.py --fid_stats` and `--ref_batch`:

- `mu` (2048,), `sigma` (2048, 2048): float64 mean and covariance of all the images' features;
- `arr_0`: uint8 (n, S, S, 3), a seeded random subset of `--ref_images` of the cropped images,
  the reference batch for precision/recall;
- `resolution` (S), `num_images`, `inception_sha256`.

With --fd_dinov2 also `<out stem>_dinov2.npz` (`mu`, `sigma` of DINOv2 features as dgm-eval
computes them, `resolution`), for `--fd_dinov2_stats`. One pass, nothing kept between runs:
an interrupted job is simply run again.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from util.args import check_positive, stats_parser
from util.crop import center_crop_arr
from util.distributed import barrier, cleanup, init_distributed
from util.fid import DinoV2Features, exact_float32, inception_extractor, inception_pool
from util.fileio import atomic_write
from util.loader import load_rgb, parse_classes, train_folder


class CroppedImages(Dataset):
    """(uint8 ADM centre crop (3, S, S), index) of image files."""

    def __init__(self, paths: list, img_size: int):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        crop = np.array(center_crop_arr(load_rgb(self.paths[i]), self.img_size))  # writable
        return torch.from_numpy(crop).permute(2, 0, 1).contiguous(), i


def image_paths(args) -> list:
    """The images of the folder (or of --classes), in ImageFolder's order."""
    from torchvision.datasets import ImageFolder
    folder = train_folder(args.data_path)
    if not folder.is_dir():
        raise SystemExit(f"error: --data_path {args.data_path}: expected images in "
                         f"{folder}/<class>/<image> (the ImageNet layout)")
    dataset = ImageFolder(folder, loader=load_rgb)
    if not args.classes:
        return [path for path, _ in dataset.samples]
    chosen = set(parse_classes(args.classes, dataset.classes))
    return [path for path, label in dataset.samples if label in chosen]


class Moments:
    """Running sums of features (float64) for their mean and covariance over every rank."""

    def __init__(self, dim: int):
        self.count, self.sum, self.outer = 0, torch.zeros(dim, dtype=torch.float64), \
            torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.double()
        self.count += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def gaussian(self, device) -> tuple:
        """(count, mu, sigma) of every rank's features together (sigma with n - 1, as np.cov)."""
        sums = [torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.outer]
        if dist.is_initialized():
            sums = [s.to(device) for s in sums]
            for s in sums:
                dist.all_reduce(s)
        count, total, outer = (s.cpu() for s in sums)
        n = int(count.item())
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return n, mu.numpy(), sigma.numpy()


def reference_positions(num_images: int, ref_images: int, seed: int) -> dict:
    """{image index: row of arr_0} for a seeded random subset (in random order)."""
    chosen = np.random.default_rng(seed).permutation(num_images)[:ref_images]
    return {int(i): row for row, i in enumerate(chosen)}


def shard_file(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}.npz")


def measure_shard(dataset, shard, positions: dict, extractor, dinov2, args, info) -> tuple:
    """This rank's feature sums and its reference images ({row: image (S, S, 3)})."""
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                        num_workers=args.num_workers, pin_memory=info.device.type == "cuda")
    pool, dino, kept = Moments(2048), Moments(1024) if dinov2 else None, {}
    bar = tqdm(total=len(shard), unit="img", disable=not info.is_main)
    with exact_float32():
        for images, index in loader:
            pool.add(inception_pool(extractor, images, info.device))
            if dinov2 is not None:
                dino.add(dinov2.batch(images))
            for image, i in zip(images, index.tolist()):
                if i in positions:
                    kept[positions[i]] = image.permute(1, 2, 0).numpy()
            bar.update(len(index))
    bar.close()
    return pool, dino, kept


def write_reference(out: Path, kept: dict, count: int, img_size: int, info) -> np.ndarray:
    """Every rank's reference images gathered into arr_0 on rank 0 (through files beside
    --out: 10,000 images at 256 px are 2 GB, too much for one collective message)."""
    rows = np.array(sorted(kept), dtype=np.int64)
    images = np.stack([kept[r] for r in rows]) if len(rows) else np.zeros((0, img_size, img_size, 3), np.uint8)
    atomic_write(shard_file(out, info.rank), lambda f: np.savez(f, rows=rows, images=images))
    barrier()
    if not info.is_main:
        return None
    arr = np.zeros((count, img_size, img_size, 3), np.uint8)
    filled = 0
    for rank in range(info.world_size):
        with np.load(shard_file(out, rank)) as part:
            arr[part["rows"]] = part["images"]
            filled += len(part["rows"])
        shard_file(out, rank).unlink()
    assert filled == count, f"reference batch: {filled} images gathered, expected {count}"
    return arr


def main(args) -> None:
    check_positive(args, "img_size", "batch_size")
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.dist_timeout)
    out = Path(args.out)
    paths = image_paths(args)
    if not paths:
        raise SystemExit(f"error: no images under {train_folder(args.data_path)} for these classes")
    try:  # the networks first: missing weights fail before any image is read
        extractor = inception_extractor(info.device, args.inception_weights)
        dinov2 = DinoV2Features(info.device) if args.fd_dinov2 else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    start = time.time()
    positions = reference_positions(len(paths), min(args.ref_images, len(paths)), args.seed)
    shard = list(range(info.rank, len(paths), info.world_size))  # disjoint, no padding
    dataset = CroppedImages(paths, args.img_size)
    pool, dino, kept = measure_shard(dataset, shard, positions, extractor, dinov2, args, info)
    n, mu, sigma = pool.gaussian(info.device)
    if n != len(paths):
        raise SystemExit(f"error: {n} images measured across ranks, expected {len(paths)}")
    arr_0 = write_reference(out, kept, len(positions), args.img_size, info)
    dino_stats = dino.gaussian(info.device) if dino is not None else None
    if info.is_main:
        atomic_write(out, lambda f: np.savez(
            f, mu=mu, sigma=sigma, arr_0=arr_0, resolution=np.int64(args.img_size),
            num_images=np.int64(n), inception_sha256=extractor.weights_sha256))
        written = {"stats": str(out), "num_images": n, "reference_images": len(arr_0),
                   "resolution": args.img_size, "seconds": round(time.time() - start, 1)}
        if dino_stats is not None:
            dino_out = out.with_name(f"{out.stem}_dinov2.npz")
            atomic_write(dino_out, lambda f: np.savez(
                f, mu=dino_stats[1], sigma=dino_stats[2], resolution=np.int64(args.img_size)))
            written["dinov2_stats"] = str(dino_out)
        print(json.dumps(written))
    cleanup()


if __name__ == "__main__":
    main(stats_parser().parse_args())
