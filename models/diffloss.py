"""The diffusion head (MAR's diffusion loss): a small denoising MLP conditioned on the
Transformer's hidden state z, trained on noised tokens and sampled with a respaced DDPM chain.

In the paper's framing it maximises a denoising (Hyvarinen-type) score instead of the energy
score. Its cost at sampling time is one MLP call per denoising step per token, where the energy
head needs one in all: the speed gap the paper reports.
"""
import math

import torch
import torch.nn as nn

from models.diffusion import Diffusion, cosine_betas
from models.scoreloss import FinalLayer, ResBlock, init_modulated_mlp, masked_rows, run_block

TRAIN_TIMESTEPS = 1000


class TimestepEmbedder(nn.Module):
    """Timestep t (N,) -> (N, width): sinusoids of `frequencies` geometric frequencies (periods
    from 2 pi to 2 pi * 10000), then Linear -> SiLU -> Linear."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(self.mlp[0].weight.dtype))


class Denoiser(nn.Module):
    """(noised token x_t (N, D), timestep t (N,), hidden state z (N, C)) -> (N, 2D): the predicted
    noise and the per-dimension variance interpolation v. A residual MLP adaLN-modulated by
    timestep embedding + Linear(z)."""
    grad_checkpointing = False  # EAR's flag: recompute the residual blocks in backward

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * token_dim)
        init_modulated_mlp(self, self.res_blocks, self.final_layer)
        for m in self.time_embed.mlp[::2]:  # the timestep MLP starts small, as in DiT
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = self.time_embed(t) + self.cond_embed(z)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = run_block(self, block, h, cond)
        return self.final_layer(h, cond)


class DiffLoss(nn.Module):
    """The diffusion head.

    Args:
        token_dim, z_dim: token dimension D and hidden-state width C.
        diffloss_d, diffloss_w: denoiser depth and width (MAR-B: 6 x 1024).
        num_sampling_steps: denoising steps when sampling, respaced from the 1000 of training.
        diffusion_batch_mul: each masked token is noised this many times per step (MAR: 4),
            each with its own timestep and noise.
    Sampling: ancestral, from pure noise; `temperature` multiplies the noise added at each step.
    Guidance acts on the predicted noise, eps = eps_u + cfg (eps_c - eps_u), with one chain per
    token (both halves see the same x_t) and the conditional half's variance.
    """
    attribute = "diffloss"  # MAR's name for it
    own_optimizer_group = False  # full lr, as MAR (no lr scale)
    decay_matrices = False  # MAR puts every parameter under `diffloss` in its no-decay group
    FLAGS = {
        "diffloss_d": ("denoiser depth (MAR-B: 6)", True),
        "diffloss_w": ("denoiser width (MAR-B: 1024)", True),
        "num_sampling_steps": ("denoising steps per token when sampling (of 1000)", False),
        "diffusion_batch_mul": ("noise draws per masked token and step", False),
    }
    SAMPLING = ("num_sampling_steps",)  # named in sample folders and evaluation results
    SIZES = {"ear_base": dict(diffloss_d=6, diffloss_w=1024),
             "ear_large": dict(diffloss_d=8, diffloss_w=1280),
             "ear_huge": dict(diffloss_d=12, diffloss_w=1536),
             "ear_tiny": dict(diffloss_d=3, diffloss_w=128)}

    def __init__(self, token_dim: int, z_dim: int, diffloss_d: int = 6, diffloss_w: int = 1024,
                 num_sampling_steps: int = 100, diffusion_batch_mul: int = 4):
        super().__init__()
        if diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {diffusion_batch_mul}")
        self.token_dim, self.diffusion_batch_mul = token_dim, diffusion_batch_mul
        self.num_sampling_steps = num_sampling_steps
        self.processes = {}
        # The schedule's tables are plain CPU tensors even when the module is built under
        # another default device (the meta device, to compare a config with weights' shapes).
        with torch.device("cpu"):
            self.betas = cosine_betas(TRAIN_TIMESTEPS)
            self.process(num_sampling_steps, "cpu")  # reject a bad step count now
        self.net = Denoiser(token_dim, z_dim, diffloss_w, diffloss_d)

    def process(self, num_steps: int, device) -> Diffusion:
        """The process respaced to num_steps (1000: training's), its tables on `device`; built
        once per (steps, device)."""
        key = (num_steps, str(device))
        if key not in self.processes:
            self.processes[key] = Diffusion.respaced(self.betas, num_steps, device)
        return self.processes[key]

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Mean hybrid diffusion loss over the rows of target (N, D) where mask is 1, each row
        noised `diffusion_batch_mul` times at uniform random timesteps."""
        target, z = masked_rows(target, z, mask, self.diffusion_batch_mul)
        t = torch.randint(0, TRAIN_TIMESTEPS, (len(target),), device=target.device)
        noise = torch.randn_like(target)
        model = lambda x, steps: self.net(x, steps, z).chunk(2, dim=-1)
        process = self.process(TRAIN_TIMESTEPS, target.device)
        return process.training_loss(model, target, t, noise).mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature=1.0, cfg: float = 1.0) -> torch.Tensor:
        """One token per row of z (N, C) -> (N, D); with cfg != 1, z is [z_cond; z_uncond] and
        N/2 tokens come back. `temperature`: a number or a 0-d tensor."""
        process = self.process(self.num_sampling_steps, z.device)
        if cfg == 1.0:
            model = lambda x, t: self.net(x, t, z).chunk(2, dim=-1)
        else:
            def model(x, t):
                eps, v = self.net(torch.cat([x, x]), torch.cat([t, t]), z).chunk(2, dim=-1)
                (eps_c, eps_u), (v_c, _) = eps.chunk(2), v.chunk(2)
                return eps_u + cfg * (eps_c - eps_u), v_c
        rows = len(z) if cfg == 1.0 else len(z) // 2
        noise = torch.randn(rows, self.token_dim, device=z.device)
        return process.sample(model, noise, temperature).to(z.dtype)

    def compile_for_training(self) -> None:
        self.net.compile(dynamic=True)
