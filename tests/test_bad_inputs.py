"""Every entry point refuses bad input before it works: a non-zero exit, one `error:` line that
names the file or flag, no traceback, nothing written or overwritten, within seconds (issue 22).

The cases run in this process through `refusals.refused` (the entry point's `__main__` block,
as `python script ...` runs it); a few run as real processes: under torchrun (every rank
refuses), and with a signal during start-up.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_image_folder, run_script
from refusals import refused, run_in_process
from test_train import SMALL, train_args, write_cache
from util.args import train_parser
from util.builders import build_model, build_train_state, resolve_args
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint, save_training_checkpoint
from util.distributed import DistInfo

def write_checkpoint(folder, argv, edit_args=None, edit_state=None):
    """checkpoint-last.pth of a fresh model with an AdamW state, as main_ear.py writes one, from
    these training flags; `edit_args` / `edit_state` change what is saved."""
    args = train_parser().parse_args([str(a) for a in argv])
    resolve_args(args, DistInfo())
    state = build_train_state(build_model(args), args, DistInfo())
    if edit_args:
        edit_args(args)
    model = state.model
    if edit_state:
        model = type("Edited", (), {"state_dict": lambda self: edit_state(state.model.state_dict())})()
    save_training_checkpoint(folder, model, state.ema, state.optimizer, state.scaler, 0, args)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """A run folder with a good checkpoint of the small cached-latent model."""
    folder = tmp_path_factory.mktemp("run")
    return write_checkpoint(folder, train_args(cache, folder))


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ----- main_ear.py: the training path ----------------------------------------------------------

def resume_refused(cache, folder, *extra) -> str:
    return refused("main_ear.py", train_args(cache, folder, "--epochs", 2, "--resume", folder, *extra),
                   watch=[folder])


def test_resume_with_other_network_flags(cache, run, tmp_path):
    folder = copy_run(run, tmp_path)
    line = resume_refused(cache, folder, "--scoreloss_w", 48)
    assert "--scoreloss_w is 48 here but 32 in the checkpoint" in line and "--finetune" in line


def test_resume_names_a_file_instead_of_training_from_scratch(cache, run, tmp_path):
    folder = copy_run(run, tmp_path)
    line = resume_refused(cache, folder, "--resume", folder / CHECKPOINT_NAME)
    assert line.startswith(f"error: --resume {folder / CHECKPOINT_NAME}: a file, not a folder")


def test_resume_from_a_corrupt_checkpoint(cache, run, tmp_path):
    folder = copy_run(run, tmp_path)
    data = bytearray((folder / CHECKPOINT_NAME).read_bytes())
    (folder / CHECKPOINT_NAME).write_bytes(bytes(data[: len(data) // 2]))  # a truncated copy
    assert f"{CHECKPOINT_NAME}: not a readable training checkpoint" in resume_refused(cache, folder)


def test_resume_from_an_old_mixture_head(cache, tmp_path):
    argv = train_args(cache, tmp_path, "--head", "gmm")
    write_checkpoint(tmp_path, argv, edit_args=lambda a: delattr(a, "gmm_dequantize"))
    line = resume_refused(cache, tmp_path, "--head", "gmm")
    assert "before it followed GIVT" in line and CHECKPOINT_NAME in line


def test_resume_with_weights_that_do_not_fit(cache, tmp_path):
    def drop_one(state):
        state.pop(next(iter(state)))
        return state
    write_checkpoint(tmp_path, train_args(cache, tmp_path), edit_state=drop_one)
    assert "[model] does not match EAR: missing keys" in resume_refused(cache, tmp_path)


def test_resume_with_another_freeze(cache, run, tmp_path):
    folder = copy_run(run, tmp_path)
    line = resume_refused(cache, folder, "--freeze", "transformer")
    assert "[optimizer]: the optimizer state" in line and "--freeze" in line


def test_missing_data_path(tmp_path):
    argv = [*SMALL, "--tokenizer", "pixel", "--vae_stride", 1, "--vae_embed_dim", 3,
            "--data_path", tmp_path / "nope", "--output_dir", tmp_path / "out"]
    line = refused("main_ear.py", argv, watch=[tmp_path])
    assert line.startswith(f"error: --data_path {tmp_path / 'nope'}:") and "<class>/<image>" in line


def test_missing_cache(cache, tmp_path):
    line = refused("main_ear.py", train_args(tmp_path / "nope", tmp_path / "out"), watch=[tmp_path])
    assert line.startswith(f"error: --cached_path {tmp_path / 'nope'}: no such folder")


def test_cache_of_another_shape(tmp_path):
    cache = write_cache(tmp_path / "cache", per_class=2, side=4)
    line = refused("main_ear.py", train_args(cache, tmp_path / "out"), watch=[tmp_path])
    assert "shape (8, 4, 4), expected (8, 2, 2)" in line and ".npz" in line


@pytest.fixture(scope="module")
def packed(tmp_path_factory, cache):
    """The small cache in the packed form (main_cache.py --convert_cache)."""
    out = tmp_path_factory.mktemp("packed") / "cache"
    status, _, err = run_in_process("main_cache.py", [
        "--img_size", 8, "--vae_embed_dim", 4, "--vae_stride", 4, "--device", "cpu",
        "--cached_path", out, "--convert_cache", cache])
    assert status == 0, err
    return out


def damage_index_label(folder):
    with np.load(folder / "packed_index.npz") as f:
        arrays = dict(f)
    arrays["label"][5] = 7  # three classes
    np.savez(folder / "packed_index.npz", **arrays)


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "packed_index.npz").unlink(), "packed segments but no index"),
    (lambda f: os.truncate(next(f.glob("seg-r*.bin")), 1000), ".bin: "),
    (damage_index_label, "packed_index.npz: sample 5"),
])
def test_a_damaged_packed_cache_points_at_the_cause(packed, tmp_path, damage, expected):
    folder = Path(shutil.copytree(packed, tmp_path / "cache"))
    damage(folder)
    line = refused("main_ear.py", train_args(folder, tmp_path / "out"), watch=[tmp_path])
    assert expected in line, line


def test_missing_vae(tmp_path):
    make_image_folder(tmp_path / "data" / "train")
    argv = [*SMALL, "--vae_stride", 16, "--vae_embed_dim", 16, "--img_size", 32,
            "--data_path", tmp_path / "data", "--vae_path", tmp_path / "kl16.ckpt",
            "--output_dir", tmp_path / "out"]
    line = refused("main_ear.py", argv, watch=[tmp_path])
    assert line.startswith(f"error: --vae_path {tmp_path / 'kl16.ckpt'}: no such file")
    line = refused("main_cache.py", ["--data_path", tmp_path / "data", "--img_size", 32,
                                     "--cached_path", tmp_path / "cache", "--device", "cpu",
                                     "--vae_path", tmp_path / "kl16.ckpt"], watch=[tmp_path])
    assert line.startswith(f"error: --vae_path {tmp_path / 'kl16.ckpt'}: no such file")


def test_output_dir_that_is_a_file(cache, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    line = refused("main_ear.py", train_args(cache, tmp_path / "out"), watch=[tmp_path])
    assert line.startswith(f"error: --output_dir {tmp_path / 'out'}: a file is there")


@pytest.mark.parametrize("given, expected", [
    ("file", "a file, not a folder"), ("nope", "no such folder, and not a Hub repo id")])
def test_finetune_names_its_flag(cache, run, tmp_path, given, expected):
    source = run / CHECKPOINT_NAME if given == "file" else tmp_path / "nope"
    line = refused("main_ear.py", train_args(cache, tmp_path / "out", "--finetune", source),
                   watch=[tmp_path, run])
    assert line.startswith(f"error: --finetune {source}: {expected}") and "exported folder" in line


def test_a_trillion_images_is_refused_before_any_folder(cache, run, tmp_path):
    for mode in (["--evaluate", "--resume", run], ["--online_eval"]):
        line = refused("main_ear.py", train_args(cache, tmp_path / "out", *mode, "--num_images",
                                                 3 * 10**12, "--num_iter", 4), watch=[tmp_path, run])
        assert line.startswith(f"error: --num_images {3 * 10**12}: ") and "room for" in line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--cfg", -2], "--cfg -2.0: expected a finite number >= 0"),
    (["--cfg", "nan"], "--cfg nan: expected a finite number"),
    (["--temperature", 0], "--infer_temperature (--temperature) 0.0: expected a finite number > 0"),
    (["--num_iter", 0], "--num_iter must be positive"),
    (["--eval_bsz", 0], "--eval_bsz must be positive"),
])
def test_sampling_flags_are_checked_alike_by_both_scripts(cache, run, tmp_path, flags, expected):
    """One validation of the sampling flags: sample_ear.py refuses what main_ear.py refuses."""
    sample = ["--resume", run, "--class_ids", 0, "--out", tmp_path / "g.png", "--device", "cpu"]
    assert expected in refused("sample_ear.py", [*sample, *flags], watch=[tmp_path, run])
    evaluate = train_args(cache, tmp_path / "out", "--evaluate", "--resume", run, "--num_images", 3)
    assert expected in refused("main_ear.py", [*evaluate, *flags], watch=[tmp_path, run])


@pytest.mark.parametrize("out, expected", [
    ("folder", "a folder is there"), ("grid", "no picture file extension"),
    ("file/g.png", "is a file (expected a folder there)")])
def test_sample_outputs_are_checked_before_loading(run, tmp_path, out, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    argv = ["--resume", run, "--class_ids", 0, "--device", "cpu", "--out", tmp_path / out]
    assert expected in refused("sample_ear.py", argv, watch=[tmp_path, run])
    argv = ["--resume", run, "--class_ids", 0, "--device", "cpu", "--save_individual", tmp_path / "file"]
    assert "--save_individual" in refused("sample_ear.py", argv, watch=[tmp_path, run])


def test_sample_more_steps_than_tokens(run, tmp_path):
    argv = ["--resume", run, "--class_ids", 0, "--device", "cpu", "--out", tmp_path / "g.png",
            "--num_iter", 64]
    assert "--num_iter 64: the checkpoint's images have 4 tokens" in refused(
        "sample_ear.py", argv, watch=[tmp_path, run])


def test_export_checks_out_and_resume_first(run, tmp_path):
    (tmp_path / "file").write_text("")
    line = refused("export_ear.py", ["--resume", run, "--out", tmp_path / "file"], watch=[tmp_path])
    assert line.startswith(f"error: --out {tmp_path / 'file'}: a file is there")
    line = refused("export_ear.py", ["--resume", tmp_path / "nope", "--out", tmp_path / "x"],
                   watch=[tmp_path])
    assert line.startswith(f"error: --resume {tmp_path / 'nope'}: no {CHECKPOINT_NAME} there")


# ----- real processes ----------------------------------------------------------------------------

def test_every_rank_refuses_a_corrupt_checkpoint(cache, run, tmp_path):
    folder = copy_run(run, tmp_path)
    (folder / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    proc = run_script("main_ear.py", train_args(cache, folder, "--epochs", 2, "--resume", folder),
                      nproc=2, check=False, timeout=120)
    # One line from each rank (the two processes' lines may interleave on the shared pipe).
    said = f"error: {folder / CHECKPOINT_NAME}: not a readable training checkpoint"
    assert proc.returncode != 0 and proc.stderr.count(said) == 2, proc.stderr[-3000:]
    # The one traceback is torchrun's own report that its workers failed, not theirs.
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr


def launch_and_signal(argv, after: float):
    """Start main_ear.py, send SIGTERM `after` seconds later; (exit status, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "main_ear.py"), *map(str, argv)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_a_signal_during_start_up_requeues(cache, tmp_path):
    """SIGTERM 2 s after launch (importing torch, or building the run) exits 75, with nothing
    saved; in --evaluate, which saves nothing, SIGTERM ends the process as usual."""
    status, out = launch_and_signal(train_args(cache, tmp_path, "--epochs", 2), after=2.0)
    assert status == 75, out[-3000:]
    assert "during start-up" in out and not (tmp_path / CHECKPOINT_NAME).exists()
    status, out = launch_and_signal(train_args(cache, tmp_path / "e", "--evaluate", "--resume",
                                               tmp_path), after=2.0)
    assert status == -signal.SIGTERM, out[-3000:]


def test_a_torn_log_line_does_not_stop_the_resume(cache, tmp_path, capsys):
    """After a kill -9 in the middle of a log.txt write, the resumed run drops the torn line
    and logs on."""
    import main_ear
    args = train_args(cache, tmp_path, "--epochs", 1)
    main_ear.main(train_parser().parse_args(list(map(str, args))))
    log = tmp_path / "log.txt"
    log.write_text(log.read_text() + '{"epoch": 1, "lo')
    main_ear.main(train_parser().parse_args(list(map(str, train_args(
        cache, tmp_path, "--epochs", 2, "--resume", tmp_path)))))
    assert "cut short" in capsys.readouterr().out
    assert [line[:11] for line in log.read_text().splitlines()] == ['{"epoch": 0', '{"epoch": 1']
    assert load_training_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
