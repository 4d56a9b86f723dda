"""KL-16 image tokenizer: the LDM-style convolutional VAE retrained by MAR.

256x256x3 images <-> 16x16x16 latents. The encoder returns *moments* (mean and log-variance, 32
channels); EAR trains on `posterior.sample() * 0.2325` and decodes `tokens / 0.2325`.
Module names follow the public `kl16.ckpt` so it loads strictly.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.weights import load_state_dict_strict, read_weights

# Scales KL-16 latents to roughly unit variance: EAR trains on sample() * LATENT_SCALE and
# decodes tokens / LATENT_SCALE.
LATENT_SCALE = 0.2325


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-0.5
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom: halves even sizes exactly


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, then an optional
    resampling step, `resample` = "downsample" or "upsample" (the attribute name in kl16.ckpt)."""

    def __init__(self, in_ch, out_ch, n_blocks, attention: bool, resample: str = None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch)
                                   for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks if attention else 0))
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(out_ch)
        elif resample == "upsample":
            self.upsample = Upsample(out_ch)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class MidBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 * z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16,
                 attn_levels=(4,)):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = ch
        for i, out_ch in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(Level(in_ch, out_ch, num_res_blocks, i in attn_levels,
                                   None if last else "downsample"))
            in_ch = out_ch
        self.mid = MidBlock(in_ch)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * 2^(levels-1), w * 2^(levels-1))."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # `up[i]` works at the resolution of encoder level i; it runs from the last level down.
        levels, in_ch = {}, widths[-1]
        for i in reversed(range(len(widths))):
            levels[i] = Level(in_ch, widths[i], num_res_blocks + 1, False,
                              "upsample" if i > 0 else None)
            in_ch = widths[i]
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior from moments (B, 2C, h, w): mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. Defaults are KL-16: 256px -> 16x16x16 latents.

    ckpt_path: optional `.ckpt`/`.pth` (dict with `model` or `state_dict`, or a bare state dict)
    or `.safetensors` file, loaded strictly.
    """

    def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ch=128, num_res_blocks=2,
                 ckpt_path=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, embed_dim,
                               attn_levels=(len(ch_mult) - 1,))
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        if ckpt_path is not None:
            self.load(ckpt_path)

    def load(self, path) -> None:
        load_state_dict_strict(self, read_weights(path, nested_keys=("model", "state_dict")),
                               source=str(path))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] (B, 3, H, W) -> posterior over (B, embed_dim, H/16, W/16)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, 3, 16h, 16w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


# Where `python util/download.py` puts the VAE, and where the entry points look for it.
DEFAULT_VAE_PATH = "pretrained_models/vae/kl16.ckpt"


def load_vae(path, embed_dim: int = 16) -> AutoencoderKL:
    """Build the KL-16 VAE and load weights strictly from `path` (.ckpt or .safetensors)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--vae_path {path}: no such file; fetch it with "
                                "`python util/download.py`")
    return AutoencoderKL(embed_dim=embed_dim, ckpt_path=path).eval()
