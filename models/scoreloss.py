"""The EAR output head: an MLP generator trained with the energy score.

For every token the Transformer emits a hidden state z. The generator turns z and a fresh
uniform noise vector into one sample of the token, so calling it N times with the same z gives N
independent samples x_1..x_N from the distribution P it has learned for that token. With d(a, b)
= ||a - b||^alpha, the loss maximises the score

    S = tau * mean over pairs i < j of d(x_i, x_j)  -  (2 / N) * sum_i mean_m d(x_i, y_m)

against the token's targets y_1..y_M. With N = 2 and one target y (the paper's) this is
tau * d(x1, x2) - d(x1, y) - d(x2, y). For every N >= 2 and M >= 1 it is an unbiased estimate of
tau * E d(X, X') - 2 E d(X, Y) (X, X' ~ P independent, Y the target's distribution): every pair
term has expectation E d(X, X'), every draw-target term E d(X, Y), and the weights sum to 1 and 2.
That expectation is maximised exactly when P equals the target distribution (a strictly proper
scoring rule for alpha in (0, 2) and tau = 1), so training needs no likelihood. More draws
(`score_samples`) use N(N-1)/2 pairs for N generator rows (one call); more targets (`score_targets`, drawn by
the training loop from the tokenizer's posterior) average the fidelity term over them.
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


def distance(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """||a - b||^alpha over the last dimension: (..., D) -> (...)."""
    # At initialisation the generator outputs exactly 0, so two samples are equal and their
    # distance is 0, where d/dn n^alpha is infinite for alpha < 1. Take the power of every
    # distance but an exact zero: same value, gradient 0 at a zero distance instead of NaN.
    # (Testing `n == 0` rather than `n > 0` lets a NaN distance through as NaN, so the training
    # guard sees it.)
    n = torch.linalg.vector_norm(a - b, dim=-1)
    zero = n == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, n).pow(alpha))


def energy_score(draws, target: torch.Tensor, alpha: float = 1.0,
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-row energy score of N >= 2 independent draws against the targets (higher is better).

    draws: N tensors (R, D), draw i of every row. target: (R, D), one target per row, or
    (R, M, D), M targets per row. Returns (R,): tau * mean_{i<j} d(x_i, x_j) - (2/N) sum_i
    mean_m d(x_i, y_m). With N = 2 and one target the operations are tau * d12 - d1 - d2's, bit
    for bit. Otherwise the score is recomputed in backward rather than kept: autograd holds the
    draws and targets only, not the N(N-1)/2 pair differences (R, D) or the (R, M, D) ones.
    """
    n = len(draws)
    if n < 2:
        raise ValueError(f"the energy score needs at least 2 draws per row, got {n}")
    if (n > 2 or target.dim() == 3) and torch.is_grad_enabled():
        return checkpoint(pairs_and_targets, target, alpha, temperature, *draws, use_reentrant=False)
    return pairs_and_targets(target, alpha, temperature, *draws)


def pairs_and_targets(target: torch.Tensor, alpha: float, temperature: float, *draws) -> torch.Tensor:
    """energy_score's formula, term by term: the pairs one at a time, then each draw's targets."""
    n = len(draws)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    score = temperature * (sum(distance(draws[i], draws[j], alpha) for i, j in pairs) / len(pairs))
    for x in draws:
        fidelity = (distance(x, target, alpha) if target.dim() == 2
                    else distance(x[:, None], target, alpha).mean(1))
        score = score - (2 / n) * fidelity
    return score


def masked_rows(target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None,
                copies: int = 1) -> tuple:
    """The rows of target (N, D) and z (N, C) where mask (N,) is 1 (all rows when mask is None),
    each repeated `copies` times, so that a head spends nothing on the rows that do not count:
    ((M * copies, D), (M * copies, C)). A target (N, T, D) of T targets per row keeps them:
    (M * copies, T, D)."""
    if mask is not None:
        keep = mask.bool()
        target, z = target[keep], z[keep]
    return target.repeat(copies, *[1] * (target.dim() - 1)), z.repeat(copies, 1)


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
        score_batch_mul: each masked token is scored this many times, each time with its own
            draws (the loss averages them).
        score_samples: N >= 2, the generator's draws per scoring (2: the paper's pair). A masked
            token costs score_batch_mul * score_samples generator rows: the paper's recipe
            (score_batch_mul 2, N 2) and score_batch_mul 1 with N 4 both run 4 rows per token and
            estimate the same expectation, the second from 6 pairs instead of 2.
    The loss takes one target per row, or several (training's --score_targets): (N, M, D).
    """
    attribute = "scoreloss"  # the reference checkpoints' prefix
    own_optimizer_group = True
    many_targets = True  # forward takes (R, M, D) targets (training's --score_targets)
    FLAGS = {
        "scoreloss_d": ("generator depth", True),
        "scoreloss_w": ("generator width", True),
        "noise_channels": ("generator input-noise dimension", True),
        "alpha": ("energy-score exponent, in (0, 2]", False),
        "train_temperature": ("weight (<= 1) of the sample-sample distance in the loss", False),
        # The flag defaults to 1, as the reference's does; the constructor keeps 2, the paper's
        # setting and this project's earlier default. The third entry is the flag's default.
        "score_batch_mul": ("times each masked token is scored, each with its own draws", False, 1),
        "score_samples": ("generator draws per scoring (2: the paper's pair; the diversity term "
                          "averages all N(N-1)/2 pairs)", False),
    }
    SIZES = {"ear_base": dict(scoreloss_d=6, scoreloss_w=1024),
             "ear_large": dict(scoreloss_d=8, scoreloss_w=1280),
             "ear_huge": dict(scoreloss_d=12, scoreloss_w=1536),
             "ear_tiny": dict(scoreloss_d=3, scoreloss_w=128)}

    def __init__(self, token_dim: int, z_dim: int, scoreloss_d: int = 6, scoreloss_w: int = 1024,
                 noise_channels: int = 64, alpha: float = 1.0, train_temperature: float = 1.0,
                 score_batch_mul: int = 2, score_samples: int = 2):
        super().__init__()
        check_alpha_temperature(alpha, train_temperature)
        if score_batch_mul < 1:
            raise ValueError(f"score_batch_mul must be >= 1, got {score_batch_mul}")
        if score_samples < 2:
            raise ValueError(f"score_samples must be >= 2 (the diversity term compares draws), "
                             f"got {score_samples}")
        self.alpha = alpha
        self.train_temperature = train_temperature
        self.score_batch_mul, self.score_samples = score_batch_mul, score_samples
        self.net = NoiseMLP(z_dim, scoreloss_w, scoreloss_d, token_dim, noise_channels)

    def generate(self, z: torch.Tensor, temperature=1.0) -> torch.Tensor:
        """One sample per row of z (N, C), with fresh noise for every row -> (N, D);
        `temperature`: a number or a 0-d tensor."""
        noise = torch.rand(z.shape[0], self.net.noise_channels, device=z.device, dtype=z.dtype) - 0.5
        return self.net(z, noise, temperature)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Mean negative energy score.

        target: (R, D), or (R, M, D) for M targets per row; z: (R, C); mask: optional (R,),
        1 = row enters the loss. Rows with mask 0 are dropped before the generator runs, so they
        cost nothing and change nothing. Each kept row is repeated `score_batch_mul` times, each
        copy with its own `score_samples` draws, all from one generator call.
        """
        target, z = masked_rows(target, z, mask, self.score_batch_mul)
        draws = self.generate(torch.cat([z] * self.score_samples)).chunk(self.score_samples)
        score = energy_score(draws, target, self.alpha, self.train_temperature)
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
