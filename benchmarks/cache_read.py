"""Random-access reads of the per-file and the packed latent cache, and the loaders' start-up.

    python benchmarks/cache_read.py                       # 50,000 records, ~6.6 GB in /tmp
    python benchmarks/cache_read.py --records 2000 --reads 500 --index_records 100000   # smoke

Builds a synthetic per-file cache of `--records` records of the ImageNet shape (2 x float32
32x16x16: 65,536 bytes of moments per image) in 1000 class folders, packs it with
`main_cache.py --convert_cache` (timed), then, for each form through the dataset training uses
(CachedFolder, PackedLatents): the start-up time (listing / index) and reads per second of
`--reads` random samples, with the page cache cold (dropped: `/proc/sys/vm/drop_caches` as root,
else each cache file's pages evicted with posix_fadvise(DONTNEED), which keeps directory entries
and inodes cached, so the per-file cold numbers are then optimistic) and warm (the same samples
again). Last, the packed index's start-up at `--index_records` (ImageNet: 1,281,167) from a
synthetic index of that many records. Scales the cache down when the disk is short, and says so.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.loader import CachedFolder  # noqa: E402
from util.packed_cache import PackedLatents, SegmentWriter, write_index  # noqa: E402

SHAPE = (32, 16, 16)
FILE_BYTES = 66_060  # one per-file record as np.savez writes it
RECORD_BYTES = 2 * int(np.prod(SHAPE)) * 4


def fit_to_disk(root: Path, records: int) -> int:
    """The record count that fits twice (both forms) in 80% of the free space."""
    free = shutil.disk_usage(root).free
    fits = int(0.8 * free / (FILE_BYTES + RECORD_BYTES))
    if fits < records:
        print(f"only {free / 1e9:.1f} GB free under {root}: {fits} records instead of {records}")
    return min(records, fits)


def build_per_file(root: Path, records: int) -> None:
    """`records` .npz files in 1000 class folders, as main_cache.py writes them."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((64, 2, *SHAPE)).astype(np.float32)
    for i in range(records):
        folder = root / f"n{i % 1000:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        pool[i % 64, 0, 0, 0, 0] = i  # every record differs
        np.savez(folder / f"img_{i:07d}.JPEG.npz", moments=pool[i % 64, 0], moments_flip=pool[i % 64, 1])


def convert(files: Path, packed: Path) -> float:
    """The user's command (entry scripts are not imported), timed with its start-up."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "main_cache.py"), "--device", "cpu", "--batch_size",
                    "256", "--cached_path", str(packed), "--convert_cache", str(files)],
                   check=True, cwd=REPO)
    return time.perf_counter() - start


def drop_page_cache(roots) -> str:
    """Make the caches' pages cold; returns how it was done."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
    return "posix_fadvise(DONTNEED) per file (drop_caches refused: not allowed here)"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def reads_per_second(dataset, indices) -> float:
    _, seconds = timed(lambda: [dataset[int(i)] for i in indices])
    return len(indices) / seconds


def measure(name: str, make, indices, roots) -> dict:
    drop_page_cache(roots)
    dataset, start_cold = timed(make)
    _, start_warm = timed(make)
    how = drop_page_cache(roots)
    cold = reads_per_second(dataset, indices)
    warm = reads_per_second(dataset, indices)
    print(f"{name:9s} start-up {start_cold:7.3f} s cold, {start_warm:7.3f} s warm; random reads "
          f"{cold:8.0f}/s cold, {warm:8.0f}/s warm")
    return {"start_cold": start_cold, "start_warm": start_warm, "cold": cold, "warm": warm, "how": how}


def index_start_up(root: Path, records: int) -> None:
    """A packed index of `records` records (names as long as ImageNet's) and its start-up."""
    root.mkdir()
    writer = SegmentWriter(root, rank=0, record_shape=(2, 1, 1, 1))
    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(records)]
    writer.append(names, np.zeros((records, 2, 1, 1, 1), np.float32))
    writer.close()
    _, build = timed(lambda: write_index(root, [], (2, 1, 1, 1)))
    size = (root / "packed_index.npz").stat().st_size
    drop_page_cache([root])
    _, cold = timed(lambda: PackedLatents(root))
    _, warm = timed(lambda: PackedLatents(root))
    print(f"packed index of {records:,} records ({size / 1e6:.1f} MB): written in {build:.1f} s "
          f"(rank 0, end of the job); start-up {cold:.3f} s cold, {warm:.3f} s warm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--reads", type=int, default=5_000, help="random samples read per measurement")
    p.add_argument("--index_records", type=int, default=1_281_167)
    p.add_argument("--root", default="/tmp/ear_cache_read",
                   help="local folder for the caches (deleted after)")
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        records = fit_to_disk(root, args.records)
        (_, seconds) = timed(lambda: build_per_file(root / "files", records))
        print(f"{records:,} per-file records written in {seconds:.0f} s")
        print(f"packed by --convert_cache in {convert(root / 'files', root / 'packed'):.0f} s")
        torch.manual_seed(0)
        indices = np.random.default_rng(0).choice(records, min(args.reads, records), replace=False)
        files = measure("per-file", lambda: CachedFolder(root / "files", SHAPE), indices, [root / "files"])
        packed = measure("packed", lambda: PackedLatents(root / "packed", SHAPE), indices, [root / "packed"])
        print(f"packed / per-file reads: {packed['cold'] / files['cold']:.1f}x cold, "
              f"{packed['warm'] / files['warm']:.1f}x warm; page cache made cold by {files['how']}")
        per_file_full = files["start_cold"] * 1_281_167 / records
        print(f"per-file start-up at 1,281,167 files, linear extrapolation: ~{per_file_full:.0f} s cold")
        index_start_up(root / "index", args.index_records)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
