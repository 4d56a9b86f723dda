"""The network settings a file holds, checked before anything is built from them: one home.

A run's network is named by its settings (model, head, tokenizer and every constructor
setting; util/args.py derives them from the constructors). They come back from files: the `args`
of a training checkpoint (ours or the reference release's) and the `config.json` of an exported
folder. Everything that decides whether such settings can be used lives here:

- `check_network_settings`: each setting has its constructor's type;
- `check_head_format`: the head's weights mean today what they meant when saved;
- `check_config`: an exported config.json as a whole;
- `check_same_config` / `check_finetune_config`: the flags of this run describe the saved
  network (fine-tuning may change the settings in ADAPTABLE);
- `check_settings_fit`: the settings describe the weights' keys and shapes.

Each raises ValueError naming the file and the key (ConfigMismatch, a ValueError, for flags
that disagree).
"""
import argparse
import inspect
import math
from typing import Mapping

import torch

from models.ear import EAR, MODEL_SIZES
from models.heads import HEADS
from models.tokenizer import TOKENIZERS
from util.args import architecture_flags, network_settings
from util.weights import check_state_dict

# The format of an exported folder's config.json (util/pretrained.py writes it).
FORMAT = "ear-weights/1"


def check_network_settings(settings, head: str, source) -> None:
    """Each network setting in `settings` (a mapping read from a file: config.json, a
    checkpoint's args) has its constructor's type: an int a whole number >= 0 (not a bool), a
    float a finite number, a bool a bool, a str one of the class's CHOICES for it. Raises
    ValueError naming the file and the key."""
    for cls in (EAR, HEADS[head]):
        params = inspect.signature(cls.__init__).parameters
        for name in cls.FLAGS:
            if name not in settings:
                continue
            value, kind = settings[name], params[name].annotation
            if kind is str:
                choices = cls.CHOICES[name]
                if value not in choices:
                    raise ValueError(f"{source}: {name} is {value!r}, expected one of {list(choices)}")
                continue
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value))
            if not ok:
                what = {bool: "true or false", int: "a whole number >= 0"}.get(kind, "a finite number")
                raise ValueError(f"{source}: {name} is {value!r}, expected {what}")


# A mixture head saved before it followed GIVT (softplus scales + 1e-4, a per-channel loss;
# changed on 2026-12-02) has weights that today's squareplus scales would misread: a raw output
# of 0 was a scale of 0.69, now 1.0. Its settings lack the flag added with that change.
GMM_GIVT_MARKER = "gmm_dequantize"


def check_head_format(saved: dict, source) -> None:
    """Refuse saved settings whose head weights this code would read differently from how they
    were trained (today: a mixture head from before GIVT's parameterisation). Called where a
    file's settings are read: a training checkpoint's (load_training_checkpoint) and an export's
    config.json (check_config)."""
    if isinstance(saved, dict) and saved.get("head") == "gmm" and GMM_GIVT_MARKER not in saved:
        raise ValueError(f"{source}: a mixture (--head gmm) head saved before it followed GIVT "
                         f"(softplus scales, per-channel loss; its settings have no "
                         f"{GMM_GIVT_MARKER}); today's squareplus scales would misread its "
                         f"weights: train it again")


# Where the energy head's training targets came from (training flags, not the network's):
# config.json records them for the energy head; files written before they existed lack them.
TRAINING_TARGETS = ("score_targets", "target_dequantize")
# Keys of config.json besides the network's settings ("exported_from": files of an earlier
# version, which held the checkpoint's path there).
CONFIG_KEYS = ("format", "model", "head", "tokenizer", "epoch", "weights", "run", "exported_from",
               "dataset_classes", *TRAINING_TARGETS)


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


# Network settings added after exports were first written, each with the value a file without
# it was trained with: the energy head drew 2 samples per scoring before --score_samples, and the
# mixture head's components all started at 0 before --gmm_init_spread.
LATER_SETTINGS = {"score_samples": 2, "gmm_init_spread": 0.0}


def check_config(config, path) -> dict:
    """An exported config.json, checked before anything is built from it: a JSON object in
    this format, known keys only, every network setting present (but those of LATER_SETTINGS,
    which older files lack and get filled in) and of its type, the names known, the epoch a
    whole number."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, found a "
                         f"{type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    head = check_names(config, path, required=True)
    check_head_format(config, path)
    settings = network_settings(head)
    config = {**{n: v for n, v in LATER_SETTINGS.items() if n in settings}, **config}
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
    targets, width = config.get("score_targets", 1), config.get("target_dequantize", 0.0)
    if not (type(targets) is int and targets >= 1):
        raise ValueError(f"{path}: score_targets is {targets!r}, expected a whole number >= 1")
    if not (type(width) in (int, float) and math.isfinite(width) and width >= 0):
        raise ValueError(f"{path}: target_dequantize is {width!r}, expected a finite number >= 0")
    if config.get("weights", "ema") not in ("ema", "raw"):
        raise ValueError(f"{path}: weights is {config['weights']!r}, expected 'ema' or 'raw'")
    return config


class ConfigMismatch(ValueError):
    """The flags describe another network than the checkpoint's."""


def check_same_config(saved: dict, current: argparse.Namespace, names, source) -> None:
    """The arguments that define the network must agree with the checkpoint's (those it has)."""
    if saved is None:
        return
    diffs = [f"--{n} is {getattr(current, n)!r} here but {saved[n]!r} in the checkpoint"
             for n in names if n in saved and saved[n] != getattr(current, n)]
    if diffs:
        raise ConfigMismatch(f"cannot use {source}: " + "; ".join(diffs))


# Settings a fine-tuning run may change; the state dict is adapted for them.
ADAPTABLE = ("class_num", "img_size")


def check_finetune_config(saved, args, source) -> None:
    """Everything that shapes the weights must agree, except the settings fine-tuning adapts."""
    from util.builders import settings_from_checkpoint
    if saved is None:  # no saved settings: adapt_state_dict compares the tensors themselves
        return
    names = [n for n in architecture_flags(args.head) if n not in ADAPTABLE]
    try:  # filled with today's defaults: a reference checkpoint has no `head` (it is the energy head)
        check_same_config(vars(settings_from_checkpoint(saved)), args, names, source)
    except ConfigMismatch as e:
        raise ConfigMismatch(f"--finetune: {e} (fine-tuning may change only "
                             f"{' and '.join('--' + n for n in ADAPTABLE)})") from None


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
