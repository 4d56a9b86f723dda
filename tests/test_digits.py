"""The CPU quick start: pixel tokens, the built-in digits, and the digit-quality metrics."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from engine_ear import TokenBatches
from models.ear import ear_models
from models.tokenizer import PixelTokenizer
from util.digits import DigitClassifier, DigitsDataset, digits_split, frechet_distance


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


def test_digits_dataset_and_split():
    x_tr, y_tr, x_te, y_te = digits_split()
    assert x_tr.shape[1:] == (8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.dtype == np.uint8 and x_tr.max() == 255
    assert sorted(np.unique(y_te).tolist()) == list(range(10))
    ds = DigitsDataset()
    img, label = ds[0]
    assert img.shape == (1, 8, 8) and -1.0 <= img.min() and img.max() <= 1.0
    assert len(ds) == len(x_tr) and ds.classes == [str(c) for c in range(10)]


def test_pixel_tokens_round_trip_exactly():
    ds = DigitsDataset()
    images = ds.images[:32]
    model = ear_models["ear_tiny"](img_size=8, vae_stride=1, vae_embed_dim=1, patch_size=2,
                                   class_num=10, buffer_size=4)
    tokens = model.patchify(images)
    assert tokens.shape == (32, 16, 4)
    assert torch.equal(model.unpatchify(tokens), images)
    # The training batches are the pixels themselves; decoding gives them back.
    tokenizer = PixelTokenizer(channels=1)
    latents, labels, targets = TokenBatches(tokenizer, False, torch.device("cpu"))((images, ds.labels[:32]))
    assert torch.equal(latents, images) and targets is None
    assert torch.equal(tokenizer.decode(latents), images)


def test_classifier_accuracy_on_known_answers(classifier):
    x_tr, y_tr, x_te, y_te = digits_split()
    assert classifier.accuracy(x_tr, y_tr) > 0.98  # fits its own training digits (measured 0.986)
    assert 0.93 < classifier.accuracy(x_te, y_te) < 1.0
    shuffled = np.random.default_rng(0).permutation(y_te)
    assert abs(classifier.accuracy(x_te, shuffled) - 0.1) < 0.06  # chance level
    assert classifier.accuracy(x_te[:3], classifier.model.predict(classifier.inputs(x_te[:3]))) == 1.0


def test_frechet_distance_on_known_answers(classifier):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 10))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = rng.normal(size=10)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # The features are affine in the pixels: moving every image by d moves them by W d / 255.
    x = digits_split()[2].astype(np.float64)
    d = rng.normal(0, 10, size=(8, 8))
    moved = classifier.model.coef_ @ (d.ravel() / 255.0)
    fd = frechet_distance(classifier.features(x), classifier.features(x + d))
    assert fd == pytest.approx(float(moved @ moved), rel=1e-6)


def test_quick_start_config_is_the_real_pipeline_shortened(tmp_path):
    config = REPO / "configs" / "digits_quickstart.args"
    proc = run_script("main_ear.py", [f"@{config}", "--epochs", 1, "--num_images", 100,
                                      "--eval_bsz", 50, "--num_iter", 4, "--output_dir", tmp_path,
                                      "--log_dir", tmp_path])
    assert "== report ==" in proc.stdout
    assert (tmp_path / "checkpoint-last.pth").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["cfg"] for r in metrics["results"]] == [1.0, 2.0]
    for r in metrics["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["frechet"] > -1e-9 and r["num_images"] == 100
        assert (tmp_path / r["grid"].split("/")[-1]).is_file()
        samples = np.load(tmp_path / f"samples-ariter4-temp1.0-linearcfg{r['cfg']}-image100.npz")
        assert samples["images"].shape == (100, 8, 8) and samples["images"].dtype == np.uint8
        assert np.bincount(samples["labels"]).tolist() == [10] * 10
    # Two evaluation points (cfg 1.0 and 2.0): a sweep table and plot (accuracy vs Frechet).
    table = (tmp_path / "sweep-epoch0.md").read_text().splitlines()
    assert table[0].startswith("| cfg | temperature | accuracy | frechet |") and len(table) == 4
    assert (tmp_path / "sweep-epoch0.png").stat().st_size > 1000
    ceiling = metrics["results"][0]["ceiling"]
    assert ceiling["accuracy"] > 0.93 and 0 <= ceiling["frechet"] < 5
