"""Weights to sample from: a training checkpoint, an exported folder, or a Hugging Face Hub repo.

An exported folder holds `model.safetensors` (the EMA weights, or the raw ones),
`config.json` (the network's settings: model, head, tokenizer and every constructor setting,
plus the epoch) and `README.md` (its model card, the page the Hub shows: metadata, settings,
recorded evaluations, commands). `export` writes it from a training checkpoint and `push` uploads
it; `--resume` of `sample_ear.py` and of `main_ear.py --evaluate` takes any of the three. Loading
an exported folder or a Hub repo never unpickles (safetensors and JSON only; the card is never
read); Hub downloads are cached by huggingface_hub and can be pinned with `--revision`.
"""
import argparse
import json
import re
from pathlib import Path
import torch.nn as nn

from models.heads import HEADS
from util.args import architecture_flags, network_settings
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from util.distributed import MainRankFailed, run_on_main
from util.fileio import atomic_write
from util.settings import (FORMAT, check_config, check_epoch, check_names, check_network_settings,
                           check_same_config, check_settings_fit, TRAINING_TARGETS)
from util.weights import load_state_dict_strict, read_weights

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The model card's license when --license is not given. The repository has no LICENSE file, so
# no license is claimed for the weights: the Hub's "other" (the publisher names one with
# --license; the training data's own terms apply in any case).
DEFAULT_LICENSE = "other"
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's identifiers: mit, apache-2.0, ...
EVAL_RESULTS = "eval_results.jsonl"  # what evaluation appends to, in the run's folder


def check_card_inputs(license: str, repo_id: str = None) -> None:
    """The two strings the model card takes from flags, before anything is written."""
    if not LICENSE_ID.fullmatch(license or ""):
        raise ValueError(f"--license {license!r}: expected a Hub license identifier in lower "
                         "case, e.g. mit, apache-2.0, cc-by-nc-4.0 or other")
    if repo_id is not None and not HUB_ID.fullmatch(repo_id):
        raise ValueError(f"--push_to_hub {repo_id!r}: expected a Hub repo id (user/name)")


def export(checkpoint_dir, out_dir, use_ema: bool = True, license: str = DEFAULT_LICENSE,
           repo_id: str = None) -> Path:
    """Write model.safetensors + config.json + README.md (the model card) from
    <checkpoint_dir>/checkpoint-last.pth. `repo_id`: the Hub repo it is going to, named in the
    card's commands. Every file is written atomically and depends only on the checkpoint, its
    folder's eval_results.jsonl and the arguments: two exports are byte-identical."""
    from safetensors.torch import save

    from util.builders import settings_from_checkpoint
    check_card_inputs(license, repo_id)
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
    if getattr(HEADS[settings.head], "many_targets", False):  # where its training targets came from
        config.update({n: getattr(settings, n) for n in TRAINING_TARGETS})
    state = {k: v.contiguous() for k, v in ckpt[key].items()}
    card = model_card(config, settings, ckpt.get("step"), Path(checkpoint_dir) / EVAL_RESULTS,
                      license, repo_id)
    out = Path(out_dir)
    atomic_write(out / WEIGHTS, lambda f: f.write(save(state)))
    atomic_write(out / CONFIG, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    atomic_write(out / CARD, lambda f: f.write(card.encode()))
    return out


def push(folder, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub (token from HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                               allow_patterns=[WEIGHTS, CONFIG, CARD],
                               commit_message=f"EAR weights ({CONFIG}, {WEIGHTS}, {CARD})")
    return str(getattr(commit, "commit_url", commit))


# The scores evaluation writes to eval_results.jsonl (engine_ear.SCORES, in its order), as the
# model card names them.
CARD_SCORES = {"fid": "FID", "is": "IS", "precision": "precision", "recall": "recall",
               "fd_dinov2": "FD-DINOv2", "accuracy": "accuracy", "frechet": "Frechet"}
# Where each ImageNet score's reference is recorded in a line (a path: the card gives its name).
CARD_REFERENCES = (("fid_reference", "FID"), ("precision_recall_reference", "precision/recall"),
                   ("fd_dinov2_reference", "FD-DINOv2"))
# Classes the sampling command of the card names for a full 1000-class model (sample_ear.py's).
IMAGENET_EXAMPLE = (207, 360, 387, 974, 88, 979, 417, 279)


def read_eval_results(path) -> tuple:
    """(the lines of an eval_results.jsonl that hold a score, in file order; how many other
    lines were left out, e.g. one cut short by a killed run). No file: ([], 0)."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    rows, left_out = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and any(k in row for k in CARD_SCORES):
            rows.append(row)
        else:
            left_out += 1
    return rows, left_out


def _text(value) -> str:
    """A value for a Markdown table cell: numbers and true/false as JSON writes them, text on one
    line with its pipes escaped."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return " ".join(str(value).split()).replace("|", "\\|")


def _score(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _text(value)
    return f"{value:.4f}"


def _measured_against(row: dict) -> str:
    """What a line's scores were measured against: the reference files' names (never their
    paths) for ImageNet, the held-out real digits (and their own scores) for the digits."""
    parts = [f"{label}: {Path(row[key]).name}" for key, label in CARD_REFERENCES
             if isinstance(row.get(key), str)]
    ceiling = row.get("ceiling")
    if isinstance(ceiling, dict):
        own = ", ".join(f"{CARD_SCORES.get(k, k)} {_score(v)}" for k, v in ceiling.items())
        parts.append(f"held-out real digits of the same classes (which score {own})")
    return _text("; ".join(parts) or "not recorded")


def _table(header: list, rows: list) -> list:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def eval_section(path, weights: str, epoch: int, sampling: tuple) -> list:
    """The card's evaluation section: a table of the recorded lines, or that there are none."""
    rows, left_out = read_eval_results(path)
    if not rows:
        return ["No evaluation was recorded for this run (its folder has no "
                f"`{EVAL_RESULTS}` with scores)."]
    scores = [k for k in CARD_SCORES if any(k in r for r in rows)]
    header = ["epoch", "cfg", "cfg schedule", "temperature", "steps", *sampling, "images",
              *(CARD_SCORES[k] for k in scores), "measured against"]
    cells = [[_text(r.get("epoch")), _text(r.get("cfg")), _text(r.get("cfg_schedule")),
              _text(r.get("infer_temperature")), _text(r.get("num_iter")),
              *(_text(r.get(name)) for name in sampling), _text(r.get("num_images")),
              *(_score(r.get(k)) for k in scores), _measured_against(r)] for r in rows]
    lines = [f"From the run's `{EVAL_RESULTS}`, in the order recorded. Evaluation samples with "
             f"the EMA weights of the epoch in the first column; these are epoch {epoch}'s"
             + (" EMA weights." if weights == "ema" else " raw weights, not the ones measured.")
             + " `steps`: autoregressive steps (`--num_iter`).", "", *_table(header, cells)]
    if left_out:
        lines += ["", f"({left_out} line(s) of the file held no scores and are left out.)"]
    return lines


def model_card(config: dict, settings, step, eval_results, license: str,
               repo_id: str = None) -> str:
    """The README.md of an exported folder: the Hub's YAML metadata, then the settings that shape
    the network, the training, the recorded evaluations and the commands to sample. Nothing in
    it depends on when or where it is written."""
    head, epoch = config["head"], config["epoch"]
    dataset = getattr(settings, "dataset", "imagenet")
    classes = config.get("dataset_classes")
    class_num = config["class_num"]
    tags = ["image-generation", "autoregressive", "class-conditional",
            "energy-score" if head == "energy" else f"{head}-head", dataset]
    # Plain identifiers only (a foreign checkpoint's saved dataset could be anything).
    tags = [t for t in tags if isinstance(t, str) and LICENSE_ID.fullmatch(t)]
    meta = ["---", f"license: {license}", "library_name: ear",
            "pipeline_tag: unconditional-image-generation", "tags:",
            *(f"- {tag}" for tag in tags), "---"]
    if step:
        trained = f"{epoch} full epochs and {step} steps of the next (saved part-way through it)"
    else:
        trained = f"{epoch + 1} (to the end of epoch {epoch}, counted from 0)"
    if getattr(settings, "finetune", ""):
        trained += ", fine-tuned from other weights (counted from the fine-tuning's start)"
    weights = ("EMA (exponential moving average, rate "
               f"{_text(getattr(settings, 'ema_rate', None))})" if config["weights"] == "ema"
               else "raw (the optimizer's, not the EMA)")
    shaping = [(name, _text(config[name])) for name in architecture_flags(head)]
    # The loss and sampling settings (they change no weight), and where the loss's targets came
    # from in training (the energy head's --score_targets, --target_dequantize).
    others = [(n, config[n]) for n in network_settings(head) if n not in architecture_flags(head)]
    others += [(n, config[n]) for n in TRAINING_TARGETS if n in config]
    about = [*shaping, ("other settings", ", ".join(f"{n} {_text(v)}" for n, v in others)),
             ("dataset", _text(dataset)),
             ("dataset classes", _text(classes) if classes else f"all {class_num}"),
             ("trained epochs", trained), ("weights", weights),
             ("license", license + (" (none named when exporting)" if license == "other" else ""))]
    if classes:
        example = list(classes)[:10]
    elif class_num == 1000:
        example = list(IMAGENET_EXAMPLE)
    else:
        example = list(range(min(class_num, 10)))
    where = repo_id or "<this folder or its Hub repo id>"
    ids = " ".join(map(str, example))
    vae = ([" The VAE tokenizer's weights come first: `python util/download.py --vae` (or "
            "`--vae_path`)."] if config["tokenizer"] == "vae" else [])
    lines = [
        *meta, "",
        f"# EAR {config['model']}, {head} head, {_text(dataset)} "
        f"{config['img_size']}x{config['img_size']}",
        "",
        "Class-conditional image generation with EAR (continuous visual autoregressive generation "
        "trained with the energy score; Shao, Meng, Zhou, *Continuous Visual Autoregressive "
        "Generation via Score Maximization*, ICML 2025), exported from the training run "
        f"`{_text(config.get('run'))}` by the `ear` code's `export_ear.py`.",
        "",
        "## Weights", "",
        f"`{WEIGHTS}` holds the weights (safetensors), `{CONFIG}` every setting of the network. "
        "The settings that shape it, and its training:", "",
        *_table(["setting", "value"], [[name, value] for name, value in about]), "",
        "## Evaluation", "",
        *eval_section(eval_results, config["weights"], epoch,
                      tuple(getattr(HEADS.get(head), "SAMPLING", ()))), "",
        "## Use", "",
        "With the `ear` code (`pip install -r requirements.txt`). Class ids are the dataset's "
        "own (its classes: the table above)."
        + "".join(vae) + " Loading reads only safetensors and JSON, never a pickle.", "",
        "```",
        f"python sample_ear.py --resume {where} --class_ids {ids} --out samples.png",
        "```", "",
        "The browser demo:", "",
        "```",
        "pip install -r demo/requirements.txt",
        f"python demo/app.py --resume {where}",
        "```", ""]
    return "\n".join(lines)


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


def load_sampling_model(spec: str, revision: str = None, use_ema: bool = True,
                        given: dict = None) -> tuple:
    """(model with the weights `spec` names (a run folder, an exported folder or a Hub repo id),
    its training settings, epoch), for sampling. Every file is checked, and the settings
    compared with the weights' shapes, before the network is built: a bad file raises
    ValueError (or FileNotFoundError) naming it and the key. `given`: network flags passed on
    the command line; those that shape the weights must match, the others (e.g. the diffusion
    head's --num_sampling_steps) replace the saved ones."""
    from util.builders import build_model, settings_from_checkpoint
    given = given or {}
    saved, state, epoch, source = read(spec, revision, use_ema)
    settings = settings_from_checkpoint(saved)
    shaping = {n: v for n, v in given.items() if n in architecture_flags(settings.head)}
    check_same_config(saved, argparse.Namespace(**shaping), shaping, source)
    # Other settings of the network may change, e.g. the diffusion head's --num_sampling_steps.
    overrides = {n: v for n, v in given.items() if n in network_settings(settings.head)
                 and n not in shaping}
    vars(settings).update({**shaping, **overrides})
    check_settings_fit(settings, state, source)
    model = build_model(settings)
    load_state_dict_strict(model, state, source)
    ignored = sorted(set(given) - set(shaping) - set(overrides))
    if ignored:
        print(f"note: ignoring training flags {', '.join('--' + n for n in ignored)}: the network "
              f"comes from {source}")
    return model, settings, epoch


def load_sampling_weights(model: nn.Module, spec: str, args, revision: str = None,
                          use_ema: bool = True) -> int:
    """Put the weights `read` finds into `model`, strictly, after checking the flags that shape
    the weights against the saved settings. Returns the epoch."""
    saved, state, epoch, source = read(spec, revision, use_ema)
    check_same_config(saved, args, architecture_flags(args.head), source)
    load_state_dict_strict(model, state, source)
    return epoch

