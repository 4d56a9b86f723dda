"""main_ear.py / engine_ear.py training (the paper's recipe, docs/training.md), on CPU, one process and torchrun."""
import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from engine_ear import optimizer_step
from models.ear import EAR
from util.args import train_parser
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.builders import TrainState, build_train_state, resolve_args
from util.distributed import DistInfo
from util.optim import EMA, lr_at, param_groups, set_lr
from util.resumable import EpochPosition

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
    # No --log_dir: TensorBoard events go to --output_dir, as in the reference.
    return [*SMALL, "--use_cached", "--cached_path", cache, "--output_dir", out,
            "--batch_size", 8, "--warmup_epochs", 0, "--lr", 1e-3, *extra]


def epoch_losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "log.txt").read_text().splitlines()]


def run_in_process(args, capsys=None) -> str:
    """main_ear.main with these flags, in this process (no interpreter start-up); its stdout."""
    import main_ear
    main_ear.main(train_parser().parse_args([str(a) for a in args]))
    return capsys.readouterr().out if capsys else ""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


# Two processes: slow (test_two_processes_from_scratch_share_weights_and_ema runs them too).
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_two_epochs_train_and_ranks_agree(cache, tmp_path, nproc):
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 2), nproc=nproc)
    assert f"weights and EMA identical on all {nproc} rank(s)" in proc.stdout
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 1
    # fp32: no loss scaler, so no `scaler` entry (the reference's resume rejects an empty one).
    assert sorted(ckpt) == ["args", "epoch", "model", "model_ema", "optimizer"]
    assert ckpt["args"]["world_size"] == nproc and ckpt["args"]["scoreloss_d"] == 2
    assert len(epoch_losses(tmp_path)) == 2
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard log in --output_dir
    # Plain torch.load, at torch's default weights_only=True, reads our checkpoints.
    plain = torch.load(tmp_path / CHECKPOINT_NAME)
    assert isinstance(plain["args"], dict) and plain["epoch"] == 1


def test_two_processes_from_scratch_share_weights_and_ema(cache, tmp_path):
    """From scratch, each rank initialises its own weights before DDP broadcasts rank 0's: the
    EMA must start from the broadcast ones. Also: no label dropping (`fake_latent` gets no
    gradient; DDP must not stop on it) and two loader workers per rank."""
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 2, "--seed", 5,
                                                "--label_drop_prob", 0, "--num_workers", 2,
                                                "--ema_rate", 0.9), nproc=2)
    assert "weights and EMA identical on all 2 rank(s)" in proc.stdout
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert not torch.equal(ckpt["model"]["z_proj.weight"], ckpt["model_ema"]["z_proj.weight"])


def test_loss_decreases_on_learnable_latents(cache, tmp_path):
    run_in_process(train_args(cache, tmp_path, "--epochs", 12, "--attn_dropout", 0, "--proj_dropout", 0))
    losses = epoch_losses(tmp_path)
    # Measured at this seed: 0.61 in the first epoch, 0.06-0.10 in the last three.
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def assert_same_training(folder_a: Path, folder_b: Path, epoch: int) -> None:
    """The checkpoints in the two folders are at `epoch`'s end with the same model, EMA and
    optimizer state, bit for bit, and their log.txt the same epoch losses."""
    assert epoch_losses(folder_a) == epoch_losses(folder_b)
    a, b = (load_training_checkpoint(folder / CHECKPOINT_NAME) for folder in (folder_a, folder_b))
    assert a["epoch"] == b["epoch"] == epoch and "step" not in a and "step" not in b
    for key in ("model", "model_ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid} {name}"


def test_resume_is_exact(cache, tmp_path, capsys):
    # Two loader workers: their random flips must not depend on whether the run was resumed.
    exact = ["--attn_dropout", 0, "--proj_dropout", 0, "--precision", "fp32", "--save_last_freq", 1,
             "--num_workers", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_in_process(train_args(cache, straight, "--epochs", 3, *exact))
    run_in_process(train_args(cache, split, "--epochs", 2, *exact))
    capsys.readouterr()
    assert "resumed from" in run_in_process(train_args(cache, split, "--epochs", 3, "--resume", split,
                                                       *exact), capsys)
    assert_same_training(straight, split, epoch=2)
    assert [e["epoch"] for e in map(json.loads, (split / "log.txt").read_text().splitlines())] == [0, 1, 2]


def test_resume_from_an_older_checkpoint_forgets_later_log_lines(cache, tmp_path, capsys):
    run_in_process(train_args(cache, tmp_path, "--epochs", 1))
    log = tmp_path / "log.txt"
    # As if a crash came after epochs 1 and 2 were logged but before their checkpoint.
    log.write_text(log.read_text() + '{"epoch": 1, "loss": 9}\n{"epoch": 2, "loss": 9}\n')
    run_in_process(train_args(cache, tmp_path, "--epochs", 2, "--resume", tmp_path))
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == [0, 1] and 9 not in epoch_losses(tmp_path)
    # --epochs at the checkpoint's count: nothing to do; below it: an error naming the flag.
    capsys.readouterr()
    out = run_in_process(train_args(cache, tmp_path, "--epochs", 2, "--resume", tmp_path), capsys)
    assert "nothing to do" in out
    with pytest.raises(SystemExit, match="beyond --epochs 1"):
        run_in_process(train_args(cache, tmp_path, "--epochs", 1, "--resume", tmp_path))


def test_resume_with_a_different_model_is_refused(cache, tmp_path):
    run_in_process(train_args(cache, tmp_path, "--epochs", 1))
    args = train_args(cache, tmp_path, "--epochs", 2, "--resume", tmp_path)
    args[args.index("--scoreloss_w") + 1] = 48
    with pytest.raises(SystemExit, match="--scoreloss_w is 48 here but 32 in the checkpoint"):
        run_in_process(args)


@pytest.mark.slow  # 20 s; tests/test_preemption.py resumes killed and signalled runs exactly
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


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A cache and a one-epoch checkpoint trained on it, to be copied and then poisoned."""
    root = tmp_path_factory.mktemp("good")
    cache = write_cache(root / "cache")
    run_script("main_ear.py", train_args(cache, root / "out", "--epochs", 1))
    return root


@pytest.mark.parametrize("fault", ["nan_latent", "divergent_lr"])
# One process: slow (the two-process runs take the same path and must also agree).
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_non_finite_training_stops_every_rank_and_keeps_the_checkpoint(good_run, tmp_path, fault,
                                                                      nproc):
    shutil.copytree(good_run, tmp_path, dirs_exist_ok=True)
    cache, out = tmp_path / "cache", tmp_path / "out"
    before = (out / CHECKPOINT_NAME).read_bytes()
    args = train_args(cache, out, "--epochs", 3, "--resume", out)
    if fault == "nan_latent":  # one cached latent holding NaN (not inf: NaN slips past `> 0`)
        m = np.full((8, 2, 2), np.nan, np.float32)
        np.savez(cache / "class0" / "poison.png.npz", moments=m, moments_flip=m)
    else:  # --blr 1e9: the lr comes from blr (no --lr)
        i = args.index("--lr")
        args[i:i + 2] = ["--blr", 1e9]
    proc = run_script("main_ear.py", args, nproc=nproc, check=False)
    assert proc.returncode != 0
    # The NaN must reach the loss itself (the energy score's zero-distance guard once hid it).
    what = "non-finite loss" if fault == "nan_latent" else "non-finite"
    for rank in range(nproc):
        assert f"[rank {rank}] error: {what}" in proc.stderr, proc.stderr[-3000:]
    assert "replicas differ" not in proc.stderr
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_non_finite_gradients_stop_before_the_update_without_a_loss_scaler():
    from engine_ear import NonFiniteLoss
    torch.manual_seed(0)
    model = tiny_model()
    state = TrainState(model, model, None, EMA(model, 0.9),
                       torch.optim.AdamW(param_groups(model, 0.02, 0.25), lr=1e-3),
                       torch.amp.GradScaler("cpu", enabled=False), "fp32", torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.z_proj.weight.register_hook(lambda g: g * float("nan"))
    batch = [(torch.randn(4, 4, 2, 2), torch.tensor([0, 1, 2, 0]), None)]
    with pytest.raises(NonFiniteLoss, match="gradient norm"):
        optimizer_step(state, batch, argparse.Namespace(grad_clip=3.0))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(e, b) for e, b in zip(state.ema.params, before))
    hook.remove()
    optimizer_step(state, batch, argparse.Namespace(grad_clip=3.0))  # finite again: it steps
    assert not torch.equal(model.z_proj.weight, before[4])


def test_replica_check_covers_the_ema(monkeypatch):
    import util.distributed as distributed
    model = tiny_model()
    ema = EMA(model, 0.9)
    seen = []
    monkeypatch.setattr(distributed, "all_gather_objects", lambda local: seen.append(local) or [local])
    assert "weights and EMA identical on all 1 rank(s)" in distributed.check_replicas_in_sync(model, ema.params)
    rank0 = seen[0]
    with torch.no_grad():
        ema.params[3] += 1.0  # another rank's EMA drifted; its weights did not
    monkeypatch.setattr(distributed, "all_gather_objects", lambda local: [rank0, local])
    with pytest.raises(distributed.ReplicasDiffer, match="EMA"):
        distributed.check_replicas_in_sync(model, ema.params)


def test_non_finite_weights_are_never_saved(tmp_path):
    import main_ear
    model = tiny_model()
    args = train_parser().parse_args(["--output_dir", str(tmp_path), "--ema_rate", "0.5"])
    state = TrainState(model, model, None, EMA(model, 0.5), torch.optim.SGD(model.parameters(), lr=1),
                       torch.amp.GradScaler("cpu", enabled=False), "fp32", torch.device("cpu"))
    main_ear.save_checkpoint(state, 0, args, DistInfo())
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    for where in ("weights", "ema"):
        with torch.no_grad():
            target = model.z_proj.weight if where == "weights" else state.ema.params[4]
            saved = target.clone()
            target[0, 0] = float("nan")
        with pytest.raises(main_ear.NonFiniteLoss, match="non-finite weights after epoch 1"):
            main_ear.save_checkpoint(state, 1, args, DistInfo())
        assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good
        with torch.no_grad():
            target.copy_(saved)


@pytest.mark.parametrize("edit, msg", [
    (lambda a, c: a.__setitem__(a.index("--cached_path") + 1, c / "missing"), "no such folder"),
    (lambda a, c: a.__setitem__(a.index("--img_size") + 1, 16), r"shape \(8, 2, 2\), expected \(8, 4, 4\)"),
    (lambda a, c: a.__setitem__(a.index("--class_num") + 1, 5), "3 class folders but --class_num is 5"),
    (lambda a, c: a.__setitem__(a.index("--batch_size") + 1, 0), "--batch_size must be positive"),
    (lambda a, c: a.extend(["--ema_rate", 1.0]), r"--ema_rate must be in \[0, 1\), got 1.0"),
    (lambda a, c: a.extend(["--blr", -1e-4]), "--blr must be a finite number >= 0"),
    (lambda a, c: a.extend(["--lr", -1]), "--lr must be a finite number >= 0"),
    # --online_eval needs all of this before the first step, not after --eval_freq epochs:
    (lambda a, c: a.extend(["--online_eval", "--num_images", 3, "--num_iter", 5]),
     "--num_iter 5 is more than the 4 tokens"),
])
def test_bad_input_fails_before_training(cache, tmp_path, capsys, edit, msg):
    args = train_args(cache, tmp_path, "--epochs", 1)
    edit(args, cache)
    with pytest.raises(SystemExit, match=msg):
        run_in_process(args)
    assert "epoch 0" not in capsys.readouterr().out
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_empty_cache_folder_fails(tmp_path):
    (tmp_path / "cache" / "class0").mkdir(parents=True)
    proc = run_script("main_ear.py", train_args(tmp_path / "cache", tmp_path, "--epochs", 1), check=False)
    assert proc.returncode != 0 and "no .npz files" in proc.stderr


# ----- in-process checks of the recipe ------------------------------------------------------

def tiny_model():
    return EAR(img_size=8, vae_stride=4, vae_embed_dim=4, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=4, class_num=3, buffer_size=4, scoreloss_d=2, scoreloss_w=32,
               noise_channels=8, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0)


def reference_param_groups(model, weight_decay, score_lrscale):
    """The reference's grouping, written from its description (not from util/optim.py): groups
    [no decay, decay, generator], each in named_parameters() order; generator biases and norms
    in the first group."""
    groups = {"no_decay": [], "decay": [], "generator": []}
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith(".bias"):
            groups["no_decay"].append(p)
        elif name.startswith("scoreloss"):
            groups["generator"].append(p)
        else:
            groups["decay"].append(p)
    return [{"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["decay"], "weight_decay": weight_decay},
            {"params": groups["generator"], "weight_decay": 0.0, "lr_scale": score_lrscale}]


def test_parameter_groups():
    model = tiny_model()
    ours = param_groups(model, 0.02, 0.25)
    ref = reference_param_groups(model, 0.02, 0.25)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in ref]
    no_decay, decay, generator = ours
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = lambda g: {names[id(p)] for p in g["params"]}
    assert (no_decay["weight_decay"], no_decay["lr_scale"]) == (0.0, 1.0)
    assert (decay["weight_decay"], decay["lr_scale"]) == (0.02, 1.0)
    assert (generator["weight_decay"], generator["lr_scale"]) == (0.0, 0.25)
    assert "scoreloss.net.res_blocks.0.mlp.0.weight" in group_of(generator)
    assert "scoreloss.net.res_blocks.0.mlp.0.bias" in group_of(no_decay)  # as the reference
    assert "scoreloss.net.res_blocks.0.in_ln.weight" in group_of(no_decay)
    assert {"mask_token", "fake_latent", "decoder_pos_embed_learned", "class_emb.weight",
            "z_proj.weight", "decoder_blocks.0.attn.qkv.weight"} <= group_of(decay)
    assert {"decoder_norm.weight", "z_proj.bias"} <= group_of(no_decay)
    opt = torch.optim.AdamW(ours, lr=1.0)
    set_lr(opt, 8e-4)
    assert [g["lr"] for g in opt.param_groups] == [8e-4, 8e-4, 2e-4]


def one_adamw_step(model, groups):
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(6, 4, 2, 2), torch.randint(0, 3, (6,))).backward()
    opt.step()
    return opt


def optimizer_state_by_name(model, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"] if p in opt.state}


def reference_checkpoint(model, opt, epoch, args_dict, scaler_enabled=True) -> dict:
    """A checkpoint as the reference writes it: its `args` are an argparse.Namespace, and it
    always saves its fp16 loss scaler."""
    ckpt = {"model": model.state_dict(), "model_ema": model.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "args": argparse.Namespace(**args_dict)}
    if scaler_enabled:
        ckpt["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    return ckpt


def test_reference_optimizer_state_loads_here_and_ours_loads_there(tmp_path):
    import main_ear
    # Reference -> here: its optimizer state lands on the same parameters; our hyper-parameters
    # (the generator's lr scale, which its groups may not carry) stay as our flags say.
    torch.manual_seed(0)
    ref_model = tiny_model()
    ref_opt = one_adamw_step(ref_model, reference_param_groups(ref_model, 0.05, 0.5))
    ref_opt.param_groups[2].pop("lr_scale")
    ref_args = {"model": "ear_base", "decoder_embed_dim": 32}  # a Namespace, as the reference's
    torch.save(reference_checkpoint(ref_model, ref_opt, 4, ref_args), tmp_path / CHECKPOINT_NAME)
    args = train_parser().parse_args(["--resume", str(tmp_path), "--output_dir", str(tmp_path),
                                      "--epochs", "9", "--decoder_embed_dim", "32"])
    resolve_args(args, DistInfo())
    model = tiny_model()
    state = build_train_state(model, args, DistInfo())
    # The reference's checkpoint has no `step`: the next epoch, from its start.
    assert main_ear.resume(state, args, DistInfo()) == EpochPosition(5)
    ours = optimizer_state_by_name(model, state.optimizer)
    theirs = optimizer_state_by_name(ref_model, ref_opt)
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in theirs:
        for k in theirs[name]:
            assert torch.equal(ours[name][k], theirs[name][k]), (name, k)
    assert [g["lr_scale"] for g in state.optimizer.param_groups] == [1.0, 1.0, 0.25]
    assert [g["weight_decay"] for g in state.optimizer.param_groups] == [0.0, 0.02, 0.0]
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_model.state_dict()[name])

    # Here -> reference: our fp32 checkpoint loads into the reference's model, EMA and optimizer,
    # strictly, by its own resume steps (the scaler only if present).
    torch.manual_seed(1)
    ours_model = tiny_model()
    ours_opt = one_adamw_step(ours_model, param_groups(ours_model, 0.02, 0.25))
    from util.checkpoint import save_training_checkpoint
    save_training_checkpoint(tmp_path / "ours", ours_model, EMA(ours_model, 0.9), ours_opt,
                             torch.amp.GradScaler("cpu", enabled=False), 3, args)
    ckpt = torch.load(tmp_path / "ours" / CHECKPOINT_NAME, weights_only=True)
    ref_model = tiny_model()
    ref_model.load_state_dict(ckpt["model"], strict=True)
    ema = [ckpt["model_ema"][name] for name, _ in ref_model.named_parameters()]
    assert len(ema) == len(list(ref_model.parameters()))
    ref_opt = torch.optim.AdamW(reference_param_groups(ref_model, 0.02, 0.25), lr=1e-3, betas=(0.9, 0.95))
    ref_opt.load_state_dict(ckpt["optimizer"])
    assert "scaler" not in ckpt
    theirs = optimizer_state_by_name(ref_model, ref_opt)
    expected = optimizer_state_by_name(ours_model, ours_opt)
    for name in expected:
        for k in expected[name]:
            assert torch.equal(theirs[name][k], expected[name][k]), (name, k)


def test_evaluation_reads_only_the_weights(tmp_path):
    from util.pretrained import load_sampling_weights
    torch.manual_seed(0)
    model = tiny_model()
    ema_sd = {k: v + 1.0 for k, v in model.state_dict().items()}
    ckpt = {"model": model.state_dict(), "model_ema": ema_sd, "epoch": 7,
            "optimizer": "not an optimizer state", "scaler": "nor a scaler state",
            "args": argparse.Namespace(model="ear_base")}
    torch.save(ckpt, tmp_path / CHECKPOINT_NAME)
    args = train_parser().parse_args([])
    fresh = tiny_model()
    assert load_sampling_weights(fresh, str(tmp_path), args) == 7
    assert torch.equal(fresh.z_proj.weight, ema_sd["z_proj.weight"])
    load_sampling_weights(fresh, str(tmp_path), args, use_ema=False)
    assert torch.equal(fresh.z_proj.weight, model.z_proj.weight)


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
    for micro in ([(x, labels, None)], [(x[:4], labels[:4], None), (x[4:], labels[4:], None)]):
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
            "--output_dir", tmp_path, "--batch_size", 4, "--epochs", 1,
            "--warmup_epochs", 0, "--lr", 1e-3]
    for flag, value in (("--img_size", 32), ("--vae_stride", 16), ("--vae_embed_dim", 16)):
        args[args.index(flag) + 1] = value
    run_script("main_ear.py", args)
    assert load_training_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(cache, tmp_path, capsys, precision):
    out = run_in_process(train_args(cache, tmp_path, "--epochs", 1, "--precision", precision), capsys)
    assert f"; {precision};" in out
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ("scaler" in ckpt) == (precision == "fp16")  # a loss scaler only for fp16
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
@pytest.mark.parametrize("head", [[], ["--head", "diffusion", "--diffloss_d", 2, "--diffloss_w", 16],
                                  ["--head", "gmm", "--gmm_d", 1, "--gmm_w", 16]])
def test_compile_trains_without_recompiling(cache, tmp_path, head):
    proc = run_script("main_ear.py", train_args(cache, tmp_path, "--epochs", 2, "--compile", *head))
    assert "recompil" not in proc.stderr  # the generator's varying row count must not recompile
    assert len(epoch_losses(tmp_path)) == 2


def test_ema_update_rule_swap_and_state_dict():
    torch.manual_seed(0)
    model = tiny_model()
    ema = EMA(model, 0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    # ema <- 0.9 ema + 0.1 p: one update moves a tenth of the way (an inverted rate: 9 tenths).
    for e, s0 in zip(ema.params, start):
        torch.testing.assert_close(e, s0 + 0.1)
    raw = [p.detach().clone() for p in model.parameters()]
    ema_values = [e.clone() for e in ema.params]

    ema.swap()
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), ema_values))
    ema.swap()
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    with pytest.raises(KeyError):
        with ema.applied() as m:
            assert m is model and torch.equal(model.z_proj.weight, ema_values[4])
            raise KeyError("an error while sampling")
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    assert all(torch.equal(e, v) for e, v in zip(ema.params, ema_values))

    # The reference's `model_ema`: the model's full state dict, in its order, holding the EMA.
    sd = ema.state_dict()
    assert list(sd) == list(model.state_dict())
    named = dict(model.named_parameters())
    assert all(torch.equal(sd[n], v) for n, v in zip(named, ema_values))
    fresh = EMA(model, 0.9)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, ema_values))


def test_ema_warmup_grows_the_rate_with_the_updates():
    """--ema_warmup: min(rate, (1 + n) / (10 + n)) after n updates; off: the rate throughout."""
    model = tiny_model()
    assert [EMA(model, 0.99).current_rate() for _ in range(2)] == [0.99, 0.99]
    ema = EMA(model, 0.95, warmup=True)
    start = [p.detach().clone() for p in model.parameters()]
    rates = []
    for n in range(200):
        rates.append(ema.current_rate())
        if n == 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        ema.update()
        if n == 0:  # the first update keeps only a tenth of where the average started
            for e, s0 in zip(ema.params, start):
                torch.testing.assert_close(e, s0 + 0.9)
    assert rates[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert rates[170] == pytest.approx(171 / 180) and rates[171:] == [0.95] * 29
    assert ema.updates == 200


def test_online_evaluation_samples_with_the_ema_and_restores_the_raw_weights(tmp_path):
    import main_ear
    torch.manual_seed(0)
    model = tiny_model()
    state = TrainState(model, model, None, EMA(model, 0.9), None, None, "fp32", torch.device("cpu"))
    with torch.no_grad():
        for e in state.ema.params:
            e.add_(0.5)
    ema_weight = state.ema.params[4].clone()  # z_proj.weight
    raw = [p.detach().clone() for p in model.parameters()]
    seen = []

    def decode(latents):  # the weights the model sampled with, and 3-channel "images"
        seen.append((model.z_proj.weight.clone(), model.training))
        return latents[:, :3].clamp(-1, 1)

    class Metrics:
        sweep_axes = ("frechet", "accuracy")

        def check(self):
            pass

        def measure(self, folder, labels, name):
            return {"num_images": len(list(Path(folder).glob("*.png"))), "frechet": 1.0, "accuracy": 0.5}

    args = train_parser().parse_args(["--output_dir", str(tmp_path), "--num_images", "6",
                                      "--class_num", "3", "--num_iter", "2", "--cfg", "2.0",
                                      "--eval_bsz", "4", "--device", "cpu"])
    model.train()
    results = main_ear.online_evaluation(state, decode, Metrics(), args, DistInfo(), 0, None, None)
    assert [r["cfg"] for r in results] == [1.0, 2.0] and results[1]["num_images"] == 6
    assert seen and all(torch.equal(w, ema_weight) and not training for w, training in seen)
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
    assert model.training
