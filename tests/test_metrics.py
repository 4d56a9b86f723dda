"""Evaluation researchers can trust and tune (issue 12): our FID/IS/precision/recall against
torch-fidelity's own, the cached reference features, the ADM .npz export, the sweep, and weights
shared as safetensors through a folder or the Hub."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval import SMALL, eval_args, inception_weights, trained  # noqa: F401 (fixtures)
from conftest import run_script
from util.images import npz_order
from util.fid import ImageArray, InceptionMetrics, ReferenceBatch, extract_features, inception_extractor


def random_images(n: int, seed: int, side: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth-ish random pictures: a few coloured blobs, so features vary between images.
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(b).resize((side, side), Image.BICUBIC)) for b in base])


def save_folder(images: np.ndarray, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inception_weights):  # noqa: F811
    """A reference batch (arr_0 + the mu/sigma of its own Inception features), the same
    images as PNGs, and a folder of other images standing in for samples."""
    root = tmp_path_factory.mktemp("reference")
    real = random_images(14, seed=1)
    extractor = inception_extractor("cpu", inception_weights)
    pool = extract_features(extractor, ImageArray(real), "cpu")["2048"].double().numpy()
    batch = root / "VIRTUAL_like.npz"
    np.savez(batch, arr_0=real, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    return batch, save_folder(real, root / "real"), save_folder(random_images(12, seed=2), root / "fake")


def test_our_metrics_equal_torch_fidelitys_own(reference, inception_weights):  # noqa: F811
    """FID, IS, precision and recall of one folder, ours (features from our Inception pass and
    from the reference batch's arr_0) against torch-fidelity's calculate_metrics on the two
    folders with the same extractor weights."""
    import torch_fidelity
    batch, real, fake = reference
    ours = InceptionMetrics(batch, inception_weights, "cpu", ref_batch=batch).measure(fake, None, "x")
    # ADM's precision/recall use the Inception pool features (torch-fidelity's default for prc
    # is VGG-16), so name the extractor and the layer.
    theirs = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), cuda=False, fid=True, isc=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(inception_weights), samples_find_ext="png",
        verbose=False)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]
    assert 0 < ours["recall"] < 1 or 0 < ours["precision"] < 1  # the check is not vacuous


def test_reference_features_are_cached_with_their_source_hash(reference, inception_weights, tmp_path):  # noqa: F811
    batch, _, _ = reference
    copy = tmp_path / "batch.npz"
    copy.write_bytes(batch.read_bytes())
    extractor = inception_extractor("cpu", inception_weights)
    ref = ReferenceBatch(copy)

    def features(batch_path, sha256=None):
        return ReferenceBatch(batch_path).features(
            "2048", sha256 or extractor.weights_sha256,
            lambda images: extract_features(extractor, images, "cpu")["2048"])
    first = features(copy)
    cache = tmp_path / "batch.2048.npz"
    with np.load(cache) as data:
        assert str(data["source_sha256"]) == ref.sha256()
        assert str(data["extractor_sha256"]) == extractor.weights_sha256
    stamp = cache.stat().st_mtime_ns
    assert torch.equal(features(copy), first)
    assert cache.stat().st_mtime_ns == stamp  # read from the cache, not recomputed
    # Another batch under the same name: the hash differs, the features are recomputed.
    with np.load(batch) as data:
        np.savez(copy, arr_0=data["arr_0"][::-1].copy(), mu=data["mu"], sigma=data["sigma"])
    again = features(copy)
    assert torch.allclose(again, first.flip(0), atol=1e-5) and not torch.equal(again, first)
    # Another network (its weights' hash differs): recomputed too.
    stamp = cache.stat().st_mtime_ns
    features(copy, sha256="0" * 64)
    assert cache.stat().st_mtime_ns != stamp
    with np.load(cache) as data:
        assert str(data["extractor_sha256"]) == "0" * 64


def test_a_statistics_file_without_images_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "adm_in256_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"adm_in256_stats.npz holds \['mu', 'sigma'\] but no "
                                         r"reference images .*python util/download.py --ref_batch"):
        ReferenceBatch(tmp_path / "adm_in256_stats.npz").check()
    with pytest.raises(FileNotFoundError, match="python util/download.py --ref_batch"):
        ReferenceBatch(tmp_path / "VIRTUAL_imagenet256_labeled.npz").check()


class StandInDinoV2(torch.nn.Module):
    """A small network in DINOv2's place (torch.hub would fetch the real one); keeps its inputs."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 16)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def dgm_eval_inputs(images: np.ndarray) -> torch.Tensor:
    """dgm-eval's DINOv2 preprocessing written out directly: PIL bicubic to 224 x 224, [0, 1],
    ImageNet mean and std, in float64."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = [(np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)) / 255.0 - mean) / std
           for img in images]
    return torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2))


@pytest.fixture
def stand_in_dinov2(monkeypatch):
    torch.manual_seed(0)
    net = StandInDinoV2()
    calls = []

    def hub_load(repo, model):
        calls.append((repo, model))
        return net
    monkeypatch.setattr(torch.hub, "load", hub_load)
    return net, calls


def test_fd_dinov2_as_dgm_eval_computes_it(reference, inception_weights, stand_in_dinov2):  # noqa: F811
    """The network gets exactly dgm-eval's inputs (not torch-fidelity's un-antialiased resize),
    and FD_DINOv2 is the Frechet distance of its outputs, against the reference batch."""
    from util.fid import frechet_distance
    batch, _, fake = reference
    net, calls = stand_in_dinov2
    result = InceptionMetrics(batch, inception_weights, "cpu", ref_batch=batch,
                              fd_dinov2=True).measure(fake, None, "x")
    assert calls == [("facebookresearch/dinov2", "dinov2_vitl14")]
    with np.load(batch) as data:
        real = data["arr_0"]
    generated = np.stack([np.asarray(Image.open(p)) for p in sorted(fake.glob("*.png"))])
    fed = torch.cat(net.inputs)
    expected = torch.cat([dgm_eval_inputs(real), dgm_eval_inputs(generated)])
    assert fed.shape == (len(real) + len(generated), 3, 224, 224)
    assert torch.allclose(fed.double(), expected, atol=1e-5)
    with torch.no_grad():
        direct = frechet_distance(net(expected[len(real):].float()).numpy(),
                                  net(expected[:len(real)].float()).numpy())
    assert result["fd_dinov2"] == pytest.approx(direct, rel=1e-4) and result["fd_dinov2"] > 0
    assert result["fd_dinov2_reference"] == str(batch)
    assert (batch.parent / f"{batch.stem}.dinov2.npz").is_file()


def test_fd_dinov2_against_statistics_from_any_file(reference, inception_weights, stand_in_dinov2,  # noqa: F811
                                                    tmp_path):
    """mu/sigma of DINOv2 features from a file (e.g. a training set's) instead of the batch."""
    from util.fid import fid_from_statistics
    batch, _, fake = reference
    net, _ = stand_in_dinov2
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 1024))
    stats = tmp_path / "train_dinov2.npz"
    np.savez(stats, mu=a.mean(0), sigma=np.cov(a, rowvar=False), resolution=32)
    net.proj = torch.nn.Linear(3 * 4 * 4, 1024)  # the real network's 1024 features
    metrics = InceptionMetrics(batch, inception_weights, "cpu", fd_dinov2=True,
                               dinov2_stats=stats, resolution=32)
    result = metrics.measure(fake, None, "x")
    generated = np.stack([np.asarray(Image.open(p)) for p in sorted(fake.glob("*.png"))])
    with torch.no_grad():
        gen = net(dgm_eval_inputs(generated).float()).double().numpy()
    expected = fid_from_statistics(gen.mean(0), np.cov(gen, rowvar=False), a.mean(0), np.cov(a, rowvar=False))
    assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-4)
    assert result["fd_dinov2_reference"] == str(stats) and "precision" not in result
    np.savez(stats, mu=a.mean(0), sigma=np.cov(a, rowvar=False), resolution=64)
    with pytest.raises(ValueError, match=r"--fd_dinov2_stats .*train_dinov2.npz is for 64x64 images "
                                         r"but the samples are 32x32"):
        InceptionMetrics(batch, inception_weights, "cpu", fd_dinov2=True, dinov2_stats=stats,
                         resolution=32).check()


def test_references_must_have_the_samples_resolution(reference, inception_weights, tmp_path, capsys):  # noqa: F811
    """Refused before anything is generated: a reference batch of 32-px images or statistics
    recorded at 256 px, against 64-px samples; statistics that do not say get a warning."""
    batch, _, _ = reference
    with pytest.raises(ValueError, match=r"--ref_batch .*VIRTUAL_like.npz is for 32x32 images but "
                                         r"the samples are 64x64 \(--img_size\)"):
        InceptionMetrics(batch, inception_weights, "cpu", ref_batch=batch, resolution=64).check()
    stats = tmp_path / "stats256.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), resolution=256)
    with pytest.raises(ValueError, match="stats256.npz is for 256x256 images but the samples are 64x64"):
        InceptionMetrics(stats, inception_weights, "cpu", resolution=64).check()
    capsys.readouterr()
    InceptionMetrics(stats, inception_weights, "cpu", resolution=256).check()
    assert "does not record the resolution" not in capsys.readouterr().err
    InceptionMetrics(batch, inception_weights, "cpu", resolution=32).check()  # ADM's: no entry
    assert "--fid_stats" in capsys.readouterr().err


def test_features_are_computed_in_full_float32(reference, inception_weights, monkeypatch):  # noqa: F811
    """TF32 is off for convolutions and matmuls while features are computed, and restored after."""
    import util.fid as fid
    batch, _, fake = reference
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [b.fp32_precision for b in backends]
    seen = []
    original = fid.extract_features

    def spy(*args, **kwargs):
        seen.append([b.fp32_precision for b in backends])
        return original(*args, **kwargs)
    monkeypatch.setattr(fid, "extract_features", spy)
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # PyTorch's default for convolutions
    try:
        result = InceptionMetrics(batch, inception_weights, "cpu", ref_batch=batch).measure(fake, None, "x")
        assert [b.fp32_precision for b in backends] == ["tf32", before[1]]
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value
    assert seen and all(s == ["ieee", "ieee"] for s in seen)
    assert result["feature_precision"] == "fp32 (TF32 off)"


def test_evaluate_sweeps_exports_npz_and_reports_precision_recall(trained, reference, random_vae_ckpt,  # noqa: F811
                                                                  inception_weights, tmp_path):  # noqa: F811
    ckpt_dir, _ = trained
    batch, _, _ = reference
    (tmp_path / "checkpoint-last.pth").symlink_to(ckpt_dir / "checkpoint-last.pth")
    args = eval_args(tmp_path, batch, random_vae_ckpt, inception_weights, "--keep_samples",
                     "--save_npz", "--precision_recall", "--ref_batch", batch)
    args[args.index("--cfg") + 1] = "1.0,2.0"
    args[args.index("--infer_temperature") + 1] = "0.7,1.0"
    args[args.index("--num_images") + 1] = 4  # 2 per class: enough for k = 3 neighbours
    proc = run_script("main_ear.py", args)
    assert proc.stderr.count("not the standard Inception weights") == 1  # loaded once
    lines = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert sorted((r["infer_temperature"], r["cfg"]) for r in lines) == [
        (0.7, 1.0), (0.7, 2.0), (1.0, 1.0), (1.0, 2.0)]
    for r in lines:
        assert {"fid", "is", "precision", "recall"} <= set(r) and 0 <= r["recall"] <= 1
        # The ADM-format export holds exactly the PNGs, in the recorded permutation, and labels.
        with np.load(r["npz"]) as data:
            assert list(data.files) == ["arr_0", "arr_1"]
            arr, labels = data["arr_0"], data["arr_1"]
        assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8 and labels.dtype == np.int64
        order = npz_order(4, r["npz_permutation_seed"])
        assert labels.tolist() == (order // 2).tolist()  # 2 images per class, in index order
        folder = tmp_path / ("samples-" + r["npz"].split("samples-")[1].rsplit("_", 1)[0])
        for row, index in enumerate(order):
            assert np.array_equal(arr[row], np.asarray(Image.open(folder / f"{index:05d}.png")))
    table = (tmp_path / "sweep-epoch0.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "precision" in table[0] and "recall" in table[0]
    assert (tmp_path / "sweep-epoch0.png").stat().st_size > 1000


def test_exported_weights_sample_from_a_folder_and_from_the_hub(trained, random_vae_ckpt, tmp_path,  # noqa: F811
                                                               monkeypatch, capsys):
    import huggingface_hub

    import export_ear
    import sample_ear
    ckpt_dir, _ = trained
    export_ear.main(["--resume", str(ckpt_dir), "--out", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["format"] == "ear-weights/1" and config["weights"] == "ema"
    assert config["decoder_embed_dim"] == 32 and config["head"] == "energy"
    sample = ["--vae_path", str(random_vae_ckpt), "--class_ids", "1", "0", "--samples_per_class", "2",
              "--num_iter", "2", "--device", "cpu", "--seed", "3"]

    def grid(resume, out, *extra):
        sample_ear.main(*sample_ear.parse_args(["--resume", resume, *sample, "--out", str(out), *extra]))
        return np.asarray(Image.open(out))

    from_checkpoint = grid(str(ckpt_dir), tmp_path / "a.png")
    from_folder = grid(str(tmp_path / "export"), tmp_path / "b.png")
    assert np.array_equal(from_checkpoint, from_folder)  # the same EMA weights
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        return str(tmp_path / "export")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    from_hub = grid("someone/ear-tiny", tmp_path / "c.png", "--revision", "v1")
    assert np.array_equal(from_checkpoint, from_hub)
    assert calls == [("someone/ear-tiny", "v1", ["config.json", "model.safetensors"])]

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploads.append(("create", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            uploads.append(("upload", repo_id, sorted(allow_patterns)))
            return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    export_ear.main(["--resume", str(ckpt_dir), "--out", str(tmp_path / "export2"),
                     "--push_to_hub", "someone/ear-tiny"])
    assert uploads == [("create", "someone/ear-tiny", True),
                       ("upload", "someone/ear-tiny", ["README.md", "config.json", "model.safetensors"])]
    assert "pushed to https://hub.example/commit/1" in capsys.readouterr().out
