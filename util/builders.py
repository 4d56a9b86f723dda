"""Building what the entry points run, from their flags: the model, the tokenizer, the data,
the training state and the metrics. `main_ear.py`, `sample_ear.py` and `benchmarks/` import
from here; no entry script imports another.

Every builder reads a settings mapping or an `argparse.Namespace` of the training flags.
`settings_from_checkpoint` makes one from a checkpoint's saved `args` (ours or the reference's).
"""
import argparse
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from models.ear import EAR, named_sizes
from models.heads import HEADS
from models.tokenizer import TOKENIZERS, build_tokenizer
from util.args import check_positive, check_sampling_args, network_settings, train_parser
from util.distributed import DistInfo
from util.errors import one_line_errors
from util.loggers import check_wandb
from util.optim import EMA, param_groups
from util.precision import resolve_precision, set_up_cuda
from util.resumable import EpochSampler, SeededSamples, ignore_signals
from util.signals import parse_signals

# ----- settings ---------------------------------------------------------------------------------

def fill_named_sizes(args: argparse.Namespace) -> None:
    """Size settings left unset (None) take the named model's, so the saved args are concrete."""
    for name, value in named_sizes(args.model, args.head).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def settings_from_checkpoint(saved: Mapping = None) -> argparse.Namespace:
    """The training flags a checkpoint was made with: its saved `args` over today's defaults
    (a reference checkpoint has no `head` or `tokenizer`: the defaults are its)."""
    args = train_parser().parse_args([])
    vars(args).update(saved or {})
    fill_named_sizes(args)
    return args


def resolve_args(args: argparse.Namespace, info: DistInfo) -> None:
    """Fill in derived values (so the saved `args` are concrete) and reject bad settings, each
    with the flag named, before anything is built."""
    check_positive(args, "batch_size", "epochs", "accumulation_steps", "img_size",
                   "save_last_freq", "print_freq", "eval_freq")
    check_sampling_args(args)
    check_target_args(args)
    parse_signals(args.save_signals)
    check_wandb(args)
    if not (math.isfinite(args.save_interval_minutes) and args.save_interval_minutes >= 0):
        raise SystemExit(f"error: --save_interval_minutes must be a finite number >= 0 (0: off), "
                         f"got {args.save_interval_minutes}")
    if not 0.0 <= args.ema_rate < 1.0:
        raise SystemExit(f"error: --ema_rate must be in [0, 1), got {args.ema_rate}")
    if getattr(args, "ema_warmup", "off") == "auto":  # the saved args say which it was
        args.ema_warmup = "on" if args.finetune else "off"
    for name in ("blr", "lr", "min_lr", "weight_decay", "warmup_epochs"):
        values = getattr(args, name)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise SystemExit(f"error: --{name} must be a finite number >= 0, got {value}")
    if args.fd_dinov2 and not (args.fd_dinov2_stats or args.precision_recall):
        raise SystemExit("error: --fd_dinov2 needs a reference: --fd_dinov2_stats (mu/sigma of "
                         "DINOv2 features) or --precision_recall (the images of --ref_batch)")
    if (args.evaluate or args.online_eval) and args.num_images % args.class_num:
        raise SystemExit(f"error: --num_images {args.num_images} must be a multiple of "
                         f"--class_num {args.class_num} (the same number of images per class)")
    fill_named_sizes(args)
    args.dataset_classes = None  # --classes as indices: set where the dataset's classes are known
    args.world_size = info.world_size
    if args.lr is None:  # linear scaling rule on the global batch
        args.lr = args.blr * args.batch_size * info.world_size * args.accumulation_steps / 256
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.img_size % (args.vae_stride * args.patch_size):
        raise SystemExit(f"error: --img_size {args.img_size} must be divisible by --vae_stride "
                         f"* --patch_size = {args.vae_stride * args.patch_size}")
    seq_len = (args.img_size // (args.vae_stride * args.patch_size)) ** 2
    if (args.evaluate or args.online_eval) and args.num_iter > seq_len:
        raise SystemExit(f"error: --num_iter {args.num_iter} is more than the {seq_len} tokens "
                         "of an image: at most one step per token")


def check_target_args(args: argparse.Namespace) -> None:
    """--score_targets and --target_dequantize: where the energy score's targets come from."""
    check_positive(args, "score_targets")
    width = args.target_dequantize
    if not (math.isfinite(width) and width >= 0):
        raise SystemExit(f"error: --target_dequantize must be a finite number >= 0 (0: off), got {width}")
    if (args.score_targets > 1 or width) and not getattr(HEADS[args.head], "many_targets", False):
        raise SystemExit(f"error: --score_targets and --target_dequantize shape the energy head's "
                         f"loss; --head {args.head} takes one target per token"
                         + (" (the mixture head has --gmm_dequantize)" if args.head == "gmm" else ""))
    # Optional tokenizer attributes: `has_posterior` (targets drawn from it), `dequantizable`
    # (pixels on a grid: --target_dequantize); without them, a tokenizer has neither.
    tokenizer = TOKENIZERS[args.tokenizer]
    posterior = getattr(tokenizer, "has_posterior", False)
    dequantizable = getattr(tokenizer, "dequantizable", False)
    if width and not dequantizable:
        raise SystemExit(f"error: --target_dequantize is for pixel tokens: --tokenizer "
                         f"{args.tokenizer} " + ("draws its targets from its posterior" if posterior
                                                 else "cannot draw dequantised targets"))
    if args.score_targets > 1 and not (posterior or width):
        raise SystemExit(f"error: --score_targets {args.score_targets}: --tokenizer "
                         f"{args.tokenizer} has no distribution to draw targets from" +
                         ("; pass --target_dequantize WIDTH (the gap between pixel levels; the "
                          "digits: 0.125)" if dequantizable else ""))


# ----- model and tokenizer ----------------------------------------------------------------------

def build_model(settings) -> EAR:
    """EAR with the head `settings.head`, from the settings that reach their constructors."""
    settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    head = settings["head"]
    try:
        return EAR(head=head, **{n: settings[n] for n in network_settings(head)})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def model_labels(class_ids: list, settings) -> torch.Tensor:
    """The model's labels for --class_ids, which are the dataset's class ids: for a model
    trained on `--classes`, its label i is the dataset's class classes[i]."""
    classes = getattr(settings, "dataset_classes", None) or list(range(settings.class_num))
    missing = [c for c in class_ids if c not in classes]
    if missing:
        raise SystemExit(f"error: --class_ids {missing} are not among the checkpoint's classes "
                         f"({classes if len(classes) <= 20 else f'0..{len(classes) - 1}'})")
    return torch.tensor([classes.index(c) for c in class_ids])


def make_tokenizer(settings, device, load: bool = True):
    """The tokenizer the flags name (models/tokenizer.py), bad combinations as a clear exit."""
    settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    with one_line_errors():  # e.g. a missing --vae_path (FileNotFoundError)
        return build_tokenizer(settings, device, load)


# ----- data -------------------------------------------------------------------------------------

def build_dataset(args, tokenizer):
    """The digits, cached moments (--use_cached) or images, checked against the tokenizer and
    --class_num. The datasets' `channels` are those of their images."""
    from util.loader import ClassSubset, ImageFolder, image_transform, train_folder
    if args.dataset == "digits":
        from util.digits import DigitsDataset
        dataset, source = DigitsDataset(), "--dataset digits"
        if args.img_size != dataset.side or args.use_cached:
            raise SystemExit(f"error: --dataset digits has {dataset.side}x{dataset.side} images "
                             f"and no cache: pass --img_size {dataset.side} and no --use_cached")
    elif args.use_cached:
        if not args.cached_path:
            raise SystemExit("error: --use_cached needs --cached_path (the main_cache.py output)")
        side = args.img_size // args.vae_stride
        dataset = open_cache(args.cached_path, tokenizer.cache_shape(side))
        dataset[0]  # fail now, not mid-epoch, if the cache does not match the flags
        source = f"--cached_path {args.cached_path}"
    else:
        folder = train_folder(args.data_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--data_path {args.data_path}: expected training images in "
                                    f"{folder}/<class>/<image>")
        dataset = ImageFolder(folder, image_transform(args.img_size, random_flip=True))
        dataset.channels = 3  # load_rgb gives RGB
        source = f"--data_path {args.data_path}"
    if args.classes:
        dataset = ClassSubset(dataset, resolve_classes(args, dataset.classes))
        source += f" --classes {args.classes}"
    if not args.use_cached and dataset.channels != tokenizer.image_channels:
        raise SystemExit(f"error: {source} has {dataset.channels}-channel images but --tokenizer "
                         f"{args.tokenizer} takes {tokenizer.image_channels}: with the pixel "
                         f"tokenizer pass --vae_embed_dim {dataset.channels}")
    if len(dataset.classes) != args.class_num:
        raise SystemExit(f"error: {source} has {len(dataset.classes)} class folders but --class_num "
                         f"is {args.class_num}")
    return dataset


def resolve_classes(args, class_names: list = None) -> list:
    """`--classes` as dataset class indices, kept as args.dataset_classes (saved with the
    checkpoint; outputs map labels back through it), checked against --class_num."""
    from util.loader import parse_classes
    if class_names is None and args.dataset == "digits":
        from util.digits import NUM_CLASSES
        class_names = [str(c) for c in range(NUM_CLASSES)]
    ids = parse_classes(args.classes, class_names)
    if len(ids) != args.class_num:
        raise SystemExit(f"error: --classes {args.classes} names {len(ids)} classes but "
                         f"--class_num is {args.class_num}")
    args.dataset_classes = ids
    return ids


def class_folders(args):
    """The sorted class-folder names under --data_path, where there are any (None: indices
    only); the digits' names are known to resolve_classes."""
    from util.loader import train_folder
    folder = train_folder(args.data_path)
    if args.dataset == "digits" or not folder.is_dir():
        return None
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def dataset_class_ids(args, labels):
    """The dataset's own class ids of model labels (the same, without --classes)."""
    classes = getattr(args, "dataset_classes", None)
    return np.asarray(classes)[labels] if classes else labels


def open_cache(root, expected_shape):
    """The cache at `root` in either form: packed when its index is there (read without listing
    the folder), else the per-file `<class>/<file>.npz` folder. Both give the same samples in the
    same order."""
    from pathlib import Path

    from util.loader import CachedFolder
    from util.packed_cache import INDEX_NAME, SEGMENT_GLOB, PackedLatents, is_packed
    if is_packed(root):
        return PackedLatents(root, expected_shape)
    # Without its index a packed cache would be taken for a per-file one with no class folders.
    if next(Path(root).glob(SEGMENT_GLOB), None) is not None:
        raise FileNotFoundError(f"--cached_path {root}: packed segments but no index "
                                f"({INDEX_NAME}): the index is written when main_cache.py "
                                "finishes; rerun it with the same flags to rebuild it")
    return CachedFolder(root, expected_shape)


def build_loader(dataset, args, info: DistInfo) -> DataLoader:
    """A loader whose epoch `e` from batch `b` is set by `set_loader_epoch`: the order depends
    only on (seed, epoch) (a distributed sampler even in one process), the random flips only on
    (seed, epoch, index), so any part of an epoch is the same in a straight and a resumed run."""
    sampler = EpochSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                           drop_last=True, seed=args.seed)
    # Workers are started anew each epoch (not persistent): they see the dataset's epoch; their
    # own seeds (Python's and numpy's generators) are drawn from `generator`, reseeded per epoch.
    loader = DataLoader(SeededSamples(dataset, args.seed), sampler=sampler,
                        batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True,
                        generator=torch.Generator(),
                        worker_init_fn=partial(ignore_signals, parse_signals(args.save_signals)),
                        pin_memory=args.pin_mem and info.device.type == "cuda")
    if len(loader) < args.accumulation_steps:
        raise SystemExit(f"error: {len(dataset)} samples give {len(loader)} batches of "
                         f"{args.batch_size} per process, fewer than --accumulation_steps "
                         f"{args.accumulation_steps}")
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int, first_batch: int = 0) -> None:
    """Make the loader's next pass epoch `epoch` from its batch `first_batch` on."""
    loader.sampler.set_epoch(epoch, first_batch * loader.batch_size)
    loader.dataset.set_epoch(epoch)


def batches_per_epoch(loader: DataLoader) -> int:
    """Batches in a whole epoch, wherever the loader's pass starts."""
    return loader.sampler.num_samples // loader.batch_size


# ----- training state and metrics ---------------------------------------------------------------

@dataclass
class TrainState:
    """Everything an optimizer step touches.

    model: the bare EAR (state dicts, EMA, sampling); train_model: what the forward pass runs
    through (the same model, or DDP around it); ddp: the DDP wrapper, if any.
    """
    model: nn.Module
    train_model: nn.Module
    ddp: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device


def build_train_state(model: EAR, args, info: DistInfo) -> TrainState:
    """The state training steps through, for a model already on `info.device`; on CUDA, also
    the run's cuDNN and TF32 settings (util/precision.py set_up_cuda)."""
    precision = resolve_precision(args.precision, info.device)
    set_up_cuda(info.device, args.tf32)
    optimizer = build_optimizer(model, args, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    if args.compile:
        # Compile the parts with stable shapes: the Transformer always sees (B, buffer + L, width);
        # the head's row count follows the mask ratio, so the head compiles for dynamic shapes.
        model.forward_transformer = torch.compile(model.forward_transformer)
        model.head.compile_for_training()
    ddp, train_model = None, model
    if info.distributed:
        # DDP's constructor broadcasts rank 0's weights to every rank ...
        ddp = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        train_model = ddp
    ema = build_ema(model, args)  # ... so the EMA, copied after it, is the same everywhere
    return TrainState(model, train_model, ddp, ema, optimizer, scaler, precision, info.device)


def build_ema(model: nn.Module, args) -> EMA:
    """The EMA of `model` that --ema_rate and --ema_warmup describe."""
    return EMA(model, args.ema_rate, args.ema_warmup == "on")


def build_metrics(args, info: DistInfo):
    """What `evaluate` scores samples with: a digit classifier, or FID/IS with Inception."""
    if args.dataset == "digits":
        from util.digits import DigitMetrics
        return DigitMetrics(args.output_dir)
    from util.fid import InceptionMetrics
    return InceptionMetrics(args.fid_stats, args.inception_weights, info.device,
                            args.ref_batch if args.precision_recall else None, args.fd_dinov2,
                            args.fd_dinov2_stats, resolution=args.img_size)


def build_optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the reference's parameter groups (util/optim.py), fused into one kernel on
    CUDA. Its state dict is the unfused one's (moments and `step` per parameter), so a run
    resumes from the other's checkpoints (util/optim.py load_optimizer_state)."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay, args.score_lrscale),
                             lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
