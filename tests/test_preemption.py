"""Checkpoints inside an epoch, on a signal or by the clock, and resuming there bit for bit
(docs/training.md "Preemption"). Tiny cached-latent runs on the CPU in fp32."""
import json
import multiprocessing
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

import engine_ear
import util.checkpoint
from conftest import run_script
from signal_at import signalling_fetch
from test_train import assert_same_training, run_in_process, train_args, write_cache
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.resumable import SeededSamples
from util.signals import EXIT_REQUEUE, parse_signals

# 48 cached latents in micro-batches of 4: 12 micro-batches an epoch in one process, 6 in each of
# two. No dropout, so that fp32 runs can be compared bit for bit.
EXACT = ["--attn_dropout", 0, "--proj_dropout", 0, "--precision", "fp32", "--batch_size", 4,
         "--epochs", 2]
REFERENCE_KEYS = ["args", "epoch", "model", "model_ema", "optimizer"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread, as run_script's: on a shared machine two threads that wait
    on each other made these runs ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


def interrupted(args, monkeypatch, at: int, send, while_saving=None) -> int:
    """Run main_ear in this process with `send()` called before the loop fetches micro-batch
    number `at` (and then `while_saving()` in the middle of writing the checkpoint); its exit
    status."""
    sent = []
    with monkeypatch.context() as m:
        m.setattr(engine_ear.TokenBatches, "__call__",
                  signalling_fetch(at, lambda: sent.append(send())))
        if while_saving is not None:
            write = util.checkpoint.atomic_write

            def write_with_a_signal(path, save):
                return write(path, lambda f: (sent and while_saving(), save(f)))
            m.setattr(util.checkpoint, "atomic_write", write_with_a_signal)
        with pytest.raises(SystemExit) as stop:
            run_in_process(args)
    return stop.value.code


def kill_self(name: str):
    return lambda: os.kill(os.getpid(), signal.Signals[name])


@pytest.mark.parametrize("sig, workers, accumulation, at, saved, loss", [
    # Epoch 1's micro-batch 5 (17 = 12 + 5) is fetched: step 5 ends, the next micro-batch is 6.
    ("SIGUSR1", 0, 1, 17, (1, 6), []),
    # Between the two micro-batches of epoch 1's step 1: that step ends first, saved at 4. With
    # 3 targets per token drawn from the cached moments and 3 draws: the resumed run draws the
    # same targets and noise.
    ("SIGTERM", 2, 2, 15, (1, 4), ["--score_targets", 3, "--score_samples", 3]),
])
def test_a_signal_inside_an_epoch_saves_there_and_resuming_is_exact(
        cache, tmp_path, monkeypatch, capsys, sig, workers, accumulation, at, saved, loss):
    flags = [*EXACT, "--num_workers", workers, "--accumulation_steps", accumulation, *loss]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_in_process(train_args(cache, straight, *flags))
    # A second signal (SIGINT, Python's KeyboardInterrupt by default) while the file is written.
    status = interrupted(train_args(cache, split, *flags), monkeypatch, at, kill_self(sig),
                         while_saving=kill_self("SIGINT"))
    assert status == EXIT_REQUEUE
    assert signal.getsignal(signal.Signals[sig]) is signal.SIG_DFL  # handlers put back
    assert not multiprocessing.active_children()  # loader workers stopped, not left to exit
    ckpt = load_training_checkpoint(split / CHECKPOINT_NAME)
    assert (ckpt["epoch"], ckpt["step"]) == saved and len(ckpt["rng"]) == 1
    # Extra keys only: the reference's resume reads the rest.
    assert sorted(ckpt) == sorted([*REFERENCE_KEYS, "step", "epoch_loss_sum", "rng"])
    with pytest.raises(SystemExit, match="--seed 1 there, 2 here"):
        run_in_process(train_args(cache, split, *flags, "--resume", split, "--seed", 2))
    capsys.readouterr()
    out = run_in_process(train_args(cache, split, *flags, "--resume", split), capsys)
    assert f"(epoch 1, micro-batch {saved[1]})" in out
    assert_same_training(straight, split, epoch=1)


def test_the_clock_saves_inside_an_epoch_and_training_goes_on(cache, tmp_path, monkeypatch):
    """--save_interval_minutes: a checkpoint after every step here (the interval is a few
    microseconds); a crash then loses no step, and saving did not disturb the training."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_in_process(train_args(cache, straight, *EXACT, "--num_workers", 0))

    def crash():
        raise RuntimeError("power cut")
    with monkeypatch.context() as m:
        m.setattr(engine_ear.TokenBatches, "__call__", signalling_fetch(9, crash))
        with pytest.raises(RuntimeError, match="power cut"):
            run_in_process(train_args(cache, split, *EXACT, "--num_workers", 0,
                                      "--save_interval_minutes", 1e-8))
    ckpt = load_training_checkpoint(split / CHECKPOINT_NAME)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 9)  # steps 0..8 done, each one saved
    run_in_process(train_args(cache, split, *EXACT, "--num_workers", 0, "--resume", split))
    assert_same_training(straight, split, epoch=1)


def test_torchrun_stopped_by_sigterm_resumes_exactly(cache, tmp_path):
    """SIGTERM to the torchrun launcher, as a scheduler sends it: torchrun forwards it to each
    rank's process group (loader workers included); the ranks finish the step, agree, rank 0
    saves, all exit. Two loader workers per rank, accumulation over 2 micro-batches, and 2
    targets per token drawn from the cached moments by each rank's own generator."""
    flags = [*EXACT, "--num_workers", 2, "--accumulation_steps", 2, "--score_targets", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script("main_ear.py", train_args(cache, straight, *flags), nproc=2)
    # Sent while epoch 1's step 0 is between its micro-batches; rank 0 then waits 2 s, so that
    # torchrun's forwarded SIGTERM has reached both ranks before that step's vote.
    env = {"SIGNAL_AT": "7", "SIGNAL": "SIGTERM", "SIGNAL_TO": "launcher", "SIGNAL_SETTLE": "2"}
    proc = run_script("tests/signal_at.py", train_args(cache, split, *flags), nproc=2,
                      check=False, env=env)
    # torchrun itself exits 1 after forwarding a signal; the ranks exited EXIT_REQUEUE.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"exiting with status {EXIT_REQUEUE}" in proc.stdout
    ckpt = load_training_checkpoint(split / CHECKPOINT_NAME)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and len(ckpt["rng"]) == 2
    proc = run_script("main_ear.py", train_args(cache, split, *flags, "--resume", split), nproc=2)
    assert "(epoch 1, micro-batch 2)" in proc.stdout
    assert_same_training(straight, split, epoch=1)


def test_a_signal_during_online_evaluation_stops_within_a_batch_and_the_resume_evaluates(
        tmp_path, monkeypatch, capsys):
    """The quick start (one epoch, 100 images in 5 sampling batches) gets SIGTERM while it
    samples its second batch: the trained epoch was saved before the evaluation, every rank
    stops after that batch (exit 75), and the resumed run evaluates that epoch again, logs it,
    and ends with a checkpoint that has nothing left to do."""
    from conftest import REPO
    out = tmp_path / "run"
    args = [f"@{REPO / 'configs' / 'digits_quickstart.args'}", "--epochs", 1, "--batch_size", 256,
            "--num_images", 100, "--eval_bsz", 20, "--cfg", 1.0, "--num_iter", 4, "--output_dir", out,
            "--log_dir", out, "--resume", out]
    calls = []
    generate = engine_ear.generate

    def generate_and_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(engine_ear, "generate", generate_and_signal)
        with pytest.raises(SystemExit) as stop:
            run_in_process(args)
    assert stop.value.code == EXIT_REQUEUE and len(calls) == 2
    ckpt = load_training_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 0 and set(ckpt["evaluation_due"]) == {"loss", "lr"}
    assert not (out / "log.txt").exists() and not (out / "eval_results.jsonl").exists()
    capsys.readouterr()
    printed = run_in_process(args, capsys)
    assert "(epoch 0, its evaluation to do)" in printed
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    lines = (out / "eval_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]
    assert json.loads((out / "log.txt").read_text())["loss"] == ckpt["evaluation_due"]["loss"]
    assert "evaluation_due" not in load_training_checkpoint(out / CHECKPOINT_NAME)


def test_save_signals_flag():
    assert parse_signals("term, SIGUSR1,INT") == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert parse_signals("") == []
    for bad in ("TERM,NOPE", "KILL"):
        with pytest.raises(SystemExit, match="--save_signals"):
            parse_signals(bad)


def test_each_sample_draws_its_flip_from_seed_epoch_and_index():
    class Coins(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            return int(torch.randint(0, 2, ()))
    coins = SeededSamples(Coins(), seed=1)
    before = torch.get_rng_state()
    flips = [coins[i] for i in range(64)]
    assert torch.equal(torch.get_rng_state(), before)  # the training's generator is untouched
    assert [coins[i] for i in reversed(range(64))][::-1] == flips  # in any order, by any process
    assert 16 < sum(flips) < 48  # and still random
    coins.set_epoch(1)
    assert [coins[i] for i in range(64)] != flips


def test_per_sample_seeding_leaves_cuda_alone(monkeypatch):
    """Seeding a sample touches only the CPU generator: torch.manual_seed would reseed CUDA's
    too (which fork_rng(devices=[]) does not restore) and, before CUDA is initialised, format a
    stack trace on every call (a tenth of the quick start's time)."""
    import torch.cuda.random
    from util.resumable import SeededSamples
    calls = []
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda *a, **k: calls.append(a))
    samples = SeededSamples(list(range(100)), seed=0)
    for i in range(100):
        samples[i]
    assert calls == []
