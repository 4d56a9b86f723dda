"""Command-line arguments, defined once and shared by the entry points.

Flag names and defaults follow the reference release, so its README commands run unchanged.
"""
import argparse


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--img_size", type=int, default=256, help="image side in pixels")
    g.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt",
                   help="KL-16 VAE weights, .ckpt or .safetensors (python util/download.py)")
    g.add_argument("--vae_embed_dim", type=int, default=16, help="VAE latent channels")
    g.add_argument("--data_path", default="./data/imagenet",
                   help="dataset root; training images in <data_path>/train/<class>/<image>")
    g.add_argument("--cached_path", default="", help="folder of cached VAE latents (main_cache.py)")
    g.add_argument("--batch_size", type=int, default=32, help="images per process and step")
    g.add_argument("--num_workers", type=int, default=10, help="data-loading worker processes")
    g.add_argument("--vae_precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of VAE encoding (caching and on-the-fly): fp32 as the "
                        "reference; bf16/fp16 are faster and change the latents slightly")
    g.add_argument("--pin_mem", action="store_true", default=True,
                   help="pin host memory for faster copies to the GPU (default on)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")


def add_system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu if no CUDA)")
    g.add_argument("--seed", type=int, default=1, help="random seed; each rank uses seed + rank")
    g.add_argument("--world_size", type=int, default=1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI variables")
    g.add_argument("--dist_url", default="env://", help="process-group rendezvous URL")


def add_precision_arg(g) -> None:
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision of training and sampling; auto = fp16 with a loss "
                        "scaler on CUDA (as the reference), fp32 on the CPU")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name} must be positive, got {getattr(args, name)}")


def cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Encode every training image and its horizontal flip with the VAE and store "
                    "the moments as <cached_path>/<class>/<file>.npz.")
    add_data_args(p)
    add_system_args(p)
    p.set_defaults(batch_size=128)
    g = p.add_argument_group("caching")
    g.add_argument("--precision", dest="vae_precision", default=argparse.SUPPRESS,
                   choices=["fp32", "bf16", "fp16"], help="the same as --vae_precision")
    g.add_argument("--overwrite", action="store_true", help="re-encode files already in the cache")
    g.add_argument("--skip_bad", action="store_true",
                   help="log unreadable images to <cached_path>/failed_images.txt and continue "
                        "(default: stop at the first one)")
    return p


# Arguments that define the network: a resumed checkpoint must agree on all of them.
MODEL_ARGS = ("model", "tokenizer", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num",
              "buffer_size", "scoreloss_d", "scoreloss_w", "noise_channels")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ear_base",
                   choices=["ear_base", "ear_large", "ear_huge", "ear_tiny"],
                   help="named model size (ear_tiny: ~1.5M parameters, for CPU runs)")
    for name, what in (("decoder_embed_dim", "width"), ("decoder_depth", "depth"),
                       ("decoder_num_heads", "attention heads")):
        g.add_argument(f"--{name}", type=int, default=None,
                       help=f"Transformer {what} (default: the named size's)")
    g.add_argument("--vae_stride", type=int, default=16, help="pixels per latent position")
    g.add_argument("--patch_size", type=int, default=1, help="latent positions per token side")
    g.add_argument("--class_num", type=int, default=1000, help="number of classes")
    g.add_argument("--buffer_size", type=int, default=64, help="class-prefix positions")
    g.add_argument("--mask_ratio_min", type=float, default=0.7, help="lowest training mask ratio")
    g.add_argument("--label_drop_prob", type=float, default=0.1,
                   help="chance of dropping the class during training (for guidance)")
    g.add_argument("--attn_dropout", type=float, default=0.1)
    g.add_argument("--proj_dropout", type=float, default=0.1)
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute Transformer activations in backward to save memory")
    g = p.add_argument_group("generator and energy score")
    g.add_argument("--scoreloss_d", type=int, default=None,
                   help="generator depth (default: the named size's, 6/8/12)")
    g.add_argument("--scoreloss_w", type=int, default=None,
                   help="generator width (default: the named size's, 1024/1280/1536)")
    g.add_argument("--noise_channels", type=int, default=64, help="generator input-noise dimension")
    g.add_argument("--alpha", type=float, default=1.0, help="energy-score exponent, in (0, 2]")
    g.add_argument("--train_temperature", type=float, default=1.0,
                   help="weight (<= 1) of the sample-sample distance in the loss")
    g.add_argument("--infer_temperature", type=float, default=1.0,
                   help="sampling temperature (scales the generator's residual shifts)")
    g.add_argument("--score_batch_mul", type=int, default=1,
                   help="independent sample pairs per masked token")


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
                   help="lr multiplier for the generator's weight matrices")
    g.add_argument("--grad_clip", type=float, default=3.0, help="max gradient norm (0: off)")
    g.add_argument("--ema_rate", type=float, default=0.9999)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_precision_arg(g)
    g = p.add_argument_group("data source")
    g.add_argument("--dataset", default="imagenet", choices=["imagenet", "digits"],
                   help="imagenet: an image folder (--data_path) or its cache (--cached_path); "
                        "digits: scikit-learn's built-in 8x8 handwritten digits")
    g.add_argument("--tokenizer", default="vae", choices=["vae", "pixel"],
                   help="vae: KL-16 latents; pixel: the image's own pixels are the tokens "
                        "(needs --vae_stride 1 and --vae_embed_dim = image channels)")
    g.add_argument("--use_cached", action="store_true",
                   help="train on cached latents from --cached_path instead of encoding images")
    g = p.add_argument_group("output and resume")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints go here")
    g.add_argument("--log_dir", default=None,
                   help="TensorBoard logs go here (default: --output_dir)")
    g.add_argument("--resume", default="",
                   help="folder holding checkpoint-last.pth to continue from (none there: start fresh)")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    g.add_argument("--save_last_freq", type=int, default=5,
                   help="write checkpoint-last.pth every this many epochs (and at the end)")
    g.add_argument("--print_freq", type=int, default=20, help="log every this many steps")


class ArgsFileParser(argparse.ArgumentParser):
    """Also reads flags from files named `@file`: whitespace-separated, `#` starts a comment.
    Flags after the file override it: `main_ear.py @configs/digits_quickstart.args --epochs 2`."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, line: str) -> list:
        return line.split("#", 1)[0].split()


def train_parser() -> argparse.ArgumentParser:
    p = ArgsFileParser(description="Train (or evaluate) an EAR model. "
                                   "Flags can also come from a file: @path/to/file.args")
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    add_eval_args(p)
    add_system_args(p)
    return p


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation and evaluation")
    g.add_argument("--evaluate", action="store_true",
                   help="only evaluate the checkpoint in --resume (EMA weights), then exit")
    g.add_argument("--online_eval", action="store_true", help="evaluate during training")
    g.add_argument("--eval_freq", type=int, default=40, help="evaluate every this many epochs")
    g.add_argument("--eval_bsz", type=int, default=64, help="images per process and sampling batch")
    g.add_argument("--num_images", type=int, default=50000,
                   help="images to generate, a multiple of --class_num (balanced classes)")
    g.add_argument("--num_iter", type=int, default=64, help="sampling steps")
    g.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    g.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    g.add_argument("--fid_stats", default="fid_stats/adm_in256_stats.npz",
                   help="reference mu/sigma .npz (python util/download.py --fid_stats)")
    g.add_argument("--inception_weights", default="",
                   help="torch-fidelity Inception weights file, for machines without network "
                        "(python util/download.py --inception)")
    g.add_argument("--keep_samples", action="store_true",
                   help="keep the generated PNG folder after measuring FID/IS")
