"""Your own data (issue 17): fine-tuning released weights (`--finetune`, another --class_num or
--img_size), training on some classes (`--classes`), and statistics of your own images
(`main_stats.py`)."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import main_ear
from conftest import REPO, run_script
from test_eval import inception_weights  # noqa: F401 (fixture)
from test_train import SMALL, train_args, write_cache
from util.args import train_parser
from util.builders import build_model, settings_from_checkpoint
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.finetune import adapt_state_dict, freeze, interpolate_pos_embed
from util.settings import ConfigMismatch, check_finetune_config

QUICKSTART = f"@{REPO / 'configs' / 'digits_quickstart.args'}"


# --- the position embedding ---------------------------------------------------------------------

def test_interpolation_is_the_identity_at_the_same_size():
    pos = torch.randn(1, 4 + 9, 6)
    assert interpolate_pos_embed(pos, 4, 3) is pos


def test_interpolation_keeps_the_buffer_and_a_smooth_field():
    """A smooth field over a 12x12 grid, resized to 24x24 (and to 6x6), stays that field sampled
    at the new cell centres (closely inside; near the border the new centres lie beyond the old
    ones, so the edge rows are extrapolated); the buffer rows are untouched."""
    def field(side):
        c = (torch.arange(side) + 0.5) / side  # cell centres in [0, 1]
        y, x = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([torch.sin(2 * x) + y, torch.cos(1.5 * y) * x], -1).reshape(1, side * side, 2)
    buffer = torch.randn(1, 3, 2)
    pos = torch.cat([buffer, field(12)], 1)
    for side in (24, 6):
        out = interpolate_pos_embed(pos, 3, side)
        assert out.shape == (1, 3 + side * side, 2)
        assert torch.equal(out[:, :3], buffer)
        error = (out[:, 3:] - field(side)).abs().reshape(side, side, 2)
        assert error.max() < 0.06  # the field spans about 2
        assert error[2:-2, 2:-2].max() < 0.03


# --- weights from a reference-format checkpoint -------------------------------------------------

def small_args(*extra):
    return train_parser().parse_args([str(a) for a in (*SMALL, *extra)])


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """A small EAR trained one epoch, rewritten as the reference release writes its checkpoint
    (args an argparse.Namespace, no head/tokenizer entries), with EMA != raw weights."""
    root = tmp_path_factory.mktemp("source")
    cache = write_cache(root / "cache")
    main_ear.main(train_parser().parse_args([str(a) for a in train_args(cache, root / "run", "--epochs", 1)]))
    path = root / "run" / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    args = {k: v for k, v in ckpt["args"].items() if k not in ("head", "tokenizer", "dataset_classes")}
    ckpt["args"] = argparse.Namespace(**args)
    torch.save(ckpt, path)
    return root / "run", ckpt


def test_a_new_class_count_reinitialises_only_the_class_embedding(reference_checkpoint):
    folder, ckpt = reference_checkpoint
    args = small_args("--class_num", 5, "--finetune", folder)
    torch.manual_seed(0)
    model = build_model(args)
    fresh = model.state_dict()["class_emb.weight"].clone()
    from util.finetune import load_finetune_weights
    source, epoch, notes = load_finetune_weights(model, args)
    state = model.state_dict()
    ema = ckpt["model_ema"]
    assert not torch.equal(ema["z_proj.weight"], ckpt["model"]["z_proj.weight"])  # EMA != raw
    for key, value in ema.items():
        if key != "class_emb.weight":
            assert torch.equal(state[key], value), key  # the EMA weights, loaded exactly
    assert torch.equal(state["class_emb.weight"], fresh)  # as a new model's
    assert state["class_emb.weight"].shape == (5, 32)
    assert notes == ["class_emb.weight re-initialised (the source's 3 classes, 5 classes here)"]
    assert "[model_ema]" in source and epoch == 0
    args.finetune_raw = True
    load_finetune_weights(model, args)
    assert torch.equal(model.state_dict()["z_proj.weight"], ckpt["model"]["z_proj.weight"])


def test_a_new_image_size_interpolates_the_position_embedding(reference_checkpoint):
    folder, ckpt = reference_checkpoint
    args = small_args("--img_size", 16, "--finetune", folder)  # 2x2 -> 4x4 tokens
    model = build_model(args)
    from util.finetune import load_finetune_weights
    _, _, notes = load_finetune_weights(model, args)
    pos = model.state_dict()["decoder_pos_embed_learned"]
    source = ckpt["model_ema"]["decoder_pos_embed_learned"]
    assert pos.shape == (1, 4 + 16, 32)
    assert torch.equal(pos[:, :4], source[:, :4])
    assert torch.allclose(pos, interpolate_pos_embed(source, 4, 4))
    assert notes == ["decoder_pos_embed_learned interpolated (bicubic, 2-D) from a 2^2 to a 4^2 "
                     "token grid; its 4 buffer rows kept"]


@pytest.mark.parametrize("flag, value", [
    ("decoder_embed_dim", 64), ("decoder_depth", 3), ("decoder_num_heads", 8), ("scoreloss_w", 64),
    ("scoreloss_d", 3), ("noise_channels", 16), ("vae_embed_dim", 8), ("patch_size", 2),
    ("buffer_size", 8), ("model", "ear_large"), ("head", "diffusion"),
])
def test_every_other_difference_is_refused_naming_the_flag(reference_checkpoint, flag, value):
    _, ckpt = reference_checkpoint
    args = small_args(f"--{flag}", value)
    with pytest.raises(ConfigMismatch, match=f"--{flag} is {value!r} here but"):
        check_finetune_config(vars(ckpt["args"]), args, "source")


def test_a_shape_the_saved_settings_do_not_explain_is_refused(reference_checkpoint):
    """A checkpoint without saved settings: the tensors themselves are compared."""
    _, ckpt = reference_checkpoint
    args = small_args("--scoreloss_w", 64)
    with pytest.raises(ValueError, match="scoreloss.net.input_proj.weight: file"):
        adapt_state_dict(build_model(args), ckpt["model_ema"], None, args, "source")


def test_freeze_transformer_trains_only_the_head_and_classes():
    model = build_model(small_args())
    frozen = freeze(model, "transformer")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("scoreloss.", "class_emb.")) for n in trains)
    assert "decoder_blocks.0.attn.qkv.weight" in frozen and "class_emb.weight" not in frozen


@pytest.mark.parametrize("flags, expected", [((), "off"), (("--finetune", "x"), "on"),
                                             (("--finetune", "x", "--ema_warmup", "off"), "off"),
                                             (("--ema_warmup", "on"), "on")])
def test_the_ema_warms_up_by_default_only_when_fine_tuning(flags, expected):
    """From scratch the paper's fixed rate; with --finetune an average that starts short."""
    from util.builders import build_train_state, resolve_args
    from util.distributed import DistInfo
    args = small_args(*flags)
    resolve_args(args, DistInfo())
    assert args.ema_warmup == expected
    state = build_train_state(build_model(args), args, DistInfo())
    assert state.ema.warmup == (expected == "on")
    assert state.ema.current_rate() == (0.1 if expected == "on" else args.ema_rate)


def test_a_reference_checkpoint_fine_tunes_with_new_classes_and_size_and_resumes(
        reference_checkpoint, tmp_path, capsys):
    """End to end through main_ear.py: 2 classes of 4x4 latents from a 3-class 2x2 source; the
    run's own checkpoint then wins over --finetune, and resuming equals a straight run."""
    folder, _ = reference_checkpoint
    cache = write_cache(tmp_path / "cache", per_class=8, classes=2, side=4)

    def run(out, epochs):
        argv = train_args(cache, out, "--class_num", 2, "--img_size", 16, "--epochs", epochs,
                          "--finetune", folder, "--resume", out)
        main_ear.main(train_parser().parse_args([str(a) for a in argv]))
        return capsys.readouterr().out

    printed = run(tmp_path / "ft", 1)
    assert "fine-tuning from" in printed and "class_emb.weight re-initialised" in printed
    assert "decoder_pos_embed_learned interpolated" in printed
    printed = run(tmp_path / "ft", 2)  # its own checkpoint now: resumed, not fine-tuned again
    assert "resumed from" in printed and "fine-tuning from" not in printed
    run(tmp_path / "straight", 2)
    resumed = load_training_checkpoint(tmp_path / "ft" / CHECKPOINT_NAME)
    straight = load_training_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    for key in ("model", "model_ema"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    # --finetune warms the EMA up (--ema_warmup auto); its clock is saved and restored.
    assert resumed["args"]["ema_warmup"] == "on"
    assert resumed["ema_updates"] == straight["ema_updates"] == 4  # 2 epochs of 2 steps


# --- --classes ----------------------------------------------------------------------------------

def test_classes_relabel_in_the_given_order():
    from util.digits import DigitsDataset
    from util.loader import ClassSubset, parse_classes
    digits = DigitsDataset()
    subset = ClassSubset(digits, parse_classes("7,5", digits.classes))
    assert subset.classes == ["7", "5"] and len(subset) == sum(1 for t in digits.targets if t in (5, 7))
    for i in range(len(subset)):
        image, label = subset[i]
        original = digits[subset.indices[i]]
        assert torch.equal(image, original[0]) and {7: 0, 5: 1}[int(original[1])] == label
    assert parse_classes("n02,n01", ["n01", "n02", "n03"]) == [1, 0]
    for bad, message in (("5,5", "named twice"), ("12", "index below 10"), ("x", "'x' is neither")):
        with pytest.raises(SystemExit, match=message):
            parse_classes(bad, digits.classes)


def test_classes_must_match_class_num(tmp_path):
    args = train_parser().parse_args([QUICKSTART, "--classes", "5,6,7", "--epochs", "1",
                                      "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--classes 5,6,7 names 3 classes but --class_num is 10"):
        main_ear.main(args)


def test_samples_of_a_class_subset_keep_the_datasets_ids(tmp_path):
    """Training on digits 5-9 as labels 0-4: the saved samples are labelled 5-9 and the digit
    classifier scores them as such; the JSON line records the classes."""
    args = train_parser().parse_args([str(a) for a in (
        QUICKSTART, "--classes", "5,6,7,8,9", "--class_num", 5, "--decoder_depth", 1,
        "--epochs", 1, "--num_images", 50, "--num_iter", 4, "--output_dir", tmp_path,
        "--log_dir", tmp_path)])
    main_ear.main(args)
    result = json.loads((tmp_path / "eval_results.jsonl").read_text().splitlines()[0])
    assert result["classes"] == [5, 6, 7, 8, 9]
    with np.load(tmp_path / "samples-ariter4-temp1.0-linearcfg1.0-image50.npz") as data:
        assert sorted(set(data["labels"].tolist())) == [5, 6, 7, 8, 9]
        assert (np.bincount(data["labels"])[5:] == 10).all()
    assert settings_from_checkpoint(load_training_checkpoint(
        tmp_path / CHECKPOINT_NAME)["args"]).dataset_classes == [5, 6, 7, 8, 9]
    other = train_parser().parse_args([str(a) for a in (
        QUICKSTART, "--classes", "0,1,2,3,4", "--class_num", 5, "--decoder_depth", 1, "--epochs", 2,
        "--output_dir", tmp_path / "other", "--resume", tmp_path)])
    with pytest.raises(SystemExit, match=r"was trained on --classes \[5, 6, 7, 8, 9\]"):
        main_ear.main(other)
    # sample_ear.py's --class_ids are the dataset's ids too, from the checkpoint or an export.
    import export_ear
    import sample_ear
    export_ear.main(["--resume", str(tmp_path), "--out", str(tmp_path / "export")])
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dataset_classes"] == [5, 6, 7, 8, 9]
    seen = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sample_ear, "generate", lambda model, decode, labels, *a: seen.append(labels.tolist())
                   or torch.zeros(len(labels), 1, 8, 8))
    try:
        for resume in (tmp_path, tmp_path / "export"):
            sample_ear.main(*sample_ear.parse_args(["--resume", str(resume), "--class_ids", "9", "5",
                                                    "--samples_per_class", "2", "--num_iter", "16",
                                                    "--device", "cpu", "--out", str(tmp_path / "g.png")]))
            assert seen.pop() == [4, 4, 0, 0]
        with pytest.raises(SystemExit, match=r"--class_ids \[2\] are not among the checkpoint's classes"):
            sample_ear.main(*sample_ear.parse_args(["--resume", str(tmp_path), "--class_ids", "2",
                                                    "--num_iter", "16", "--device", "cpu",
                                                    "--out", str(tmp_path / "g.png")]))
    finally:
        monkey.undo()


# --- main_stats.py ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of non-square photos-to-be, so the ADM crop matters."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            base = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            Image.fromarray(base).resize((48, 40), Image.BICUBIC).save(root / "train" / f"class{c}" / f"{i}.png")
    return root


def stats_run(image_folder, out, inception_weights, nproc=1, *extra):  # noqa: F811
    run_script("main_stats.py", ["--data_path", image_folder, "--img_size", 32, "--out", out,
                                 "--inception_weights", inception_weights, "--ref_images", 5,
                                 "--batch_size", 4, "--num_workers", 0, "--device", "cpu", *extra],
               nproc=nproc)
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_main_stats_equals_torch_fidelity_one_process_and_two(image_folder, inception_weights, tmp_path):  # noqa: F811
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from util.crop import center_crop_arr
    from util.fid import InceptionMetrics, extract_features, folder_images, inception_extractor
    from util.images import sample_file
    one = stats_run(image_folder, tmp_path / "one.npz", inception_weights)
    two = stats_run(image_folder, tmp_path / "two.npz", inception_weights, 2)
    assert np.allclose(one["mu"], two["mu"], rtol=1e-10, atol=1e-12)
    assert np.allclose(one["sigma"], two["sigma"], rtol=1e-9, atol=1e-12)
    assert int(one["resolution"]) == 32 and int(one["num_images"]) == 12
    assert one["mu"].dtype == np.float64 and one["sigma"].dtype == np.float64
    # The crops as sample PNGs: torch-fidelity's own statistics of that folder, and FID ~ 0.
    paths = sorted((image_folder / "train").glob("*/*.png"))
    crops = [np.asarray(center_crop_arr(Image.open(p).convert("RGB"), 32)) for p in paths]
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(sample_file(samples, i))
    extractor = inception_extractor("cpu", inception_weights)
    theirs = fid_features_to_statistics(extract_features(extractor, folder_images(samples), "cpu")["2048"])
    assert np.allclose(one["mu"], theirs["mu"], rtol=1e-5, atol=1e-6)
    assert np.allclose(one["sigma"], theirs["sigma"], rtol=1e-4, atol=1e-6)
    result = InceptionMetrics(tmp_path / "one.npz", inception_weights, "cpu",
                              ref_batch=tmp_path / "one.npz", resolution=32).measure(samples, None, "x")
    assert abs(result["fid"]) < 1e-3 * np.trace(one["sigma"])
    # The reference batch: 5 of the crops, each once, a seeded choice, the same from two processes.
    assert one["arr_0"].shape == (5, 32, 32, 3) and np.array_equal(one["arr_0"], two["arr_0"])
    rows = [next(i for i, c in enumerate(crops) if np.array_equal(c, image)) for image in one["arr_0"]]
    assert len(set(rows)) == 5


def test_main_stats_of_some_classes(image_folder, inception_weights, tmp_path):  # noqa: F811
    some = stats_run(image_folder, tmp_path / "c1.npz", inception_weights, 1, "--classes", "class1")
    assert int(some["num_images"]) == 6 and not math.isnan(float(some["mu"][0]))


def test_digit_scores_of_a_class_subset_compare_with_those_classes():
    """Real training digits 5-9 scored as samples: their Frechet distance is the ceiling of
    5-9 (held-out 5-9 against training 5-9), not a distance to all ten digits."""
    from util.digits import DigitClassifier
    classifier = DigitClassifier()
    keep = np.isin(classifier.y_train, [5, 6, 7, 8, 9])
    subset = classifier.quality(classifier.x_train[keep], classifier.y_train[keep])
    assert subset["frechet"] == pytest.approx(classifier.ceiling([5, 6, 7, 8, 9])["frechet"], rel=1e-9)
    assert subset["frechet"] < 2  # against all ten digits it would be about 14
    everything = classifier.quality(classifier.x_train, classifier.y_train)
    assert everything["frechet"] == pytest.approx(classifier.ceiling()["frechet"], rel=1e-9)
