"""Starting a run from released weights: `--finetune WEIGHTS` (and `--freeze`).

The weights come from a training checkpoint (ours or the reference release's), an exported
folder or a Hugging Face Hub repo, as for sampling (util/pretrained.py): the EMA weights by
default. Only the weights carry over; the optimizer, the loss scaler, the epoch and the EMA start
fresh (the EMA from the loaded weights). Two settings may differ from the source's:

- `--class_num` (or the classes themselves, `--classes`): the class embedding is re-initialised
  as a new model's is (N(0, 0.02)); every other tensor is loaded. The unconditional embedding
  `fake_latent` carries over, so guidance keeps its meaning.
- `--img_size`: the position embedding of the token grid is interpolated in 2-D, bicubic, as
  MAE does for ViTs at a new resolution; the class-buffer rows, which are no grid, stay as they
  are. (EAR is decoder-only: this one embedding is all the positional state it has.)

Any other difference in what shapes the weights (size, head, generator, token channels ...) is
refused naming the flag, as `--resume` refuses it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.args import FREEZE_CHOICES
from util.settings import check_finetune_config
from util.weights import check_weights

POS_EMBED = "decoder_pos_embed_learned"
CLASS_EMBED = "class_emb.weight"
def interpolate_pos_embed(pos: torch.Tensor, buffer_size: int, side: int) -> torch.Tensor:
    """Position embedding (1, buffer + s*s, D) -> (1, buffer + side*side, D): the token grid's
    rows resized as a (D, s, s) image with bicubic interpolation, the buffer rows kept. At the
    same size it returns the input unchanged."""
    grid = pos[:, buffer_size:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"{POS_EMBED}: {grid.shape[1]} token positions are not a square grid")
    if old == side:
        return pos
    dim = pos.shape[-1]
    image = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, side * side, dim).to(pos.dtype)
    return torch.cat([pos[:, :buffer_size], resized], dim=1)


def adapt_state_dict(model: nn.Module, state: dict, saved, args, source) -> tuple:
    """(the source's state dict fitted to `model`, notes saying what was changed). `model` is
    freshly initialised: its class embedding is what a re-initialised one is."""
    target = model.state_dict()
    state, notes = dict(state), []
    old_classes = (saved or {}).get("dataset_classes")
    new_classes = getattr(args, "dataset_classes", None)
    if CLASS_EMBED in state and (state[CLASS_EMBED].shape != target[CLASS_EMBED].shape
                                 or (old_classes and new_classes and old_classes != new_classes)):
        before = f"classes {old_classes}" if old_classes else f"{state[CLASS_EMBED].shape[0]} classes"
        after = f"classes {new_classes}" if new_classes else f"{args.class_num} classes"
        state[CLASS_EMBED] = target[CLASS_EMBED]
        notes.append(f"{CLASS_EMBED} re-initialised (the source's {before}, {after} here)")
    if POS_EMBED in state and state[POS_EMBED].shape != target[POS_EMBED].shape:
        old_rows = state[POS_EMBED].shape[1] - args.buffer_size
        state[POS_EMBED] = interpolate_pos_embed(state[POS_EMBED], args.buffer_size, model.seq_h)
        notes.append(f"{POS_EMBED} interpolated (bicubic, 2-D) from a {math.isqrt(old_rows)}^2 "
                     f"to a {model.seq_h}^2 token grid; its {args.buffer_size} buffer rows kept")
    check_weights(target, state, source, "EAR")
    return state, notes


def freeze(model: nn.Module, what: str) -> list:
    """Stop gradients to a part of the model; returns the frozen parameters' names.
    `transformer`: everything but the head and the class embedding (what a new dataset most
    needs), so only those train."""
    if what not in FREEZE_CHOICES:
        raise ValueError(f"--freeze {what!r}: expected one of {', '.join(FREEZE_CHOICES)}")
    if what == "none":
        return []
    keep = (f"{model.head_name}.", "class_emb.")
    frozen = [n for n, p in model.named_parameters() if not n.startswith(keep)]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def load_finetune_weights(model: nn.Module, args) -> tuple:
    """Put the weights of --finetune into `model` (freshly initialised), adapted as described;
    returns (source, epoch of the source, notes)."""
    from util.pretrained import read
    saved, state, epoch, source = read(args.finetune, args.revision, not args.finetune_raw, "--finetune")
    check_finetune_config(saved, args, source)
    state, notes = adapt_state_dict(model, state, saved, args, source)
    model.load_state_dict(state, strict=True)
    return source, epoch, notes
