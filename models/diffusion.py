"""Gaussian diffusion over token vectors, as MAR's diffusion loss uses it: DDPM (Ho et al. 2020)
with the improvements of Nichol & Dhariwal (2021): the cosine noise schedule, variances learned
through the variational bound (the "hybrid" objective), and sampling on a respaced subset of the
timesteps. Rows are tokens: x (N, D); every table is float64 and indexed per row.

    forward process  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    posterior        q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t)
    model            p(x_{t-1} | x_t) = N(c1_t x0_hat + c2_t x_t, sigma_t^2), with
                     x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) and
                     log sigma_t^2 = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2
"""
import math

import torch

LOG2 = math.log(2.0)


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - abar(t+1)/abar(t) for abar(t) = cos^2(((t/T) + 0.008)/1.008 * pi/2), clipped
    at max_beta (near t = T the ratio goes to 0)."""
    abar = lambda t: math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar(t + 1) / abar(t), max_beta) for t in range(num_timesteps)],
                        dtype=torch.float64)


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF by the tanh approximation improved-DDPM (and so MAR) uses:
    0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). It is off the exact CDF by up to 2e-4, and
    far in the tails it rounds to exactly 0 or 1; we use it anyway because MAR's loss at t = 0
    is defined with it (with the exact CDF the t = 0 term differs by up to ~5 nats)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_nll(x, mean, log_var, half_width: float = 1 / 255) -> torch.Tensor:
    """DDPM's decoder term L_0 per element, in nats, in improved-DDPM's form (which MAR keeps
    for its continuous tokens): -log of the mass N(mean, e^log_var) puts on the bin
    [x - half_width, x + half_width] around x (the data as 8-bit values in [-1, 1]), the edge
    bins (|x| > 0.999) reaching to +-infinity, with the CDF's tanh approximation and each
    probability clamped at 1e-12. All tensors broadcast; the result has their shape."""
    inv_std = torch.exp(-0.5 * log_var)
    cdf_upper = approx_normal_cdf(inv_std * (x - mean + half_width))
    cdf_lower = approx_normal_cdf(inv_std * (x - mean - half_width))
    # The three cases as improved-DDPM writes them: the lower edge bin is P(X < x + h), the
    # upper one P(X > x - h) = 1 - CDF (cancellation and all: the clamp bounds it), the rest
    # the difference of the two CDF values.
    log_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_one_minus_lower, log_mass))


def kept_timesteps(num_timesteps: int, num_steps: int) -> list:
    """The training timesteps a respaced process of `num_steps` steps keeps, as improved-DDPM's
    `space_timesteps` (and so MAR) picks them: start at 0 and add the float stride
    (T - 1) / (N - 1) N times, keeping Python's round() of each running sum (half to even).
    The rounding of the accumulated floats decides ties, so e.g. 21 steps keep 499, not the 500
    that round(i * 999 / 20) gives; only this exact rule reproduces MAR's tables.

    One step is ours: improved-DDPM keeps timestep 0 there, a chain that starts from noise at
    the noise level of t = 0 (MAR's sampler fails on it); we keep T - 1, one jump straight from
    pure noise to the model's estimate of x_0."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_sampling_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (num_steps - 1)
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return kept


class Diffusion:
    """The process for one sequence of betas. `timesteps[i]` is the training timestep that step i
    stands for: the network is always conditioned on training timesteps, so a respaced process
    (fewer, larger steps) runs the same network."""

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor = None, device="cpu"):
        self.betas = betas.double().to(device)
        self.num_steps = len(betas)
        self.timesteps = (torch.arange(self.num_steps) if timesteps is None else timesteps).to(device)
        alphas = 1.0 - self.betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt(), (1.0 - abar).sqrt()
        self.sqrt_recip_abar, self.sqrt_recip_abar_m1 = (1.0 / abar).sqrt(), (1.0 / abar - 1).sqrt()
        variance = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta~_0 is 0: its log takes beta~_1's value (a one-step process: beta_0's), so the
        # interpolation range stays finite.
        first = variance[1:2] if self.num_steps > 1 else self.betas[:1]
        self.posterior_log_var = torch.log(torch.cat([first, variance[1:]]))
        self.log_betas = torch.log(self.betas)
        self.posterior_c1 = self.betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_c2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

    @classmethod
    def respaced(cls, betas: torch.Tensor, num_steps: int, device="cpu") -> "Diffusion":
        """The process of `betas` on the `num_steps` timesteps `kept_timesteps` gives: step i
        jumps from kept timestep k_i to k_{i-1}, with beta = 1 - abar_{k_i} / abar_{k_{i-1}}."""
        keep = torch.tensor(kept_timesteps(len(betas), num_steps))
        abar = torch.cumprod(1.0 - betas.double(), 0)[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return cls(1.0 - abar / abar_prev, keep, device)

    @staticmethod
    def at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as a column (N, 1) in like's dtype (the tables live on like's device)."""
        return table[t].to(like.dtype)[:, None]

    def q_sample(self, x0, t, noise):
        return self.at(self.sqrt_abar, t, x0) * x0 + self.at(self.sqrt_one_minus_abar, t, x0) * noise

    def q_posterior(self, x0, xt, t) -> tuple:
        mean = self.at(self.posterior_c1, t, x0) * x0 + self.at(self.posterior_c2, t, x0) * xt
        return mean, self.at(self.posterior_log_var, t, x0).expand_as(x0)

    def p_mean_log_var(self, eps, v, xt, t) -> tuple:
        """The model's p(x_{t-1} | x_t): mean and log-variance from its noise prediction eps and
        its variance interpolation v in [-1, 1] (log beta~_t at -1, log beta_t at +1)."""
        frac = (v + 1) / 2
        log_var = frac * self.at(self.log_betas, t, xt) + (1 - frac) * self.at(self.posterior_log_var, t, xt)
        x0 = self.at(self.sqrt_recip_abar, t, xt) * xt - self.at(self.sqrt_recip_abar_m1, t, xt) * eps
        mean = self.at(self.posterior_c1, t, xt) * x0 + self.at(self.posterior_c2, t, xt) * xt
        return mean, log_var

    def training_loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-row hybrid loss at training timesteps t (N,): the noise MSE plus the variational
        bound term L_t (bits per dimension) for the variance, with the noise prediction held
        fixed in L_t so that only the MSE trains the mean. This is L_simple + lambda * L_vlb
        with lambda = 1/T and L_vlb estimated by T * L_t. L_0, the decoder term, is the
        discretized Gaussian NLL of x_0, as DDPM and MAR have it.
        `model(x_t, t) -> (eps, v)`, each (N, D)."""
        xt = self.q_sample(x0, t, noise)
        eps, v = (o.float() for o in model(xt, self.timesteps[t]))
        mse = (noise - eps).pow(2).mean(-1)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_log_var(eps.detach(), v, xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(-1) / LOG2
        nll = discretized_gaussian_nll(x0, mean, log_var).mean(-1) / LOG2
        return mse + torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling from x_T = noise (N, D): x_{t-1} = mean + sigma_t * z * temperature,
        z ~ N(0, I), no noise on the last step. `model(x_t, t) -> (eps, v)`."""
        x = noise.float()
        for i in reversed(range(self.num_steps)):
            t = torch.full((len(x),), i, dtype=torch.long, device=x.device)
            eps, v = (o.float() for o in model(x, self.timesteps[t]))
            mean, log_var = self.p_mean_log_var(eps, v, x, t)
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * torch.randn_like(x) * temperature
        return x
