"""Every file we load is checked before it is used (issue 15): exported weights and their
config.json, a training checkpoint's saved settings, where weights are looked for, and the
resolution of the reference a sample set is measured against. Each bad file is a one-line
error naming the file and the key, before anything is built or sampled."""
import json
import resource
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sample_ear
from conftest import REPO
from util import pretrained
from util.args import network_settings, train_parser
from util.builders import build_model, settings_from_checkpoint
from util.checkpoint import CHECKPOINT_NAME, save_training_checkpoint
from util.settings import check_settings_fit
from util.weights import load_state_dict_strict

QUICKSTART = f"@{REPO / 'configs' / 'digits_quickstart.args'}"


def digits_settings():
    args = train_parser().parse_args([QUICKSTART, "--decoder_depth", "2"])
    return settings_from_checkpoint(vars(args))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An exported folder (model.safetensors + config.json) of a small digits model, as
    export_ear.py writes it, and its state dict."""
    settings = digits_settings()
    torch.manual_seed(0)
    model = build_model(settings)
    folder = tmp_path_factory.mktemp("export")
    names = ("model", "head", "tokenizer", *network_settings(settings.head))
    config = {"format": pretrained.FORMAT, **{n: getattr(settings, n) for n in names},
              "epoch": 3, "weights": "ema", "run": "digits"}
    save_file(model.state_dict(), folder / pretrained.WEIGHTS)
    (folder / pretrained.CONFIG).write_text(json.dumps(config))
    return folder, config, model.state_dict()


def copy_export(export, tmp_path, config_edit=None, state_edit=None):
    folder, config, state = export
    config, state = json.loads(json.dumps(config)), dict(state)
    if config_edit:
        config = config_edit(config)
    if state_edit:
        state_edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / pretrained.WEIGHTS)
    (tmp_path / pretrained.CONFIG).write_text(json.dumps(config))
    return tmp_path


def sample(folder, tmp_path, *extra):
    argv = ["--resume", str(folder), "--class_ids", "1", "--samples_per_class", "1",
            "--num_iter", "2", "--device", "cpu", "--out", str(tmp_path / "g.png"), *extra]
    sample_ear.main(*sample_ear.parse_args(argv))


def refused(folder, tmp_path, capsys, *extra) -> str:
    """sample_ear's one-line error, with nothing sampled and no traceback."""
    with pytest.raises(SystemExit) as e:
        sample(folder, tmp_path, *extra)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "g.png").exists()
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_a_good_export_samples(export, tmp_path):
    sample(export[0], tmp_path)
    assert (tmp_path / "g.png").is_file()


def with_key(key, value):
    return lambda c: {**c, key: value}


def without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "expected a JSON object of settings, found a list"),
    (with_key("colour", "blue"), "unknown keys colour"),
    (without("epoch"), "missing keys epoch"),
    (without("decoder_depth"), "missing keys decoder_depth"),
    (with_key("epoch", "3"), "epoch is '3', expected a whole number >= 0"),
    (with_key("epoch", 2.5), "epoch is 2.5, expected a whole number"),
    (with_key("epoch", -1), "epoch is -1"),
    (with_key("decoder_depth", "2"), "decoder_depth is '2', expected a whole number >= 0"),
    (with_key("decoder_depth", True), "decoder_depth is True"),
    (with_key("label_drop_prob", "0.1"), "label_drop_prob is '0.1', expected a finite number"),
    (with_key("grad_checkpointing", 1), "grad_checkpointing is 1, expected true or false"),
    (with_key("model", "../../etc/passwd"), "model is '../../etc/passwd', expected one of"),
    (with_key("head", ["energy"]), r"head is \['energy'\], expected one of"),
    (with_key("tokenizer", "../vae"), "tokenizer is '../vae', expected one of"),
    (with_key("format", "other/1"), "format 'other/1'"),
    (with_key("weights", "best"), "weights is 'best'"),
    (with_key("dataset_classes", [5, 6]), r"dataset_classes is \[5, 6\], expected null or 10 class ids"),
    (with_key("dataset_classes", "5,6"), "dataset_classes is '5,6'"),
    (with_key("decoder_embed_dim", 64), r"shape mismatches: .*decoder_pos_embed_learned"),
    (with_key("class_num", 12), r"class_emb.weight: file \(10, 128\), model \(12, 128\)"),
    (with_key("scoreloss_d", 2), r"unexpected keys: scoreloss.net.res_blocks.2"),
])
def test_bad_config_json_is_refused_before_building(export, tmp_path, capsys, edit, message):
    folder = copy_export(export, tmp_path, config_edit=edit)
    text = refused(folder, tmp_path, capsys)
    assert str(folder / pretrained.CONFIG) in text or str(folder) in text
    assert pytest.importorskip("re").search(message, text), text


def test_not_json_is_refused(export, tmp_path, capsys):
    folder = copy_export(export, tmp_path)
    (folder / pretrained.CONFIG).write_text("{'epoch': 3")
    assert "config.json: not a JSON file" in refused(folder, tmp_path, capsys)


def test_a_huge_depth_is_refused_in_under_a_second_with_bounded_memory(export, tmp_path, capsys):
    folder = copy_export(export, tmp_path, config_edit=with_key("decoder_depth", 10 ** 6))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    text = refused(folder, tmp_path, capsys)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB
    assert "decoder_depth 1000000 cannot describe these weights" in text


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_weights_are_refused_naming_the_key(export, tmp_path, capsys, dtype):
    def edit(state):
        state["z_proj.weight"] = state["z_proj.weight"].to(dtype)
    folder = copy_export(export, tmp_path, state_edit=edit)
    text = refused(folder, tmp_path, capsys)
    assert f"z_proj.weight is {dtype}, expected torch.float32" in text and "model.safetensors" in text


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_key(export, tmp_path, capsys, bad):
    def edit(state):
        state["mask_token"] = state["mask_token"].clone()
        state["mask_token"][0, 0, 5] = bad
    folder = copy_export(export, tmp_path, state_edit=edit)
    assert "mask_token holds non-finite values" in refused(folder, tmp_path, capsys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_precisions_are_cast_with_a_note(export, tmp_path, capsys, dtype):
    folder = copy_export(export, tmp_path, state_edit=lambda s: s.update(
        {k: v.to(dtype) for k, v in s.items()}))
    settings = digits_settings()
    model = build_model(settings)
    _, state, _, source = pretrained.read(str(folder))
    load_state_dict_strict(model, state, source)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{dtype} tensors cast to torch.float32" in out
    assert model.z_proj.weight.dtype == torch.float32
    assert torch.equal(model.z_proj.weight, export[2]["z_proj.weight"].to(dtype).float())


def test_exported_weights_never_unpickle(export, tmp_path):
    """A folder whose config is right but whose weights are a pickle is refused."""
    folder = copy_export(export, tmp_path)
    torch.save({"w": torch.zeros(1)}, folder / pretrained.WEIGHTS)  # a pickle, not safetensors
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        pretrained.read(str(folder))


def test_the_exported_pair_is_preferred_over_a_checkpoint_beside_it(export, tmp_path):
    folder = copy_export(export, tmp_path)
    torch.save({"model": {}, "epoch": 99}, folder / CHECKPOINT_NAME)  # would not even load
    saved, state, epoch, source = pretrained.read(str(folder))
    assert epoch == 3 and "model.safetensors" in source and saved["run"] == "digits"


def test_a_missing_folder_that_looks_like_a_hub_id(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class RepositoryNotFoundError(Exception):  # huggingface_hub's needs an HTTP response
        pass

    def not_found(repo_id, revision=None, allow_patterns=None):
        raise RepositoryNotFoundError(f"404 Client Error: {repo_id}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    monkeypatch.chdir(tmp_path)
    text = refused("runs/ear-tiny", tmp_path, capsys)
    assert "--resume runs/ear-tiny: no such folder here" in text
    assert "as a Hugging Face Hub repo id it failed: RepositoryNotFoundError" in text
    assert "no such folder, and not a Hub repo id either" in refused(
        "runs/ear/tiny", tmp_path, capsys)


def save_checkpoint(folder, model, settings, epoch: int) -> None:
    """A training checkpoint of `model` with `settings` saved as its args (its EMA the same
    weights), as main_ear.py writes it."""
    ema = type("EMA", (), {"state_dict": lambda self: model.state_dict()})()
    save_training_checkpoint(folder, model, ema, torch.optim.SGD(model.parameters(), lr=0.1),
                             torch.amp.GradScaler("cpu", enabled=False), epoch, settings)


def test_bad_saved_settings_in_a_training_checkpoint(export, tmp_path, capsys):
    settings = digits_settings()
    model = build_model(settings)
    settings.decoder_depth = "2"  # e.g. a hand-edited or foreign checkpoint
    save_checkpoint(tmp_path, model, settings, 0)
    assert "checkpoint-last.pth: decoder_depth is '2'" in refused(tmp_path, tmp_path, capsys)


def test_evaluate_with_a_bad_resume_is_one_line(tmp_path, capsys):
    import main_ear
    args = train_parser().parse_args([QUICKSTART, "--evaluate", "--resume", str(tmp_path / "nope"),
                                      "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main_ear.main(args)
    assert "nope: no such folder" in str(e.value.code) and "\n" not in str(e.value.code)
    assert "Traceback" not in capsys.readouterr().err


def test_export_records_the_run_name_not_the_path(export, tmp_path):
    settings = digits_settings()
    run = tmp_path / "secret" / "my-run"
    save_checkpoint(run, build_model(settings), settings, 7)
    out = pretrained.export(run, tmp_path / "out")
    config = json.loads((out / pretrained.CONFIG).read_text())
    assert config["run"] == "my-run" and config["epoch"] == 7
    assert str(tmp_path) not in (out / pretrained.CONFIG).read_text()
    pretrained.read(str(out))  # and it reads back


def test_digit_metrics_read_samples_by_index(tmp_path):
    """Sample files are read by their index (as strings, 100000.png sorts before 10001.png),
    and nothing else in the folder is taken for a sample."""
    from PIL import Image

    from util.digits import DigitMetrics
    from util.images import sample_file
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(sample_file(tmp_path, i))
    Image.fromarray(images[0]).save(tmp_path / "00003 (copy).png")
    metrics = DigitMetrics(tmp_path)
    metrics.measure(tmp_path, np.arange(12) % 10, "x")
    with np.load(tmp_path / "samples-x.npz") as data:
        assert np.array_equal(data["images"], images)
    assert sample_file(tmp_path, 100000).name == "100000.png"


@pytest.mark.parametrize("head", ["energy", "diffusion", "gmm"])
def test_every_head_is_compared_with_the_weights_before_building(head):
    """The comparison builds the network on the meta device: every head must build there."""
    settings = settings_from_checkpoint({**vars(digits_settings()), "head": head})
    state = build_model(settings).state_dict()
    check_settings_fit(settings, state, "weights")
    settings.decoder_depth += 1
    with pytest.raises(ValueError, match="missing keys: decoder_blocks.2"):
        check_settings_fit(settings, state, "weights")


def old_mixture_checkpoint(folder):
    """A mixture-head training checkpoint as the code before GIVT's parameterisation wrote it:
    same weight shapes, settings without the three flags that change added."""
    settings = settings_from_checkpoint({**vars(digits_settings()), "head": "gmm"})
    model = build_model(settings)
    for name in ("gmm_dequantize", "gmm_temperature_probs", "gmm_guidance"):
        delattr(settings, name)
    save_checkpoint(folder, model, settings, 5)
    return settings


def test_an_old_mixture_head_is_refused_wherever_it_is_loaded(export, tmp_path, capsys):
    """Its softplus-trained scales would be read as squareplus: sampling, resuming and an
    exported config.json each refuse it, naming the file."""
    from util.checkpoint import open_checkpoint
    old = tmp_path / "old"
    settings = old_mixture_checkpoint(old)
    assert "checkpoint-last.pth: a mixture (--head gmm) head saved before it followed GIVT" \
        in refused(old, tmp_path, capsys)
    args = settings_from_checkpoint({**vars(settings), "head": "gmm"})
    with pytest.raises(ValueError, match="checkpoint-last.pth: a mixture .* train it again"):
        open_checkpoint(old, args, ("model", "head"))

    def old_config(config):
        for name in ("gmm_dequantize", "gmm_temperature_probs", "gmm_guidance"):
            config.pop(name, None)
        return {**config, "head": "gmm"}
    (tmp_path / "exported").mkdir()
    folder = copy_export(export, tmp_path / "exported", config_edit=old_config)
    assert f"{pretrained.CONFIG}: a mixture (--head gmm) head saved before" \
        in refused(folder, tmp_path, capsys)


def test_a_mixture_head_samples_and_exports_and_its_guidance_is_checked(tmp_path, capsys):
    """The mixture head's text setting (gmm_guidance) passes the saved-settings check when it is
    one of its choices, from a training checkpoint and from an export, and is refused by name
    otherwise."""
    settings = settings_from_checkpoint({**vars(digits_settings()), "head": "gmm"})
    run = tmp_path / "run"
    save_checkpoint(run, build_model(settings), settings, 1)
    sample(run, tmp_path, "--cfg", "2.0")
    assert (tmp_path / "g.png").is_file()
    out = pretrained.export(run, tmp_path / "out")
    assert pretrained.read(str(out))[0]["gmm_guidance"] == "density"
    config = json.loads((out / pretrained.CONFIG).read_text())
    # An export from before --gmm_init_spread existed reads as GIVT's initialisation.
    (out / pretrained.CONFIG).write_text(json.dumps({k: v for k, v in config.items()
                                                     if k != "gmm_init_spread"}))
    assert pretrained.read(str(out))[0]["gmm_init_spread"] == 0.0
    (out / pretrained.CONFIG).write_text(json.dumps({**config, "gmm_guidance": "both"}))
    (tmp_path / "g.png").unlink()
    assert "config.json: gmm_guidance is 'both', expected one of ['density', 'hidden']" \
        in refused(out, tmp_path, capsys)


def test_too_many_sampling_steps_for_the_checkpoint_is_one_line(export, tmp_path, capsys):
    """sample_ear's default --num_iter (64, ImageNet's) on a 16-token digits model."""
    assert "--num_iter 64: the checkpoint's images have 16 tokens" in refused(export[0], tmp_path, capsys, "--num_iter", "64")
