"""The packed latent cache: the same moments as the per-file cache, in a few large files.

The per-file cache (`<cached_path>/<class>/<file>.npz`, the reference release's layout) is 1.28 million small
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

Every record of every listed segment is indexed once (N is the sum of their records). Samples
are in the per-file loader's order (torchvision's DatasetFolder on the `.npz` files: sorted
classes, then sorted folders, then sorted `<file name>.npz`), so the same seed draws the same
samples from either form. Writing: a process appends a batch of records, fsyncs it, appends their
lines, fsyncs them, then commits by rewriting its marker; a kill at any point leaves the
committed prefix intact and the uncommitted tail ignored (it is never indexed). A rerun writes
new segments for what is missing and rebuilds the index.
"""
import itertools
import json
import os
import reprlib
import zipfile
import zlib
from fnmatch import fnmatch
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

REBUILD = "rerun main_cache.py with the same flags to rebuild the index"
REWRITE = "rerun main_cache.py with the same flags and --overwrite to write the records anew"
ARRAYS = {"label": np.int32, "segment": np.int32, "row": np.int64, "crc32": np.uint32}


def is_segment_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and "/" not in entry["file"] and fnmatch(entry["file"], f"{SEGMENT_GLOB}.bin")
            and type(entry.get("records")) is int and entry["records"] >= 0)


HEADER_FIELDS = (  # (field, its check, what was expected)
    ("dtype", lambda v: v == DTYPE.str, repr(DTYPE.str)),
    ("record_shape", lambda v: isinstance(v, list) and len(v) == 4 and v[0] == 2
     and all(type(d) is int and d > 0 for d in v), "[2, 2C, h, w] of positive integers"),
    ("classes", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
     "a list of class names"),
    ("segments", lambda v: isinstance(v, list) and all(map(is_segment_entry, v)),
     '[{"file": "seg-r<rank>-<k>.bin", "records": n}, ...]'),
)


def read_index(path: Path) -> tuple:
    """(header, {label, segment, row, crc32: arrays}) of the index at `path`, their form checked:
    the header's fields, and each array's dtype and length (one entry per record of the listed
    segments). `names` is only checked to be there: it is read for messages alone (30 MB for
    ImageNet, not worth reading at every start)."""
    try:
        with np.load(path) as index:
            files = set(index.files)
            header = json.loads(str(index["header"])) if "header" in files else {}
            arrays = {k: index[k] for k in ARRAYS if k in files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable ({e}), expected the np.savez index main_cache.py "
                         f"writes; {REBUILD}") from e
    missing = [k for k in ("header", *ARRAYS, "names") if k not in files]
    if missing:
        raise ValueError(f"{path}: no array {', '.join(missing)} (expected header, "
                         f"{', '.join(ARRAYS)}, names); {REBUILD}")
    found = (header.get("format"), header.get("version")) if isinstance(header, dict) else header
    if found != (FORMAT, VERSION):
        raise ValueError(f"{path}: its header says {reprlib.repr(found)}, expected format "
                         f"{FORMAT} version {VERSION}; {REBUILD}")
    for field, valid, expected in HEADER_FIELDS:
        if not valid(header.get(field)):
            raise ValueError(f"{path}: header field {field!r} is "
                             f"{reprlib.repr(header.get(field))}, expected {expected}; {REBUILD}")
    n = sum(s["records"] for s in header["segments"])
    for k, dtype in ARRAYS.items():
        shape = (n, 2) if k == "crc32" else (n,)
        if arrays[k].dtype != dtype or arrays[k].shape != shape:
            raise ValueError(f"{path}: array {k!r} is {arrays[k].dtype} of shape "
                             f"{arrays[k].shape}, expected {np.dtype(dtype)} of shape {shape} "
                             f"(one entry per record of the header's segments); {REBUILD}")
    return header, arrays


class PackedLatents(Dataset):
    """The packed cache at `root` -> (moments (2C, h, w) float32, label), as CachedFolder.

    Start-up reads the index and each segment's size (no record, no directory listing) and
    refuses what would fail mid-training: a malformed index, a sample whose segment, row or
    label is out of range, a segment missing or shorter than its records. Each read takes the
    plain or the flipped half with the same random draw as CachedFolder: one positioned read of
    that half (the file could equally be memory-mapped; a plain read avoids the fault handler's
    readahead around every random sample), checked against its CRC-32. Files open lazily in
    each process, so the dataset pickles to DataLoader workers as paths and index arrays.
    expected_shape: (2C, h, w) the index's record shape must end in, or None.
    """

    def __init__(self, root, expected_shape=None):
        self.root, self.index_path = Path(root), Path(root) / INDEX_NAME
        self.header, arrays = read_index(self.index_path)
        self.labels, self.segment, self.row, self.crc = (arrays[k] for k in ARRAYS)
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
        self.check_samples()
        self.check_segments()
        self._fds, self._pid = {}, None

    def check_samples(self) -> None:
        """Every sample's segment, row and label in range (vectorized: ImageNet has 1.28M)."""
        segments = self.header["segments"]
        records = np.array([s["records"] for s in segments], np.int64)
        bad = (self.segment < 0) | (self.segment >= len(segments))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            self.refuse_sample(i, f"is in segment {self.segment[i]}, expected 0 to "
                                  f"{len(segments) - 1} (the header lists {len(segments)})")
        bad = (self.row < 0) | (self.row >= records[self.segment])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            s = int(self.segment[i])
            self.refuse_sample(i, f"is record {self.row[i]} of {segments[s]['file']}, expected a "
                                  f"record below the {records[s]} the header lists in it")
        bad = (self.labels < 0) | (self.labels >= len(self.classes))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            self.refuse_sample(i, f"has label {self.labels[i]}, expected 0 to "
                                  f"{len(self.classes) - 1} (the header lists "
                                  f"{len(self.classes)} classes)")

    def refuse_sample(self, index: int, problem: str) -> None:
        raise ValueError(f"{self.index_path}: {self.sample(index)} {problem}; {REBUILD}")

    def check_segments(self) -> None:
        """Each segment there and at least as long as its records (one stat each, no read)."""
        for s, info in enumerate(self.header["segments"]):
            path, records = self.segment_path(s), info["records"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file, but {INDEX_NAME} lists {records} "
                                        f"records in it{self.first_lost(s, 0)}; {REWRITE}")
            size = path.stat().st_size
            if size < records * self.record_bytes:
                cut = size // self.record_bytes  # the first record not wholly there
                raise ValueError(f"{path}: {size} bytes, shorter than the {records} records of "
                                 f"{self.record_bytes} bytes {INDEX_NAME} lists in it: the file "
                                 f"was truncated at record {cut}{self.first_lost(s, cut)}; "
                                 f"{REWRITE}")

    def first_lost(self, s: int, cut: int) -> str:
        """"; the first sample lost is ..." for records `cut` on of segment s ("" if none)."""
        lost = np.flatnonzero((self.segment == s) & (self.row >= cut))
        return f"; the first sample lost is {self.sample(int(lost[0]))}" if len(lost) else ""

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # descriptors are per process: a worker opens its own
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def segment_path(self, s: int) -> Path:
        return self.root / self.header["segments"][s]["file"]

    def segment_fd(self, s: int) -> int:
        """A descriptor of segment s, opened once per process (forked workers get their own).
        Readahead is off: a sample is one random read of half a record; reading ahead around it
        (as a memory map's page faults do) only wastes I/O on a cold cache."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            fd = os.open(self.segment_path(s), os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[s] = fd
        return self._fds[s]

    def names(self) -> list:
        """The N relative names "<class>/<file name>", in sample order (read on demand)."""
        with np.load(self.index_path) as index:
            return index["names"].tobytes().decode().split("\n")

    def sample(self, index: int) -> str:
        """"sample <index> (<class>/<file name>)" for a message; the bare number if the names
        cannot be read or do not match the samples."""
        try:
            names = self.names()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            names = []
        return f"sample {index} ({names[index]})" if len(names) == len(self) else f"sample {index}"

    def read(self, index: int, half: int) -> np.ndarray:
        """Half `half` (0: the image, 1: its flip) of record `index`: (2C, h, w), CRC-checked."""
        s, row = int(self.segment[index]), int(self.row[index])
        moments = np.empty(self.record_shape[1:], DTYPE)
        offset = row * self.record_bytes + half * moments.nbytes
        fd = self.segment_fd(s)
        if os.preadv(fd, [moments], offset) != moments.nbytes:  # its size was checked at start-up
            raise ValueError(f"{self.segment_path(s)}: short read of record {row}, "
                             f"{self.sample(index)}: the file is {os.fstat(fd).st_size} bytes now, "
                             f"it was truncated while in use; {REWRITE}")
        if zlib.crc32(moments) != int(self.crc[index, half]):
            raise self.crc_failure(index, half)
        return moments

    def crc_failure(self, index: int, half: int) -> ValueError:
        """Why half `half` of sample `index` fails its CRC: the segment's own list (its .tsv,
        written with the records) tells a wrong index (another record's CRC at that row) from
        bytes that changed since they were written (the list agrees with the index)."""
        path, row = self.segment_path(int(self.segment[index])), int(self.row[index])
        tsv = path.with_suffix(".tsv")
        try:
            with open(tsv, "rb") as f:
                line = next(itertools.islice(f, row, None)).decode().rstrip("\n").split("\t", 2)
            listed_crc, listed_name = int(line[half], 16), line[2]
        except (OSError, ValueError, IndexError, StopIteration):
            listed_crc = None
        if listed_crc is None:
            cause = (f"its bytes changed after they were written, or the index is wrong "
                     f"({tsv.name} cannot be read to tell)")
        elif listed_crc == int(self.crc[index, half]):
            cause = ("its bytes changed after they were written (the segment's list agrees "
                     "with the index)")
        else:
            return ValueError(f"{self.index_path}: {self.sample(index)} is record {row} of "
                              f"{path.name}, but {tsv.name} lists that record as {listed_name} "
                              f"with another CRC-32: the index does not match the segment; "
                              f"{REBUILD}")
        return ValueError(f"{path}: record {row}, the {CACHE_KEYS[half]} of {self.sample(index)}, "
                          f"fails its CRC-32 check: {cause}; {REWRITE}")

    def record(self, index: int) -> np.ndarray:
        """Record `index`, both halves: (2, 2C, h, w)."""
        return np.stack([self.read(index, 0), self.read(index, 1)])

    def __getitem__(self, index):
        return torch.from_numpy(self.read(index, draw_flip())), int(self.labels[index])
