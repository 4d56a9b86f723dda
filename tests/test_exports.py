"""What other tools read from us (issue 15): the ADM `.npz` as ADM's evaluator scores it, the
reference's Python names, and a module graph without circles."""
import ast
import importlib
import json
import re
from pathlib import Path

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


# The model card export_ear.py writes beside the weights (README.md, the page the Hub shows).

def card_cells(line: str) -> list:
    """The cells of one Markdown table row (an escaped pipe stays inside its cell)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def card_table(card: str, heading: str) -> list:
    """The first table under `## heading`, as one dict per row."""
    section = card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = card_cells(rows[0])
    assert set(card_cells(rows[1])) == {"---"}
    return [dict(zip(header, card_cells(row), strict=True)) for row in rows[2:]]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A training checkpoint (epoch 7, EMA rate 0.995) of a small model of the digits 5-9, as
    main_ear.py --classes 5,6,7,8,9 writes it; its folder has no eval_results.jsonl."""
    from test_files import digits_settings, save_checkpoint
    from util.builders import build_model
    settings = digits_settings()
    settings.class_num, settings.classes, settings.dataset_classes = 5, "5,6,7,8,9", [5, 6, 7, 8, 9]
    run = tmp_path_factory.mktemp("runs") / "digits-5to9"
    save_checkpoint(run, build_model(settings), settings, 7)
    return run


def run_with_evaluations(digits_run, folder, lines):
    """Another run folder with the same checkpoint and this eval_results.jsonl."""
    folder.mkdir()
    (folder / "checkpoint-last.pth").symlink_to(digits_run / "checkpoint-last.pth")
    (folder / "eval_results.jsonl").write_text("".join(
        line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return folder


def digits_line(cfg, accuracy, frechet):
    """A line as engine_ear.measure_samples writes it for the digits."""
    return {"epoch": 7, "model": "ear_tiny", "head": "energy", "cfg": cfg, "infer_temperature": 1.0,
            "cfg_schedule": "linear", "classes": [5, 6, 7, 8, 9], "num_iter": 16,
            "accuracy": accuracy, "frechet": frechet, "num_images": 500,
            "ceiling": {"accuracy": 0.99, "frechet": 0.25}, "seconds_per_image": 0.01,
            "grid": "/home/someone/private/grid.png"}


def test_export_writes_a_model_card_with_metadata_settings_and_evaluations(digits_run, tmp_path):
    from huggingface_hub.repocard import metadata_load

    import export_ear
    run = run_with_evaluations(digits_run, tmp_path / "evaluated", [
        digits_line(1.0, 0.875, 3.5), digits_line(2.0, 0.9375, 2.125),
        '{"epoch": 7, "cfg": 3.0, "accur'])  # a last line cut short by a killed run
    export_ear.main(["--resume", str(run), "--out", str(tmp_path / "out"), "--license", "mit"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n")  # the Hub reads the metadata only at the very top
    assert metadata_load(tmp_path / "out" / "README.md") == {  # PyYAML, as the Hub client does
        "license": "mit", "library_name": "ear", "pipeline_tag": "unconditional-image-generation",
        "tags": ["image-generation", "autoregressive", "class-conditional", "energy-score",
                 "digits"]}
    settings = {row["setting"]: row["value"] for row in card_table(card, "Weights")}
    assert settings["trained epochs"].startswith("8 ")  # epoch 7, counted from 0
    assert settings["weights"].startswith("EMA") and "0.995" in settings["weights"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for name in ("model", "head", "tokenizer", "img_size", "class_num", "decoder_depth"):
        assert settings[name] == str(config[name])
    assert (settings["model"], settings["img_size"], settings["class_num"]) == (
        "ear_tiny", "8", "5")
    assert settings["dataset classes"] == "5, 6, 7, 8, 9" and settings["license"] == "mit"
    rows = card_table(card, "Evaluation")
    assert [(r["cfg"], r["accuracy"], r["Frechet"]) for r in rows] == [
        ("1.0", "0.8750", "3.5000"), ("2.0", "0.9375", "2.1250")]
    assert all(r["epoch"] == "7" and r["images"] == "500" and r["steps"] == "16" for r in rows)
    assert all("held-out real digits" in r["measured against"] and "0.9900" in r["measured against"]
               for r in rows)
    assert "1 line(s)" in card  # the cut-short one is left out, and said so
    assert "--class_ids 5 6 7 8 9 --out samples.png" in card  # the dataset's own ids
    assert "python demo/app.py --resume" in card and "pip install -r demo/requirements.txt" in card
    assert str(tmp_path) not in card and "/home/someone" not in card  # no local path published


def test_the_card_names_what_imagenet_scores_were_measured_against(tmp_path):
    from util import pretrained
    path = tmp_path / "eval_results.jsonl"
    path.write_text(json.dumps({
        "epoch": 399, "cfg": 3.0, "infer_temperature": 1.0, "cfg_schedule": "linear",
        "num_iter": 64, "fid": 1.9712345, "is": 289.3, "precision": 0.81, "recall": 0.6,
        "num_images": 50000, "fid_reference": "/data/me/fid_stats/adm_in256_stats.npz",
        "precision_recall_reference": "fid_stats/VIRTUAL_imagenet256_labeled.npz"}) + "\n")
    section = "\n".join(pretrained.eval_section(path, "raw", 399, ()))
    [row] = card_table("\n## Evaluation\n" + section, "Evaluation")
    assert (row["FID"], row["IS"], row["precision"], row["recall"]) == (
        "1.9712", "289.3000", "0.8100", "0.6000")
    assert row["measured against"] == ("FID: adm_in256_stats.npz; precision/recall: "
                                       "VIRTUAL_imagenet256_labeled.npz")
    assert "raw weights, not the ones measured" in section and "/data/me" not in section


def test_a_run_without_evaluations_says_so(digits_run, tmp_path):
    import export_ear
    export_ear.main(["--resume", str(digits_run), "--out", str(tmp_path / "out"), "--no_ema"])
    card = (tmp_path / "out" / "README.md").read_text()
    evaluation = card.split("\n## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "No evaluation was recorded" in evaluation and "|" not in evaluation
    assert "\nlicense: other\n" in card.split("\n---\n", 1)[0]  # the default: none claimed
    settings = {row["setting"]: row["value"] for row in card_table(card, "Weights")}
    assert settings["weights"].startswith("raw")


def test_two_exports_of_a_checkpoint_are_byte_identical(digits_run, tmp_path):
    from util import pretrained
    a = pretrained.export(digits_run, tmp_path / "a")
    b = pretrained.export(digits_run, tmp_path / "b")
    names = [pretrained.WEIGHTS, pretrained.CONFIG, pretrained.CARD]
    assert sorted(p.name for p in a.iterdir()) == sorted(names)  # no temporary left behind
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_push_uploads_the_card_with_the_weights(digits_run, tmp_path, monkeypatch, capsys):
    import fnmatch

    import huggingface_hub

    import export_ear
    uploaded = []

    class FakeApi:  # as the Hub client is called; records what upload_folder would send
        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded.extend(f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
            return "https://hub.example/commit/2"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    export_ear.main(["--resume", str(digits_run), "--out", str(tmp_path / "out"),
                     "--push_to_hub", "someone/ear-digits"])
    assert uploaded == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "python sample_ear.py --resume someone/ear-digits " in card  # the repo it went to
    assert "python demo/app.py --resume someone/ear-digits\n" in card
    assert "pushed to https://hub.example/commit/2" in capsys.readouterr().out


def test_a_bad_license_is_refused_before_anything_is_written(digits_run, tmp_path):
    import export_ear
    with pytest.raises(SystemExit) as e:
        export_ear.main(["--resume", str(digits_run), "--out", str(tmp_path / "out"),
                         "--license", "MIT\nlibrary_name: other"])
    assert str(e.value.code).startswith("error: --license") and not (tmp_path / "out").exists()
