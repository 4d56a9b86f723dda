"""The diffusion and mixture heads against the facts of MAR's release (LTH14/mar: models/diffloss.py
and its diffusion/ package, from improved-DDPM) and GIVT's (google-research/big_vision:
big_vision/models/proj/givt/givt.py), each checked by an independent computation written here
from the papers' formulas."""
import math

import numpy as np
import pytest
import torch

from models.diffloss import DiffLoss
from models.diffusion import Diffusion, cosine_betas, discretized_gaussian_nll
from models.ear import EAR
from models.gmmloss import GMMLoss, guided_gaussian_sample
from util.args import train_parser
from util.optim import param_groups


def small_ear(head, **settings):
    torch.manual_seed(0)
    return EAR(img_size=8, vae_stride=4, vae_embed_dim=4, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=4, class_num=3, buffer_size=4, head=head, **settings)


# ----- MAR ---------------------------------------------------------------------------------

def test_no_diffusion_parameter_is_weight_decayed_and_the_generator_keeps_its_group():
    """MAR: every parameter whose name contains `diffloss` is in the no-decay group, at full lr;
    only the Transformer's matrices are decayed. The energy head keeps the reference's
    generator group (no decay, lr * score_lrscale) for its matrices."""
    model = small_ear("diffusion", diffloss_d=2, diffloss_w=16)
    groups = param_groups(model, 0.02, 0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    head = [n for n in names.values() if n.startswith("diffloss.")]
    assert len(head) > 20 and all(group_of[n] == (0.0, 1.0) for n in head)
    assert group_of["diffloss.net.res_blocks.0.mlp.0.weight"] == (0.0, 1.0)
    assert group_of["decoder_blocks.0.attn.qkv.weight"] == (0.02, 1.0)
    # MAR's rule, with the groups in named_parameters() order.
    expected_no_decay = [n for n, p in model.named_parameters()
                         if p.ndim == 1 or n.endswith(".bias") or "diffloss" in n]
    assert [names[id(p)] for p in groups[0]["params"]] == expected_no_decay
    assert len(groups) == 2

    energy = small_ear("energy", scoreloss_d=2, scoreloss_w=16, noise_channels=8)
    names = {id(p): n for n, p in energy.named_parameters()}
    groups = param_groups(energy, 0.02, 0.25)
    assert len(groups) == 3 and (groups[2]["weight_decay"], groups[2]["lr_scale"]) == (0.0, 0.25)
    assert [names[id(p)] for p in groups[2]["params"]] == [
        n for n, p in energy.named_parameters()
        if n.startswith("scoreloss.") and p.ndim > 1 and not n.endswith(".bias")]


def tanh_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def decoder_nll_float64(x, mean, log_var):
    """improved-DDPM's discretised Gaussian NLL, element by element, in float64 numpy."""
    out = np.empty(np.broadcast(x, mean, log_var).shape)
    for i, (xi, mi, lv) in enumerate(np.broadcast(x, mean, log_var)):
        inv_std = np.exp(-0.5 * lv)
        upper, lower = tanh_cdf(inv_std * (xi - mi + 1 / 255)), tanh_cdf(inv_std * (xi - mi - 1 / 255))
        if xi < -0.999:
            p = upper
        elif xi > 0.999:
            p = 1.0 - lower
        else:
            p = upper - lower
        out.flat[i] = -np.log(max(p, 1e-12))
    return out


def test_decoder_term_is_the_tanh_cdf_discretised_likelihood():
    """The t = 0 term as MAR computes it: bin half-width 1/255, edges at |x| > 0.999, the tanh
    CDF, probabilities clamped at 1e-12 (the exact CDF differs by up to ~5 nats)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-1.0, -0.9995, -0.999, 0.999, 0.9995, 1.0, 0.0]),
                   torch.linspace(-1, 1, 256), torch.rand(500, generator=g) * 2 - 1]).double()
    mean = (torch.randn(len(x), generator=g) * 0.5).double()
    log_var = (torch.rand(len(x), generator=g) * 16 - 14).double()  # std from 1e-3 to 3
    ours = discretized_gaussian_nll(x, mean, log_var).numpy()
    # (A bin far in a tail has a mass that is the difference of two CDF values near 1, so the
    # last bits of numpy's and torch's tanh show, relatively, at ~1e-6 there.)
    np.testing.assert_allclose(ours, decoder_nll_float64(x.numpy(), mean.numpy(), log_var.numpy()),
                               rtol=1e-5, atol=1e-9)
    assert ours.max() == pytest.approx(-math.log(1e-12))  # some bins hit the clamp

    # Through the training loss, t = 0 with v = +1: log sigma^2 = log beta_0 and
    # x0_hat = (x_t - sqrt(beta_0) eps) / sqrt(1 - beta_0); the loss is the noise MSE plus the
    # decoder NLL in bits.
    process = Diffusion(cosine_betas())
    beta0 = float(cosine_betas()[0])
    x0 = torch.linspace(-1, 1, 256).reshape(64, 4)
    noise, eps = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g) * 0.1
    t = torch.zeros(64, dtype=torch.long)
    loss = process.training_loss(lambda xt, _: (eps, torch.ones_like(xt)), x0, t, noise)
    xt = math.sqrt(1 - beta0) * x0.double() + math.sqrt(beta0) * noise.double()
    mean = (xt - math.sqrt(beta0) * eps.double()) / math.sqrt(1 - beta0)
    nll = decoder_nll_float64(x0.double().numpy(), mean.numpy(), np.full((64, 4), math.log(beta0)))
    expected = (noise - eps).pow(2).mean(-1).double().numpy() + nll.mean(-1) / math.log(2)
    np.testing.assert_allclose(loss.double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_respaced_timesteps_are_improved_ddpms_for_every_count():
    """Kept timesteps: accumulate the float stride 999/(N-1) from 0, N times, and round each
    running sum half to even. numpy's cumsum adds in order, as the rule does; np.round rounds
    half to even. 282 of the counts 2..1000 differ from round(linspace) somewhere."""
    betas = cosine_betas()
    for n in range(2, 1001):
        running = np.cumsum(np.concatenate([[0.0], np.full(n - 1, 999 / (n - 1))]))
        assert Diffusion.respaced(betas, n).timesteps.tolist() == np.round(running).astype(int).tolist(), n
    assert Diffusion.respaced(betas, 21).timesteps[10] == 499  # round(10 * 999 / 20) would be 500
    # One step: ours keeps 999 (improved-DDPM keeps 0, a chain MAR cannot sample).
    assert Diffusion.respaced(betas, 1).timesteps.tolist() == [999]
    assert DiffLoss(2, 4, diffloss_d=1, diffloss_w=8, num_sampling_steps=1).process(1, "cpu").timesteps.tolist() == [999]


# ----- GIVT --------------------------------------------------------------------------------

def test_mixture_head_at_initialisation_is_a_standard_normal():
    """GIVT's zero-initialised output layer: equal logits, means 0, raw scales 0, and
    squareplus(0) = 1. So the loss is the standard normal's NLL of the whole token,
    sum_d (y_d^2 / 2 + log(2 pi) / 2), and the samples are N(0, I)."""
    torch.manual_seed(0)
    head = GMMLoss(4, 16, gmm_components=16, gmm_d=2, gmm_w=32)
    z, y = torch.randn(300, 16) * 3, torch.randn(300, 4) * 2
    expected = (y.double().pow(2) / 2 + math.log(2 * math.pi) / 2).sum(-1).mean()
    assert head(y, z).item() == pytest.approx(expected.item(), rel=1e-6)
    draws = head.sample(torch.randn(20000, 16)).double()
    assert draws.mean(0).abs().max() < 0.03 and (draws.std(0) - 1).abs().max() < 0.03
    for d in range(4):  # each channel standard normal: Kolmogorov-Smirnov against Phi
        x = draws[:, d].sort().values
        cdf = torch.special.ndtr(x)
        i = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
        assert torch.maximum(i - cdf, cdf - (i - 1 / len(x))).max() < 0.015


def test_mixture_scales_are_squareplus_floored_and_the_temperatures_act_on_scales_and_logits():
    head = GMMLoss(2, 3, gmm_components=3, gmm_d=0)
    with torch.no_grad():
        head.net.out.bias.copy_(torch.tensor([0.0, 1.0, -1.0] + [0.0] * 6 + [0.0, -10.0, 3.0, -1e7, 0.0, 0.0]))
    _, _, scales = head.net(torch.zeros(1, 3))
    square_plus = lambda r: (r + math.sqrt(r * r + 4)) / 2
    torch.testing.assert_close(scales[0].flatten(), torch.tensor(
        [1.0, square_plus(-10.0), square_plus(3.0), 1e-6, 1.0, 1.0]))
    # temperature_probs multiplies the logits [0, 1, -1]: at 3 the component probabilities are
    # softmax([0, 3, -3]).
    head = GMMLoss(1, 3, gmm_components=3, gmm_d=0, gmm_temperature_probs=3.0)
    with torch.no_grad():
        head.net.out.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.0, 10.0, 20.0, -5.0, -5.0, -5.0]))
    torch.manual_seed(0)
    draws = head.sample(torch.zeros(30000, 3))
    share = torch.stack([(draws - m).abs().lt(1).float().mean() for m in (0.0, 10.0, 20.0)])
    torch.testing.assert_close(share, torch.softmax(torch.tensor([0.0, 3.0, -3.0]), 0), atol=0.01, rtol=0)
    # The sampling temperature multiplies the scales (squareplus(-5) = 0.19).
    torch.manual_seed(0)
    hot = head.sample(torch.zeros(30000, 3), temperature=2.0)
    near = lambda d: d[(d - 10).abs() < 3] - 10
    assert near(hot).std().item() == pytest.approx(2 * square_plus(-5.0), rel=0.03)
    assert near(draws).std().item() == pytest.approx(square_plus(-5.0), rel=0.03)


def guided_cdf_on_grid(loc_c, scale_c, loc_u, scale_u, cfg):
    """The CDF of p_c^cfg p_u^(1-cfg), normalised by the trapezoid rule on a fine grid."""
    grid = np.linspace(loc_c - 10, loc_c + 10, 400001)
    log_p = (cfg * (-0.5 * ((grid - loc_c) / scale_c) ** 2 - np.log(scale_c))
             + (1 - cfg) * (-0.5 * ((grid - loc_u) / scale_u) ** 2 - np.log(scale_u)))
    p = np.exp(log_p - log_p.max())
    cdf = np.concatenate([[0.0], np.cumsum((p[1:] + p[:-1]) / 2 * np.diff(grid))])
    return grid, cdf / cdf[-1]


def ks_distance(draws, grid, cdf):
    x = np.sort(draws)
    f = np.interp(x, grid, cdf)
    i = np.arange(1, len(x) + 1) / len(x)
    return max(np.max(i - f), np.max(f - (i - 1 / len(x))))


@pytest.mark.parametrize("loc_c, scale_c, loc_u, scale_u, cfg", [
    (0.5, 0.3, 0.0, 0.5, 3.0), (0.5, 0.3, -0.2, 0.4, 2.0), (0.3, 0.2, 0.0, 0.25, 1.5)])
def test_guided_mixture_draws_follow_the_guided_density(loc_c, scale_c, loc_u, scale_u, cfg):
    """GIVT's guidance per channel: draws from p_c^cfg p_u^(1-cfg). 20000 draws, seed 0;
    measured KS distances 0.005-0.007; with the exponent off by 0.5 they are 0.047-0.17, and
    with no guidance (exponent 1) 0.17-0.38. The 0.001 critical value is 0.0138."""
    torch.manual_seed(0)
    full = lambda v: torch.full((10000, 2), v, dtype=torch.float64)
    draws, exhausted = guided_gaussian_sample(full(loc_c), full(scale_c), full(loc_u), full(scale_u), cfg)
    assert not exhausted.any()
    draws = draws.flatten().numpy()
    assert ks_distance(draws, *guided_cdf_on_grid(loc_c, scale_c, loc_u, scale_u, cfg)) < 0.0138
    assert ks_distance(draws, *guided_cdf_on_grid(loc_c, scale_c, loc_u, scale_u, cfg - 0.5)) > 0.03


def test_guided_sampler_falls_back_to_the_conditional_gaussian_when_tries_run_out():
    """Ours: p_c^2 p_u^-1 with scale_u = scale_c / 10 grows without bound (precision
    2 - 100 < 0), so no proposal is accepted; every element then gets an unguided draw from
    N(loc_c, scale_c) and is marked exhausted."""
    torch.manual_seed(0)
    full = lambda v: torch.full((5000, 2), v)
    draws, exhausted = guided_gaussian_sample(full(3.0), full(0.5), full(3.0), full(0.05), 2.0, tries=20)
    assert exhausted.all()
    assert draws.mean().item() == pytest.approx(3.0, abs=0.02) and draws.std().item() == pytest.approx(0.5, abs=0.02)


def test_guided_mixture_head_pairs_the_conditional_component_with_the_same_unconditional_one():
    """Through GMMLoss.sample: the component comes from the conditional logits and the same
    index serves the unconditional mixture. Conditional means (0, 3), unconditional (0.5, 2.5),
    unit scales, cfg 2: the pairs give N(-0.5, 1) and N(3.5, 1) (a product of Gaussian powers
    is Gaussian), weighted by the conditional mixture's probabilities; pairing component 0 with
    the unconditional component 1 would give N(-2.5, 1), and so on."""
    head = GMMLoss(1, 2, gmm_components=2, gmm_d=0)
    with torch.no_grad():  # LayerNorm maps z = (1, 0) to (1, -1) and (0, 1) to (-1, 1)
        w, b = head.net.out.weight, head.net.out.bias  # rows: logits 0-1, means 2-3, raw scales 4-5
        w.zero_(), b.zero_()
        w[0, 0], w[1, 0] = 0.5, -0.5
        w[2, 0], b[2], w[3, 0], b[3] = -0.25, 0.25, 0.25, 2.75
    rows = 20000
    z = torch.cat([torch.tensor([[1.0, 0.0]]).expand(rows, -1), torch.tensor([[0.0, 1.0]]).expand(rows, -1)])
    with torch.no_grad():
        logits, means, scales = (t.double() for t in head.net(z))
    torch.testing.assert_close(means[:, :, 0], torch.tensor([[0.0, 3.0]] * rows + [[0.5, 2.5]] * rows,
                                                           dtype=torch.float64), atol=1e-4, rtol=0)
    cfg, weights = 2.0, torch.softmax(logits[0], 0)  # the conditional half's
    (loc_c, loc_u), (scale_c, scale_u) = means[[0, rows], :, 0], scales[[0, rows], :, 0]
    precision = cfg / scale_c ** 2 + (1 - cfg) / scale_u ** 2
    loc = (cfg * loc_c / scale_c ** 2 + (1 - cfg) * loc_u / scale_u ** 2) / precision
    torch.testing.assert_close(loc, torch.tensor([-0.5, 3.5], dtype=torch.float64), atol=1e-4, rtol=0)
    grid = np.linspace(-10, 15, 100001)
    cdf = sum(w * torch.special.ndtr((torch.from_numpy(grid) - m) * p.sqrt())
              for w, m, p in zip(weights, loc, precision)).numpy()
    torch.manual_seed(0)
    draws = head.sample(z.float(), cfg=cfg)[:, 0].double().numpy()
    assert ks_distance(draws, grid, cdf) < 0.0138  # the 0.001 critical value for 20000 draws
    assert head.exhausted == 0


# ----- ours: the mixture head on the digits' grey levels -------------------------------------

def test_quick_start_mixture_head_has_its_best_scale_at_the_grey_levels_spacing():
    """The digits' pixels take 17 values, ~2/16 apart. A log score on such data has no minimum:
    a component on a grey level lowers the loss without end as it narrows (and its gradient
    grows as 1/scale). In the quick start that happened on the background level: half the
    chosen components narrowed to scale ~0.003, gradient norms reached 100-340 under a clip of
    3, the EMA weights no longer matched (loss 0.67 against -1.14) and the samples were noise.
    The quick start's settings dequantise the targets (uniform noise of the spacing's width), so
    the expected loss of a component on a level is lowest at a finite scale, near
    0.125 / sqrt(12) = 0.036, and rises below it. Here: the quick start's head settings, one
    component on the background level -1, its scale set through the output layer's bias."""
    from conftest import REPO
    args = train_parser().parse_args([f"@{REPO / 'configs' / 'digits_quickstart.args'}", "--head", "gmm"])
    settings = {name: getattr(args, name) for name in GMMLoss.FLAGS if name not in ("gmm_d", "gmm_w")}
    head = GMMLoss(1, 2, **{**settings, "gmm_components": 1}, gmm_d=0)
    z, target = torch.zeros(200000, 2), torch.full((200000, 1), -1.0)  # out = the bias
    loss = {}
    for scale in (0.001, 0.036, 0.5):
        low, high = -1e4, 1e2  # the raw output giving this scale, by bisection (monotone map)
        for _ in range(100):
            with torch.no_grad():
                head.net.out.bias.copy_(torch.tensor([0.0, -1.0, (low + high) / 2]))
                low, high = ((low + high) / 2, high) if head.net(z[:1])[2].item() < scale else (low, (low + high) / 2)
        assert head.net(z[:1])[2].item() == pytest.approx(scale, rel=0.05)  # (float32 at -1000)
        torch.manual_seed(0)
        loss[scale] = head(target, z).item()
    assert loss[0.036] < loss[0.001] and loss[0.036] < loss[0.5]
    # The dequantised level's entropy, -log 8, bounds the loss below; a Gaussian at its best
    # scale is 0.18 above it.
    assert loss[0.036] == pytest.approx(-math.log(8) + 0.18, abs=0.02)
