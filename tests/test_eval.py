"""Evaluation (ADM's reference statistics, torch-fidelity's Inception): FID/IS plumbing, distributed generation, and the sampling command."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from engine_ear import balanced_labels, rank_share
from util.fid import fid_from_statistics, load_fid_stats
from util.images import save_grid

# --- FID from statistics ------------------------------------------------------------------------


def closed_form_fid(mu1, var1, mu2, var2) -> float:
    """FID between Gaussians whose covariances share eigenvectors, from their eigenvalues:
    |mu1 - mu2|^2 + sum(v1 + v2 - 2 sqrt(v1 v2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_fid_matches_closed_form_on_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=2048), rng.normal(size=2048)
    v1, v2 = rng.uniform(0.1, 2, 2048), rng.uniform(0.1, 2, 2048)
    fid = fid_from_statistics(mu1.astype(np.float32), np.diag(v1), mu2, np.diag(v2).astype(np.float32))
    assert fid == pytest.approx(closed_form_fid(mu1, v1, mu2, v2), rel=1e-4)


def test_fid_matches_closed_form_on_rotated_gaussians():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))  # a shared random eigenbasis
    v1, v2 = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    sigma1, sigma2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    assert fid_from_statistics(mu1, sigma1, mu2, sigma2) == pytest.approx(
        closed_form_fid(mu1, v1, mu2, v2), rel=1e-6)
    assert fid_from_statistics(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("arrays, msg", [
    ({"mean": np.zeros(2048), "sigma": np.eye(2048)}, r"expected arrays 'mu' and 'sigma', found \['mean', 'sigma'\]"),
    ({"mu": np.zeros(2048), "sigma": np.eye(16)}, r"expected mu \(2048,\) and sigma \(2048, 2048\)"),
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "non-finite"),
])
def test_bad_statistics_file_fails_clearly(tmp_path, arrays, msg):
    np.savez(tmp_path / "stats.npz", **arrays)
    with pytest.raises(ValueError, match=msg):
        load_fid_stats(tmp_path / "stats.npz")


def test_missing_statistics_file_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python util/download.py --fid_stats"):
        load_fid_stats(tmp_path / "adm_in256_stats.npz")


# --- which rank writes what ---------------------------------------------------------------------

def test_ranks_split_indices_exactly_once_with_balanced_labels():
    assert rank_share(60, 0, 1) == range(60)
    single_labels = balanced_labels(range(60), 60, 6)
    assert torch.bincount(single_labels).tolist() == [10] * 6
    for world in (2, 4, 7):
        shares = [rank_share(60, r, world) for r in range(world)]
        index = torch.tensor([i for share in shares for i in share])
        labels = torch.cat([balanced_labels(share, 60, 6) for share in shares])
        assert sorted(index.tolist()) == list(range(60))
        assert torch.equal(labels[index.argsort()], single_labels)
        # a batch of a share (a slice of the range) gets the same labels
        assert torch.equal(balanced_labels(shares[1][2:5], 60, 6), single_labels[list(shares[1][2:5])])
    with pytest.raises(ValueError, match="multiple of --class_num"):
        balanced_labels(range(50), 50, 6)
    # a trillion images: only the asked-for indices become a tensor (no 8 TB allocation)
    assert balanced_labels(rank_share(10**12, 3, 8)[:4], 10**12, 1000).tolist() == [0] * 4


def test_grid_layout(tmp_path):
    images = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(6)])
    path = save_grid(images, nrow=3, path=tmp_path / "g.png", pad=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[6, 1 + 2 * 6, 0] == 5  # row 2, column 3 holds image 5


# --- end to end, no network ---------------------------------------------------------------------

SMALL = ["--model", "ear_base", "--decoder_embed_dim", 32, "--decoder_depth", 2,
         "--decoder_num_heads", 4, "--scoreloss_d", 2, "--scoreloss_w", 32, "--noise_channels", 8,
         "--img_size", 32, "--vae_stride", 16, "--vae_embed_dim", 16, "--buffer_size", 4,
         "--class_num", 2, "--device", "cpu", "--num_workers", 0]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random weights in torch-fidelity's Inception file format (a plain state dict)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, random_vae_ckpt):
    """A checkpoint of a small EAR on 2x2x16 latents, trained for one epoch on a toy cache."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "cache" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            m = rng.normal(0, 1, (32, 2, 2)).astype(np.float32)
            np.savez(root / "cache" / f"c{c}" / f"{i}.png.npz", moments=m, moments_flip=m)
    run_script("main_ear.py", [*SMALL, "--use_cached", "--cached_path", root / "cache",
                               "--vae_path", random_vae_ckpt, "--batch_size", 4, "--epochs", 1,
                               "--output_dir", root / "out"])
    # Rewrite the checkpoint as the reference release writes it: `args` an argparse.Namespace,
    # an fp16 loss-scaler state, so every test below reads a reference-format file.
    path = root / "out" / "checkpoint-last.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"] = argparse.Namespace(**ckpt["args"])
    ckpt["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    torch.save(ckpt, path)
    stats = root / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    return root / "out", stats


def eval_args(out, stats, vae, inception, *extra):
    return [*SMALL, "--vae_path", vae, "--eval_bsz", 3, "--num_images", 10, "--num_iter", 4,
            "--cfg", 2.0, "--infer_temperature", 0.7, "--output_dir", out, "--resume", out,
            "--fid_stats", stats, "--inception_weights", inception, "--evaluate", *extra]


# One process: slow (the two-process run measures the same way; the sample folder's removal
# by default is also seen by test_metrics.py's evaluations).
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_evaluate_writes_each_image_once_and_measures(trained, random_vae_ckpt, inception_weights,
                                                     tmp_path, nproc):
    ckpt_dir, stats = trained
    out = tmp_path / "eval"
    out.mkdir()
    (out / "checkpoint-last.pth").symlink_to(ckpt_dir / "checkpoint-last.pth")
    keep = nproc == 2  # one process: the PNG folder is removed, as by default
    proc = run_script("main_ear.py", eval_args(out, stats, random_vae_ckpt, inception_weights,
                                               *(["--keep_samples"] if keep else [])), nproc=nproc)
    folder = out / "samples-ariter4-temp0.7-linearcfg2.0-image10"
    if keep:
        names = sorted(p.name for p in folder.iterdir())
        assert names == [f"{i:05d}.png" for i in range(10)]
        assert np.asarray(Image.open(folder / "00007.png")).shape == (32, 32, 3)
    else:
        assert not list(out.glob("samples-*"))
    lines = (out / "eval_results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["num_images"] == 10 and result["epoch"] == 0 and result["cfg"] == 2.0
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    # IS >= 1 in exact arithmetic; the float64 result may miss it by an ulp on other machines.
    assert np.isfinite(result["is"]) and result["is"] >= 1.0 - 1e-9
    assert result["seconds_per_image"] > 0
    assert proc.stdout.count("evaluating the EMA weights of") == 1  # rank 0 alone prints
    assert "cfg 2.0, temperature 0.7: fid " in proc.stdout
    grid = np.asarray(Image.open(result["grid"]))
    assert grid.shape == (2 * 34 + 2, 5 * 34 + 2, 3)  # 2 classes x 5 images, 2-pixel padding


def test_missing_inputs_fail_before_sampling_with_fetch_commands(trained, random_vae_ckpt, tmp_path,
                                                               monkeypatch):
    import main_ear
    from util.args import train_parser
    evaluate = lambda *a: main_ear.main(train_parser().parse_args([str(x) for x in eval_args(*a)]))
    ckpt_dir, stats = trained
    (tmp_path / "checkpoint-last.pth").symlink_to(ckpt_dir / "checkpoint-last.pth")
    # No Inception weights given, none fetched; torch-fidelity's own download cache holds a
    # planted file that runs code when unpickled. It must not be used (nor anything downloaded).
    marker = tmp_path / "code-ran"
    planted = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    planted.parent.mkdir(parents=True)
    torch.save(RunsCode(marker), planted)
    monkeypatch.chdir(tmp_path)  # no pretrained_models/ here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(SystemExit, match="python util/download.py --inception"):
        evaluate(tmp_path, stats, random_vae_ckpt, "")
    assert not list(tmp_path.glob("samples-*/*.png"))
    assert not marker.exists()
    with pytest.raises(SystemExit, match="python util/download.py --fid_stats"):
        evaluate(tmp_path, tmp_path / "none.npz", random_vae_ckpt, tmp_path / "w.pth")
    with pytest.raises(SystemExit, match="error: --resume .*empty: no such folder"):
        evaluate(tmp_path / "empty", stats, random_vae_ckpt, "")


class RunsCode:
    """Unpickling this creates `marker`: what a planted weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_inception_weights_that_would_run_code_are_refused(tmp_path):
    from util.fid import inception_extractor
    marker = tmp_path / "code-ran"
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="not a plain state dict"):
        inception_extractor("cpu", path)
    assert not marker.exists()


def test_garbage_statistics_file_is_named(tmp_path):
    path = tmp_path / "adm_in256_stats.npz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="adm_in256_stats.npz: not a readable .npz"):
        load_fid_stats(path)
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(path)
    with pytest.raises(ValueError, match="adm_in256_stats.npz: expected an .npz archive"):
        load_fid_stats(path)


def test_sample_command_writes_a_grid_per_class(trained, random_vae_ckpt, tmp_path):
    ckpt_dir, _ = trained
    proc = run_script("sample_ear.py", [*SMALL, "--vae_path", random_vae_ckpt, "--resume", ckpt_dir,
                                        "--class_ids", 1, 0, 1, "--samples_per_class", 4,
                                        "--num_iter", 4, "--cfg", 3.0, "--out", tmp_path / "grid.png",
                                        "--save_individual", tmp_path / "each"])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)
    assert len(list((tmp_path / "each").glob("row*_class0001_*.png"))) == 8  # rows 0 and 2
    assert "3 classes x 4" in proc.stdout


def test_online_evaluation_during_training(trained, random_vae_ckpt, inception_weights, tmp_path):
    ckpt_dir, stats = trained
    cache = ckpt_dir.parent / "cache"
    args = [*SMALL, "--use_cached", "--cached_path", cache, "--vae_path", random_vae_ckpt,
            "--batch_size", 4, "--epochs", 3, "--output_dir", tmp_path,
            "--online_eval", "--eval_freq", 2,
            "--cfg", 3.0, "--eval_bsz", 4, "--num_images", 4, "--num_iter", 2,
            "--inception_weights", inception_weights]
    # What evaluation needs is checked before the first step, not after --eval_freq epochs.
    import main_ear
    from util.args import train_parser
    with pytest.raises(SystemExit, match="python util/download.py --fid_stats"):
        main_ear.main(train_parser().parse_args([str(a) for a in [*args, "--fid_stats", tmp_path / "none.npz"]]))
    assert not (tmp_path / "checkpoint-last.pth").exists() and not (tmp_path / "log.txt").exists()
    run_script("main_ear.py", [*args, "--fid_stats", stats])
    results = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    # After every second epoch (epoch 1) and after the last (epoch 2), each without guidance and
    # with cfg 3.0; the untrained epoch 0 is not evaluated.
    assert [(r["epoch"], r["cfg"]) for r in results] == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    # 4 images: the Inception Score uses 4 splits instead of 10 (10 would leave empty ones, NaN).
    assert all(r["is_splits"] == 4 and np.isfinite(r["is"]) for r in results)
    assert json.loads((tmp_path / "metrics.json").read_text())["results"][1]["cfg"] == 3.0
    assert not list(tmp_path.glob("samples-*"))  # the PNG folders are removed by default
