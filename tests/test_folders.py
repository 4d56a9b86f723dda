"""Image folders (issue 22, item 3): one walker (util/loader.py `list_folder`) lists every file
once, whatever links there are, in torchvision's order; main_stats.py, main_cache.py and
training from images use it, and name an empty folder or class, an unusable --out and an
unreadable image in one line."""
import io
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from conftest import make_image_folder, run_script
from refusals import refused
from test_eval import inception_weights  # noqa: F401 (fixture)
from util.loader import ImageFolder

LAYOUT = "<data_path>/train/<class>/<image>"


def cross_link(train: Path, classes=("cat", "dog", "zebra")) -> int:
    """Each class folder links to every other (os.walk follows them 2^40 ways), and the first
    also to itself (`self -> .`). Returns the number of links made."""
    (train / classes[0] / "self").symlink_to(".")
    for cls in classes:
        for other in classes:
            if other != cls:
                (train / cls / f"to_{other}").symlink_to(f"../{other}")
    return len(classes) * (len(classes) - 1) + 1


def within(seconds: float, make):
    """make()'s result; it must end within `seconds` (a listing that loops never would)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(make()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    assert result, "it failed: see the thread's exception above"
    return result[0]


def stats_args(data, out, weights, *extra):
    return ["--data_path", data, "--img_size", 32, "--out", out, "--inception_weights", weights,
            "--ref_images", 10, "--batch_size", 4, "--num_workers", 0, "--device", "cpu", *extra]


def printed_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_links_add_nothing_to_torchvisions_listing(tmp_path, capsys):
    train = make_image_folder(tmp_path / "train", per_class=2)
    for sub in ("s", "s-t", "s.t"):  # path order is not depth-first order: "s-t" < "s/x"
        (train / "cat" / sub).mkdir()
        (train / "cat" / sub / "x.PNG").touch()
    (tmp_path / "elsewhere").mkdir()  # a class folder may be a link to a folder elsewhere
    (tmp_path / "elsewhere" / "e.jpg").touch()
    (train / "ant").symlink_to(tmp_path / "elsewhere")
    expected = DatasetFolder(str(train), loader=None, extensions=IMG_EXTENSIONS)

    links = cross_link(train) + 1
    dog = next((train / "dog").glob("*.png"))
    (train / "dog" / "again.png").symlink_to(dog.name)
    listed = within(10, lambda: ImageFolder(train, transform=None))
    assert (listed.classes, listed.samples) == (expected.classes, expected.samples)
    assert listed.targets == expected.targets and listed.class_to_idx == expected.class_to_idx
    note = f"note: {train}: {links} link(s) to folders or files listed already were not counted"
    assert note in capsys.readouterr().out

    (train / "zebra" / "stolen.png").symlink_to(dog)
    with pytest.raises(ValueError, match=f"{train}/zebra/stolen.png: the same file as {dog}, in "
                                         "class 'dog'"):
        ImageFolder(train, transform=None)


def test_stats_count_each_linked_image_once(tmp_path, inception_weights, capsys):  # noqa: F811
    import main_stats
    from util.args import stats_parser
    make_image_folder(tmp_path / "data" / "train", per_class=1)
    cross_link(tmp_path / "data" / "train")
    argv = stats_args(tmp_path / "data", tmp_path / "s.npz", inception_weights)
    args = stats_parser().parse_args([str(a) for a in argv])
    within(60, lambda: main_stats.main(args))
    printed = capsys.readouterr().out
    assert printed_json(printed)["num_images"] == 3 and "note:" in printed
    with np.load(tmp_path / "s.npz") as stats:
        assert int(stats["num_images"]) == 3 and len(stats["arr_0"]) == 3


def test_training_from_images_lists_a_linked_image_once(tmp_path):
    from util.args import train_parser
    from util.builders import build_dataset
    train = make_image_folder(tmp_path / "train", per_class=2)
    (train / "cat" / "to_dog").symlink_to("../dog")  # a loop: cat -> dog -> cat ...
    (train / "dog" / "to_cat").symlink_to("../cat")
    args = train_parser().parse_args(["--data_path", str(tmp_path), "--class_num", "3",
                                      "--img_size", "16"])
    dataset = build_dataset(args, SimpleNamespace(image_channels=3))
    assert len(dataset) == 6 and dataset[5][0].shape == (3, 16, 16) and dataset[5][1] == 2


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return path


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_stats_name_a_truncated_image_or_list_and_leave_it_out(tmp_path, inception_weights,  # noqa: F811
                                                               capsys, nproc):
    import main_stats
    from util.args import stats_parser
    data, out = tmp_path / "data", tmp_path / "stats" / "s.npz"
    make_image_folder(data / "train", per_class=3)
    bad = truncated_jpeg(data / "train" / "dog" / "broken.jpg")
    line = refused("main_stats.py", stats_args(data, out, inception_weights), watch=[tmp_path])
    assert line.startswith(f"error: {bad}: cannot read image (OSError: image file is truncated")
    assert line.endswith("(pass --skip_bad to list it and go on)")

    # Decoding in worker processes (two ranks: slow tests): listed once, left out everywhere.
    flags = stats_args(data, out, inception_weights, "--skip_bad", "--num_workers", 1)
    if nproc == 1:
        capsys.readouterr()
        main_stats.main(stats_parser().parse_args([str(a) for a in flags]))
        printed = capsys.readouterr().out
    else:
        printed = run_script("main_stats.py", flags, nproc=2).stdout
    written = printed_json(printed)
    assert written["skipped"] == 1 and written["num_images"] == 9
    skipped_list = tmp_path / "stats" / "s_skipped.txt"
    listed = skipped_list.read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{bad}\tOSError: image file is truncated")
    with np.load(out) as stats:
        skipped = {key: stats[key] for key in ("num_images", "arr_0", "mu", "sigma")}
    assert int(skipped["num_images"]) == 9 and skipped["arr_0"].shape == (9, 32, 32, 3)
    assert skipped["arr_0"].reshape(9, -1).any(axis=1).all()  # no row left empty
    # The same as without the image; a run with nothing skipped leaves no stale list.
    bad.unlink()
    main_stats.main(stats_parser().parse_args([str(a) for a in
                                               stats_args(data, out, inception_weights)]))
    with np.load(out) as clean:
        assert np.allclose(skipped["mu"], clean["mu"], rtol=1e-9, atol=1e-12)
        assert np.allclose(skipped["sigma"], clean["sigma"], rtol=1e-9, atol=1e-12)
    assert not skipped_list.exists()


@pytest.mark.parametrize("case", ["out is a folder", "out's folder unwritable", "no class folders",
                                  "a class without images"])
def test_stats_refuse_before_any_work(tmp_path, inception_weights, monkeypatch, case):  # noqa: F811
    data, out = tmp_path / "data", tmp_path / "s.npz"
    (data / "train").mkdir(parents=True)
    make_image_folder(data / "train", per_class=2,
                      classes=() if case == "no class folders" else ("cat", "dog"))
    if case == "out is a folder":
        out.mkdir()
        expected = f"error: --out {out}: a folder is there"
    elif case == "out's folder unwritable":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "new" / "s.npz"
        access = os.access  # root may write anywhere: answer as for any other user
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
        expected = f"error: --out {out}: cannot write in {locked}"
    elif case == "no class folders":
        expected = f"error: {data / 'train'}: no class folders (expected images in {LAYOUT})"
    else:
        (data / "train" / "zebra").mkdir()
        expected = f"error: {data / 'train' / 'zebra'}: no images (expected {LAYOUT}"
    assert refused("main_stats.py", stats_args(data, out, inception_weights),
                   watch=[tmp_path]).startswith(expected)


def test_cache_names_an_unreadable_image(tmp_path, random_vae_ckpt):
    make_image_folder(tmp_path / "data" / "train", per_class=1)
    bad = truncated_jpeg(tmp_path / "data" / "train" / "dog" / "broken.jpg")
    line = refused("main_cache.py", ["--img_size", 32, "--vae_path", random_vae_ckpt,
                                     "--vae_embed_dim", 16, "--batch_size", 2, "--num_workers", 1,
                                     "--device", "cpu", "--data_path", tmp_path / "data",
                                     "--cached_path", tmp_path / "cache"],
                   watch=[tmp_path / "data"])
    assert line.startswith(f"error: {bad}: cannot read image (OSError: image file is truncated")
