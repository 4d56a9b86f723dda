"""The EAR output head: an MLP generator trained with the energy score.

For every token the Transformer emits a hidden state z. The generator turns z and a fresh
uniform noise vector into one sample of the token, so calling it twice with the same z gives two
independent samples x1, x2 from the distribution it has learned for that token. The energy score

    S(x1, x2, y) = tau * ||x1 - x2||^alpha - ||x1 - y||^alpha - ||x2 - y||^alpha

rewards samples that are close to the target y while staying spread out. Its expectation is
maximised exactly when the generator's distribution equals the data distribution (a strictly
proper scoring rule for alpha in (0, 2) and tau = 1), so training needs no likelihood.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def check_alpha_temperature(alpha: float, train_temperature: float) -> None:
    """Reject loss settings outside the range where the energy score is usable."""
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (0, 2], got {alpha}: the energy score is strictly "
                         "proper for alpha in (0, 2) (2 only matches means)")
    if train_temperature > 1.0:
        raise ValueError(f"train_temperature must be <= 1, got {train_temperature}: above 1 "
                         "the loss is unbounded below")


def energy_score(x1: torch.Tensor, x2: torch.Tensor, target: torch.Tensor,
                 alpha: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Per-row energy score of two samples against a target (higher is better).

    x1, x2, target: (N, D). Returns (N,).
    """
    def dist(a, b):
        # At initialisation the generator outputs exactly 0, so x1 == x2 and the distance is 0,
        # where d/dn n^alpha is infinite for alpha < 1. Take the power of every distance but an
        # exact zero: same value, gradient 0 at a zero distance instead of NaN. (Testing `n == 0`
        # rather than `n > 0` lets a NaN distance through as NaN, so the training guard sees it.)
        n = torch.linalg.vector_norm(a - b, dim=-1)
        zero = n == 0
        return torch.where(zero, 0.0, torch.where(zero, 1.0, n).pow(alpha))
    return temperature * dist(x1, x2) - dist(x1, target) - dist(x2, target)


def masked_rows(target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None,
                copies: int = 1) -> tuple:
    """The rows of target (N, D) and z (N, C) where mask (N,) is 1 (all rows when mask is None),
    each repeated `copies` times, so that a head spends nothing on the rows that do not count:
    ((M * copies, D), (M * copies, C))."""
    if mask is not None:
        keep = mask.bool()
        target, z = target[keep], z[keep]
    return target.repeat(copies, 1), z.repeat(copies, 1)


def guided_hidden_state(z: torch.Tensor, cfg: float) -> torch.Tensor:
    """Guidance on hidden states: z is [z_cond; z_uncond] (2M, C) when cfg != 1, and becomes
    cfg * z_cond + (1 - cfg) * z_uncond (M, C); with cfg == 1 it is returned as it is."""
    if cfg == 1.0:
        return z
    z_cond, z_uncond = z.chunk(2)
    return cfg * z_cond + (1 - cfg) * z_uncond


def run_block(owner: nn.Module, block: nn.Module, *inputs):
    """block(*inputs). While `owner` trains with its `grad_checkpointing` set (EAR sets it on
    its own and its head's networks), the block keeps no activations for backward and is run
    again there instead: memory for compute, the same values and gradients."""
    if owner.grad_checkpointing and owner.training:
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """Residual MLP block whose LayerNorm is shifted, scaled and gated by a conditioning vector
    (here the noise embedding; in the diffusion head, timestep plus hidden state)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, temperature=None) -> torch.Tensor:
        """x, cond: (N, w). `temperature` (a number or a 0-d tensor; None: 1, the diffusion
        head's) multiplies the shift (eval mode only)."""
        shift, scale, gate = self.adaLN_modulation(cond).chunk(3, dim=-1)
        if temperature is not None and not self.training:
            # In float32, as a Python number would be (a 0-d CUDA tensor would first be
            # rounded to a half-precision shift's dtype).
            shift = (shift.float() * temperature).to(shift.dtype)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Modulated LayerNorm (no affine) followed by the projection to the output."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_modulated_mlp(net: nn.Module, res_blocks, final_layer: FinalLayer) -> None:
    """Xavier-uniform weights and zero biases, then zero modulation outputs and last projection:
    every residual block starts as the identity and the untrained network outputs 0."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for m in [blk.adaLN_modulation[-1] for blk in res_blocks] + [final_layer.adaLN_modulation[-1],
                                                                  final_layer.linear]:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


class NoiseMLP(nn.Module):
    """Generator: (hidden state z, uniform noise) -> one token sample.

    Args:
        in_dim: width of the Transformer's hidden state z.
        width: the MLP's width (`scoreloss_w`).
        depth: number of residual blocks (`scoreloss_d`).
        out_dim: token dimension.
        noise_channels: dimension of the input noise.
    """
    grad_checkpointing = False  # EAR's flag: recompute the residual blocks in backward

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, noise_channels: int):
        super().__init__()
        self.noise_channels = noise_channels
        self.noise_embed = nn.Linear(noise_channels, width)
        self.input_proj = nn.Linear(in_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_modulated_mlp(self, self.res_blocks, self.final_layer)

    def forward(self, z: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z: (N, in_dim), noise: (N, noise_channels) -> samples (N, out_dim)."""
        x = self.input_proj(z)
        noise_emb = self.noise_embed(noise)
        for block in self.res_blocks:
            x = run_block(self, block, x, noise_emb, temperature)
        return self.final_layer(x, noise_emb)


class ScoreLoss(nn.Module):
    """The energy head: energy-score loss and sampler around the `NoiseMLP` generator (`net`).

    Args:
        token_dim: token dimension D.
        z_dim: width of the conditioning hidden state.
        scoreloss_d, scoreloss_w: generator depth and width.
        noise_channels: dimension of the Uniform[-0.5, 0.5] input noise.
        alpha: exponent of the distances, in (0, 2].
        train_temperature: weight tau <= 1 of the sample-sample distance in the loss.
        score_batch_mul: each masked token is scored with this many independent sample pairs.
    """
    attribute = "scoreloss"  # the reference checkpoints' prefix
    own_optimizer_group = True
    FLAGS = {
        "scoreloss_d": ("generator depth", True),
        "scoreloss_w": ("generator width", True),
        "noise_channels": ("generator input-noise dimension", True),
        "alpha": ("energy-score exponent, in (0, 2]", False),
        "train_temperature": ("weight (<= 1) of the sample-sample distance in the loss", False),
        # The flag defaults to 1, as the reference's does; the constructor keeps 2, the paper's
        # setting and this project's earlier default. The third entry is the flag's default.
        "score_batch_mul": ("independent sample pairs per masked token", False, 1),
    }
    SIZES = {"ear_base": dict(scoreloss_d=6, scoreloss_w=1024),
             "ear_large": dict(scoreloss_d=8, scoreloss_w=1280),
             "ear_huge": dict(scoreloss_d=12, scoreloss_w=1536),
             "ear_tiny": dict(scoreloss_d=3, scoreloss_w=128)}

    def __init__(self, token_dim: int, z_dim: int, scoreloss_d: int = 6, scoreloss_w: int = 1024,
                 noise_channels: int = 64, alpha: float = 1.0, train_temperature: float = 1.0,
                 score_batch_mul: int = 2):
        super().__init__()
        check_alpha_temperature(alpha, train_temperature)
        if score_batch_mul < 1:
            raise ValueError(f"score_batch_mul must be >= 1, got {score_batch_mul}")
        self.alpha = alpha
        self.train_temperature = train_temperature
        self.score_batch_mul = score_batch_mul
        self.net = NoiseMLP(z_dim, scoreloss_w, scoreloss_d, token_dim, noise_channels)

    def generate(self, z: torch.Tensor, temperature=1.0) -> torch.Tensor:
        """One sample per row of z (N, C), with fresh noise for every row -> (N, D);
        `temperature`: a number or a 0-d tensor."""
        noise = torch.rand(z.shape[0], self.net.noise_channels, device=z.device, dtype=z.dtype) - 0.5
        return self.net(z, noise, temperature)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Mean negative energy score.

        target: (N, D), z: (N, C), mask: optional (N,), 1 = row enters the loss. Rows with mask 0
        are dropped before the generator runs, so they cost nothing and change nothing. Each
        kept row is repeated `score_batch_mul` times, each copy with its own pair of samples.
        """
        target, z = masked_rows(target, z, mask, self.score_batch_mul)
        x1, x2 = self.generate(torch.cat([z, z])).chunk(2)
        score = energy_score(x1, x2, target, self.alpha, self.train_temperature)
        return -score.mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature=1.0, cfg: float = 1.0) -> torch.Tensor:
        """Draw one token per conditioning row.

        z: (N, C). With cfg != 1, z is the conditional half followed by the unconditional half
        (N = 2M); guidance mixes the hidden states, z = cfg * z_cond + (1 - cfg) * z_uncond,
        before the generator, and M samples are returned. `temperature` (a number or a 0-d
        tensor) scales the residual blocks' shifts (eval mode only). Returns (N or N/2, D).
        """
        # The generator gets the temperature as a float32 tensor on z's device (no copy when it
        # is one already, as EAR.sample_tokens passes it): a compiled generator takes it as an
        # input rather than recompiling for each value.
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=z.device)
        return self.generate(guided_hidden_state(z, cfg), temperature)

    def compile_for_training(self) -> None:
        # The loss's row count follows the mask ratio: compile the MLP for dynamic shapes.
        self.net.compile(dynamic=True)
