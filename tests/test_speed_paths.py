"""The speed paths of issue 23 (items 4 and 5), held on the CPU: fused AdamW, cuDNN autotuning
and TF32 on CUDA, the VAE in channels-last, no host sync per training step, torch-fidelity's
reading workers, and --compile sampling without recompiles."""
import io
import json
import signal

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import engine_ear
from models.tokenizer import PixelTokenizer, VAETokenizer
from test_train import SMALL, run_in_process, write_cache
from util.args import train_parser
from util.builders import build_model, build_optimizer, build_train_state, fill_named_sizes
from util.distributed import DistInfo
from util.fid import InceptionMetrics, exact_float32, extract_features
from util.optim import load_optimizer_state
from util.precision import describe_precision, set_up_cuda

CUDA = torch.device("cuda")


def small_args(*flags):
    """Training flags of a small EAR (SMALL), concrete as resolve_args leaves them."""
    args = train_parser().parse_args([str(f) for f in [*SMALL, "--lr", 1e-3, *flags]])
    fill_named_sizes(args)
    return args


@pytest.fixture
def cuda_flags():
    """Puts back the process-wide flags set_up_cuda sets."""
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
             torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    torch.backends.cudnn.allow_tf32 = saved[2]


# ----- fused AdamW, cuDNN autotuning, TF32 ------------------------------------------------------

@pytest.mark.parametrize("tf32", [True, False])
def test_a_cuda_run_fuses_adamw_and_sets_cudnn_and_tf32(cuda_flags, tf32):
    """build_train_state for a CUDA device (the parameters stay on the CPU, where torch has the
    fused kernel too); --no_tf32 gives full float32 matmuls and convolutions."""
    args = small_args("--precision", "fp32", *([] if tf32 else ["--no_tf32"]))
    torch.backends.cudnn.benchmark = False
    state = build_train_state(build_model(args), args, DistInfo(device=CUDA))
    assert state.optimizer.defaults["fused"] is True
    assert torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert describe_precision(state.precision, CUDA, tf32) == (
        "fp32 with TF32 matmuls" if tf32 else "fp32 (TF32 off)")


def test_a_cpu_run_changes_no_cuda_setting(cuda_flags):
    args = small_args()
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    state = build_train_state(build_model(args), args, DistInfo())
    assert state.optimizer.defaults["fused"] is False
    assert torch.backends.cudnn.benchmark is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert describe_precision(state.precision, state.device, True) == "fp32"


def test_metrics_compute_in_full_float32_under_a_tf32_run(cuda_flags):
    """exact_float32 turns off the TF32 that set_up_cuda turns on, and gives it back; the
    setting stays readable through torch.get_float32_matmul_precision (torch.compile reads it)."""
    set_up_cuda(CUDA, tf32=True)
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    assert [b.fp32_precision for b in backends] == ["tf32", "tf32"]
    with exact_float32():
        assert [b.fp32_precision for b in backends] == ["ieee", "ieee"]
    assert [b.fp32_precision for b in backends] == ["tf32", "tf32"]
    assert torch.get_float32_matmul_precision() == "high"


def adamw_steps(model, optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def saved_and_read(state: dict) -> dict:
    """`state` through a file, as checkpoints go (without, two optimizers would share tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("saved_on, loaded_on", [(CUDA, torch.device("cpu")),
                                                 (torch.device("cpu"), CUDA)])
def test_fused_and_unfused_adamw_states_load_into_each_other(saved_on, loaded_on):
    """A run's optimizer (fused for CUDA) resumes from the other kind's state and goes on as
    the saving one does (on the CPU, where torch has both kernels)."""
    args = small_args()
    model = build_model(args)
    saving = build_optimizer(model, args, saved_on)
    adamw_steps(model, saving, 3, seed=0)
    twin = build_model(args)
    twin.load_state_dict(model.state_dict())
    loading = build_optimizer(twin, args, loaded_on)
    load_optimizer_state(loading, saved_and_read(saving.state_dict()), "test")
    assert loading.defaults["fused"] is (loaded_on.type == "cuda")
    assert all(g["fused"] is (loaded_on.type == "cuda") for g in loading.param_groups)
    adamw_steps(model, saving, 2, seed=1)
    adamw_steps(twin, loading, 2, seed=1)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_loaded_step_counts_sit_where_the_loading_optimizer_keeps_them(fused):
    """torch puts `step` on the parameter's device for a fused optimizer (its CUDA kernel
    reads it there) and leaves it where it was loaded (the CPU) otherwise: by this run's kind,
    not the saving run's. The meta device stands in for CUDA."""
    saved_param = torch.nn.Parameter(torch.zeros(2))
    saving = torch.optim.AdamW([saved_param], fused=not fused)
    saved_param.grad = torch.ones(2)
    saving.step()
    param = torch.nn.Parameter(torch.empty(2, device="meta"))
    loading = torch.optim.AdamW([param], fused=fused)
    load_optimizer_state(loading, saving.state_dict(), "test")
    assert loading.state[param]["step"].device.type == ("meta" if fused else "cpu")
    assert loading.state[param]["exp_avg"].device.type == "meta"


# ----- the VAE in channels-last -----------------------------------------------------------------

def test_vae_runs_channels_last_on_cuda_with_the_same_results(random_vae_ckpt):
    """channels-last is the CUDA default; on the CPU it is off, and where forced it gives the
    default layout's results to float32 rounding, in the default layout."""
    assert VAETokenizer(random_vae_ckpt, device="cuda", load=False).layout == torch.channels_last
    plain = VAETokenizer(random_vae_ckpt)
    assert plain.layout == torch.contiguous_format
    nhwc = VAETokenizer(random_vae_ckpt, channels_last=True)
    conv = nhwc.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = nhwc.moments(images)
    assert moments.is_contiguous()
    torch.testing.assert_close(moments, plain.moments(images), rtol=1e-4, atol=1e-5)
    tokens = torch.randn(2, 16, 2, 2)
    decoded = nhwc.decode(tokens)
    assert decoded.is_contiguous()
    torch.testing.assert_close(decoded, plain.decode(tokens), rtol=1e-4, atol=1e-4)


# ----- no host sync per training step -----------------------------------------------------------

class Read(torch.Tensor):
    """A loss tensor that counts the times its value (or a copy's) is read on the host."""
    count = 0

    def item(self):
        Read.count += 1
        return super().item()


def test_the_epoch_loss_is_read_only_when_logged(tmp_path, monkeypatch):
    """--print_freq 100 on a 6-step epoch logs steps 0 and 5: the loss is read there only
    (the progress bar and the logged mean over ranks: twice each) and for the epoch's mean at
    its end, and log.txt's epoch loss is still the mean of the step losses summed as Python
    floats."""
    steps, original = [], engine_ear.optimizer_step

    def counted_step(*args, **kwargs):
        loss, grad_norm = original(*args, **kwargs)
        steps.append(loss.tolist())
        return loss.as_subclass(Read), grad_norm
    monkeypatch.setattr(engine_ear, "optimizer_step", counted_step)
    monkeypatch.setattr(Read, "count", 0)
    cache = write_cache(tmp_path / "cache", per_class=8)  # 24 latents: 6 steps of 4
    run_in_process([*SMALL, "--use_cached", "--cached_path", cache, "--output_dir",
                    tmp_path / "out", "--batch_size", 4, "--epochs", 1, "--warmup_epochs", 0,
                    "--lr", 1e-3, "--print_freq", 100])
    assert len(steps) == 6 and Read.count == 2 + 2 + 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    total = 0.0
    for loss in steps:
        total += loss
    assert log[0]["loss"] == total / 6


def test_labels_are_copied_to_the_device_without_blocking():
    class Copied:
        def __init__(self):
            self.non_blocking = []

        def to(self, device, non_blocking=False):
            self.non_blocking.append(non_blocking)
            return self
    data, labels = Copied(), Copied()
    engine_ear.TokenBatches(PixelTokenizer(1), False, torch.device("cpu"))((data, labels))
    assert data.non_blocking == labels.non_blocking == [True]


# ----- torch-fidelity reads the samples with workers --------------------------------------------

class Stop(Exception):
    pass


@pytest.fixture
def fidelity_calls(monkeypatch):
    """torch-fidelity's feature pass, replaced: records its keyword arguments and whether
    SIGTERM was blocked in the calling thread, then stops."""
    import torch_fidelity.utils
    calls = []

    def spy(*args, **kwargs):
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        calls.append({**kwargs, "sigterm_blocked": blocked})
        raise Stop
    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
    return calls


def test_the_sample_folder_is_read_by_torch_fidelity_workers(fidelity_calls):
    """On a GPU run, save_cpu_ram=False: torch-fidelity's loader workers decode the PNGs; they
    start with the save signals blocked (a preemption signal must not end them), and this
    thread's mask comes back. On the CPU, the images are read in this process."""
    for device in ("cuda", "cpu"):
        with pytest.raises(Stop):
            InceptionMetrics("stats.npz", None, device).scores(["an image"])
    assert fidelity_calls == [
        {"cuda": True, "save_cpu_ram": False, "verbose": False, "sigterm_blocked": True},
        {"cuda": False, "save_cpu_ram": True, "verbose": False, "sigterm_blocked": False}]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_an_array_in_memory_is_read_in_this_process(fidelity_calls):
    with pytest.raises(Stop):
        extract_features(None, ["an image"], "cpu")
    assert fidelity_calls[0]["save_cpu_ram"] is True and not fidelity_calls[0]["sigterm_blocked"]


# ----- --compile sampling -----------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    """No compiled code from other tests counts, and none is left for them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("head", [[], ["--head", "diffusion", "--diffloss_d", 1, "--diffloss_w", 16,
                                       "--num_sampling_steps", 2],
                                  ["--head", "gmm", "--gmm_d", 1, "--gmm_w", 16]])
def test_compiled_sampling_compiles_once_for_every_temperature_and_batch(fresh_dynamo, monkeypatch,
                                                                         head):
    """With --compile (build_train_state's torch.compile calls, counted with the cheap `eager`
    backend): after a training step and a first sampling batch, more temperatures, a partial
    last batch and guidance compile nothing more. torch 2.14 already passes a Python float to
    compiled code as an input; with `specialize_float` (the default before) a float
    temperature would compile once per value: the sampler gives the heads a tensor."""
    counter = CompileCounterWithBackend("eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn=None, **kw: compile_(fn, **{**kw, "backend": counter}))
    args = small_args("--compile", "--class_num", 4, *head)
    model = build_train_state(build_model(args), args, DistInfo()).model
    with torch._dynamo.config.patch(specialize_float=True):
        model(torch.randn(4, 4, 2, 2), torch.arange(4))
        model.eval()
        model.sample_tokens(4, num_iter=2, labels=torch.arange(4), infer_temperature=1.0)
        compiled = counter.frame_count
        for temperature, images, cfg in [(0.7, 4, 1.0), (1.3, 3, 1.0), (0.9, 4, 2.0),
                                         (0.5, 3, 3.0)]:
            model.sample_tokens(images, num_iter=2, cfg=cfg, labels=torch.arange(images),
                                infer_temperature=temperature)
    assert counter.frame_count == compiled
