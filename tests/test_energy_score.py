"""The energy score's axes (docs/energy_score.md): N draws per scoring (--score_samples), M targets
per token from the tokenizer's posterior (--score_targets, --target_dequantize)."""
import argparse
import math

import numpy as np
import pytest
import torch

from conftest import REPO
from engine_ear import TokenBatches, optimizer_step
from models.ear import EAR
from models.scoreloss import ScoreLoss, energy_score, pairs_and_targets
from models.tokenizer import PixelTokenizer, VAETokenizer
from models.vae import LATENT_SCALE
from refusals import refused
from test_train import cache, train_args  # noqa: F401  (cache: a fixture)
from util.builders import TrainState
from util.optim import EMA, param_groups


def small_head(**kw) -> ScoreLoss:
    head = ScoreLoss(3, 10, scoreloss_d=2, scoreloss_w=16, noise_channels=8, **kw)
    with torch.no_grad():  # random weights everywhere (the zero-initialised ones too)
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def papers_loss(head: ScoreLoss, target, z, mask):
    """The loss as it was written before N draws existed (its distance too): one pair per copy
    of a masked row."""
    keep = mask.bool()
    target = target[keep].repeat(head.score_batch_mul, 1)
    z = z[keep].repeat(head.score_batch_mul, 1)
    x1, x2 = head.generate(torch.cat([z, z])).chunk(2)

    def d(a, b):
        n = torch.linalg.vector_norm(a - b, dim=-1)
        zero = n == 0
        return torch.where(zero, 0.0, torch.where(zero, 1.0, n).pow(head.alpha))
    return -(head.train_temperature * d(x1, x2) - d(x1, target) - d(x2, target)).mean()


@pytest.mark.parametrize("alpha, tau, copies", [(1.0, 1.0, 1), (0.5, 0.99, 2), (1.5, 1.0, 3)])
def test_two_draws_and_one_target_are_the_papers_loss_bit_for_bit(alpha, tau, copies):
    head = small_head(alpha=alpha, train_temperature=tau, score_batch_mul=copies)
    target, z, mask = torch.randn(30, 3), torch.randn(30, 10), torch.rand(30) < 0.6
    results = []
    for loss_fn in (head, lambda *a: papers_loss(head, *a)):
        head.zero_grad()
        torch.manual_seed(4)
        loss = loss_fn(target, z, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    (new, new_grads), (old, old_grads) = results
    assert torch.equal(new, old)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def tiny_state(seed: int, old_loss: bool = False) -> TrainState:
    torch.manual_seed(seed)
    model = EAR(img_size=8, vae_stride=4, vae_embed_dim=4, decoder_embed_dim=32, decoder_depth=2,
                decoder_num_heads=4, class_num=3, buffer_size=4, scoreloss_d=2, scoreloss_w=32,
                noise_channels=8, score_batch_mul=2)
    if old_loss:
        head = model.scoreloss
        head.forward = lambda target, z, mask=None: papers_loss(
            head, target, z, torch.ones(len(z)) if mask is None else mask)
    return TrainState(model, model, None, EMA(model, 0.9),
                      torch.optim.AdamW(param_groups(model, 0.02, 0.25), lr=1e-3),
                      torch.amp.GradScaler("cpu", enabled=False), "fp32", torch.device("cpu"))


def train_steps(state: TrainState, batches) -> list:
    torch.manual_seed(11)
    for batch in batches:
        optimizer_step(state, [batch], argparse.Namespace(grad_clip=3.0))
    return [p.detach().clone() for p in state.model.parameters()] + state.ema.params


def test_a_training_step_with_the_defaults_is_the_papers_bit_for_bit():
    """Three optimizer steps (Transformer, masking, label drop, the head) with the default N = 2
    and no targets, against the same steps with the loss written as before; and the targets
    path given each token's own value as its one target (B, 1, C, H, W) trains the same too."""
    x, labels = torch.randn(3, 6, 4, 2, 2), torch.randint(0, 3, (3, 6))
    plain = [(x[i], labels[i], None) for i in range(3)]
    default = train_steps(tiny_state(0), plain)
    before = train_steps(tiny_state(0, old_loss=True), plain)
    own = train_steps(tiny_state(0), [(x[i], labels[i], x[i][:, None]) for i in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(default, before))
    assert all(torch.equal(a, b) for a, b in zip(default, own))
    untrained = [p.detach() for p in tiny_state(0).model.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(default, untrained)) > len(untrained) // 2


def numpy_score(draws, targets, alpha, tau) -> np.ndarray:
    """float64 per-row score: draws (N, R, D), targets (R, M, D)."""
    d = lambda a, b: np.sqrt(((a - b) ** 2).sum(-1)) ** alpha  # noqa: E731
    n = len(draws)
    pairs = np.mean([d(draws[i], draws[j]) for i in range(n) for j in range(i + 1, n)], 0)
    fidelity = np.mean([d(x[:, None], targets).mean(1) for x in draws], 0)
    return tau * pairs - 2 * fidelity


@pytest.mark.parametrize("draws, targets", [(3, 1), (4, 5), (8, 2)])
def test_the_head_with_n_draws_and_m_targets_is_the_formula(draws, targets):
    head = small_head(alpha=1.5, train_temperature=0.98, score_batch_mul=2, score_samples=draws)
    target, z, mask = torch.randn(40, targets, 3), torch.randn(40, 10), torch.rand(40) < 0.5
    torch.manual_seed(2)
    loss = head(target, z, mask)
    torch.manual_seed(2)  # replay: the masked rows twice, N copies of them in one generator call
    zm, tm = z[mask].repeat(2, 1), target[mask].repeat(2, 1, 1)
    x = head.generate(torch.cat([zm] * draws)).detach().unflatten(0, (draws, -1))
    expected = -numpy_score(x.double().numpy(), tm.double().numpy(), 1.5, 0.98).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Targets of unmasked rows change nothing; one target as (R, 1, D) is the same as (R, D).
    target2 = target.clone()
    target2[~mask] += 50.0
    torch.manual_seed(2)
    assert head(target2, z, mask).item() == loss.item()
    torch.manual_seed(2)
    one = head(target[:, :1], z, mask)
    torch.manual_seed(2)
    assert one.item() == head(target[:, 0], z, mask).item()


def test_more_draws_and_targets_keep_only_the_draws_for_backward():
    """Memory: with N 8 and 4 targets, autograd holds the draws and targets (12 draws' worth),
    not the 28 pair differences and the draw-target ones (75 written out plainly); the
    gradients are the same."""
    draws = [torch.randn(100, 16, requires_grad=True) for _ in range(8)]
    target = torch.randn(100, 4, 16)
    results = []
    for fn in (energy_score, lambda d, t: pairs_and_targets(t, 1.0, 1.0, *d)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            score = fn(draws, target)
        grads = torch.autograd.grad(score.sum(), draws)
        results.append((sum(saved) / draws[0].numel(), score.detach(), grads))
    (kept, score, grads), (plain_kept, plain_score, plain_grads) = results
    assert kept == 12 and plain_kept > 60
    assert torch.equal(score, plain_score)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


# ----- the estimator on a 1-D toy, against float64 oracles --------------------------------------

def abs_gauss_mean(mu: float, sigma: float) -> float:
    """E|W| for W ~ N(mu, sigma^2): the folded normal's mean."""
    return (sigma * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sigma ** 2))
            + mu * (1 - 2 * 0.5 * math.erfc(mu / (sigma * math.sqrt(2)))))


def expected_score_oracle(mu, s, alpha, tau, gen) -> float:
    """tau E|X-X'|^a - 2 E|X-Y|^a for X ~ N(mu, s^2), Y ~ N(0, 1) in 1-D: in closed form for
    alpha 1, else by float64 Monte Carlo over 4 million independent pairs."""
    if alpha == 1.0:
        return tau * abs_gauss_mean(0.0, s * math.sqrt(2)) - 2 * abs_gauss_mean(mu, math.sqrt(s * s + 1))
    n = 4_000_000
    x, x2, y = (torch.randn(n, dtype=torch.float64, generator=gen) for _ in range(3))
    x, x2 = mu + s * x, mu + s * x2
    return float(tau * ((x - x2).abs() ** alpha).mean() - 2 * ((x - y).abs() ** alpha).mean())


def estimates(mu, s, draws, targets, alpha, tau, gen, rows=200_000, eps=None):
    """energy_score over `rows` rows of a 1-D toy: N draws of N(mu, s^2) per row (from the
    standard normals `eps` if given: common random numbers), M targets of N(0, 1). (R,)."""
    if eps is None:
        eps = torch.randn(draws, rows, 1, dtype=torch.float64, generator=gen)
    y = torch.randn(rows, targets, 1, dtype=torch.float64, generator=gen)
    return energy_score(list(mu + s * eps), y if targets > 1 else y[:, 0], alpha, tau)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("draws, targets", [(2, 1), (3, 4), (8, 16)])
def test_the_estimator_is_unbiased_for_every_n_and_m(alpha, draws, targets):
    gen = torch.Generator().manual_seed(draws * 100 + targets)
    for mu, s in ((0.0, 1.0), (0.4, 0.6)):
        oracle = expected_score_oracle(mu, s, alpha, 0.97, gen)
        rows = estimates(mu, s, draws, targets, alpha, 0.97, gen)
        error = float(rows.std()) / math.sqrt(len(rows))
        assert float(rows.mean()) == pytest.approx(oracle, abs=5 * error + 2e-3), (mu, s)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_the_true_distribution_has_the_highest_expected_score(alpha):
    """Strict propriety, numerically: draws from the target's own N(0, 1) score higher than
    draws shifted by 0.3 or narrowed to 0.7, by many standard errors (the same standard normals
    and targets for every candidate, so the differences have small noise)."""
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn(4, 200_000, 1, dtype=torch.float64, generator=gen)
    state = gen.get_state()

    def rows(mu, s):
        gen.set_state(state)  # the same targets for every candidate
        return estimates(mu, s, 4, 4, alpha, 1.0, gen, eps=eps)
    true = rows(0.0, 1.0)
    for mu, s in ((0.3, 1.0), (0.0, 0.7)):
        gap = true - rows(mu, s)
        error = float(gap.std()) / math.sqrt(len(gap))
        oracle_gap = (expected_score_oracle(0.0, 1.0, alpha, 1.0, gen)
                      - expected_score_oracle(mu, s, alpha, 1.0, gen))
        assert float(gap.mean()) > 8 * error and oracle_gap > 0, (mu, s, float(gap.mean()), error)


# ----- targets from the tokenizer's posterior ---------------------------------------------------

def test_vae_targets_are_draws_from_the_cached_moments():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full((2, 4, 3, 3), -1.0)
    moments = torch.cat([mean, logvar], 1)
    tokenizer = VAETokenizer(None, embed_dim=4, load=False)
    torch.manual_seed(0)
    tokens, targets = tokenizer.tokens_and_targets(moments, cached=True, count=4000)
    torch.manual_seed(0)
    assert torch.equal(tokens, tokenizer.from_moments(moments))  # the input: the draw of M = 1
    assert targets.shape == (2, 4000, 4, 3, 3) and torch.equal(targets[:, 0], tokens)
    assert not torch.equal(targets[:, 1], targets[:, 2])
    std = math.exp(-0.5) * LATENT_SCALE
    torch.testing.assert_close(targets.mean(1), mean * LATENT_SCALE, atol=5 * std / 60, rtol=0)
    torch.testing.assert_close(targets.std(1), torch.full_like(mean, std), atol=0.05 * std, rtol=0)
    torch.manual_seed(0)
    again = tokenizer.tokens_and_targets(moments, cached=True, count=4000)[1]
    torch.manual_seed(1)
    other = tokenizer.tokens_and_targets(moments, cached=True, count=4000)[1]
    assert torch.equal(again, targets) and not torch.equal(other, targets)
    torch.manual_seed(0)
    single, none = tokenizer.tokens_and_targets(moments, cached=True, count=1)
    assert torch.equal(single, tokens) and none is None


def test_pixel_targets_are_dequantised_pixels_and_batches_carry_them():
    levels = torch.randint(0, 17, (5, 1, 8, 8)) / 8.0 - 1.0
    plain = PixelTokenizer(1)
    assert plain.tokens_and_targets(levels, False, 1) == (levels, None)
    with pytest.raises(ValueError, match="--target_dequantize"):
        plain.tokens_and_targets(levels, False, 3)
    tokens, labels, targets = TokenBatches(PixelTokenizer(1, 0.125), False, torch.device("cpu"), 16)(
        (levels, torch.zeros(5, dtype=torch.long)))
    assert torch.equal(tokens, levels) and targets.shape == (5, 16, 1, 8, 8)
    offset = targets - levels[:, None]
    assert offset.abs().max() <= 0.0625 and offset.abs().min() > 0
    assert offset.std().item() == pytest.approx(0.125 / math.sqrt(12), rel=0.05)
    one = TokenBatches(PixelTokenizer(1, 0.125), False, torch.device("cpu"))((levels, labels))[2]
    assert one.shape == (5, 1, 1, 8, 8)  # one dequantised target per token


def test_targets_reach_the_head_at_the_masked_positions():
    """EAR.forward hands the head, for each masked token, its own M targets: with targets equal
    to the tokens plus the target's index, the head sees exactly the masked tokens + 0..M-1."""
    torch.manual_seed(0)
    model = EAR(img_size=8, vae_stride=2, vae_embed_dim=3, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4, class_num=3, buffer_size=2, patch_size=2, scoreloss_d=1,
                scoreloss_w=16, noise_channels=4)
    x = torch.randn(2, 3, 4, 4)
    targets = x[:, None] + torch.arange(3.0)[None, :, None, None, None]
    seen = {}
    model.scoreloss.forward = lambda target, z, mask=None: seen.update(target=target) or z.sum()
    torch.manual_seed(1)
    model(x, torch.tensor([0, 1]), targets)
    torch.manual_seed(1)
    model.scoreloss.forward = lambda target, z, mask=None: seen.update(plain=target) or z.sum()
    model(x, torch.tensor([0, 1]))
    assert seen["target"].shape == (seen["plain"].shape[0], 3, 12)
    for m in range(3):
        assert torch.equal(seen["target"][:, m], seen["plain"] + m)


@pytest.mark.parametrize("flags, expected", [
    (["--score_samples", 1], "score_samples must be >= 2"),
    (["--score_targets", 0], "--score_targets must be positive"),
    (["--target_dequantize", -0.1], "--target_dequantize must be a finite number >= 0"),
    (["--target_dequantize", 0.125], "--target_dequantize is for pixel tokens"),
    (["--score_targets", 2, "--head", "gmm"], "--head gmm takes one target per token"),
    (["--head", "gmm", "--gmm_init_spread", "inf"], "gmm_init_spread must be a finite number >= 0"),
])
def test_bad_target_flags_are_refused_before_training(cache, tmp_path, flags, expected):
    line = refused("main_ear.py", train_args(cache, tmp_path / "out", *flags), watch=[tmp_path])
    assert expected in line


def test_pixel_tokens_without_dequantisation_have_no_targets_to_draw(tmp_path):
    argv = [f"@{REPO / 'configs' / 'digits_quickstart.args'}", "--score_targets", 4,
            "--output_dir", tmp_path / "out"]
    assert "--target_dequantize WIDTH" in refused("main_ear.py", argv, watch=[tmp_path])


# ----- checkpoints stay interchangeable ---------------------------------------------------------

def test_a_run_with_more_draws_and_targets_exports_samples_and_fine_tunes(cache, tmp_path, capsys):
    """N and M change the loss, not the weights: the run's settings are recorded (checkpoint,
    config.json) and shown (the start of training, the model card), its export samples, and it
    fine-tunes with the paper's N 2 like any other checkpoint. An export from before
    --score_samples existed (no such key) reads as N 2."""
    import json

    from test_train import run_in_process
    from util import pretrained
    from util.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
    run, export, tuned = tmp_path / "run", tmp_path / "export", tmp_path / "tuned"
    printed = run_in_process(train_args(cache, run, "--epochs", 1, "--score_samples", 3,
                                        "--score_targets", 2), capsys)
    assert "per masked token 1 x 3 generator draws, 2 targets drawn from the posterior" in printed
    saved = load_training_checkpoint(run / CHECKPOINT_NAME)["args"]
    assert (saved["score_samples"], saved["score_targets"]) == (3, 2)
    pretrained.export(run, export)
    config = json.loads((export / pretrained.CONFIG).read_text())
    card = (export / "README.md").read_text()
    assert (config["score_samples"], config["score_targets"], config["target_dequantize"]) == (3, 2, 0.0)
    assert "score_samples 3" in card and "score_targets 2" in card
    model, settings, _ = pretrained.load_sampling_model(str(export))
    assert settings.score_samples == 3
    assert model.sample_tokens(2, num_iter=2, labels=torch.tensor([0, 1])).shape == (2, 4, 2, 2)
    run_in_process(train_args(cache, tuned, "--epochs", 1, "--finetune", export), capsys)
    assert load_training_checkpoint(tuned / CHECKPOINT_NAME)["args"]["score_samples"] == 2
    for key in ("score_samples", "score_targets", "target_dequantize"):
        del config[key]
    (export / pretrained.CONFIG).write_text(json.dumps(config))
    assert pretrained.load_sampling_model(str(export))[1].score_samples == 2
    (export / pretrained.CONFIG).write_text(json.dumps({**config, "score_targets": 0}))
    with pytest.raises(ValueError, match="score_targets is 0, expected a whole number >= 1"):
        pretrained.load_sampling_model(str(export))
