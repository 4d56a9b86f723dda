"""Tokenizers: images <-> the continuous token maps EAR models, (B, C, h, w).

A tokenizer knows its stride (pixels per token-map position), the channels of the images it
takes and of the maps it gives, and how to go both ways. The VAE tokenizer can also hand out
its encoder's *moments* (mean and log-variance, (B, 2C, h, w)), which `main_cache.py` stores and
training turns back into tokens with `from_moments`. For the energy score's several targets
(--score_targets) a tokenizer also draws more samples of each image's tokens from the
distribution the tokens are a draw of: the VAE's posterior, or the pixel grid's dequantisation
noise (`--target_dequantize`). Adding a tokenizer is one class plus one line in `TOKENIZERS`;
`build_tokenizer` is the only place that looks at `--tokenizer`.
"""
from typing import Mapping

import torch

from models.vae import LATENT_SCALE, DiagonalGaussian, load_vae
from util.precision import autocast


class VAETokenizer:
    """KL-16 latents: images (B, 3, H, W) in [-1, 1] <-> tokens (B, C, H/16, W/16), a posterior
    sample times LATENT_SCALE (decoding divides by it). Encodes in `precision` (fp32 unless
    asked, as the reference). The network is loaded only when `load` is set: training on a
    cache without evaluation never needs it. `channels_last` (default: on CUDA) runs the
    network in the channels-last layout, cuDNN's fastest for convolutions; what goes in and
    comes out keeps the default layout."""
    stride = 16
    image_channels = 3
    cacheable = True
    has_posterior = True  # the encoder's moments: targets can be drawn from them

    def __init__(self, vae_path, embed_dim: int = 16, precision: str = "fp32",
                 device=torch.device("cpu"), load: bool = True, channels_last: bool = None):
        self.channels, self.precision, self.device = embed_dim, precision, torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.vae = (load_vae(vae_path, embed_dim).to(self.device, memory_format=self.layout)
                    if load else None)

    @classmethod
    def from_settings(cls, settings: Mapping, device, load: bool) -> "VAETokenizer":
        return cls(settings["vae_path"], settings["vae_embed_dim"], settings["vae_precision"],
                   device, load)

    def cache_shape(self, side: int) -> tuple:
        """Shape of one image's cached moments for a side x side token map: (2C, side, side)."""
        return 2 * self.channels, side, side

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> encoder moments (B, 2C, h, w), float32."""
        with autocast(images.device, self.precision):
            moments = self.vae.encode(images.contiguous(memory_format=self.layout)).parameters
        return moments.float().contiguous()

    def from_moments(self, moments: torch.Tensor) -> torch.Tensor:
        """Moments (B, 2C, h, w) -> tokens: one posterior sample times LATENT_SCALE."""
        return DiagonalGaussian(moments.float()).sample() * LATENT_SCALE

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_moments(self.moments(images))

    def tokens_and_targets(self, data: torch.Tensor, cached: bool, count: int) -> tuple:
        """(tokens (B, C, h, w), targets (B, count, C, h, w) or None) of images (B, 3, H, W), or
        of their cached moments when `cached`. The tokens are one posterior draw, as `encode`'s
        (the same random numbers); with count > 1 the targets are that draw and count - 1 more,
        independent ones. None for count 1: the tokens are the targets."""
        moments = data if cached else self.moments(data)
        tokens = self.from_moments(moments)
        if count == 1:
            return tokens, None
        return tokens, torch.stack([tokens, *(self.from_moments(moments) for _ in range(count - 1))], 1)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> tokens of the posterior mean (no draw): what an edit keeps of an image."""
        return DiagonalGaussian(self.moments(images)).mean * LATENT_SCALE

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, C, h, w) -> images (B, 3, 16h, 16w), roughly in [-1, 1]."""
        latents = (tokens / LATENT_SCALE).contiguous(memory_format=self.layout)
        return self.vae.decode(latents).contiguous()


class PixelTokenizer:
    """The image's own pixels in [-1, 1] are the tokens (stride 1): no network, no cache. With
    `--patch_size p` the model groups p x p pixels into one token. `dequantize` (training's
    --target_dequantize): pixels on a grid of levels this far apart (the digits: 0.125) are
    read as draws from Uniform[level -+ dequantize / 2], and training targets are drawn from
    that; 0: the pixels have no distribution to draw from."""
    stride = 1
    cacheable = False
    dequantizable = True  # its targets can be drawn from dequantisation noise (--target_dequantize)

    def __init__(self, channels: int, dequantize: float = 0.0):
        self.channels = self.image_channels = channels
        self.dequantize = dequantize

    @classmethod
    def from_settings(cls, settings: Mapping, device, load: bool) -> "PixelTokenizer":
        return cls(settings["vae_embed_dim"], settings.get("target_dequantize", 0.0))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    encode_mean = encode  # the pixels are the tokens: nothing to draw

    def tokens_and_targets(self, images: torch.Tensor, cached: bool, count: int) -> tuple:
        """(the images as tokens, targets (B, count, C, H, W): count draws of images + dequantize
        * (U[0, 1) - 1/2)); targets None without dequantisation (count must then be 1)."""
        if not self.dequantize:
            if count != 1:
                raise ValueError(f"{count} targets per token need a distribution to draw them "
                                 "from: pixel tokens have one only with --target_dequantize")
            return images, None
        draws = [images + self.dequantize * (torch.rand_like(images) - 0.5) for _ in range(count)]
        return images, torch.stack(draws, 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.clamp(-1, 1)


TOKENIZERS = {
    "vae": VAETokenizer,
    "pixel": PixelTokenizer,
}


def build_tokenizer(settings: Mapping, device, load: bool = True):
    """The tokenizer `settings["tokenizer"]` names, from the flags it reads (vae_path,
    vae_embed_dim, vae_precision), checked against --use_cached and, when it will encode or
    decode (`load`), against --vae_stride. (Training on a cache alone only needs the cache's
    shape to match the flags, which the loader checks.)"""
    name = settings["tokenizer"]
    tokenizer = TOKENIZERS[name].from_settings(settings, device, load)
    if load and settings["vae_stride"] != tokenizer.stride:
        raise ValueError(f"--tokenizer {name} has stride {tokenizer.stride}: pass --vae_stride "
                         f"{tokenizer.stride}, not {settings['vae_stride']}")
    if settings.get("use_cached") and not tokenizer.cacheable:
        raise ValueError(f"--tokenizer {name} has nothing to cache: drop --use_cached")
    return tokenizer
