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
    g.add_argument("--batch_size", type=int, default=16, help="images per process and step")
    g.add_argument("--num_workers", type=int, default=10, help="data-loading worker processes")
    g.add_argument("--pin_mem", action="store_true", default=True,
                   help="pin host memory for faster copies to the GPU (default on)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")


def add_system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu if no CUDA)")
    g.add_argument("--seed", type=int, default=1, help="random seed; each rank uses seed + rank")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = fp32 on CPU, the job's mixed precision on CUDA")
    g.add_argument("--world_size", type=int, default=1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility; the launcher's environment decides")
    g.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI variables")
    g.add_argument("--dist_url", default="env://", help="process-group rendezvous URL")


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
    g = p.add_argument_group("caching")
    g.add_argument("--overwrite", action="store_true", help="re-encode files already in the cache")
    g.add_argument("--skip_bad", action="store_true",
                   help="log unreadable images to <cached_path>/failed_images.txt and continue "
                        "(default: stop at the first one)")
    return p
