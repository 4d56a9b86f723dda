"""Weights to sample from: a training checkpoint, an exported folder, or a Hugging Face Hub repo.

An exported folder holds `model.safetensors` (the EMA weights, or the raw ones) and
`config.json` (the network's settings: model, head, tokenizer and every constructor setting,
plus the epoch). `export` writes it from a training checkpoint and `push` uploads it; `--resume`
of `sample_ear.py` and of `main_ear.py --evaluate` takes any of the three. Loading an exported
folder or a Hub repo never unpickles (safetensors and JSON only); Hub downloads are cached by
huggingface_hub and can be pinned with `--revision`.
"""
import json
import re
from pathlib import Path

import torch.nn as nn

from util.args import architecture_flags, network_settings
from util.checkpoint import CHECKPOINT_NAME, check_same_config, load_training_checkpoint
from util.fileio import atomic_write
from util.weights import load_state_dict_strict, read_weights

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
    config = {"format": FORMAT, **{n: getattr(settings, n) for n in names},
              "epoch": ckpt["epoch"], "weights": "ema" if key == "model_ema" else "raw",
              "exported_from": str(path)}
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
    if HUB_ID.match(spec or ""):
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=spec, revision=revision,
                                      allow_patterns=[WEIGHTS, CONFIG]))
    raise FileNotFoundError(f"--resume {spec or '(not given)'}: neither a folder nor a Hub "
                            "repo id (user/name)")


def read(spec: str, revision: str = None, use_ema: bool = True) -> tuple:
    """(saved settings dict or None, state dict, epoch, source) from a folder with a training
    checkpoint, an exported folder, or a Hub repo id. A training checkpoint gives its EMA
    weights (use_ema=False: its raw ones); its optimizer and loss scaler are never read."""
    folder = resolve(spec, revision)
    from_hub = not Path(spec).is_dir()  # a Hub repo: only the exported pair, never a pickle
    if not from_hub and (folder / CHECKPOINT_NAME).is_file():
        path = folder / CHECKPOINT_NAME
        ckpt = load_training_checkpoint(path, mmap=True)  # the optimizer state stays on disk
        key = "model_ema" if use_ema and "model_ema" in ckpt else "model"
        return ckpt.get("args"), ckpt[key], ckpt["epoch"], f"{path} [{key}]"
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        config = json.loads((folder / CONFIG).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
        return config, read_weights(folder / WEIGHTS), config["epoch"], f"{spec} [{WEIGHTS}]"
    raise FileNotFoundError(f"--resume {spec}: no {CHECKPOINT_NAME}, and no {CONFIG} with "
                            f"{WEIGHTS}, in {folder}")


def load_sampling_weights(model: nn.Module, spec: str, args, revision: str = None,
                          use_ema: bool = True) -> int:
    """Put the weights `read` finds into `model`, strictly, after checking the flags that shape
    the weights against the saved settings. Returns the epoch."""
    saved, state, epoch, source = read(spec, revision, use_ema)
    check_same_config(saved, args, architecture_flags(args.head), source)
    load_state_dict_strict(model, state, source)
    return epoch

