"""Weights to sample from: a training checkpoint, an exported folder, or a Hugging Face Hub repo.

An exported folder holds `model.safetensors` (the EMA weights, or the raw ones) and
`config.json` (the network's settings: model, head, tokenizer and every constructor setting,
plus the epoch). `export` writes it from a training checkpoint and `push` uploads it; `--resume`
of `sample_ear.py` and of `main_ear.py --evaluate` takes any of the three. Loading an exported
folder or a Hub repo never unpickles (safetensors and JSON only); Hub downloads are cached by
huggingface_hub and can be pinned with `--revision`.
"""
import argparse
import json
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from models.ear import MODEL_SIZES
from models.heads import HEADS
from models.tokenizer import TOKENIZERS
from util.args import architecture_flags, check_network_settings, network_settings
from util.checkpoint import (CHECKPOINT_NAME, check_head_format, check_same_config,
                              load_training_checkpoint)
from util.distributed import run_on_main
from util.fileio import atomic_write
from util.weights import check_state_dict, load_state_dict_strict, read_weights

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "ear-weights/1"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def export(checkpoint_dir, out_dir, use_ema: bool = True) -> Path:
    """Write model.safetensors + config.json from <checkpoint_dir>/checkpoint-last.pth."""
    from safetensors.torch import save

    from util.builders import settings_from_checkpoint
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    ckpt = load_training_checkpoint(path)
    settings = settings_from_checkpoint(ckpt.get("args"))
    key = "model_ema" if use_ema and "model_ema" in ckpt else "model"
    names = ("model", "head", "tokenizer", *network_settings(settings.head))
    # The run's folder name, not its path: the file may be pushed to the Hub.
    config = {"format": FORMAT, **{n: getattr(settings, n) for n in names},
              "epoch": ckpt["epoch"], "weights": "ema" if key == "model_ema" else "raw",
              "run": Path(checkpoint_dir).resolve().name,
              "dataset_classes": getattr(settings, "dataset_classes", None)}
    state = {k: v.contiguous() for k, v in ckpt[key].items()}
    out = Path(out_dir)
    atomic_write(out / WEIGHTS, lambda f: f.write(save(state)))
    atomic_write(out / CONFIG, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return out


def push(folder, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub (token from HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                               allow_patterns=[WEIGHTS, CONFIG],
                               commit_message=f"EAR weights ({CONFIG}, {WEIGHTS})")
    return str(getattr(commit, "commit_url", commit))


def resolve(spec: str, revision: str = None) -> Path:
    """A local folder as it is; a Hub repo id ("user/name") downloaded (or found in the cache)."""
    if spec and Path(spec).is_dir():
        return Path(spec)
    if not HUB_ID.match(spec or ""):
        raise FileNotFoundError(f"--resume {spec or '(not given)'}: no such folder, and not a "
                                "Hugging Face Hub repo id (user/name) either")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=spec, revision=revision,
                                      allow_patterns=[WEIGHTS, CONFIG]))
    except Exception as e:  # not found, no network, gated ...: huggingface_hub's many kinds
        raise FileNotFoundError(f"--resume {spec}: no such folder here, and as a Hugging Face "
                                f"Hub repo id it failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None


def download_on_main_first(spec: str, revision: str, is_main: bool) -> None:
    """A Hub repo id is downloaded by rank 0 alone, into huggingface_hub's cache, which the
    other ranks then read; its failure stops every rank with rank 0's message."""
    if not Path(spec).is_dir():
        run_on_main(is_main, lambda: resolve(spec, revision), expected=(FileNotFoundError,))


# Keys of config.json besides the network's settings ("exported_from": files of an earlier
# version, which held the checkpoint's path there).
CONFIG_KEYS = ("format", "model", "head", "tokenizer", "epoch", "weights", "run", "exported_from",
               "dataset_classes")


def check_names(settings: Mapping, source, required: bool) -> str:
    """`model`, `head`, `tokenizer` are names this code knows (a reference checkpoint's args
    have no head or tokenizer: required=False lets them default). Returns the head."""
    for key, known in (("model", MODEL_SIZES), ("head", HEADS), ("tokenizer", TOKENIZERS)):
        if key not in settings and not required:
            continue
        value = settings.get(key)
        if not (isinstance(value, str) and value in known):
            raise ValueError(f"{source}: {key} is {value!r}, expected one of {sorted(known)}")
    return settings.get("head", "energy")


def check_epoch(epoch, source) -> int:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"{source}: epoch is {epoch!r}, expected a whole number >= 0")
    return epoch


def check_config(config, path) -> dict:
    """An exported config.json, checked before anything is built from it: a JSON object in
    this format, known keys only, every network setting present and of its type, the names
    known, the epoch a whole number."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, found a "
                         f"{type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    head = check_names(config, path, required=True)
    check_head_format(config, path)
    settings = network_settings(head)
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(settings))
    missing = [n for n in ("epoch", *settings) if n not in config]
    if unknown or missing:
        raise ValueError(f"{path}: " + "; ".join(
            f"{what} keys {', '.join(keys)}" for what, keys in (("unknown", unknown),
                                                                ("missing", missing)) if keys))
    check_network_settings(config, head, path)
    check_epoch(config["epoch"], path)
    classes = config.get("dataset_classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == config["class_num"]
                                    and all(type(c) is int and c >= 0 for c in classes)):
        raise ValueError(f"{path}: dataset_classes is {classes!r}, expected null or "
                         f"{config['class_num']} class ids (class_num)")
    if config.get("weights", "ema") not in ("ema", "raw"):
        raise ValueError(f"{path}: weights is {config['weights']!r}, expected 'ema' or 'raw'")
    return config


def read_config(path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    return check_config(config, path)


def read(spec: str, revision: str = None, use_ema: bool = True) -> tuple:
    """(saved settings dict or None, state dict, epoch, source) from an exported folder, a
    folder with a training checkpoint, or a Hub repo id, every part checked before use. Where a
    folder has both, the exported pair wins (no unpickling). A training checkpoint gives its
    EMA weights (use_ema=False: its raw ones); its optimizer and loss scaler are never read."""
    folder = resolve(spec, revision)
    from_hub = not Path(spec).is_dir()  # a Hub repo: only the exported pair, never a pickle
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        config = read_config(folder / CONFIG)
        return config, read_weights(folder / WEIGHTS), config["epoch"], f"{spec} [{WEIGHTS}]"
    if not from_hub and (folder / CHECKPOINT_NAME).is_file():
        path = folder / CHECKPOINT_NAME
        ckpt = load_training_checkpoint(path, mmap=True)  # the optimizer state stays on disk
        saved = ckpt.get("args")
        if saved is not None:
            check_network_settings(saved, check_names(saved, path, required=False), path)
        key = "model_ema" if use_ema and "model_ema" in ckpt else "model"
        return saved, ckpt[key], check_epoch(ckpt["epoch"], path), f"{path} [{key}]"
    raise FileNotFoundError(f"--resume {spec}: no {CONFIG} with {WEIGHTS}, and no "
                            f"{CHECKPOINT_NAME}, in {folder}")


def check_settings_fit(settings: argparse.Namespace, state: Mapping[str, torch.Tensor],
                       source) -> None:
    """Compare the network `settings` describe with the weights' keys and shapes before
    building it. A setting that shapes the weights can be no larger than the weights' largest
    dimension or their number of tensors (a width is a dimension, a depth counts blocks of
    tensors); above that it is refused at once, so a config claiming a depth of 10^6 cannot
    make us build 10^6 blocks. Within that bound the network is built on the meta device (no
    memory) and its state dict compared key by key."""
    from util.builders import build_model
    largest_dim = max((d for t in state.values() for d in t.shape), default=0)
    for name in architecture_flags(settings.head):
        value = getattr(settings, name)
        if isinstance(value, int) and not isinstance(value, bool) \
                and value > max(len(state), largest_dim):
            raise ValueError(f"{source}: {name} {value} cannot describe these weights ("
                             f"{len(state)} tensors, largest dimension {largest_dim})")
    with torch.device("meta"):
        model = build_model(settings)
    check_state_dict(model.state_dict(), state, source,
                     f"the network its settings describe ({settings.model}, {settings.head} head)")


def load_sampling_weights(model: nn.Module, spec: str, args, revision: str = None,
                          use_ema: bool = True) -> int:
    """Put the weights `read` finds into `model`, strictly, after checking the flags that shape
    the weights against the saved settings. Returns the epoch."""
    saved, state, epoch, source = read(spec, revision, use_ema)
    check_same_config(saved, args, architecture_flags(args.head), source)
    load_state_dict_strict(model, state, source)
    return epoch

