"""The Gaussian-mixture head (GIVT): the hidden state z gives a k-component mixture of diagonal
Gaussians over the token, trained by its negative log-likelihood, the logarithmic score.

In the paper's framing: the log score is strictly proper too, but it needs a density, so the
distribution is confined to a parametric family; the energy score needs only samples.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.scoreloss import guided_hidden_state, masked_rows

MIN_STD = 1e-4  # keeps the density finite when a component collapses onto a point


def mixture_log_prob(logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """log p(x) under sum_k softmax(logits)_k N(x; means_k, diag(stds_k^2)).

    logits (N, k), means and stds (N, k, D), x (N, D) -> (N,), in nats.
    """
    z = (x[:, None, :] - means) / stds
    component = -0.5 * z.pow(2).sum(-1) - stds.log().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + component, dim=-1)


class MixtureMLP(nn.Module):
    """z (N, C) -> mixture parameters: `depth` pre-norm residual MLP blocks of `width` (none: a
    single linear map of z, as GIVT), then a Linear to k logits, k means and k raw scales."""

    def __init__(self, z_dim: int, token_dim: int, components: int, depth: int, width: int):
        super().__init__()
        self.components, self.token_dim = components, token_dim
        self.input_proj = nn.Linear(z_dim, width) if depth else nn.Identity()
        self.res_blocks = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, width), nn.SiLU(),
                          nn.Linear(width, width)) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width if depth else z_dim, eps=1e-6)
        self.out = nn.Linear(width if depth else z_dim, components * (1 + 2 * token_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> tuple:
        """-> logits (N, k), means (N, k, D), stds (N, k, D) (softplus + MIN_STD)."""
        h = self.input_proj(z)
        for block in self.res_blocks:
            h = h + block(h)
        # The mixture parameters in float32 even under fp16/bf16 autocast: half-precision means
        # would quantise the density far more coarsely than the smallest standard deviation.
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.out(self.norm_out(h.to(self.out.weight.dtype)))
        k, d = self.components, self.token_dim
        logits, means, raw = out.split([k, k * d, k * d], dim=-1)
        return logits, means.view(-1, k, d), F.softplus(raw.view(-1, k, d)) + MIN_STD


class GMMLoss(nn.Module):
    """The Gaussian-mixture head.

    Args:
        token_dim, z_dim: token dimension D and hidden-state width C.
        gmm_components: mixture components k (GIVT: 16).
        gmm_d, gmm_w: residual MLP blocks and their width between z and the mixture parameters
            (0 blocks: a linear map, as GIVT's). The named sizes give it the energy head's
            depth and width, so the heads compare at a similar size.
    Loss: the mixture's negative log-likelihood per token dimension (nats), over masked rows.
    Sampling: a component from softmax(logits), then its Gaussian with the standard deviations
    times `temperature` (the logits are not sharpened). Guidance mixes hidden states as the
    energy head does, z = cfg z_c + (1 - cfg) z_u: a simplification of GIVT's guidance on
    densities, p_c^cfg p_u^(1-cfg), which for mixtures has no exact sampler.
    """
    attribute = "gmmloss"
    own_optimizer_group = False
    FLAGS = {
        "gmm_components": ("mixture components (GIVT: 16)", True),
        "gmm_d": ("residual MLP blocks before the mixture parameters (0: linear, as GIVT)", True),
        "gmm_w": ("their width", True),
    }
    SIZES = {"ear_base": dict(gmm_d=6, gmm_w=1024),
             "ear_large": dict(gmm_d=8, gmm_w=1280),
             "ear_huge": dict(gmm_d=12, gmm_w=1536),
             "ear_tiny": dict(gmm_d=3, gmm_w=128)}

    def __init__(self, token_dim: int, z_dim: int, gmm_components: int = 16, gmm_d: int = 0,
                 gmm_w: int = 1024):
        super().__init__()
        if gmm_components < 1:
            raise ValueError(f"gmm_components must be >= 1, got {gmm_components}")
        self.net = MixtureMLP(z_dim, token_dim, gmm_components, gmm_d, gmm_w)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        target, z = masked_rows(target, z, mask)
        logits, means, stds = self.net(z)
        return -mixture_log_prob(logits.float(), means.float(), stds.float(), target.float()).mean() / target.shape[-1]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0) -> torch.Tensor:
        logits, means, stds = self.net(guided_hidden_state(z, cfg))
        pick = torch.multinomial(F.softmax(logits.float(), dim=-1), 1)[:, :, None]
        pick = pick.expand(-1, 1, means.shape[-1])
        mean, std = means.gather(1, pick)[:, 0], stds.gather(1, pick)[:, 0]
        return (mean + std * temperature * torch.randn_like(mean)).to(z.dtype)

    def compile_for_training(self) -> None:
        self.net.compile(dynamic=True)
