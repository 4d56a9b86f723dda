"""Command-line arguments, defined once and shared by the entry points.

Flag names and defaults follow the reference release, so its README commands run unchanged. The
network's flags are derived from the constructors, where the settings are written: name, type and
default from the signature of `EAR` (models/ear.py) and of each head (models/heads.py), help from
their `FLAGS` tables.
"""
import argparse
import inspect
import math

from models.ear import EAR, MODEL_SIZES
from models.heads import HEADS
from models.tokenizer import TOKENIZERS
from models.vae import DEFAULT_VAE_PATH
from util.signals import DEFAULT_SAVE_SIGNALS

PRECISIONS = ("fp32", "bf16", "fp16")
# What --freeze can hold fixed (util/finetune.py `freeze`).
FREEZE_CHOICES = ("none", "transformer")


class ArgsFileParser(argparse.ArgumentParser):
    """Also reads flags from files named `@file`: whitespace-separated, `#` starts a comment.
    Flags after the file override it: `main_ear.py @configs/digits_quickstart.args --epochs 2`."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, line: str) -> list:
        return line.split("#", 1)[0].split()


# ----- the network's settings, derived from the constructors ----------------------------------

def sized_settings() -> set:
    """Settings a named model size provides (Transformer and head sizes)."""
    sizes = list(MODEL_SIZES.values()) + [s for h in HEADS.values() for s in h.SIZES.values()]
    return {name for size in sizes for name in size}


def add_settings(group, cls, names=None) -> None:
    """A flag for each entry of `cls.FLAGS` (or the given `names` of them), typed and defaulted
    by `cls.__init__`'s signature. Settings a named size provides default to None: the size's.
    An entry (help, shapes, default) gives the flag a default of its own."""
    params = inspect.signature(cls.__init__).parameters
    sized = sized_settings()
    for name in names or cls.FLAGS:
        help_text, _, *flag_default = cls.FLAGS[name]
        param = params[name]
        default = flag_default[0] if flag_default else param.default
        if param.annotation is bool:
            assert param.default is False, f"{cls.__name__}.{name}: a bool flag must default to False"
            group.add_argument(f"--{name}", action="store_true", help=help_text)
        elif name in getattr(cls, "CHOICES", {}):
            group.add_argument(f"--{name}", default=default, choices=cls.CHOICES[name],
                               help=f"{help_text} (default: {default})")
        elif name in sized:
            group.add_argument(f"--{name}", type=param.annotation, default=None,
                               help=f"{help_text} (default: the named size's)")
        else:
            group.add_argument(f"--{name}", type=param.annotation, default=default,
                               help=f"{help_text} (default: {default})")


def network_settings(head: str) -> tuple:
    """Every flag that reaches the constructor of EAR with this head."""
    return tuple(EAR.FLAGS) + tuple(HEADS[head].FLAGS)


def architecture_flags(head: str) -> tuple:
    """The flags a checkpoint must agree on: the model, tokenizer and head names and every
    setting of EAR and of this head that shapes the weights."""
    shaping = [n for cls in (EAR, HEADS[head]) for n, (_, shapes, *_) in cls.FLAGS.items() if shapes]
    return ("model", "tokenizer", "head", *shaping)


def add_vae_path_arg(g) -> None:
    g.add_argument("--vae_path", default=DEFAULT_VAE_PATH,
                   help="KL-16 VAE weights, .ckpt or .safetensors (python util/download.py)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ear_base", choices=sorted(MODEL_SIZES),
                   help="named model size (ear_tiny: ~1.5M parameters, for CPU runs)")
    g.add_argument("--head", default="energy", choices=sorted(HEADS),
                   help="output head (models/heads.py); energy: the paper's generator")
    add_settings(g, EAR, [n for n in EAR.FLAGS if n not in TOKEN_SETTINGS])
    for name, head in HEADS.items():
        add_settings(p.add_argument_group(f"{name} head (--head {name})"), head)


# ----- data, sampling, system -------------------------------------------------------------------

# The model's settings that describe the token maps: the data and cache flags show them.
TOKEN_SETTINGS = ("img_size", "vae_stride", "vae_embed_dim")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--tokenizer", default="vae", choices=sorted(TOKENIZERS),
                   help="vae: KL-16 latents; pixel: the image's own pixels are the tokens "
                        "(needs --vae_stride 1 and --vae_embed_dim = image channels)")
    add_settings(g, EAR, TOKEN_SETTINGS)
    add_vae_path_arg(g)
    g.add_argument("--vae_precision", default="fp32", choices=PRECISIONS,
                   help="precision of VAE encoding (caching and on-the-fly): fp32 as the "
                        "reference; bf16/fp16 are faster and change the latents slightly")
    g.add_argument("--data_path", default="./data/imagenet",
                   help="dataset root; training images in <data_path>/train/<class>/<image>")
    g.add_argument("--cached_path", default="", help="folder of cached VAE latents (main_cache.py)")
    g.add_argument("--classes", default="",
                   help="train and evaluate on these classes only, relabelled 0..k-1 in this order "
                        "(--class_num k): comma-separated class indices (sorted folder order; "
                        "digits: 5,6,7,8,9) or folder names; outputs keep the dataset's ids")
    g.add_argument("--batch_size", type=int, default=32, help="images per process and step")
    g.add_argument("--num_workers", type=int, default=10, help="data-loading worker processes")
    g.add_argument("--pin_mem", action="store_true", default=True,
                   help="pin host memory for faster copies to the GPU (default on)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")


def float_list(text: str) -> list:
    """`1.5,2.0,2.5` -> [1.5, 2.0, 2.5] (one value: a one-element list)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def add_sampling_args(g, sweep: bool = False) -> None:
    """Sampling flags; with `sweep`, --cfg and --infer_temperature take comma-separated lists."""
    kind, many = (float_list, " (a list sweeps: 1.5,2.0,3.0)") if sweep else (float, "")
    g.add_argument("--num_iter", type=int, default=64, help="sampling steps")
    g.add_argument("--cfg", type=kind, default=[1.0] if sweep else 1.0,
                   help=f"classifier-free guidance scale{many}")
    g.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    g.add_argument("--infer_temperature", "--temperature", type=kind,
                   default=[1.0] if sweep else 1.0,
                   help=f"sampling temperature (energy head: scales the generator's residual "
                        f"shifts; diffusion head: its step noise; GMM head: its deviations){many}")
    g.add_argument("--eval_bsz", type=int, default=64, help="images per process and sampling batch")


def add_device_args(g) -> None:
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu if no CUDA)")
    g.add_argument("--seed", type=int, default=1, help="random seed; each rank uses seed + rank")


def add_precision_arg(g) -> None:
    g.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="autocast precision of training and sampling; auto = fp16 with a loss "
                        "scaler on CUDA (as the reference), fp32 on the CPU")


def add_system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("system")
    add_device_args(g)
    g.add_argument("--world_size", type=int, default=1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI variables")
    g.add_argument("--dist_url", default="env://", help="process-group rendezvous URL")
    g.add_argument("--dist_timeout", type=float, default=120,
                   help="minutes a rank waits for the others (rank 0 measures FID alone)")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name} must be positive, got {getattr(args, name)}")


def check_sampling_args(args: argparse.Namespace) -> None:
    """The flags of `add_sampling_args`, for main_ear.py and sample_ear.py alike: a positive
    step count and batch, guidance scales that are finite and >= 0 (1: none), temperatures
    finite and > 0 (each value of a list)."""
    check_positive(args, "num_iter", "eval_bsz")
    for flag, values, positive in (("--cfg", args.cfg, False),
                                   ("--infer_temperature (--temperature)", args.infer_temperature, True)):
        values = values if isinstance(values, list) else [values]
        what = "> 0" if positive else ">= 0 (1.0: no guidance)"
        if not values:
            raise SystemExit(f"error: {flag}: no value given (expected numbers {what})")
        for value in values:
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise SystemExit(f"error: {flag} {value}: expected a finite number {what}")


# ----- the parsers ------------------------------------------------------------------------------

def cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Encode every training image and its horizontal flip with the VAE and store "
                    "the moments as <cached_path>/<class>/<file>.npz (or, with --cache_format "
                    "packed, in a few large files).")
    add_data_args(p)
    add_system_args(p)
    p.set_defaults(batch_size=128)
    g = p.add_argument_group("caching")
    g.add_argument("--precision", dest="vae_precision", default=argparse.SUPPRESS,
                   choices=PRECISIONS, help="the same as --vae_precision")
    g.add_argument("--cache_format", choices=["files", "packed"], default=None,
                   help="files (default, the reference's): <cached_path>/<class>/<file>.npz; "
                        "packed: a few large memory-mapped files plus an index, for big "
                        "datasets and network file systems (util/packed_cache.py)")
    g.add_argument("--convert_cache", nargs="?", const="", default=None, metavar="PER_FILE_CACHE",
                   help="no encoding: pack the per-file cache in PER_FILE_CACHE (default: "
                        "--cached_path itself) into the packed form at --cached_path, checking "
                        "every file")
    g.add_argument("--overwrite", action="store_true", help="re-encode files already in the cache")
    g.add_argument("--skip_bad", action="store_true",
                   help="log unreadable images to <cached_path>/failed_images.txt and continue "
                        "(default: stop at the first one)")
    return p


def stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FID statistics and a reference batch of an image folder (ImageNet layout), "
                    "as evaluation measures samples: one .npz with mu, sigma, arr_0, resolution.")
    g = p.add_argument_group("images")
    g.add_argument("--data_path", required=True,
                   help="dataset root; images in <data_path>/train/<class>/<image>")
    g.add_argument("--img_size", type=int, default=256,
                   help="ADM centre crop to this side: the samples' resolution")
    g.add_argument("--classes", default="", help="only these classes (as main_ear.py --classes)")
    g.add_argument("--batch_size", type=int, default=64, help="images per process and batch")
    g.add_argument("--num_workers", type=int, default=10, help="image-decoding worker processes")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help=".npz to write (e.g. fid_stats/mydata_256.npz)")
    g.add_argument("--ref_images", type=int, default=10000,
                   help="images kept as the reference batch arr_0 (a seeded random subset; "
                        "0: none)")
    g.add_argument("--inception_weights", default="",
                   help="torch-fidelity Inception weights file (python util/download.py --inception)")
    g.add_argument("--fd_dinov2", action="store_true",
                   help="also mu/sigma of DINOv2 features (dgm-eval's), as <out stem>_dinov2.npz "
                        "for --fd_dinov2_stats (torch.hub: needs network once)")
    g.add_argument("--skip_bad", action="store_true",
                   help="list unreadable images in <out stem>_skipped.txt beside --out and leave "
                        "them out (default: stop at the first one)")
    add_system_args(p)
    return p


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=400)
    g.add_argument("--accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute learning rate (default: blr * global batch / 256)")
    g.add_argument("--blr", type=float, default=1e-4, help="learning rate per 256 images")
    g.add_argument("--min_lr", type=float, default=0.0, help="final lr of the cosine schedule")
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"])
    g.add_argument("--warmup_epochs", type=float, default=100, help="linear warm-up, in epochs")
    g.add_argument("--weight_decay", type=float, default=0.02)
    g.add_argument("--score_lrscale", type=float, default=0.25,
                   help="lr multiplier for the energy head's weight matrices")
    g.add_argument("--grad_clip", type=float, default=3.0, help="max gradient norm (0: off)")
    g.add_argument("--ema_rate", type=float, default=0.9999)
    g.add_argument("--ema_warmup", default="auto", choices=["auto", "on", "off"],
                   help="grow the EMA's rate with the steps, min(ema_rate, (1+n)/(10+n)) after n "
                        "(auto: on with --finetune, off otherwise, as the paper trains)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_precision_arg(g)
    g.add_argument("--tf32", action="store_true", default=True,
                   help="CUDA: float32 matmuls and cuDNN convolutions in TF32 (default on; what "
                        "--precision fp32 computes in); metrics always run in full float32. "
                        "No effect on the CPU")
    g.add_argument("--no_tf32", action="store_false", dest="tf32",
                   help="CUDA: full float32 matmuls and convolutions")
    g = p.add_argument_group("energy-score targets (--head energy)")
    g.add_argument("--score_targets", type=int, default=1,
                   help="targets per masked token, drawn from the tokenizer's posterior (the VAE's "
                        "cached moments; pixels: --target_dequantize); the fidelity term averages "
                        "over them (default 1: the token itself, the paper's)")
    g.add_argument("--target_dequantize", type=float, default=0.0,
                   help="pixel tokens on a grid of levels this far apart (the digits: 0.125): "
                        "targets are drawn uniformly within half of it around each pixel "
                        "(default 0: the pixels themselves)")
    g = p.add_argument_group("data source")
    g.add_argument("--dataset", default="imagenet", choices=["imagenet", "digits"],
                   help="imagenet: an image folder (--data_path) or its cache (--cached_path); "
                        "digits: scikit-learn's built-in 8x8 handwritten digits")
    g.add_argument("--use_cached", action="store_true",
                   help="train on cached latents from --cached_path instead of encoding images")
    g = p.add_argument_group("output and resume")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints go here")
    g.add_argument("--log_dir", default=None,
                   help="TensorBoard logs go here (default: --output_dir)")
    g.add_argument("--resume", default="",
                   help="folder holding checkpoint-last.pth to continue from (none there: start fresh)")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    g = p.add_argument_group("fine-tuning (util/finetune.py)")
    g.add_argument("--finetune", default="",
                   help="start from these weights (not resuming them): a folder with "
                        "checkpoint-last.pth, an exported folder or a Hub repo id (--revision); "
                        "--class_num and --img_size may differ. A checkpoint in --resume wins")
    g.add_argument("--finetune_raw", action="store_true",
                   help="with --finetune: the raw weights instead of the EMA")
    g.add_argument("--freeze", default="none", choices=FREEZE_CHOICES,
                   help="transformer: train only the head and the class embedding")
    g.add_argument("--save_last_freq", type=int, default=5,
                   help="write checkpoint-last.pth every this many epochs (and at the end)")
    g.add_argument("--save_signals", default=DEFAULT_SAVE_SIGNALS,
                   help="on these signals finish the step, write checkpoint-last.pth with the "
                        "position in the epoch and exit with status 75 ('' for none)")
    g.add_argument("--save_interval_minutes", type=float, default=0,
                   help="also write checkpoint-last.pth inside an epoch every this many minutes "
                        "of rank 0's clock, and go on (0: only at the --save_last_freq epochs)")
    g.add_argument("--print_freq", type=int, default=20, help="log every this many steps")
    g.add_argument("--wandb_project", default="",
                   help="also log to this Weights & Biases project (rank 0; needs `pip install "
                        "wandb`; WANDB_MODE=offline writes the run locally)")
    g.add_argument("--wandb_run", default=None, help="the W&B run's name (default: W&B picks one)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation and evaluation")
    g.add_argument("--evaluate", action="store_true",
                   help="only evaluate the checkpoint in --resume (EMA weights), then exit")
    g.add_argument("--online_eval", action="store_true", help="evaluate during training")
    g.add_argument("--eval_freq", type=int, default=40, help="evaluate every this many epochs")
    g.add_argument("--num_images", type=int, default=50000,
                   help="images to generate, a multiple of --class_num (balanced classes)")
    add_sampling_args(g, sweep=True)
    g.add_argument("--fid_stats", default="fid_stats/adm_in256_stats.npz",
                   help="reference mu/sigma .npz (python util/download.py --fid_stats)")
    g.add_argument("--inception_weights", default="",
                   help="torch-fidelity Inception weights file (python util/download.py --inception)")
    g.add_argument("--precision_recall", action="store_true",
                   help="also precision and recall (k=3, as ADM's evaluator) against --ref_batch")
    g.add_argument("--ref_batch", default="fid_stats/VIRTUAL_imagenet256_labeled.npz",
                   help="ADM's reference batch, real images in `arr_0` (python util/download.py "
                        "--ref_batch); its features are cached beside it")
    g.add_argument("--fd_dinov2", action="store_true",
                   help="also FD_DINOv2 as dgm-eval computes it (DINOv2 ViT-L/14 from torch.hub: "
                        "needs network once), against --fd_dinov2_stats or else --ref_batch's images")
    g.add_argument("--fd_dinov2_stats", default="",
                   help="mu/sigma .npz of DINOv2 features to compare with (e.g. of the training "
                        "set, as EDM2 reports FD_DINOv2; main_stats.py --fd_dinov2 writes one)")
    g.add_argument("--revision", default=None,
                   help="with a Hub repo id in --resume (--evaluate) or --finetune: the branch, "
                        "tag or commit")
    g.add_argument("--save_npz", action="store_true",
                   help="also write the samples as one ADM-format .npz (arr_0 uint8 (N, H, W, 3))")
    g.add_argument("--keep_samples", action="store_true",
                   help="keep the generated PNG folder after measuring FID/IS")


def train_parser() -> argparse.ArgumentParser:
    p = ArgsFileParser(description="Train (or evaluate) an EAR model. "
                                   "Flags can also come from a file: @path/to/file.args")
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    add_eval_args(p)
    add_system_args(p)
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list) -> tuple:
    """(the flags of `parser` that `argv` sets, as a dict; the words it does not know). Drops
    the parser's defaults to do so: pass a parser made for this call."""
    for action in parser._actions:  # argparse has no public way to drop every default
        action.default = argparse.SUPPRESS
    given, unknown = parser.parse_known_args(argv)
    return vars(given), unknown
