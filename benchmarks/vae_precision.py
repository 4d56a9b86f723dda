"""How much lower-precision VAE encoding changes the latents, against fp32 (--vae_precision).

    python benchmarks/vae_precision.py --vae_path pretrained_models/vae/kl16.ckpt --device cuda
    python benchmarks/vae_precision.py --random_weights --device cpu   # the plumbing, no download

Encodes 256px centre crops (scikit-learn's two sample photos, or the images under --image_dir)
in fp32 and under bf16/fp16 autocast, and prints, per precision, the error of the posterior mean
and of the scaled latent (mean * 0.2325, what training sees before sampling), relative to the
fp32 latents' RMS.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.vae import DEFAULT_VAE_PATH, LATENT_SCALE, AutoencoderKL, load_vae  # noqa: E402
from util.crop import center_crop_arr  # noqa: E402
from util.precision import autocast  # noqa: E402


def images(image_dir, size: int) -> torch.Tensor:
    from PIL import Image
    if image_dir:
        pictures = [Image.open(p).convert("RGB") for p in sorted(Path(image_dir).glob("*"))]
    else:
        from sklearn.datasets import load_sample_images
        pictures = [Image.fromarray(a) for a in load_sample_images().images]
    arrays = [np.asarray(center_crop_arr(p, size), np.float32) / 127.5 - 1 for p in pictures]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae_path", default=DEFAULT_VAE_PATH)
    p.add_argument("--random_weights", action="store_true", help="a randomly initialised KL-16")
    p.add_argument("--image_dir", default="", help="images to encode (default: sklearn's photos)")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = (AutoencoderKL() if args.random_weights else load_vae(args.vae_path)).to(device).eval()
    x = images(args.image_dir, args.img_size).to(device)
    with torch.no_grad():
        reference = vae.encode(x).mean.float() * LATENT_SCALE
        scale = reference.pow(2).mean().sqrt()
        for precision in ("bf16", "fp16"):
            with autocast(device, precision):
                latent = vae.encode(x).mean.float() * LATENT_SCALE
            err = latent - reference
            print(f"{precision}: latent RMS error {err.pow(2).mean().sqrt() / scale:.2e} of the fp32 "
                  f"latents' RMS ({scale:.3f}); max abs error {err.abs().max():.2e}; "
                  f"{len(x)} images at {args.img_size}px on {device}, "
                  f"{'random' if args.random_weights else args.vae_path} weights")


if __name__ == "__main__":
    main()
