"""The EAR Transformer: masking, training loss, and the sampler (as MAR and the EAR paper describe them)."""
import math

import pytest
import torch

from models.ear import EAR


def tiny(**kw) -> EAR:
    """A small EAR: 16x16 images, stride 4, 4 latent channels -> 16 tokens of dimension 4."""
    cfg = dict(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=4, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=4, class_num=10, buffer_size=4,
               scoreloss_d=2, scoreloss_w=32, noise_channels=8)
    cfg.update(kw)
    return EAR(**cfg)


def record_sampler_calls(model: EAR):
    """Replace the generator's sampler: step k writes the value k+1 and logs (rows, cfg)."""
    calls = []

    def fake_sample(z, infer_temperature=1.0, cfg=1.0):
        calls.append((z.shape[0], cfg))
        rows = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        return torch.full((rows, model.token_embed_dim), float(len(calls)))

    model.scoreloss.sample = fake_sample
    return calls


def expected_masked_counts(seq_len: int, num_iter: int):
    """MAR's cosine schedule, written out independently: tokens still masked after each step."""
    counts, masked = [], seq_len
    for t in range(num_iter):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (t + 1) / num_iter))
        n = max(1, min(masked - 1, n))
        masked = 0 if t == num_iter - 1 else n
        counts.append(n)
    return counts


def test_patchify_roundtrip_and_token_layout():
    model = tiny(img_size=32, patch_size=2)
    x = torch.randn(3, 4, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (3, 16, 16)
    # Token 1 is latent rows 0-1, columns 2-3; values ordered (channel, row, column).
    assert torch.equal(tokens[:, 1], x[:, :, 0:2, 2:4].reshape(3, -1))
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("img_size, num_iter", [(8, 1), (8, 4), (16, 3), (16, 16), (32, 64), (32, 7)])
def test_sampler_fills_every_position_exactly_once(img_size, num_iter):
    model = tiny(img_size=img_size).eval()
    L = model.seq_len
    calls = record_sampler_calls(model)
    out = model.sample_tokens(3, num_iter=num_iter)
    tokens = model.patchify(out)
    assert out.shape == (3, 4, img_size // 4, img_size // 4)
    assert sum(rows for rows, _ in calls) == 3 * L  # no position written twice...
    assert (tokens > 0).all()  # ...and none left as the zero it started with
    # Each token was written at the step that unmasked it, in the numbers the schedule prescribes.
    before = [L] + expected_masked_counts(L, num_iter)[:-1]
    after = expected_masked_counts(L, num_iter)[:-1] + [0]
    filled = [b - a for b, a in zip(before, after)]
    per_step = [(tokens[0, :, 0] == k + 1).sum().item() for k in range(num_iter)]
    assert per_step == filled


def test_no_guidance_keeps_the_batch_single():
    model = tiny().eval()
    record_sampler_calls(model)
    seen = []
    model.decoder_norm.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    labels = torch.tensor([1, 2, 3])
    model.sample_tokens(3, num_iter=4, cfg=1.0, labels=labels)
    assert seen == [3] * 4
    seen.clear()
    model.sample_tokens(3, num_iter=4, cfg=2.0, labels=labels)
    assert seen == [6] * 4
    seen.clear()
    model.sample_tokens(3, num_iter=4, cfg=2.0)  # unconditional: guidance would be a no-op
    assert seen == [3] * 4


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_guidance_schedule(schedule):
    model = tiny().eval()
    calls = record_sampler_calls(model)
    num_iter, cfg, L = 5, 3.0, model.seq_len
    model.sample_tokens(2, num_iter=num_iter, cfg=cfg, cfg_schedule=schedule,
                        labels=torch.tensor([0, 1]))
    counts = expected_masked_counts(L, num_iter)
    if schedule == "linear":
        expected = [1 + (cfg - 1) * (L - n) / L for n in counts]
    else:
        expected = [cfg] * num_iter
    assert [c for _, c in calls] == pytest.approx(expected)


def test_sampling_is_deterministic_given_the_seed_and_tempered_in_eval():
    model = tiny().eval()
    with torch.no_grad():
        for p in model.scoreloss.parameters():
            p.normal_(0, 0.3)
    labels = torch.tensor([4, 5])
    torch.manual_seed(0)
    a = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, infer_temperature=0.7)
    torch.manual_seed(0)
    b = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, infer_temperature=0.7)
    torch.manual_seed(0)
    c = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, infer_temperature=1.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_mask_ratio_distribution():
    model = tiny(mask_ratio_min=0.7)
    ratios = torch.tensor([model.sample_mask_ratio() for _ in range(20000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # Mean of N(1, 0.25) truncated to [0.7, 1]: 1 + 0.25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)).
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2))
    assert ratios.mean().item() == pytest.approx(mean, abs=0.003)


def test_training_masks_ceil_of_ratio_positions(monkeypatch):
    model = tiny()
    seen = {}
    original = model.forward_transformer

    def spy(tokens, cls_emb, mask):
        seen["mask"] = mask
        return original(tokens, cls_emb, mask)

    monkeypatch.setattr(model, "forward_transformer", spy)
    for ratio in (0.7, 0.71, 0.93, 1.0):
        monkeypatch.setattr(model, "sample_mask_ratio", lambda r=ratio: r)
        model(torch.randn(5, 4, 4, 4), torch.arange(5))
        assert (seen["mask"].sum(1) == math.ceil(16 * ratio)).all()
        assert len({tuple(row.tolist()) for row in seen["mask"]}) > 1 or ratio == 1.0


def test_every_parameter_receives_a_gradient():
    model = tiny(label_drop_prob=0.5)
    # Below 1, so some tokens stay visible: at ratio 1 every token is the mask token and z_proj
    # rightly gets a zero gradient.
    model.sample_mask_ratio = lambda: 0.75
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 4, 4, 4), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad()
        model(x, y).backward()
        opt.step()

    # After one optimiser step every parameter is in the graph (DDP needs no unused parameters).
    step()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # The generator's zero-initialised modulations and output layer open one stage per update
    # (final Linear, then the modulations, then noise embedding and residual MLPs), so after
    # three updates every gradient is non-zero.
    step()
    step()
    opt.zero_grad()
    model(x, y).backward()
    dead = [n for n, p in model.named_parameters()
            if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert dead == []


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x, y = torch.randn(4, 4, 4, 4), torch.tensor([1, 2, 3, 4])
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = tiny(grad_checkpointing=gc, attn_dropout=0.0, proj_dropout=0.0)
        torch.manual_seed(1)
        loss = model(x, y)
        loss.backward()
        results.append((loss.item(), model.z_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("call, msg", [
    (lambda m: m(torch.randn(2, 4, 8, 8), torch.tensor([0, 1])), "latents must have shape"),
    (lambda m: m(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])), "latents must have shape"),
    (lambda m: m(torch.randn(2, 4, 4, 4), torch.tensor([0, 10])), r"labels must be in \[0, 10\)"),
    (lambda m: m(torch.randn(2, 4, 4, 4), torch.tensor([-1, 0])), "labels must be in"),
    (lambda m: m.sample_tokens(2, num_iter=4, cfg_schedule="cosine"), "cfg_schedule"),
    (lambda m: m.sample_tokens(2, num_iter=0), r"num_iter must be in \[1, 16\]"),
    (lambda m: m.sample_tokens(2, num_iter=17), "num_iter"),
    (lambda m: m.sample_tokens(2, labels=torch.tensor([3, 12]), num_iter=4), "labels"),
    (lambda m: tiny(alpha=0.0), "alpha"),
    (lambda m: tiny(alpha=2.01), "alpha"),
    (lambda m: tiny(train_temperature=1.5), "train_temperature"),
    (lambda m: tiny(img_size=18), "divisible"),
])
def test_bad_input_is_a_clear_value_error(call, msg):
    with pytest.raises(ValueError, match=msg):
        call(tiny())
