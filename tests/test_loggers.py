"""Logs: TensorBoard always, Weights & Biases with --wandb_project (a real offline run here)."""
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_script


def wandb_records(run_file: Path):
    """The records of an offline run's .wandb file: a 7-byte header (':W&B', magic, version),
    then LevelDB-style log records (crc 4 bytes, length 2, type 1: full, first, middle or last
    piece) in 32 KiB blocks, each piece of a record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, pieces = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def read_wandb_run(folder: Path) -> tuple:
    """(history rows as dicts, summary, config) of the one offline run under folder/wandb."""
    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    rows, summary, config = [], {}, {}

    def named(items) -> dict:  # an item's name is `key` or, for some, `nested_key`
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(named(record.history.item))
        elif kind == "summary":
            summary.update(named(record.summary.update))
        elif kind in ("run", "config"):
            config.update(named((record.run if kind == "run" else record).config.update))
    return rows, summary, config


def tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # 17 s: W&B is an optional logger (TensorBoard's scalars are tested by default)
def test_wandb_offline_gets_the_tensorboard_scalars_the_config_and_the_results(tmp_path):
    run_script("main_ear.py", ["@configs/digits_quickstart.args", "--model", "ear_tiny",
                               "--decoder_depth", 1, "--epochs", 1, "--batch_size", 128,
                               "--print_freq", 4, "--num_images", 20, "--eval_bsz", 20,
                               "--num_iter", 2, "--output_dir", tmp_path, "--log_dir", tmp_path,
                               "--wandb_project", "ear-test", "--wandb_run", "quick"],
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    rows, summary, config = read_wandb_run(tmp_path)
    assert config["wandb_run"] == "quick" and config["epochs"] == 1 and config["batch_size"] == 128
    tensorboard = tensorboard_scalars(tmp_path)
    assert {"train_loss", "lr", "accuracy_ema", "frechet_ema_cfg2.0"} <= tensorboard.keys()
    for tag, points in tensorboard.items():
        axis = "epoch" if tag.endswith(("_ema", "_cfg2.0")) else "epoch_1000x"
        logged = [(row[axis], row[tag]) for row in rows if tag in row]
        assert [x for x, _ in logged] == [x for x, _ in points], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), tag
    results = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert [summary[k] for k in sorted(summary) if k.startswith("eval/")] == results


def test_wandb_flag_without_wandb_is_a_clear_error(monkeypatch):
    from util.loggers import check_wandb
    from util.args import train_parser
    args = train_parser().parse_args(["--wandb_project", "ear"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="--wandb_project needs the wandb package"):
        check_wandb(args)
