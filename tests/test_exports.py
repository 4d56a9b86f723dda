"""What other tools read from us (issue 15): the ADM `.npz` as ADM's evaluator scores it, the
reference's Python names, and a module graph without circles."""
import ast
import importlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.npz_order import adm_inception_score  # ADM's consecutive-split IS
from conftest import REPO
from util.images import npz_order, write_adm_npz


def simulated_softmax(classes: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """A classifier that is fairly sure of each image's class, with some per-image noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(classes), num_classes))
    logits[np.arange(len(classes)), classes] += 6.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_npz_export_is_scored_right_by_adms_consecutive_splits(tmp_path):
    """Samples written in class order (as evaluation writes them) come out of the .npz in one
    fixed permutation, with their class ids in arr_1, so ADM's IS equals the shuffled value."""
    num_classes, per_class = 20, 50
    labels = np.arange(num_classes * per_class) // per_class  # evaluation's balanced labels
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, c in enumerate(labels):  # the class in the red channel, noise elsewhere
        img = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
        img[..., 0] = c
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    path = write_adm_npz(folder, labels + 100, tmp_path / "samples")  # ids need not start at 0
    assert path.name == f"samples_{len(labels)}x2x2x3.npz"
    with np.load(path) as data:
        assert data.files == ["arr_0", "arr_1"]
        images, ids = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and ids.dtype == np.int64
    shown = images[:, 0, 0, 0].astype(np.int64)
    assert np.array_equal(ids, shown + 100)  # arr_1 labels every image of arr_0
    assert sorted(ids.tolist()) == sorted((labels + 100).tolist())  # each image exactly once
    for part in np.array_split(shown, 10):
        assert len(set(part.tolist())) >= num_classes - 2  # each split sees nearly every class

    preds = simulated_softmax(shown, num_classes, seed=1)
    from_file = adm_inception_score(preds)
    shuffled = adm_inception_score(preds[np.random.default_rng(2).permutation(len(preds))])
    in_class_order = adm_inception_score(preds[np.argsort(shown, kind="stable")])
    assert from_file == pytest.approx(shuffled, rel=0.03)
    assert in_class_order < 0.3 * shuffled  # what the old class-ordered file scored


def test_the_permutation_spreads_every_class_at_imagenet_scale():
    """50 images of each of 1,000 classes: every consecutive 5,000 holds nearly every class."""
    labels = np.arange(50_000) // 50
    order = npz_order(50_000)
    assert np.array_equal(np.sort(order), np.arange(50_000))
    assert np.array_equal(order, npz_order(50_000))  # fixed: the same file every time
    for part in np.split(labels[order], 10):
        assert len(np.unique(part)) >= 985


def test_reference_names_of_the_named_sizes():
    """`from models.ear import ear_base` and `models.ear.__dict__[args.model](...)` work."""
    import models.ear as ear
    from models.ear import ear_base, ear_huge, ear_large, ear_tiny  # noqa: F401
    model = ear.__dict__["ear_tiny"](img_size=8, vae_stride=1, vae_embed_dim=1, patch_size=2,
                                     class_num=3)
    assert isinstance(model, ear.EAR) and model.class_emb.num_embeddings == 3
    assert len(model.decoder_blocks) == ear.MODEL_SIZES["ear_tiny"]["decoder_depth"]
    assert set(ear.ear_models) == set(ear.MODEL_SIZES)
    assert all(ear.__dict__[name] is fn for name, fn in ear.ear_models.items())


def project_modules() -> dict:
    """{module name: set of project modules it imports} for every .py file of the project."""
    files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    names = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", "."): p for p in files}
    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in imported if m in names and m != name}
    return graph


def test_no_two_modules_import_each_other():
    graph = project_modules()
    assert "util.fid" in graph and "util.download" in graph
    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                     if a in graph.get(b, ())})
    assert cycles == []
    importlib.import_module("util.download")  # and both still import
