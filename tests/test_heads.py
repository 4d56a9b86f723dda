"""The diffusion (MAR) and Gaussian-mixture (GIVT) heads, and every head through the same
training, checkpoint, evaluation and sampling paths as the energy head."""
import json
import math

import pytest
import torch

import main_ear
from models.diffloss import DiffLoss
from models.diffusion import Diffusion, cosine_betas
from models.gmmloss import GMMLoss, mixture_log_prob
from models.heads import HEADS
from test_scoreloss import energy_distance, mixture
from test_train import SMALL, write_cache
from util.args import train_parser
from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint

# ----- the scores are proper: lowest at the truth --------------------------------------------


def gaussian_denoiser(mean, std):
    """The exact noise predictor E[eps | x_t] when x_0 ~ N(mean, std^2 I): for x_t = a x_0 + b eps,
    it is b (x_t - a mean) / (a^2 std^2 + b^2). Variance output v = -1 (the posterior's)."""
    abar = torch.cumprod(1 - cosine_betas(), 0)

    def model(x, t):
        a, b = abar[t].sqrt().float()[:, None], (1 - abar[t]).sqrt().float()[:, None]
        return b * (x - a * mean) / (a ** 2 * std ** 2 + b ** 2), torch.full_like(x, -1.0)
    return model


def test_diffusion_loss_is_lowest_for_the_true_denoiser():
    """Expected hybrid loss on data from N(m, 0.5^2), with the exact denoiser of the true, a
    shifted and a wider distribution (the same draws for all three). Measured over seeds 0-2:
    0.327-0.330 true, 0.384-0.389 shifted, 0.355-0.357 wider."""
    process = Diffusion(cosine_betas())
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.0, -0.5])
    x0 = m + 0.5 * torch.randn(20000, 2, generator=g)
    t, noise = torch.randint(0, 1000, (20000,), generator=g), torch.randn(20000, 2, generator=g)
    loss = lambda mean, std: process.training_loss(gaussian_denoiser(mean, std), x0, t, noise).mean()
    true = loss(m, 0.5)
    assert true < loss(m + torch.tensor([0.5, 0.0]), 0.5) - 0.03
    assert true < loss(m, 0.75) - 0.01


def test_diffusion_sampler_is_exact_with_the_exact_denoiser():
    """With E[eps | x_t] of N(1.5, 0.3^2) the 1000-step chain reproduces that Gaussian."""
    torch.manual_seed(0)
    x = Diffusion(cosine_betas()).sample(gaussian_denoiser(1.5, 0.3), torch.randn(20000, 1))
    assert x.mean().item() == pytest.approx(1.5, abs=0.01)
    assert x.std().item() == pytest.approx(0.3, abs=0.01)


def test_respacing_keeps_the_endpoints_and_the_noise_levels():
    betas = cosine_betas()
    full, spaced = Diffusion(betas), Diffusion.respaced(betas, 10)
    assert spaced.timesteps.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # Step i of the respaced process has the noise level of training timestep k_i.
    torch.testing.assert_close(spaced.sqrt_abar, full.sqrt_abar[spaced.timesteps])
    assert betas.max() == pytest.approx(0.999) and bool((betas > 0).all())
    with pytest.raises(ValueError, match="num_sampling_steps"):
        DiffLoss(2, 4, diffloss_d=1, diffloss_w=8, num_sampling_steps=0)


def test_mixture_log_score_is_lowest_at_the_true_mixture():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.3, -0.3]])
    means = torch.tensor([[[1.0, 0.0], [-1.0, 0.5]]])
    stds = torch.tensor([[[0.3, 0.2], [0.4, 0.3]]])
    pick = torch.multinomial(torch.softmax(logits, -1).expand(20000, -1), 1, generator=g)[:, 0]
    y = means[0, pick] + stds[0, pick] * torch.randn(20000, 2, generator=g)
    nll = lambda mu, sd: -mixture_log_prob(logits.expand(20000, -1), mu.expand(20000, -1, -1),
                                          sd.expand(20000, -1, -1), y).mean()
    true = nll(means, stds)
    assert true < nll(means + torch.tensor([0.3, 0.0]), stds) - 0.1
    assert true < nll(means, stds * 1.5) - 0.1
    # The density is a density: it integrates to 1 (a grid over the 1-D case).
    grid = torch.linspace(-6, 6, 4001)[:, None]
    density = mixture_log_prob(logits.expand(4001, -1), means[:, :, :1].expand(4001, -1, -1),
                               stds[:, :, :1].expand(4001, -1, -1), grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-4)


# ----- each head learns a 2-D mixture -------------------------------------------------------

def fit_toy(head, steps: int, lr: float, dtype=torch.float32):
    """Train a head alone (fixed z) on the 8-Gaussian mixture, Adam with a cosine lr decay;
    energy distance of 2000 samples to 2000 fresh data points."""
    torch.manual_seed(0)
    z = torch.randn(1, 8, dtype=dtype)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = head(mixture(256).to(dtype), z.expand(256, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    head.eval()
    return energy_distance(head.sample(z.expand(2000, -1)).double(), mixture(2000))


@pytest.mark.parametrize("spread", [0.0, 0.5])
def test_gmm_head_learns_a_2d_mixture_once_its_components_differ(spread):
    """GIVT's linear head with 16 components holds the 8 Gaussians exactly, once its components
    differ. GIVT's zero-initialised output layer starts them equal, and equal components get
    equal gradients: with a constant z in float64 nothing separates them, and the head stays one
    Gaussian. --gmm_init_spread starts the means apart. Measured: 0.090 tied (one Gaussian),
    0.0012 apart at 0.5 (0.014 at 0.1 and 0.3; the energy head: 0.020; two sets of true samples:
    0.002)."""
    torch.manual_seed(0)
    head = GMMLoss(2, 8, gmm_components=16, gmm_d=0, gmm_init_spread=spread).double()
    distance = fit_toy(head, 600, 1e-2, torch.float64)
    _, means, scales = head.net(torch.randn(1, 8, dtype=torch.float64))
    if spread:
        assert distance < 0.01
    else:
        assert torch.equal(means, means[:, :1].expand_as(means))
        assert torch.equal(scales, scales[:, :1].expand_as(scales))
        assert distance > 0.05


def test_diffusion_head_learns_a_2d_mixture():
    """800 steps, sampled with the full 1000-step chain: measured 0.019-0.028 over seeds 0-3.
    With 100 or 250 respaced steps this small budget does not suffice (0.08-4.4 at 250): the
    first jump, from timestep 999 to 989, multiplies the noise-prediction error by about 300
    (see the README's comparison of the heads)."""
    torch.manual_seed(0)
    head = DiffLoss(2, 8, diffloss_d=2, diffloss_w=64, diffusion_batch_mul=1, num_sampling_steps=1000)
    assert fit_toy(head, 800, 4e-3) < 0.05


# ----- sampling: shapes, guidance, temperature ----------------------------------------------

def small_head(name, **gmm):
    torch.manual_seed(0)
    head = {"energy": lambda: HEADS["energy"](3, 6, scoreloss_d=2, scoreloss_w=16, noise_channels=8),
            "diffusion": lambda: DiffLoss(3, 6, diffloss_d=2, diffloss_w=16, num_sampling_steps=5),
            "gmm": lambda: GMMLoss(3, 6, gmm_components=4, gmm_d=1, gmm_w=16, **gmm)}[name]()
    with torch.no_grad():
        for p in head.parameters():  # random values everywhere, the zero-initialised ones too
            p.normal_(0, 0.3)
    return head.eval()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_sampling_shapes_and_guidance_with_equal_halves(name):
    # (GIVT's guidance on densities draws equal halves' tokens by rejection, from the same
    # distribution but with other random numbers: tests/test_heads_sources.py checks it.)
    head = small_head(name, gmm_guidance="hidden")
    z = torch.randn(5, 6)
    assert head.sample(z).shape == (5, 3) and head.sample(z).dtype == torch.float32
    torch.manual_seed(1)
    guided = head.sample(torch.cat([z, z]), cfg=3.0)
    torch.manual_seed(1)
    plain = head.sample(z)
    assert guided.shape == (5, 3)
    torch.testing.assert_close(guided, plain)  # equal halves: guidance changes nothing
    loss = head(torch.randn(7, 3), torch.randn(7, 6), torch.tensor([1, 0, 1, 1, 0, 1, 1]))
    assert loss.shape == () and torch.isfinite(loss)


def test_gmm_hidden_state_guidance_mixes_hidden_states_and_temperature_scales_the_deviation():
    head = small_head("gmm", gmm_guidance="hidden")
    z_c, z_u = torch.randn(10, 6), torch.randn(10, 6)
    torch.manual_seed(5)
    guided = head.sample(torch.cat([z_c, z_u]), cfg=3.0)
    torch.manual_seed(5)
    torch.testing.assert_close(guided, head.sample(3.0 * z_c - 2.0 * z_u))
    logits, means, _ = head.net(z_c)
    draws = {}
    for temperature in (0.0, 0.5, 1.0):
        torch.manual_seed(7)
        draws[temperature] = head.sample(z_c, temperature=temperature)
    # Temperature 0: exactly the chosen components' means; otherwise mean + t * (draw - mean).
    assert all(any(torch.equal(d, m) for m in row) for d, row in zip(draws[0.0], means))
    torch.testing.assert_close(draws[0.5] - draws[0.0], 0.5 * (draws[1.0] - draws[0.0]))


def test_respaced_sampler_conditions_the_network_on_training_timesteps():
    """With the exact denoiser, 50 respaced steps still give the data's mean: the network is
    called with the kept training timesteps (indices 0..49 would be far off)."""
    torch.manual_seed(0)
    process = Diffusion.respaced(cosine_betas(), 50)
    x = process.sample(gaussian_denoiser(1.5, 0.3), torch.randn(20000, 1))
    assert x.mean().item() == pytest.approx(1.5, abs=0.02)
    assert 0.2 < x.std().item() < 0.33
    one_step = Diffusion.respaced(cosine_betas(), 1)  # straight from noise to the data's mean
    assert one_step.timesteps.tolist() == [999]
    torch.testing.assert_close(one_step.sample(gaussian_denoiser(1.5, 0.3), torch.randn(4, 1)),
                               torch.full((4, 1), 1.5), atol=0.01, rtol=0)


def test_decoder_term_is_a_probability_of_the_data_bin():
    from models.diffusion import discretized_gaussian_nll
    x = torch.linspace(-1, 1, 256)[:, None]  # every 8-bit value
    mass = torch.exp(-discretized_gaussian_nll(x, torch.tensor(0.1), torch.tensor(math.log(0.3 ** 2))))
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-4)  # the bins cover the line once
    assert bool((discretized_gaussian_nll(torch.randn(100, 3), torch.zeros(3), torch.zeros(3)) >= 0).all())


class LinearStub(torch.nn.Module):
    """The exact denoiser of N(mean(z), I) with mean(z) = z[:, :D] / 2, and v = 1: its noise
    prediction is linear in z, so guidance on the noise equals mixing the z's."""

    def forward(self, x, t, z):
        eps, _ = gaussian_denoiser(z[:, :x.shape[1]] / 2, 1.0)(x, t)
        return torch.cat([eps, torch.ones_like(x)], dim=-1)


class NonlinearStub(torch.nn.Module):
    """The exact denoiser of N(tanh(z[:, :D]), I), and v = tanh(z[:, D:2D]): nonlinear in z, so
    guidance on the noise differs from mixing the z's; the halves' v differ."""

    def forward(self, x, t, z):
        d = x.shape[1]
        eps, _ = gaussian_denoiser(torch.tanh(z[:, :d]), 1.0)(x, t)
        return torch.cat([eps, torch.tanh(z[:, d:2 * d])], dim=-1)


def test_diffusion_guidance_is_on_the_noise_with_the_conditional_variance():
    head = small_head("diffusion")
    head.net = NonlinearStub()
    z_c, z_u = torch.randn(10, 6), torch.randn(10, 6)
    torch.manual_seed(5)
    guided = head.sample(torch.cat([z_c, z_u]), cfg=3.0, temperature=0.8)

    def by_hand(x, t):  # eps_u + cfg (eps_c - eps_u), and the conditional half's v
        (eps_c, v_c), (eps_u, _) = (head.net(x, t, z).chunk(2, -1) for z in (z_c, z_u))
        return eps_u + 3.0 * (eps_c - eps_u), v_c
    torch.manual_seed(5)
    noise = torch.randn(10, 3)  # x_T: drawn first, not scaled by the temperature
    expected = head.process(5, "cpu").sample(by_hand, noise, temperature=0.8)
    torch.testing.assert_close(guided, expected)
    torch.manual_seed(5)
    mixed_z = head.sample(3.0 * z_c - 2.0 * z_u, temperature=0.8)
    assert (guided - mixed_z).abs().max() > 1e-3  # guidance on z would be another thing


def test_diffusion_guidance_acts_on_the_noise_and_temperature_on_the_step_noise():
    head = small_head("diffusion")
    head.net = LinearStub()
    z_c, z_u = torch.randn(10, 6), torch.randn(10, 6)
    torch.manual_seed(5)
    guided = head.sample(torch.cat([z_c, z_u]), cfg=3.0)
    torch.manual_seed(5)
    # (The first jump divides by sqrt(abar_999) = 5e-5: float32 rounding grows to ~1e-3.)
    torch.testing.assert_close(guided, head.sample(3.0 * z_c - 2.0 * z_u), rtol=0, atol=5e-3)
    assert not torch.allclose(guided, head.sample(z_c), atol=0.1)
    # The chain is linear in the noise it adds: temperature t scales that part by t exactly.
    draws = {}
    for temperature in (0.0, 0.5, 1.0):
        torch.manual_seed(7)
        draws[temperature] = head.sample(z_c, temperature=temperature)
    assert not torch.allclose(draws[0.0], draws[1.0])
    torch.testing.assert_close(draws[0.5] - draws[0.0], 0.5 * (draws[1.0] - draws[0.0]),
                               rtol=0, atol=5e-3)


# ----- every head through main_ear.py and sample_ear.py ----------------------------------------

HEAD_FLAGS = {"diffusion": ["--diffloss_d", 2, "--diffloss_w", 16, "--num_sampling_steps", 5],
              "gmm": ["--gmm_d", 1, "--gmm_w", 16, "--gmm_components", 4]}


def head_args(out, cache, head, *extra):
    return train_parser().parse_args([str(a) for a in [
        *SMALL, "--head", head, *HEAD_FLAGS[head], "--use_cached", "--cached_path", cache,
        "--output_dir", out, "--batch_size", 8, "--warmup_epochs", 0, "--lr", 1e-3, *extra]])


@pytest.mark.parametrize("head", ["diffusion", "gmm"])
def test_a_head_trains_resumes_and_refuses_another(tmp_path, head):
    cache = write_cache(tmp_path / "cache", per_class=3)
    main_ear.main(head_args(tmp_path, cache, head, "--epochs", 1))
    main_ear.main(head_args(tmp_path, cache, head, "--epochs", 2, "--resume", tmp_path))
    ckpt = load_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 1 and ckpt["args"]["head"] == head
    prefix = HEADS[head].attribute + "."
    assert any(k.startswith(prefix) for k in ckpt["model"]) and not any(
        k.startswith("scoreloss.") for k in ckpt["model"])
    with pytest.raises(SystemExit, match=f"--head is 'energy' here but '{head}' in the checkpoint"):
        main_ear.main(train_parser().parse_args([str(a) for a in [
            *SMALL, "--use_cached", "--cached_path", cache, "--output_dir", tmp_path,
            "--batch_size", 8, "--epochs", 3, "--resume", tmp_path]]))


def test_diffusion_head_through_the_quick_start_and_sample_ear(tmp_path, capsys):
    """The digits quick start (training, EMA, online evaluation with both guidance settings)
    with the diffusion head; then sample_ear.py takes the head from the checkpoint, and its
    sampling steps from the flag."""
    import sample_ear
    from conftest import REPO
    args = train_parser().parse_args([
        f"@{REPO / 'configs' / 'digits_quickstart.args'}", "--head", "diffusion", "--epochs", "1",
        "--num_images", "20", "--eval_bsz", "20", "--num_iter", "4", "--diffloss_d", "1",
        "--num_sampling_steps", "5", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path)])
    main_ear.main(args)
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert [r["cfg"] for r in results] == [1.0, 2.0]
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["frechet"]) for r in results)
    sample_ear.main(*sample_ear.parse_args([
        "--resume", str(tmp_path), "--class_ids", "3", "4", "--samples_per_class", "2",
        "--num_iter", "4", "--num_sampling_steps", "3", "--device", "cpu",
        "--out", str(tmp_path / "grid.png")]))
    assert "(diffusion head)" in capsys.readouterr().out
    assert (tmp_path / "grid.png").is_file()


def test_diffusion_head_under_torchrun(tmp_path):
    from conftest import run_script
    cache = write_cache(tmp_path / "cache", per_class=6)
    proc = run_script("main_ear.py", [*SMALL, "--head", "diffusion", *HEAD_FLAGS["diffusion"],
                                      "--use_cached", "--cached_path", cache, "--output_dir", tmp_path,
                                      "--batch_size", 4, "--epochs", 1, "--lr", 1e-3], nproc=2)
    assert "with the diffusion head" in proc.stdout
    assert "weights and EMA identical on all 2 rank(s)" in proc.stdout


def test_the_benchmark_finds_the_fewest_diffusion_steps_that_match_the_energy_head():
    """benchmarks/heads.py's equal-quality rule: without guidance, the fewest sampling steps
    whose Frechet distance is no larger and accuracy no lower than the energy head's, accuracy
    counted up to the real digits' ceiling; the speed-up is the time per image there over the
    energy head's."""
    from benchmarks.heads import equal_quality

    def row(head, steps, cfg, accuracy, frechet, seconds):
        return dict(head=head, sampling_steps=steps, cfg=cfg, accuracy=accuracy,
                    frechet=frechet, seconds_per_image=seconds)
    rows = [row("energy", "-", 1.0, 0.95, 1.0, 0.01), row("energy", "-", 2.0, 0.99, 2.0, 0.02),
            row("diffusion", 1000, 1.0, 0.97, 0.8, 0.2), row("diffusion", 100, 1.0, 0.90, 0.9, 0.03),
            row("diffusion", 500, 1.0, 0.96, 0.9, 0.1), row("diffusion", 250, 1.0, 0.96, 1.2, 0.05),
            row("diffusion", 25, 2.0, 0.99, 0.5, 0.01)]
    match = equal_quality(rows, {"accuracy": 1.0})
    assert match["diffusion_steps"] == 500 and match["energy_speedup"] == pytest.approx(10.0)
    none = {"diffusion_steps": None, "energy_speedup": None}
    assert equal_quality(rows[:2] + rows[3:4], {"accuracy": 1.0}) == none
    # above the real digits' accuracy (0.89 here), more accuracy is no better
    assert equal_quality(rows, {"accuracy": 0.89})["diffusion_steps"] == 100


def test_evaluation_reports_the_mixture_heads_guidance_fallbacks(tmp_path, monkeypatch, capsys):
    """The quick start with the mixture head: each guided evaluation's JSON line and printed
    line say how many of its density-guided draws fell back to unguided ones (all of them when
    the rejection sampler is given no tries); unguided lines say nothing."""
    import models.gmmloss as gmmloss
    from conftest import REPO
    flags = [f"@{REPO / 'configs' / 'digits_quickstart.args'}", "--head", "gmm", "--gmm_d", "1",
             "--decoder_depth", "1", "--num_images", "20", "--eval_bsz", "20", "--num_iter", "4",
             "--output_dir", str(tmp_path), "--log_dir", str(tmp_path)]
    main_ear.main(train_parser().parse_args([*flags, "--epochs", "1"]))
    sampler = gmmloss.guided_gaussian_sample
    monkeypatch.setattr(gmmloss, "guided_gaussian_sample", lambda *a: sampler(*a, tries=0))
    main_ear.main(train_parser().parse_args([*flags, "--resume", str(tmp_path), "--evaluate"]))
    unguided, guided, given_up = [json.loads(line) for line in
                                  (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert "guided_draws" not in unguided and unguided["cfg"] == 1.0
    assert 0 < guided["guided_draws"] <= 20 * 16 * 4 and guided["unguided_fallbacks"] < guided["guided_draws"]
    assert given_up["unguided_fallbacks"] == given_up["guided_draws"] == guided["guided_draws"]
    assert f"{given_up['guided_draws']} of {given_up['guided_draws']} guided draws fell back" \
        in capsys.readouterr().out
