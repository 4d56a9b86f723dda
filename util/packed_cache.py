"""The packed latent cache: the same moments as the per-file cache, in a few large files.

The per-file cache (`<cached_path>/<class>/<file>.npz`, SPEC section 2) is 1.28 million small
files for ImageNet: every start walks them and every step opens one, the slow path on network
file systems. The packed form keeps one fixed-record array file per writing process and run, read
by offset (one positioned read per sample, readahead off), and one index file.
Layout of `<cached_path>` (format version 1):

    packed_index.npz          the index; its presence marks the folder as a packed cache
    seg-r<rank>-<k>.bin       records, back to back, no header: record i sits at byte
                              i * record_bytes; a record is float32 little-endian of shape
                              (2, 2C, h, w): [0] the image's moments, [1] its flip's
                              (ImageNet 256 px: (2, 32, 16, 16), 65,536 bytes)
    seg-r<rank>-<k>.tsv       one line per record, in record order:
                              "<crc32 of [0]>\t<crc32 of [1]>\t<class>/<file name>\n"
                              (crc32 as 8 hex digits, zlib's; the name of the image, no `.npz`)
    seg-r<rank>-<k>.json      the commit marker, rewritten atomically after every batch:
                              {"records": n, "record_shape": [...], "dtype": "<f4"};
                              only the first n records and lines of the segment are valid

`packed_index.npz` (np.savez, uncompressed; written atomically once every process is done):
    header   0-d str: JSON {"format": "ear-packed-latent-cache", "version": 1, "dtype": "<f4",
             "record_shape": [2, 2C, h, w], "classes": [sorted class names; label = position],
             "segments": [{"file": "seg-....bin", "records": n}, ...]}
    label    (N,) int32    class index of sample i
    segment  (N,) int32    which segment file holds it
    row      (N,) int64    its record number in that file
    crc32    (N, 2) uint32 zlib CRC-32 of the record's two halves (a reader checks the half it reads)
    names    (bytes,) uint8 the N relative names "<class>/<file name>", UTF-8, joined by "\n"

Samples are in the per-file loader's order (torchvision's DatasetFolder on the `.npz` files:
sorted classes, then sorted folders, then sorted `<file name>.npz`), so the same seed draws the
same samples from either form. Writing: a process appends a batch of records, fsyncs it, appends
their lines, fsyncs them, then commits by rewriting its marker; a kill at any point leaves the
committed prefix intact and the uncommitted tail ignored (it is never indexed). A rerun writes
new segments for what is missing and rebuilds the index.
"""
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from util.fileio import atomic_write
from util.loader import CACHE_KEYS, draw_flip

INDEX_NAME = "packed_index.npz"
FORMAT, VERSION = "ear-packed-latent-cache", 1
DTYPE = np.dtype("<f4")
SEGMENT_GLOB = "seg-r*"


def is_packed(root) -> bool:
    """A folder holding the packed form (its index file); no listing of the folder."""
    return (Path(root) / INDEX_NAME).is_file()


def record_crcs(record: np.ndarray) -> tuple:
    """CRC-32 of each half of one record (2, 2C, h, w): (moments, moments_flip)."""
    return tuple(zlib.crc32(np.ascontiguousarray(half, DTYPE)) for half in record)


def loader_order_key(name: str) -> tuple:
    """Sort key giving DatasetFolder's order of `<name>.npz` among a cache's classes: it walks
    sorted(os.walk(class folder)) (folders by path) and sorts file names, `.npz` included (the
    suffix changes the order: "a.b.npz" < "a.npz" although "a" < "a.b")."""
    folder, _, file = name.rpartition("/")
    return name.split("/", 1)[0], folder, file + ".npz"


# ----- writing ----------------------------------------------------------------------------------

class SegmentWriter:
    """This process's new segment: append(names, records) writes and commits one batch.

    The files are created at the first append, so a process with nothing to write leaves none.
    """

    def __init__(self, root, rank: int, record_shape):
        self.root, self.rank = Path(root), rank
        self.record_shape = tuple(int(s) for s in record_shape)
        self.stem, self.count, self.data, self.lines = None, 0, None, None

    def _open(self) -> None:
        k = 0  # the first number no earlier run of this rank used
        while any((self.root / f"seg-r{self.rank:05d}-{k:04d}{ext}").exists()
                  for ext in (".bin", ".tsv", ".json")):
            k += 1
        self.stem = self.root / f"seg-r{self.rank:05d}-{k:04d}"
        self.data = open(self.stem.with_suffix(".bin"), "xb")
        self.lines = open(self.stem.with_suffix(".tsv"), "xb")

    def append(self, names, records: np.ndarray) -> None:
        """records: (B, 2, 2C, h, w) float32, records[i] belonging to names[i]."""
        if tuple(records.shape[1:]) != self.record_shape or len(names) != len(records):
            raise ValueError(f"expected {len(names)} records of shape {self.record_shape}, "
                             f"got {records.shape}")
        for name in names:  # a tab or newline would break the line-per-record list
            if "\t" in name or "\n" in name:
                raise ValueError(f"{name!r}: a file name with a tab or newline cannot be packed")
        if self.stem is None:
            self._open()
        records = np.ascontiguousarray(records, DTYPE)
        text = "".join("%08x\t%08x\t%s\n" % (*record_crcs(r), n) for r, n in zip(records, names))
        for f, payload in ((self.data, records.tobytes()), (self.lines, text.encode())):
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # on disk before the marker says so
        self.count += len(names)
        marker = {"records": self.count, "record_shape": list(self.record_shape), "dtype": DTYPE.str}
        atomic_write(self.stem.with_suffix(".json"), lambda f: f.write(json.dumps(marker).encode()))

    def close(self) -> None:
        for f in (self.data, self.lines):
            if f is not None:
                f.close()


def committed_segments(root, record_shape) -> list:
    """Every committed segment: [(bin file name, [(name, (crc, crc)), ...] in record order)].
    A segment of another record shape is an error (the flags changed since it was written)."""
    segments = []
    for marker_path in sorted(Path(root).glob(f"{SEGMENT_GLOB}.json")):
        marker = json.loads(marker_path.read_text())
        if tuple(marker["record_shape"]) != tuple(record_shape) or marker["dtype"] != DTYPE.str:
            raise ValueError(f"{marker_path}: records of shape {marker['record_shape']} "
                             f"({marker['dtype']}), expected {list(record_shape)} ({DTYPE.str}); "
                             "check --img_size and --vae_embed_dim, or pass --overwrite")
        with open(marker_path.with_suffix(".tsv"), "rb") as f:
            lines = [f.readline().decode().rstrip("\n").split("\t", 2) for _ in range(marker["records"])]
        if any(len(fields) != 3 for fields in lines):  # only if edited by hand: appends come first
            raise ValueError(f"{marker_path.with_suffix('.tsv')}: fewer than the {marker['records']} "
                             "lines its marker commits; rerun with --overwrite")
        entries = [(name, (int(c0, 16), int(c1, 16))) for c0, c1, name in lines]
        segments.append((marker_path.with_suffix(".bin").name, entries))
    return segments


def committed_names(root, record_shape) -> set:
    return {name for _, entries in committed_segments(root, record_shape) for name, _ in entries}


def remove_packed(root) -> None:
    """Delete the index and every segment (--overwrite). Only while nothing writes."""
    for path in [Path(root) / INDEX_NAME, *Path(root).glob(SEGMENT_GLOB)]:
        path.unlink(missing_ok=True)


def remove_uncommitted(root) -> None:
    """Delete segments a killed process left without any commit. Only while nothing writes."""
    for path in Path(root).glob(SEGMENT_GLOB):
        if path.suffix in (".bin", ".tsv") and not path.with_suffix(".json").exists():
            path.unlink()


def write_index(root, classes, record_shape) -> int:
    """Index every committed record in the per-file loader's order; returns the record count.
    classes: the class names (their union with the records' classes is the class list)."""
    segments = committed_segments(root, record_shape)
    entries = [(name, s, row, crcs) for s, (_, items) in enumerate(segments)
               for row, (name, crcs) in enumerate(items)]
    entries.sort(key=lambda e: loader_order_key(e[0]))
    names = [e[0] for e in entries]
    duplicate = next((a for a, b in zip(names, names[1:]) if a == b), None)
    if duplicate is not None:
        raise ValueError(f"{root}: {duplicate} is in two segments; rerun with --overwrite")
    classes = sorted(set(classes) | {n.split("/", 1)[0] for n in names})
    class_index = {c: i for i, c in enumerate(classes)}
    header = {"format": FORMAT, "version": VERSION, "dtype": DTYPE.str,
              "record_shape": list(record_shape), "classes": classes,
              "segments": [{"file": f, "records": len(items)} for f, items in segments]}
    arrays = dict(
        header=np.array(json.dumps(header)),
        label=np.array([class_index[n.split("/", 1)[0]] for n in names], np.int32),
        segment=np.array([e[1] for e in entries], np.int32),
        row=np.array([e[2] for e in entries], np.int64),
        crc32=np.array([e[3] for e in entries], np.uint32).reshape(-1, 2),
        names=np.frombuffer("\n".join(names).encode(), np.uint8))
    atomic_write(Path(root) / INDEX_NAME, lambda f: np.savez(f, **arrays))
    return len(names)


# ----- reading ----------------------------------------------------------------------------------

def read_header(index) -> dict:
    """The index's header, checked for format and version."""
    header = json.loads(str(index["header"]))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"not a version-{VERSION} {FORMAT} (found {header.get('format')} "
                         f"version {header.get('version')})")
    return header


class PackedLatents(Dataset):
    """The packed cache at `root` -> (moments (2C, h, w) float32, label), as CachedFolder.

    Start-up reads the index only (no directory listing). Each read takes the plain or the
    flipped half with the same random draw as CachedFolder: one positioned read of that half
    (the file could equally be memory-mapped; a plain read avoids the fault handler's readahead
    around every random sample), checked against its CRC-32. Files open lazily in each process,
    so the dataset pickles to DataLoader workers as paths and index arrays.
    expected_shape: (2C, h, w) the index's record shape must end in, or None.
    """

    def __init__(self, root, expected_shape=None):
        self.root, self.index_path = Path(root), Path(root) / INDEX_NAME
        try:
            with np.load(self.index_path) as index:
                self.header = read_header(index)
                self.labels, self.segment, self.row, self.crc = (
                    index[k] for k in ("label", "segment", "row", "crc32"))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{self.index_path}: unreadable packed-cache index ({e}); rerun "
                             "main_cache.py --cache_format packed") from e
        self.record_shape = tuple(self.header["record_shape"])
        if expected_shape is not None and self.record_shape[1:] != tuple(expected_shape):
            raise ValueError(f"{self.index_path}: records of shape {self.record_shape[1:]}, "
                             f"expected {tuple(expected_shape)} (check --img_size and "
                             "--vae_embed_dim against the cache)")
        if len(self.labels) == 0:
            raise FileNotFoundError(f"--cached_path {root}: its packed index lists no records")
        self.classes = self.header["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = self.labels
        self.record_bytes = int(np.prod(self.record_shape)) * DTYPE.itemsize
        self._fds, self._pid = {}, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # descriptors are per process: a worker opens its own
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def segment_fd(self, s: int) -> int:
        """A descriptor of segment s, opened once per process (forked workers get their own).
        Readahead is off: a sample is one random read of half a record; reading ahead around it
        (as a memory map's page faults do) only wastes I/O on a cold cache."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            info = self.header["segments"][s]
            path = self.root / info["file"]
            fd = os.open(path, os.O_RDONLY)
            if os.fstat(fd).st_size < info["records"] * self.record_bytes:
                os.close(fd)
                raise ValueError(f"{path}: shorter than its {info['records']} records of "
                                 f"{self.record_shape}; the packed cache is incomplete")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[s] = fd
        return self._fds[s]

    def names(self) -> list:
        """The N relative names "<class>/<file name>", in sample order (read on demand)."""
        with np.load(self.index_path) as index:
            return index["names"].tobytes().decode().split("\n")

    def read(self, index: int, half: int) -> np.ndarray:
        """Half `half` (0: the image, 1: its flip) of record `index`: (2C, h, w), CRC-checked."""
        s, row = int(self.segment[index]), int(self.row[index])
        moments = np.empty(self.record_shape[1:], DTYPE)
        offset = row * self.record_bytes + half * moments.nbytes
        if os.preadv(self.segment_fd(s), [moments], offset) != moments.nbytes:
            raise ValueError(f"{self.root / self.header['segments'][s]['file']}: short read of "
                             f"record {row}; the file was truncated")
        if zlib.crc32(moments) != int(self.crc[index, half]):
            raise ValueError(f"{self.root / self.header['segments'][s]['file']}: record {row} "
                             f"({self.names()[index]}, {CACHE_KEYS[half]}) fails its CRC-32 "
                             "check; the file is corrupt: rerun main_cache.py --cache_format "
                             "packed --overwrite")
        return moments

    def record(self, index: int) -> np.ndarray:
        """Record `index`, both halves: (2, 2C, h, w)."""
        return np.stack([self.read(index, 0), self.read(index, 1)])

    def __getitem__(self, index):
        return torch.from_numpy(self.read(index, draw_flip())), int(self.labels[index])
