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
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.distributed import MainRankFailed, run_on_main
from util.fileio import atomic_write
from util.settings import (FORMAT, check_config, check_epoch, check_names, check_network_settings,
                           check_same_config)
from util.weights import load_state_dict_strict, read_weights

WEIGHTS, CONFIG = "model.safetensors", "config.json"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def export(checkpoint_dir, out_dir, use_ema: bool = True) -> Path:
    """Write model.safetensors + config.json from <checkpoint_dir>/checkpoint-last.pth."""
    from safetensors.torch import save

    from util.builders import settings_from_checkpoint
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume {checkpoint_dir}: no {CHECKPOINT_NAME} there (expected "
                                "the --output_dir of a training run)")
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


# What a weights flag (--resume of sampling and evaluation, --finetune) takes.
EXPECTED = (f"expected a folder with {CHECKPOINT_NAME}, an exported folder ({WEIGHTS} + {CONFIG}) "
            "or a Hugging Face Hub repo id (user/name)")


def resolve(spec: str, revision: str = None, flag: str = "--resume") -> Path:
    """A local folder as it is; a Hub repo id ("user/name") downloaded (or found in the cache).
    `flag`: the flag that named it, for the messages."""
    if spec and Path(spec).is_dir():
        return Path(spec)
    if spec and Path(spec).exists():
        raise FileNotFoundError(f"{flag} {spec}: a file, not a folder ({EXPECTED}; for "
                                f"{Path(spec).name}, pass the folder that holds it)")
    if not HUB_ID.match(spec or ""):
        raise FileNotFoundError(f"{flag} {spec or '(not given)'}: no such folder, and not a "
                                f"Hub repo id either ({EXPECTED})")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=spec, revision=revision,
                                      allow_patterns=[WEIGHTS, CONFIG]))
    except Exception as e:  # not found, no network, gated ...: huggingface_hub's many kinds
        raise FileNotFoundError(f"{flag} {spec}: no such folder here, and as a Hugging Face "
                                f"Hub repo id it failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None


def download_on_main_first(spec: str, revision: str, is_main: bool, flag: str = "--resume") -> None:
    """A Hub repo id is downloaded by rank 0 alone, into huggingface_hub's cache, which the
    other ranks then read; its failure stops every rank with rank 0's message (a
    FileNotFoundError, as in a single process)."""
    if not Path(spec).is_dir():
        try:
            run_on_main(is_main, lambda: resolve(spec, revision, flag), expected=(FileNotFoundError,))
        except MainRankFailed as e:
            raise FileNotFoundError(str(e).removeprefix("FileNotFoundError: ")) from None


def read_config(path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    return check_config(config, path)


def read(spec: str, revision: str = None, use_ema: bool = True, flag: str = "--resume") -> tuple:
    """(saved settings dict or None, state dict, epoch, source) from an exported folder, a
    folder with a training checkpoint, or a Hub repo id, every part checked before use. Where a
    folder has both, the exported pair wins (no unpickling). A training checkpoint gives its
    EMA weights (use_ema=False: its raw ones); its optimizer and loss scaler are never read."""
    folder = resolve(spec, revision, flag)
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
    raise FileNotFoundError(f"{flag} {spec}: no {CONFIG} with {WEIGHTS}, and no "
                            f"{CHECKPOINT_NAME}, in {folder}")


def load_sampling_weights(model: nn.Module, spec: str, args, revision: str = None,
                          use_ema: bool = True) -> int:
    """Put the weights `read` finds into `model`, strictly, after checking the flags that shape
    the weights against the saved settings. Returns the epoch."""
    saved, state, epoch, source = read(spec, revision, use_ema)
    check_same_config(saved, args, architecture_flags(args.head), source)
    load_state_dict_strict(model, state, source)
    return epoch

