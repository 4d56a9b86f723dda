"""Memory as the reference release spends it (docs/performance.md#memory): the heads' residual
blocks recomputed under --grad_checkpointing, the EMA saved tensor by tensor to the CPU, the
replica checksums one tensor at a time, resume from a mapped file, the cache's flips encoded in
a second pass. Each is checked for unchanged results and for the memory it no longer holds."""
import argparse
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import run_script
from models.ear import EAR
from util.optim import EMA

HEAD_SIZES = {"energy": dict(scoreloss_d=2, scoreloss_w=32, noise_channels=8),
              "diffusion": dict(diffloss_d=2, diffloss_w=32),
              "gmm": dict(gmm_d=2, gmm_w=32, gmm_components=3)}


def tiny(head: str = "energy", **kw) -> EAR:
    """16 tokens of dimension 16 (8x8 latents of 4 channels in 2x2 patches), width 32, depth 2."""
    return EAR(img_size=32, vae_stride=4, patch_size=2, vae_embed_dim=4, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=4, class_num=10, buffer_size=4, head=head,
               **HEAD_SIZES[head], **kw)


def cpu_allocations(fn) -> tuple:
    """Run fn() under torch's profiler: (its result, bytes it allocated on the CPU in all, the
    peak of those allocations net of frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    total = running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += max(event.self_cpu_memory_usage, 0)
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return result, total, peak


def training_step(model: EAR, head_blocks) -> tuple:
    """One forward/backward from seed 1: (loss, {parameter: gradient}, forward calls per block)."""
    calls = Counter()
    # Counted as each call starts: a recomputation stops once backward has what it needs.
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.update([i]))
             for i, b in enumerate(head_blocks)]
    torch.manual_seed(1)
    loss = model(torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("head", sorted(HEAD_SIZES))
def test_grad_checkpointing_recomputes_the_head_blocks_with_the_same_gradients(head):
    plain = tiny(head)
    with torch.no_grad():  # away from the zero initialisation, so that every block has a gradient
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpointed = tiny(head, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())  # same keys: the flag adds no weights
    results = [training_step(m, m.head.net.res_blocks) for m in (plain, checkpointed)]
    (loss, grads, calls), (loss_gc, grads_gc, calls_gc) = results
    assert calls == {0: 1, 1: 1}  # two blocks, each run once
    assert calls_gc == {0: 2, 1: 2}  # and again in backward
    assert loss_gc == pytest.approx(loss)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(plain.head_name))
    torch.testing.assert_close(grads_gc, grads)


def test_ema_state_dict_goes_to_the_cpu_tensor_by_tensor():
    model = tiny()
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sd, allocated, _ = cpu_allocations(ema.state_dict)
    assert list(sd) == list(weights)
    assert all(v.device.type == "cpu" for v in sd.values())
    for name, value in zip(ema.names, ema.params):
        assert torch.equal(sd[name], value) and not torch.equal(sd[name], weights[name])
    torch.testing.assert_close(model.state_dict(), weights, rtol=0, atol=0)
    # One copy of each tensor, nothing more: no copy of the whole model on its device first.
    size = sum(v.numel() * v.element_size() for v in sd.values())
    assert allocated < 1.2 * size
    for value in sd.values():  # copies, not the EMA's or the model's own tensors
        value.zero_()
    assert all(p.abs().sum() > 0 for p in [*ema.params, *model.parameters()])


def test_replica_checksums_take_one_float64_copy_at_a_time(monkeypatch):
    import util.distributed as distributed
    model = tiny()
    ema = EMA(model, 0.9)
    seen = []
    monkeypatch.setattr(distributed, "all_gather_objects",
                        lambda local: seen.append(local) or [local])
    _, _, peak = cpu_allocations(lambda: distributed.check_replicas_in_sync(model, ema.params))

    def expected(tensors):  # float64 throughout, tensor after tensor
        tensors = [t.detach().double() for t in tensors]
        return [float(sum(t.sum() for t in tensors)), float(sum(t.abs().sum() for t in tensors))]
    assert seen == [expected(model.parameters()) + expected(ema.params)]
    largest = max(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total > 6 * largest  # so that the bound below tells one tensor from all of them
    assert peak <= 3 * 8 * largest  # a float64 copy and its absolute value, of one tensor


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_resume_maps_the_checkpoint_instead_of_reading_it(tmp_path):
    from util.checkpoint import open_checkpoint, save_training_checkpoint
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="ear_tiny")
    path = save_training_checkpoint(tmp_path, model, EMA(model, 0.9), optimizer,
                                    torch.amp.GradScaler("cpu", enabled=False), 3, args)
    opened, ckpt = open_checkpoint(tmp_path, args, ("model",))
    assert opened == path and ckpt["epoch"] == 3
    torch.testing.assert_close(ckpt["model"], model.state_dict(), rtol=0, atol=0)
    assert str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_a_resumed_optimizer_does_not_keep_the_mapped_file(tmp_path):
    """After resuming from a mapped checkpoint, no optimizer state shares memory with the file
    (which would stay mapped, and on disk after it is replaced, for the whole run)."""
    from util.checkpoint import open_checkpoint, save_training_checkpoint
    from util.optim import load_optimizer_state
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1])).backward()
    optimizer.step()
    args = argparse.Namespace(model="ear_tiny")
    save_training_checkpoint(tmp_path, model, EMA(model, 0.9), optimizer,
                             torch.amp.GradScaler("cpu", enabled=False), 3, args)
    _, ckpt = open_checkpoint(tmp_path, args, ("model",))
    mapped = {t.untyped_storage().data_ptr() for s in ckpt["optimizer"]["state"].values()
              for t in s.values() if torch.is_tensor(t)}
    fresh = torch.optim.AdamW(model.parameters())
    load_optimizer_state(fresh, ckpt["optimizer"], "ckpt")
    kept = [t for s in fresh.state.values() for t in s.values() if torch.is_tensor(t)]
    assert len(kept) == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq
    assert not {t.untyped_storage().data_ptr() for t in kept} & mapped
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_encodes_the_flips_in_a_second_pass_of_the_batch_size(random_vae_ckpt):
    from main_cache import encode_with_flip
    from models.tokenizer import VAETokenizer
    tokenizer = VAETokenizer(random_vae_ckpt)
    batches = []
    encode = tokenizer.vae.encode
    tokenizer.vae.encode = lambda x: batches.append(len(x)) or encode(x)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    records = encode_with_flip(tokenizer, images)
    assert batches == [3, 3]  # never the 6 images at once
    both = tokenizer.moments(torch.cat([images, images.flip(dims=[3])]))
    assert records.shape == (3, 2, 32, 2, 2) and records.flags.c_contiguous
    torch.testing.assert_close(torch.from_numpy(records[:, 0]), both[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(records[:, 1]), both[3:], rtol=1e-4, atol=1e-5)


def test_memory_benchmark_runs_and_prints_both_settings():
    out = run_script("benchmarks/memory.py", ["--smallest"], timeout=120).stdout
    for setting in ("without", "with"):
        assert re.search(rf"^ *{setting} --grad_checkpointing: +[0-9.]+ MiB", out, re.M), out
