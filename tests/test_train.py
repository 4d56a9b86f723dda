"""main_ear.py / engine_ear.py training (SPEC section 6), on CPU, one process and torchrun."""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from engine_ear import TrainState, optimizer_step
from main_ear import resolve_args
from models.ear import EAR
from util.args import train_parser
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.distributed import DistInfo
from util.optim import EMA, lr_at, param_groups, set_lr

# A small EAR through the same flags a user types: 8px "images", stride 4 -> 2x2 latents of 4
# channels, 3 classes.
SMALL = ["--model", "ear_base", "--decoder_embed_dim", 32, "--decoder_depth", 2,
         "--decoder_num_heads", 4, "--scoreloss_d", 2, "--scoreloss_w", 32, "--noise_channels", 8,
         "--img_size", 8, "--vae_stride", 4, "--vae_embed_dim", 4, "--buffer_size", 4,
         "--class_num", 3, "--device", "cpu", "--num_workers", 0, "--print_freq", 2]


def write_cache(root: Path, per_class: int = 16, classes: int = 3, side: int = 2, channels: int = 4):
    """Learnable toy latents: class c has mean c - 1 everywhere and a tiny variance."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mean = np.full((channels, side, side), c - 1.0) + rng.normal(0, 0.05, (channels, side, side))
            m = np.concatenate([mean, np.full((channels, side, side), -8.0)]).astype(np.float32)
            np.savez(root / f"class{c}" / f"img{i:03d}.png.npz", moments=m,
                     moments_flip=m[:, :, ::-1].copy())
    return root


def train_args(cache, out, *extra):
    return [*SMALL, "--use_cached", "--cached_path", cache, "--output_dir", out, "--log_dir", out,
            "--batch_size", 8, "--warmup_epochs", 0, "--lr", 1e-3, *extra]


def epoch_losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_two_epochs_train_and_ranks_agree(cache, tmp_path, nproc):
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 2), nproc=nproc)
    assert f"weights identical on all {nproc} rank(s)" in proc.stdout
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 1
    assert sorted(ckpt) == ["args", "epoch", "model", "model_ema", "optimizer", "scaler"]
    assert ckpt["args"].world_size == nproc and ckpt["args"].scoreloss_d == 2
    assert len(epoch_losses(tmp_path)) == 2
    assert list((tmp_path).glob("events.out.tfevents.*"))  # TensorBoard log


def test_loss_decreases_on_learnable_latents(cache, tmp_path):
    run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 12, "--attn_dropout", 0,
                                         "--proj_dropout", 0))
    losses = epoch_losses(tmp_path)
    # Measured at this seed: 0.61 in the first epoch, 0.06-0.10 in the last three.
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_resume_is_exact(cache, tmp_path):
    exact = ["--attn_dropout", 0, "--proj_dropout", 0, "--precision", "fp32", "--save_last_freq", 1]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script("main_ear.py", train_args(cache, straight, "--epochs", 2, *exact))
    run_script("main_ear.py", train_args(cache, split, "--epochs", 1, *exact))
    proc = run_script("main_ear.py", train_args(cache, split, "--epochs", 2, "--resume", split, *exact))
    assert "resumed from" in proc.stdout
    a = load_training_checkpoint(straight / CHECKPOINT_NAME)
    b = load_training_checkpoint(split / CHECKPOINT_NAME)
    assert a["epoch"] == b["epoch"] == 1
    for key in ("model", "model_ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid} {name}"


def test_resume_with_a_different_model_is_refused(cache, tmp_path):
    run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 1))
    args = train_args(cache, tmp_path, "--epochs", 2, "--resume", tmp_path)
    args[args.index("--scoreloss_w") + 1] = 48
    proc = run_script("main_ear.py", args, check=False)
    assert proc.returncode != 0
    assert "--scoreloss_w is 48 here but 32 in the checkpoint" in proc.stderr


def test_sigkill_then_resume(cache, tmp_path):
    args = train_args(cache, tmp_path, "--epochs", 60, "--save_last_freq", 1, "--resume", tmp_path)
    cmd = [sys.executable, str(REPO / "main_ear.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / CHECKPOINT_NAME
    deadline = time.time() + 120
    while not (tmp_path / "log.txt").exists() or len(epoch_losses(tmp_path)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # wherever it is, possibly in the middle of a save
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epoch = load_training_checkpoint(ckpt)["epoch"]  # readable: never half-written
    proc = run_script("main_ear.py", args)
    assert f"resumed from {ckpt} (epoch {epoch})" in proc.stdout
    assert load_training_checkpoint(ckpt)["epoch"] == 59
    assert list(tmp_path.glob(".*.tmp")) == []  # a temporary left by the kill is cleaned up


def test_non_finite_loss_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    cache = write_cache(tmp_path / "cache")
    out = tmp_path / "out"
    run_script("main_ear.py", train_args(cache, out, "--epochs", 1))
    before = (out / CHECKPOINT_NAME).read_bytes()
    m = np.full((8, 2, 2), np.inf, np.float32)
    np.savez(cache / "class0" / "poison.png.npz", moments=m, moments_flip=m)
    proc = run_script("main_ear.py", train_args(cache, out, "--epochs", 3, "--resume", out),
                      nproc=2, check=False)
    assert proc.returncode != 0
    assert "[rank 0] error: non-finite loss" in proc.stderr
    assert "[rank 1] error: non-finite loss" in proc.stderr
    assert (out / CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("edit, msg", [
    (lambda a, c: a.__setitem__(a.index("--cached_path") + 1, c / "missing"), "no such folder"),
    (lambda a, c: a.__setitem__(a.index("--img_size") + 1, 16), r"shape \(8, 2, 2\), expected \(8, 4, 4\)"),
    (lambda a, c: a.__setitem__(a.index("--class_num") + 1, 5), "3 class folders but --class_num is 5"),
    (lambda a, c: a.__setitem__(a.index("--batch_size") + 1, 0), "--batch_size must be positive"),
])
def test_bad_input_fails_before_training(cache, tmp_path, edit, msg):
    args = train_args(cache, tmp_path, "--epochs", 1)
    edit(args, cache)
    proc = run_script("main_ear.py", args, check=False)
    assert proc.returncode != 0 and "epoch 0" not in proc.stdout
    assert __import__("re").search(msg, proc.stderr), proc.stderr[-2000:]


def test_empty_cache_folder_fails(tmp_path):
    (tmp_path / "cache" / "class0").mkdir(parents=True)
    proc = run_script("main_ear.py", train_args(tmp_path / "cache", tmp_path, "--epochs", 1), check=False)
    assert proc.returncode != 0 and "no .npz files" in proc.stderr


# ----- in-process checks of the recipe ------------------------------------------------------

def tiny_model():
    return EAR(img_size=8, vae_stride=4, vae_embed_dim=4, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=4, class_num=3, buffer_size=4, scoreloss_d=2, scoreloss_w=32,
               noise_channels=8, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0)


def test_parameter_groups():
    model = tiny_model()
    no_decay, generator, decay = param_groups(model, 0.02, 0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = lambda g: {names[id(p)] for p in g["params"]}
    assert (no_decay["weight_decay"], no_decay["lr_scale"]) == (0.0, 1.0)
    assert (generator["weight_decay"], generator["lr_scale"]) == (0.0, 0.25)
    assert (decay["weight_decay"], decay["lr_scale"]) == (0.02, 1.0)
    assert "scoreloss.net.res_blocks.0.mlp.0.weight" in group_of(generator)
    assert "scoreloss.net.res_blocks.0.mlp.0.bias" in group_of(no_decay)  # as the reference
    assert "scoreloss.net.res_blocks.0.in_ln.weight" in group_of(no_decay)
    assert {"mask_token", "fake_latent", "decoder_pos_embed_learned", "class_emb.weight",
            "z_proj.weight", "decoder_blocks.0.attn.qkv.weight"} <= group_of(decay)
    assert {"decoder_norm.weight", "z_proj.bias"} <= group_of(no_decay)
    assert all(n.startswith("scoreloss.") for n in group_of(generator))
    assert sum(len(g["params"]) for g in (no_decay, generator, decay)) == len(list(model.parameters()))
    opt = torch.optim.AdamW([no_decay, generator, decay], lr=1.0)
    set_lr(opt, 8e-4)
    assert [g["lr"] for g in opt.param_groups] == [8e-4, 2e-4, 8e-4]


def test_learning_rate_schedule_and_scaling():
    # EAR-B: blr 1e-4, 32 per GPU x 32 GPUs x 2 accumulation steps -> 8e-4.
    args = train_parser().parse_args(["--batch_size", "32", "--accumulation_steps", "2"])
    resolve_args(args, DistInfo(world_size=32))
    assert args.lr == pytest.approx(8e-4)
    assert (args.scoreloss_d, args.scoreloss_w, args.decoder_embed_dim) == (6, 1024, 768)
    assert lr_at(0.0, 8e-4, 100, 750) == 0.0
    assert lr_at(50.0, 8e-4, 100, 750) == pytest.approx(4e-4)
    assert lr_at(99.5, 8e-4, 100, 750) == pytest.approx(8e-4 * 0.995)
    assert lr_at(400.0, 8e-4, 100, 750, "constant") == 8e-4
    assert lr_at(100.0, 8e-4, 100, 800, "cosine", 1e-5) == pytest.approx(8e-4)
    assert lr_at(450.0, 8e-4, 100, 800, "cosine", 1e-5) == pytest.approx((8e-4 + 1e-5) / 2)
    assert lr_at(800.0, 8e-4, 100, 800, "cosine", 1e-5) == pytest.approx(1e-5)


def make_deterministic(model: EAR):
    """Remove the sampling randomness so a batch's loss depends only on its data: fixed order,
    fixed mask ratio, and generator noise derived from the hidden state."""
    L = model.seq_len
    model.random_orders = lambda bsz, device: torch.arange(L).flip(0).expand(bsz, L)
    model.sample_mask_ratio = lambda: 0.75
    net = model.scoreloss.net

    def generate(z, temperature=1.0):
        half = z[: z.shape[0] // 2, : net.noise_channels]
        noise = 0.5 * torch.cat([torch.sin(3 * half), torch.cos(3 * half)])
        return net(z, noise, temperature)

    model.scoreloss.generate = generate


def test_accumulation_matches_one_large_batch():
    torch.manual_seed(0)
    x, labels = torch.randn(8, 4, 2, 2), torch.randint(0, 3, (8,))
    results = []
    for micro in ([(x, labels)], [(x[:4], labels[:4]), (x[4:], labels[4:])]):
        torch.manual_seed(0)
        model = tiny_model()
        make_deterministic(model)
        # SGD: the update is linear in the gradient. (Adam would divide the float noise of
        # gradients that are exactly zero in theory, like the attention key bias's, by itself.)
        optimizer = torch.optim.SGD(param_groups(model, 0.02, 0.25), lr=0.1)
        state = TrainState(model, model, None, EMA(model, 0.9), optimizer,
                           torch.amp.GradScaler("cpu", enabled=False), "fp32", torch.device("cpu"))
        args = argparse.Namespace(grad_clip=3.0)
        for _ in range(3):
            loss, _ = optimizer_step(state, micro, args)
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()],
                        state.ema.params))
    (loss_a, params_a, ema_a), (loss_b, params_b, ema_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a + ema_a, params_b + ema_b):
        # Tolerance: float32 summation order (measured max difference 1.3e-6 after 3 steps).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_from_images_through_the_vae(tmp_path, random_vae_ckpt):
    from conftest import make_image_folder
    make_image_folder(tmp_path / "data" / "train", per_class=4)
    args = [*SMALL, "--data_path", tmp_path / "data", "--vae_path", random_vae_ckpt,
            "--output_dir", tmp_path, "--log_dir", tmp_path, "--batch_size", 4, "--epochs", 1,
            "--warmup_epochs", 0, "--lr", 1e-3]
    for flag, value in (("--img_size", 32), ("--vae_stride", 16), ("--vae_embed_dim", 16)):
        args[args.index(flag) + 1] = value
    run_script("main_ear.py", args)
    assert load_training_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(cache, tmp_path, precision):
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 1, "--precision", precision))
    assert f"; {precision};" in proc.stdout
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # a loss scaler only for fp16
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_benchmark_prints_throughput_and_memory():
    assert SMALL[-2] == "--print_freq"
    args = SMALL[:-2] + ["--steps", 2, "--warmup_steps", 1, "--batch_size", 4]
    out = run_script("benchmarks/train_throughput.py", args).stdout
    assert __import__("re").search(r"[0-9.]+ images/s per device; peak process memory \(RSS\) [0-9.]+ GiB", out)


def test_launcher_environments(monkeypatch):
    from util.distributed import _launcher_env
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert _launcher_env(False) is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _launcher_env(False)
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert _launcher_env(False) == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _launcher_env(False) == (3, 4, 3)


@pytest.mark.slow
def test_compile_trains_without_recompiling(cache, tmp_path):
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 2, "--compile"))
    assert "recompil" not in proc.stderr  # the generator's varying row count must not recompile
    assert len(epoch_losses(tmp_path)) == 2
