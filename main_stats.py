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
computes them, `resolution`), for `--fd_dinov2_stats`. An unreadable image stops the job, named;
with --skip_bad it is left out of all of these and listed in `<out stem>_skipped.txt`
("path<TAB>error" a line). One pass, nothing kept between runs: an interrupted job is simply
run again.
"""
import json
import time
from bisect import bisect
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from util.args import check_positive, stats_parser
from util.crop import center_crop_arr
from util.distributed import all_gather_objects, barrier, cleanup, init_distributed
from util.errors import one_line_errors, with_kind
from util.fid import DinoV2Features, exact_float32, inception_extractor, inception_pool
from util.fileio import atomic_write, check_writable
from util.loader import ImageFolder, load_rgb, parse_classes, train_folder


class CroppedImages(Dataset):
    """(uint8 ADM centre crop (3, S, S), index, None) of image files, or (None, index, error
    text) for one that cannot be read: the main process names it, where an exception in a
    loader worker would end in a traceback."""

    def __init__(self, paths: list, img_size: int):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            crop = np.array(center_crop_arr(load_rgb(self.paths[i]), self.img_size))  # writable
        except Exception as e:
            return None, i, with_kind(e)
        return torch.from_numpy(crop).permute(2, 0, 1).contiguous(), i, None


def collate(batch) -> tuple:
    """(readable crops (B, 3, S, S) or None, their indices [B], [(index, error)] of the others)."""
    good = [(crop, i) for crop, i, error in batch if error is None]
    crops = torch.stack([crop for crop, _ in good]) if good else None
    return crops, [i for _, i in good], [(i, error) for _, i, error in batch if error is not None]


def image_paths(args) -> list:
    """The images of the folder (or of --classes), in ImageFolder's order; ValueError naming the
    folder or class without images."""
    folder = train_folder(args.data_path)
    if not folder.is_dir():
        raise SystemExit(f"error: --data_path {args.data_path}: expected images in "
                         f"{folder}/<class>/<image> (the ImageNet layout)")
    dataset = ImageFolder(folder, transform=None)  # listed only: CroppedImages reads them
    chosen = (set(parse_classes(args.classes, dataset.classes)) if args.classes
              else range(len(dataset.classes)))
    paths = [path for path, label in dataset.samples if label in chosen]
    if len(paths) < 2:
        raise ValueError(f"{folder}: only one image (expected at least 2, for a covariance)")
    return paths


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
    """This rank's feature sums, its reference images ({row: image (S, S, 3)}) and, with
    --skip_bad, its unreadable images [(index, error)]."""
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda")
    pool, dino, kept, skipped = Moments(2048), Moments(1024) if dinov2 else None, {}, []
    # the bar is closed on the way out too, so that an error line starts a line of its own
    with exact_float32(), tqdm(total=len(shard), unit="img", disable=not info.is_main) as bar:
        for images, index, failed in loader:
            if failed and not args.skip_bad:
                raise SystemExit(f"error: {dataset.paths[failed[0][0]]}: cannot read image "
                                 f"({failed[0][1]}) (pass --skip_bad to list it and go on)")
            skipped += failed
            if images is not None:
                pool.add(inception_pool(extractor, images, info.device))
                if dinov2 is not None:
                    dino.add(dinov2.batch(images))
                for image, i in zip(images, index):
                    if i in positions:
                        kept[positions[i]] = image.permute(1, 2, 0).numpy()
            bar.update(len(index) + len(failed))
    return pool, dino, kept, skipped


def write_skipped(path: Path, skipped: list) -> None:
    """The unreadable images [(path, error)], "path<TAB>error" a line; none: no file (an earlier
    run's list would name images that are read by now)."""
    if skipped:
        text = "".join(f"{image}\t{error}\n" for image, error in skipped)
        atomic_write(path, lambda f: f.write(text.encode()))
    else:
        path.unlink(missing_ok=True)


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
    with one_line_errors():  # before any work: where the results go, what images there are
        out = check_writable(args.out, "--out")
        paths = image_paths(args)
    try:  # the networks first: missing weights fail before any image is read
        extractor = inception_extractor(info.device, args.inception_weights)
        dinov2 = DinoV2Features(info.device) if args.fd_dinov2 else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    start = time.time()
    positions = reference_positions(len(paths), min(args.ref_images, len(paths)), args.seed)
    shard = list(range(info.rank, len(paths), info.world_size))  # disjoint, no padding
    dataset = CroppedImages(paths, args.img_size)
    pool, dino, kept, skipped = measure_shard(dataset, shard, positions, extractor, dinov2, args,
                                              info)
    skipped = sorted(f for part in all_gather_objects(skipped) for f in part)  # every rank's
    n, mu, sigma = pool.gaussian(info.device)
    if n != len(paths) - len(skipped):
        raise SystemExit(f"error: {n} images measured across ranks, expected "
                         f"{len(paths) - len(skipped)}")
    skipped_list = out.with_name(f"{out.stem}_skipped.txt")
    if info.is_main:
        write_skipped(skipped_list, [(paths[i], error) for i, error in skipped])
    if n < 2:
        raise SystemExit(f"error: {train_folder(args.data_path)}: {n} readable image(s) (expected "
                         f"at least 2, for a covariance; the others are listed in {skipped_list})")
    # arr_0 without the skipped images' rows: the rows after one move up
    gone = sorted(positions[i] for i, _ in skipped if i in positions)
    kept = {row - bisect(gone, row): image for row, image in kept.items()}
    arr_0 = write_reference(out, kept, len(positions) - len(gone), args.img_size, info)
    dino_stats = dino.gaussian(info.device) if dino is not None else None
    if info.is_main:
        atomic_write(out, lambda f: np.savez(
            f, mu=mu, sigma=sigma, arr_0=arr_0, resolution=np.int64(args.img_size),
            num_images=np.int64(n), inception_sha256=extractor.weights_sha256))
        written = {"stats": str(out), "num_images": n, "reference_images": len(arr_0),
                   "skipped": len(skipped), "resolution": args.img_size,
                   "seconds": round(time.time() - start, 1)}
        if skipped:
            written["skipped_list"] = str(skipped_list)
        if dino_stats is not None:
            dino_out = out.with_name(f"{out.stem}_dinov2.npz")
            atomic_write(dino_out, lambda f: np.savez(
                f, mu=dino_stats[1], sigma=dino_stats[2], resolution=np.int64(args.img_size)))
            written["dinov2_stats"] = str(dino_out)
        print(json.dumps(written))
    cleanup()


if __name__ == "__main__":
    main(stats_parser().parse_args())
