"""The seams of issue 10: a head or a tokenizer is one class plus one registry line, and it trains
through main_ear.py's own code path (in-process, one step)."""
import json

import pytest
import torch.nn as nn

import main_ear
from models.ear import MODEL_SIZES
from models.heads import HEADS
from models.tokenizer import TOKENIZERS
from test_train import SMALL, write_cache
from util.args import train_parser
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint


class RegressionHead(nn.Module):
    """A deterministic toy head: predicts the token as a linear function of z (squared error)."""
    attribute = "regression"
    own_optimizer_group = False
    FLAGS = {"regression_width": ("hidden width of the toy head", True)}
    SIZES = {name: {} for name in MODEL_SIZES}

    def __init__(self, token_dim: int, z_dim: int, regression_width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, regression_width), nn.Linear(regression_width, token_dim))

    def forward(self, target, z, mask=None):
        err = (self.net(z) - target).pow(2).mean(-1)
        return err.mean() if mask is None else (err * mask).sum() / mask.sum()

    def sample(self, z, temperature=1.0, cfg=1.0):
        if cfg != 1.0:
            z_cond, z_uncond = z.chunk(2)
            z = cfg * z_cond + (1 - cfg) * z_uncond
        return self.net(z)

    def compile_for_training(self):
        self.net.compile(dynamic=True)


class HalfPixels:
    """A toy tokenizer: the pixels, halved."""
    stride, cacheable = 1, False

    def __init__(self, channels):
        self.channels = self.image_channels = channels

    @classmethod
    def from_settings(cls, settings, device, load):
        return cls(settings["vae_embed_dim"])

    def encode(self, images):
        return images * 0.5

    def decode(self, tokens):
        return (tokens * 2).clamp(-1, 1)


def one_step_args(tmp_path, *extra):
    return [str(a) for a in [*SMALL, "--epochs", 1, "--warmup_epochs", 0, "--lr", 1e-3,
                             "--batch_size", 8, "--output_dir", tmp_path, *extra]]


def test_a_registered_head_trains_through_main_ear(tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "regression", RegressionHead)
    cache = write_cache(tmp_path / "cache", per_class=3, classes=3)  # 9 images: one step of 8
    args = train_parser().parse_args(one_step_args(
        tmp_path / "out", "--head", "regression", "--regression_width", 6, "--use_cached",
        "--cached_path", cache))
    main_ear.main(args)
    ckpt = load_training_checkpoint(tmp_path / "out" / CHECKPOINT_NAME)
    assert ckpt["args"]["head"] == "regression" and ckpt["args"]["regression_width"] == 6
    assert ckpt["model"]["regression.net.0.weight"].shape == (6, 32)
    assert not any(k.startswith("scoreloss.") for k in ckpt["model"])
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # no group of its own
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["loss"] > 0


def test_a_registered_tokenizer_trains_through_main_ear(tmp_path, monkeypatch):
    monkeypatch.setitem(TOKENIZERS, "halfpixels", HalfPixels)
    seen = []
    monkeypatch.setattr(HalfPixels, "encode", lambda self, images: seen.append(images) or images * 0.5)
    args = train_parser().parse_args(one_step_args(
        tmp_path, "--dataset", "digits", "--tokenizer", "halfpixels", "--img_size", 8,
        "--vae_stride", 1, "--vae_embed_dim", 1, "--patch_size", 2, "--class_num", 10,
        "--batch_size", 1400))  # 1,437 training digits: one step
    main_ear.main(args)
    assert len(seen) == 1 and seen[0].shape == (1400, 1, 8, 8)
    assert load_training_checkpoint(tmp_path / CHECKPOINT_NAME)["args"]["tokenizer"] == "halfpixels"


def test_a_tokenizer_with_another_stride_is_refused(tmp_path):
    args = train_parser().parse_args(one_step_args(
        tmp_path, "--dataset", "digits", "--tokenizer", "pixel", "--img_size", 8,
        "--vae_stride", 2, "--vae_embed_dim", 1, "--class_num", 10))
    with pytest.raises(SystemExit, match="--tokenizer pixel has stride 1: pass --vae_stride 1"):
        main_ear.main(args)


def test_every_network_flag_comes_from_a_constructor():
    """The settings are written once: each head's and EAR's FLAGS name constructor arguments,
    and the parser's defaults are the signatures' (or the named size's: None)."""
    import inspect

    from models.ear import EAR
    args = vars(train_parser().parse_args([]))
    for cls in (EAR, *HEADS.values()):
        params = inspect.signature(cls.__init__).parameters
        for name, (_, _, *flag_default) in cls.FLAGS.items():
            assert name in params, f"{cls.__name__}.FLAGS names {name}, not an argument"
            expected = flag_default[0] if flag_default else params[name].default
            assert args[name] in (expected, None), name
    assert args["score_batch_mul"] == 1  # the reference's flag default (its constructor's is 2)
    assert inspect.signature(HEADS["energy"].__init__).parameters["score_batch_mul"].default == 2


def test_no_entry_script_imports_another():
    import ast

    from conftest import REPO
    entry = {"main_ear", "main_cache", "sample_ear", "export_ear"}
    for path in [*REPO.glob("*.py"), *REPO.glob("models/*.py"), *REPO.glob("util/*.py"),
                 *REPO.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not entry & set(names), f"{path.name} imports {entry & set(names)}"


def test_sample_help_lists_only_sampling_flags():
    from conftest import run_script
    out = run_script("sample_ear.py", ["--help"]).stdout
    for flag in ("--resume", "--class_ids", "--samples_per_class", "--cfg", "--num_iter",
                 "--infer_temperature", "--out", "--no_ema", "--vae_path", "--precision"):
        assert flag in out
    for flag in ("--epochs", "--blr", "--scoreloss_w", "--online_eval", "--data_path"):
        assert flag not in out
