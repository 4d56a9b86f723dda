"""The packed latent cache (util/packed_cache.py): main_cache.py --cache_format packed and
--convert_cache, and training from it exactly as from the per-file cache."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_image_folder, run_script
from test_cache import all_images, cache_args
from util.builders import open_cache
from util.loader import CachedFolder
from util.packed_cache import PackedLatents

SHAPE = (32, 2, 2)  # 32 px images through KL-16


def run_cache(*args) -> None:
    """main_cache.main in this process (no interpreter start-up)."""
    import main_cache
    from util.args import cache_parser
    main_cache.main(cache_parser().parse_args([str(a) for a in args]))


def packed_records(root) -> dict:
    """name -> record (2, 2C, h, w) of a packed cache, every CRC checked; each name once."""
    dataset = PackedLatents(root)
    names = dataset.names()
    assert len(names) == len(set(names)) == len(dataset)
    return {name: dataset.record(i) for i, name in enumerate(names)}


def file_records(root) -> dict:
    """name -> record (2, 2C, h, w) of a per-file cache."""
    records = {}
    for path in Path(root).rglob("*.npz"):
        with np.load(path) as f:
            records[path.relative_to(root).as_posix()[:-4]] = np.stack([f["moments"], f["moments_flip"]])
    return records


def committed_count(root) -> int:
    return sum(json.loads(m.read_text())["records"] for m in Path(root).glob("seg-r*.json"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root / "train")
    return root


@pytest.fixture(scope="module")
def files_cache(image_folder, random_vae_ckpt, tmp_path_factory):
    """The per-file form of `image_folder`, one process, one batch of 8 then one of 1."""
    files = tmp_path_factory.mktemp("files")
    run_cache(*cache_args(image_folder, files, random_vae_ckpt, "--batch_size", 8))
    return files


def test_torchrun_packs_each_image_exactly_once(image_folder, files_cache, tmp_path, random_vae_ckpt):
    packed = tmp_path / "packed"
    proc = run_script("main_cache.py", cache_args(image_folder, packed, random_vae_ckpt,
                                                   "--cache_format", "packed", "--batch_size", 8), nproc=2)
    images = all_images(image_folder)
    assert f'"written": {len(images)}, "skipped": 0, "failed": 0, "records": {len(images)}, ' \
           f'"segments": 2' in proc.stdout  # one segment per rank
    records = packed_records(packed)
    assert sorted(records) == images
    assert not list(packed.glob("*/")), "the packed form makes no class folders"
    # The same numbers as the per-file form (other batches: equal up to rounding).
    for name, record in file_records(files_cache).items():
        np.testing.assert_allclose(records[name], record, atol=1e-5, rtol=1e-5)


def test_convert_equals_packed_encoding_of_the_same_images(image_folder, files_cache, tmp_path,
                                                           random_vae_ckpt):
    packed, converted = tmp_path / "packed", tmp_path / "converted"
    run_cache(*cache_args(image_folder, packed, random_vae_ckpt, "--cache_format", "packed",
                          "--batch_size", 8))
    run_cache("--img_size", 32, "--device", "cpu", "--cached_path", converted,
              "--convert_cache", files_cache)
    encoded, packed_from_files = packed_records(packed), packed_records(converted)
    assert list(encoded) == list(packed_from_files)  # same names in the same order
    for name in encoded:
        assert np.array_equal(encoded[name], packed_from_files[name]), name
    assert PackedLatents(converted).labels.tolist() == PackedLatents(packed).labels.tolist()


def per_file_cache(root: Path, bad: dict = None) -> Path:
    """Three classes of per-file records (class c: value c); `bad` maps a name to its arrays."""
    for c, cls in enumerate(("a", "b", "c")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            m = np.full(SHAPE, float(c), np.float32)
            np.savez(root / cls / f"x{i}.png.npz", moments=m, moments_flip=-m)
    for name, arrays in (bad or {}).items():
        if isinstance(arrays, bytes):
            (root / f"{name}.npz").write_bytes(arrays)
        else:
            np.savez(root / f"{name}.npz", **arrays)
    return root


GOOD = np.zeros(SHAPE, np.float32)


@pytest.mark.parametrize("arrays, message", [
    ({"moments": GOOD}, "expected keys"),
    ({"moments": GOOD.astype(np.float64), "moments_flip": GOOD.astype(np.float64)}, "float32"),
    ({"moments": np.zeros((32, 4, 4), np.float32), "moments_flip": np.zeros((32, 4, 4), np.float32)},
     "shape"),
    ({"moments": GOOD, "moments_flip": np.full(SHAPE, np.nan, np.float32)}, "non-finite"),
    (b"PK\x03\x04 truncated", "unreadable"),
])
def test_convert_refuses_a_bad_file_naming_it(tmp_path, arrays, message, capsys):
    source = per_file_cache(tmp_path / "files", {"b/bad.JPEG": arrays})
    convert = ["--img_size", 32, "--device", "cpu", "--cached_path", tmp_path / "packed",
               "--convert_cache", source]
    with pytest.raises(SystemExit, match=f"b/bad.JPEG.npz.*{message}.*--skip_bad"):
        run_cache(*convert)
    run_cache(*convert, "--skip_bad")
    assert '"written": 6, "skipped": 0, "failed": 1' in capsys.readouterr().out
    assert (tmp_path / "packed" / "failed_images.txt").read_text().startswith("b/bad.JPEG\t")
    assert sorted(packed_records(tmp_path / "packed")) == [f"{c}/x{i}.png" for c in "abc" for i in (0, 1)]


def test_killed_job_resumes_and_skips_bad_images(tmp_path, random_vae_ckpt, capsys):
    data, cache = tmp_path / "images", tmp_path / "cache"
    make_image_folder(data / "train", per_class=3)
    (data / "train" / "dog" / "broken.JPEG").write_bytes(b"not an image")
    args = cache_args(data, cache, random_vae_ckpt, "--batch_size", 1, "--cache_format", "packed",
                      "--skip_bad")
    proc = subprocess.Popen([sys.executable, str(REPO / "main_cache.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while committed_count(cache) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    partial = committed_count(cache)
    assert 1 <= partial < 9 and not (cache / "packed_index.npz").exists()

    run_cache(*args, "--batch_size", 8)  # another batch size is fine
    assert f'"skipped": {partial}, "failed": 1' in capsys.readouterr().out
    good = [name for name in all_images(data) if name != "dog/broken.JPEG"]
    assert sorted(packed_records(cache)) == good  # every CRC checks: no torn record indexed
    assert (cache / "failed_images.txt").read_text().startswith("dog/broken.JPEG\t")
    assert list(cache.rglob("*.tmp")) == []


# Names whose order changes with the `.npz` suffix ("x1.b.npz" < "x1.npz", yet "x1" < "x1.b")
# and a nested folder: the packed form must keep the per-file loader's order exactly.
TRICKY = ["x1", "x1.b", "x10", "x1_", "x2", "sub/x0", "sub-y/x0", "x0"]


def toy_cache(root: Path) -> Path:
    """A learnable per-file cache: class c has mean c - 1; the flip is mirrored."""
    rng = np.random.default_rng(0)
    for c in range(3):
        for name in TRICKY:
            path = root / f"class{c}" / f"{name}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            mean = np.full((4, 2, 2), c - 1.0) + rng.normal(0, 0.05, (4, 2, 2))
            m = np.concatenate([mean, np.full((4, 2, 2), -8.0)]).astype(np.float32)
            np.savez(path, moments=m, moments_flip=m[:, :, ::-1].copy())
    return root


def convert(source: Path, packed: Path, *extra) -> Path:
    run_cache("--img_size", 8, "--vae_embed_dim", 4, "--vae_stride", 4, "--device", "cpu",
              "--cached_path", packed, "--convert_cache", source, *extra)
    return packed


@pytest.fixture(scope="module")
def toy_forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    files = toy_cache(root / "files")
    return files, convert(files, root / "packed")


def test_training_from_either_form_is_bit_identical(toy_forms, tmp_path):
    from test_train import SMALL, run_in_process
    from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
    files, packed = toy_forms
    per_file_order = [Path(p).relative_to(files).as_posix()[:-4] for p, _ in CachedFolder(files).samples]
    assert per_file_order != sorted(per_file_order)  # the trap is armed
    assert PackedLatents(packed).names() == per_file_order
    checkpoints = []
    for form in (files, packed):
        out = tmp_path / form.name
        run_in_process([*SMALL, "--use_cached", "--cached_path", form, "--output_dir", out,
                        "--batch_size", 4, "--warmup_epochs", 0, "--lr", 1e-3, "--epochs", 1,
                        "--num_workers", 1, "--seed", 3])
        checkpoints.append(load_training_checkpoint(out / CHECKPOINT_NAME))
    for key in ("model", "model_ema"):
        a, b = (c[key] for c in checkpoints)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name}"


def test_packed_loader_lists_no_folder_and_pickles(toy_forms, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the packed loader listed a folder")
    for module, name in ((os, "scandir"), (os, "listdir"), (os, "walk"), (Path, "iterdir"),
                         (Path, "glob"), (Path, "rglob")):
        monkeypatch.setattr(module, name, refuse)
    files, packed = toy_forms
    dataset = open_cache(packed, (8, 2, 2))
    assert isinstance(dataset, PackedLatents) and len(dataset) == 3 * len(TRICKY)
    assert dataset.classes == ["class0", "class1", "class2"]
    moments, label = dataset[len(dataset) - 1]
    assert label == 2 and moments.shape == (8, 2, 2) and moments.dtype == torch.float32
    clone = pickle.loads(pickle.dumps(dataset))  # as a spawned worker gets it: no open maps
    assert clone._fds == {} and np.array_equal(clone.record(5), dataset.record(5))


@pytest.fixture
def damaged(toy_forms, tmp_path):
    """A copy of the toy packed cache to damage (24 records of 256 bytes in one segment), its
    segment and its sample names."""
    packed = Path(shutil.copytree(toy_forms[1], tmp_path / "packed"))
    return packed, next(packed.glob("seg-r*.bin")), PackedLatents(packed).names()


def edit_index(packed: Path, edit) -> None:
    """Rewrite the index with `edit` applied to its dict of arrays."""
    with np.load(packed / "packed_index.npz") as f:
        arrays = dict(f)
    edit(arrays)
    np.savez(packed / "packed_index.npz", **arrays)


def set_header(field, value):
    def edit(arrays):
        header = json.loads(str(arrays["header"]))
        arrays["header"] = np.array(json.dumps({**header, field: value}))
    return edit


def set_at(key, i, value):
    return lambda arrays: arrays[key].__setitem__(i, value)


REBUILD = "rerun main_cache.py with the same flags to rebuild the index"
REWRITE = "rerun main_cache.py with the same flags and --overwrite"


def sample(names, i) -> str:
    """How a message names sample i, as a regex."""
    return re.escape(f"sample {i} ({names[i]})")


def starts_with(path) -> str:
    return "^" + re.escape(str(path)) + ": "


@pytest.mark.parametrize("edit, message", [
    pytest.param(set_at("row", 5, 24), r"{sample5} is record 24 of seg-r00000-0000.bin, expected "
                 r"a record below the 24 the header lists in it", id="row past the end"),
    pytest.param(set_at("segment", 5, 1), r"{sample5} is in segment 1, expected 0 to 0 "
                 r"\(the header lists 1\)", id="segment out of range"),
    pytest.param(set_at("label", 5, 3), r"{sample5} has label 3, expected 0 to 2 "
                 r"\(the header lists 3 classes\)", id="label out of range"),
    pytest.param(set_at("label", 5, -1), r"{sample5} has label -1, expected 0 to 2",
                 id="negative label"),
    pytest.param(lambda a: a.update(row=a["row"][:-1]), r"array 'row' is int64 of shape \(23,\), "
                 r"expected int64 of shape \(24,\)", id="array too short"),
    pytest.param(lambda a: a.update(label=a["label"].astype(np.int64)),
                 r"array 'label' is int64 .* expected int32", id="array of another dtype"),
    pytest.param(lambda a: a.pop("crc32"), r"no array crc32 \(expected header, label, segment, "
                 r"row, crc32, names\)", id="array missing"),
    pytest.param(set_header("dtype", "<f8"), r"header field 'dtype' is '<f8', expected '<f4'",
                 id="header dtype"),
    pytest.param(set_header("version", 2), r"its header says \('ear-packed-latent-cache', 2\), "
                 r"expected format ear-packed-latent-cache version 1", id="header version"),
    pytest.param(set_header("segments", [{"file": "../x.bin", "records": 24}]),
                 r"header field 'segments' is", id="segment file outside the cache"),
])
def test_bad_index_is_refused_at_open_naming_the_sample(damaged, edit, message):
    packed, _, names = damaged
    edit_index(packed, edit)
    message = message.format(sample5=sample(names, 5))
    with pytest.raises(ValueError, match=f"{starts_with(packed / 'packed_index.npz')}{message}.*; "
                                         f"{REBUILD}$"):
        PackedLatents(packed)


def test_unreadable_index_is_named(damaged):
    packed = damaged[0]
    (packed / "packed_index.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"packed_index.npz: unreadable .*; {REBUILD}$"):
        PackedLatents(packed)


def test_deleted_index_is_reported_as_such(damaged):
    packed = damaged[0]
    (packed / "packed_index.npz").unlink()
    with pytest.raises(FileNotFoundError, match=f"{starts_with(f'--cached_path {packed}')}packed "
                                                "segments but no index .*rerun it with the same"):
        open_cache(packed, (8, 2, 2))


def test_short_or_missing_segment_is_refused_at_open(damaged):
    packed, segment, names = damaged
    rows = PackedLatents(packed).row
    first_lost = int(np.flatnonzero(rows >= 10)[0])  # sample order is not record order
    segment.write_bytes(segment.read_bytes()[:10 * 256 + 100])
    with pytest.raises(ValueError, match=(
            f"{starts_with(segment)}2660 bytes, shorter than the 24 records of 256 bytes "
            "packed_index.npz lists in it: the file was truncated at record 10; the first sample "
            f"lost is {sample(names, first_lost)}; {REWRITE}")):
        PackedLatents(packed)
    segment.unlink()
    with pytest.raises(FileNotFoundError, match=f"{starts_with(segment)}no such file, but packed_"
                                                f"index.npz lists 24 records in it.*{REWRITE}"):
        PackedLatents(packed)


def test_flipped_byte_fails_the_crc_naming_segment_record_and_sample(damaged):
    packed, segment, names = damaged
    data = bytearray(segment.read_bytes())
    data[5] ^= 0xFF  # record 0, first half
    segment.write_bytes(bytes(data))
    dataset = PackedLatents(packed)  # a flip leaves the sizes alone: found when read
    i = int(np.flatnonzero(dataset.row == 0)[0])
    dataset.read(i, 1)  # the other half is intact
    with pytest.raises(ValueError, match=(
            f"{starts_with(segment)}record 0, the moments of {sample(names, i)}, fails its CRC-32 "
            f"check: its bytes changed after they were written .*{REWRITE}")):
        dataset.read(i, 0)


def test_index_pointing_at_another_record_blames_the_index(damaged):
    packed, segment, names = damaged
    def swap_rows(arrays):
        arrays["row"][[3, 4]] = arrays["row"][[4, 3]]
    edit_index(packed, swap_rows)  # in range, so only the CRC can tell
    dataset = PackedLatents(packed)
    with pytest.raises(ValueError, match=(
            f"{starts_with(packed / 'packed_index.npz')}{sample(names, 3)} is record "
            f"{dataset.row[3]} of {segment.name}, but {segment.stem}.tsv lists that record as "
            f"{re.escape(names[4])} with another CRC-32: the index does not match the segment; "
            f"{REBUILD}$")):
        dataset.read(3, 0)


def test_segment_cut_while_in_use_is_a_short_read(damaged):
    packed, segment, names = damaged
    dataset = PackedLatents(packed)
    i = int(np.flatnonzero(dataset.row == 23)[0])
    segment.write_bytes(segment.read_bytes()[:100])
    with pytest.raises(ValueError, match=(
            f"{starts_with(segment)}short read of record 23, {sample(names, i)}: the file is 100 "
            f"bytes now, it was truncated while in use; {REWRITE}")):
        dataset.read(i, 1)


def test_cache_of_other_flags_is_refused(damaged):
    with pytest.raises(ValueError, match=r"records of shape \(8, 2, 2\), expected \(32, 2, 2\)"):
        PackedLatents(damaged[0], expected_shape=(32, 2, 2))


def test_uncommitted_tail_is_never_indexed(tmp_path):
    """As a kill in the middle of a batch leaves it: records and a line past the marker."""
    from util.packed_cache import SegmentWriter, write_index
    writer = SegmentWriter(tmp_path, rank=0, record_shape=(2, *SHAPE))
    records = np.stack([np.full((2, *SHAPE), i, np.float32) for i in range(3)])
    writer.append(["a/x0", "a/x1"], records[:2])
    writer.data.write(records[2].tobytes()[:1000])  # torn record
    writer.lines.write(b"0000\t12")  # torn line
    writer.close()
    assert write_index(tmp_path, ["a"], (2, *SHAPE)) == 2
    assert sorted(packed_records(tmp_path)) == ["a/x0", "a/x1"]
    # The next run (rank 0 again) starts a new segment beside it.
    SegmentWriter(tmp_path, rank=0, record_shape=(2, *SHAPE)).append(["a/x2"], records[2:])
    assert write_index(tmp_path, ["a"], (2, *SHAPE)) == 3
    assert packed_records(tmp_path)["a/x2"][0, 0, 0, 0] == 2


def test_rerun_skips_and_overwrite_repacks(toy_forms, tmp_path, capsys):
    files, packed = toy_forms
    packed = Path(shutil.copytree(packed, tmp_path / "packed"))
    capsys.readouterr()
    convert(files, packed)
    assert '"written": 0, "skipped": 24, "failed": 0, "records": 24, "segments": 1' in capsys.readouterr().out
    convert(files, packed, "--overwrite")
    assert '"written": 24, "skipped": 0, "failed": 0, "records": 24, "segments": 1' in capsys.readouterr().out
