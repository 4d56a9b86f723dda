"""The Gaussian-mixture head (GIVT): the hidden state z gives a k-component mixture of diagonal
Gaussians over the token, trained by its negative log-likelihood, the logarithmic score.

In the paper's framing: the log score is strictly proper too, but it needs a density, so the
distribution is confined to a parametric family; the energy score needs only samples.

As GIVT's release builds it (Tschannen et al., "GIVT: Generative Infinite-Vocabulary
Transformers", ECCV 2024, arXiv 2312.02116; code: google-research/big_vision,
`big_vision/models/proj/givt/givt.py`, ImageNet config: k = 16, `fix_square_plus=True`):
a zero-initialised output layer; scales
squareplus(raw) floored at 1e-6; the loss is the NLL of the whole token (summed over its
channels), averaged over tokens; the temperature multiplies the scales and a separate one
multiplies the mixture logits; guidance on densities, p_c^cfg p_u^(1-cfg), sampled per channel
by rejection. Ours: the residual MLP blocks before the output layer (GIVT has the single linear
layer on the Transformer's output), hidden-state guidance as an option, and dequantisation of
the targets for data on a coarse grid (see GMMLoss).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.scoreloss import guided_hidden_state, masked_rows, run_block

MIN_SCALE = 1e-6  # GIVT's floor on the scales

# GIVT's guided sampler (rejection per channel): tries, and the grid (loc_c +- GRID_RADIUS, in
# GRID_POINTS points: the count is ours, 0.01 apart) on which the bound of target / proposal
# is found.
REJECTION_TRIES = 1000
GRID_RADIUS, GRID_POINTS = 10.0, 2001


def squareplus(x: torch.Tensor) -> torch.Tensor:
    """(x + sqrt(x^2 + 4)) / 2: positive, 1 at 0, ~x for large x, ~1/|x| for very negative x."""
    return (x + torch.sqrt(x * x + 4.0)) / 2


def mixture_log_prob(logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """log p(x) under sum_k softmax(logits)_k N(x; means_k, diag(scales_k^2)).

    logits (N, k), means and scales (N, k, D), x (N, D) -> (N,), in nats.
    """
    z = (x[:, None, :] - means) / scales
    component = -0.5 * z.pow(2).sum(-1) - scales.log().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + component, dim=-1)


def gaussian_log_kernel(x, loc, scale):
    """log N(x; loc, scale^2) up to the constant -log(2 pi)/2 (it cancels in every ratio here)."""
    return -0.5 * ((x - loc) / scale).pow(2) - scale.log()


def guided_log_ratio(x, loc_c, scale_c, loc_u, scale_u, proposal_scale, cfg: float):
    """log of target(x) / proposal(x) up to a constant: the target is N(loc_c, scale_c)^cfg *
    N(loc_u, scale_u)^(1 - cfg), the proposal N(loc_c, proposal_scale). Broadcasts."""
    return (cfg * gaussian_log_kernel(x, loc_c, scale_c)
            + (1 - cfg) * gaussian_log_kernel(x, loc_u, scale_u)
            - gaussian_log_kernel(x, loc_c, proposal_scale))


def guided_gaussian_sample(loc_c: torch.Tensor, scale_c: torch.Tensor, loc_u: torch.Tensor,
                           scale_u: torch.Tensor, cfg: float, tries: int = REJECTION_TRIES) -> tuple:
    """One draw per element from the density proportional to N(loc_c, scale_c)^cfg *
    N(loc_u, scale_u)^(1 - cfg), by rejection as GIVT's guided sampler: proposal
    Normal(loc_c, 2 max(scale_c, scale_u)), bound M = max of target / proposal on the grid
    loc_c +- GRID_RADIUS (GRID_POINTS points), a proposal x accepted when
    u < target(x) / (M proposal(x)); at most `tries` proposals per element, all elements at
    once (each round draws only for those still pending).

    Arguments (N, D) (they broadcast) -> (draws (N, D), exhausted (N, D) bool). An element still
    unaccepted after `tries` proposals gets an unguided draw from N(loc_c, scale_c), and
    `exhausted` marks it (ours: this happens when the target lies far out in the proposal's
    tail or is not normalisable, cfg > 1 with scale_u^2 < scale_c^2 (cfg - 1) / cfg; it then
    grows towards the grid's edge, and the edge, loc_c +- 10, is no sample to fall back on).
    """
    loc_c, scale_c, loc_u, scale_u = torch.broadcast_tensors(loc_c, scale_c, loc_u, scale_u)
    proposal_scale = 2 * torch.maximum(scale_c, scale_u)
    params = (loc_c, scale_c, loc_u, scale_u, proposal_scale)

    # The bound, in chunks of rows: the whole grid would be N * D * GRID_POINTS values at once.
    offsets = torch.linspace(-GRID_RADIUS, GRID_RADIUS, GRID_POINTS, dtype=loc_c.dtype, device=loc_c.device)
    log_bound = torch.empty_like(loc_c)
    rows = max(1, 2 ** 22 // (GRID_POINTS * max(1, loc_c[:1].numel())))
    for i in range(0, len(loc_c), rows):
        part = [p[i:i + rows, ..., None] for p in params]
        log_bound[i:i + rows] = guided_log_ratio(part[0] + offsets, *part, cfg).amax(-1)

    draws = loc_c + scale_c * torch.randn_like(loc_c)  # kept only where every try fails
    pending = torch.ones_like(loc_c, dtype=torch.bool)
    for _ in range(tries):
        idx = pending.nonzero(as_tuple=True)
        if not len(idx[0]):
            break
        loc, scale = loc_c[idx], proposal_scale[idx]
        x = loc + scale * torch.randn_like(loc)
        accept = torch.rand_like(x).log() < guided_log_ratio(x, *(p[idx] for p in params), cfg) - log_bound[idx]
        accepted = tuple(i[accept] for i in idx)
        draws[accepted], pending[accepted] = x[accept], False
    return draws, pending


class MixtureMLP(nn.Module):
    """z (N, C) -> mixture parameters: `depth` pre-norm residual MLP blocks of `width` (none: a
    single linear map of z, as GIVT), then a zero-initialised Linear to k logits, k means and
    k raw scales (GIVT's output layer). `init_spread` > 0 (ours) starts the component means at
    offsets drawn from N(0, init_spread^2), one per component and channel, instead of all at 0."""
    grad_checkpointing = False  # EAR's flag: recompute the residual blocks in backward

    def __init__(self, z_dim: int, token_dim: int, components: int, depth: int, width: int,
                 init_spread: float = 0.0):
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
        # GIVT zero-initialises the output layer: at the start every component is N(0, I)
        # (raw scale 0 -> squareplus 1) with equal weights, whatever z is.
        nn.init.zeros_(self.out.weight)
        if init_spread:
            # Identical components get identical gradients and only rounding separates them:
            # distinct starting means break the tie from the first step (weights stay equal).
            nn.init.normal_(self.out.bias[components:components * (1 + token_dim)], std=init_spread)

    def forward(self, z: torch.Tensor) -> tuple:
        """-> logits (N, k), means (N, k, D), scales (N, k, D) (squareplus, floored at 1e-6)."""
        h = self.input_proj(z)
        for block in self.res_blocks:
            h = h + run_block(self, block, h)
        # The mixture parameters in float32 even under fp16/bf16 autocast: half-precision means
        # would quantise the density far more coarsely than the smallest scale.
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.out(self.norm_out(h.to(self.out.weight.dtype)))
        k, d = self.components, self.token_dim
        logits, means, raw = out.split([k, k * d, k * d], dim=-1)
        return logits, means.view(-1, k, d), squareplus(raw.view(-1, k, d)).clamp(min=MIN_SCALE)


class GMMLoss(nn.Module):
    """The Gaussian-mixture head.

    Args:
        token_dim, z_dim: token dimension D and hidden-state width C.
        gmm_components: mixture components k (GIVT: 16).
        gmm_d, gmm_w: residual MLP blocks and their width between z and the mixture parameters
            (0 blocks: GIVT's single linear layer). Ours: the named sizes give the head the
            energy head's depth and width, so that the heads compare at a similar size and a
            difference in quality is the score's and the family's, not a smaller network's.
        gmm_temperature_probs: multiplies the mixture logits when sampling (GIVT's
            `temperature_probs`); the sampling temperature multiplies the scales (GIVT's
            `temperature_scales`).
        gmm_guidance: "density" (GIVT's): the component is drawn from the conditional mixture
            and the same index is used for the unconditional one; each channel is drawn from
            p_c^cfg p_u^(1-cfg) by rejection (guided_gaussian_sample). "hidden" (ours, as the
            energy head): one mixture from z = cfg z_c + (1 - cfg) z_u.
        gmm_dequantize: ours, for data on a grid (the digits' 17 grey levels, 2/16 apart in
            [-1, 1]): training adds uniform noise of this width to the targets. 0 (default):
            none, as GIVT on continuous VAE latents. Without it the log score on such data has
            no minimum: the components narrow onto the grid points until the scales hit the
            floor, and the loss falls without bound.
        gmm_init_spread: ours. 0 (default): GIVT's zero-initialised output layer, every
            component the same N(0, I) at the start. Above 0: the component means start at
            offsets drawn from N(0, gmm_init_spread^2) (see docs/heads.md: whether they mix).
    Loss: the mixture's negative log-likelihood of each token (nats, summed over its channels),
    averaged over the masked rows.
    """
    attribute = "gmmloss"
    own_optimizer_group = False
    FLAGS = {
        "gmm_components": ("mixture components (GIVT: 16)", True),
        "gmm_d": ("residual MLP blocks before the mixture parameters (0: linear, as GIVT)", True),
        "gmm_w": ("their width", True),
        "gmm_temperature_probs": ("multiplies the mixture logits when sampling (GIVT's "
                                  "temperature_probs; --temperature multiplies the scales)", False),
        "gmm_guidance": ("density: GIVT's guidance on the densities, by rejection; hidden: "
                         "mix the hidden states, as the energy head", False),
        "gmm_dequantize": ("width of the uniform noise added to the training targets, for data "
                           "on a grid (digits: 0.125); 0: none, as GIVT", False),
        "gmm_init_spread": ("std of the component means' random starting offsets (0: GIVT's "
                            "zero-initialised output layer, identical components)", False),
    }
    SAMPLING = ("gmm_temperature_probs", "gmm_guidance")  # named in sample folders and results
    SIZES = {"ear_base": dict(gmm_d=6, gmm_w=1024),
             "ear_large": dict(gmm_d=8, gmm_w=1280),
             "ear_huge": dict(gmm_d=12, gmm_w=1536),
             "ear_tiny": dict(gmm_d=3, gmm_w=128)}
    GUIDANCE = ("density", "hidden")
    CHOICES = {"gmm_guidance": GUIDANCE}  # the values a text setting may take (flags, files)

    def __init__(self, token_dim: int, z_dim: int, gmm_components: int = 16, gmm_d: int = 0,
                 gmm_w: int = 1024, gmm_temperature_probs: float = 1.0,
                 gmm_guidance: str = "density", gmm_dequantize: float = 0.0,
                 gmm_init_spread: float = 0.0):
        super().__init__()
        if gmm_components < 1:
            raise ValueError(f"gmm_components must be >= 1, got {gmm_components}")
        if gmm_guidance not in self.GUIDANCE:
            raise ValueError(f"gmm_guidance must be one of {self.GUIDANCE}, got {gmm_guidance!r}")
        if gmm_dequantize < 0:
            raise ValueError(f"gmm_dequantize must be >= 0, got {gmm_dequantize}")
        if not (math.isfinite(gmm_init_spread) and gmm_init_spread >= 0):
            raise ValueError(f"gmm_init_spread must be a finite number >= 0, got {gmm_init_spread}")
        self.temperature_probs, self.guidance = gmm_temperature_probs, gmm_guidance
        self.dequantize = gmm_dequantize
        self.net = MixtureMLP(z_dim, token_dim, gmm_components, gmm_d, gmm_w, gmm_init_spread)
        # Since construction: the density-guided draws (one per channel), and those of them the
        # rejection sampler gave up on (an unguided draw instead). Evaluation reports both.
        self.guided_draws, self.exhausted = 0, 0

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Mean over the masked rows of -log p(target row), target (N, D), z (N, C)."""
        target, z = masked_rows(target, z, mask)
        if self.dequantize:
            target = target + self.dequantize * (torch.rand_like(target) - 0.5)
        logits, means, scales = self.net(z)
        return -mixture_log_prob(logits.float(), means.float(), scales.float(), target.float()).mean()

    def pick(self, logits: torch.Tensor, *params: torch.Tensor) -> list:
        """A component per row from softmax(logits * temperature_probs): each of params
        (N, k, D) -> its row's component (N, D)."""
        probs = F.softmax(logits.float() * self.temperature_probs, dim=-1)
        index = torch.multinomial(probs, 1)[:, :, None].expand(-1, 1, params[0].shape[-1])
        return [p.gather(1, index)[:, 0] for p in params]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature=1.0, cfg: float = 1.0) -> torch.Tensor:
        """One token per row of z (N, C) -> (N, D); with cfg != 1, z is [z_cond; z_uncond] and
        N/2 tokens come back. `temperature` (a number or a 0-d tensor) multiplies the scales."""
        if cfg == 1.0 or self.guidance == "hidden":
            logits, means, scales = self.net(guided_hidden_state(z, cfg))
            mean, scale = self.pick(logits, means.float(), scales.float())
            return (mean + scale * temperature * torch.randn_like(mean)).to(z.dtype)
        logits, means, scales = self.net(z)
        (logits_c, _), (means_c, means_u), (scales_c, scales_u) = (
            t.float().chunk(2) for t in (logits, means, scales))
        loc_c, scale_c, loc_u, scale_u = self.pick(logits_c, means_c, scales_c, means_u, scales_u)
        # (Temperature 0 would make the scales 0: keep GIVT's floor.)
        draws, exhausted = guided_gaussian_sample(
            loc_c, (scale_c * temperature).clamp(min=MIN_SCALE), loc_u,
            (scale_u * temperature).clamp(min=MIN_SCALE), cfg)
        self.guided_draws += exhausted.numel()
        self.exhausted += int(exhausted.sum())
        return draws.to(z.dtype)

    def compile_for_training(self) -> None:
        self.net.compile(dynamic=True)
