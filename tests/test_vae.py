"""The KL-16 tokenizer: reference-compatible weights, strict loading, shapes, downloads."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.vae import AutoencoderKL, load_vae
from util import download
from util.weights import read_weights
from util.crop import center_crop_arr


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL().eval()


def test_state_dict_matches_reference(vae, manifest):
    ours = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert ours == [(k, list(v)) for k, v in manifest["vae_kl16"].items()]
    assert len(ours) == 312


@pytest.mark.parametrize("fmt", ["ckpt_model", "ckpt_state_dict", "safetensors"])
def test_loads_reference_formats_strictly(vae, tmp_path, fmt):
    sd = {k: torch.randn_like(v) for k, v in vae.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "kl16.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "kl16.ckpt"
        torch.save({fmt.split("_", 1)[1]: sd, "epoch": 3}, path)
    loaded = load_vae(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("edit, key_named", [
    ("remove", "missing keys: decoder.conv_out.bias"),
    ("rename", "unexpected keys: decoder.conv_out.bias_renamed"),
    ("reshape", "shape mismatches: decoder.conv_out.bias"),
])
def test_bad_checkpoint_names_the_key(vae, tmp_path, edit, key_named):
    sd = dict(vae.state_dict())
    bias = sd.pop("decoder.conv_out.bias")
    if edit == "rename":
        sd["decoder.conv_out.bias_renamed"] = bias
    elif edit == "reshape":
        sd["decoder.conv_out.bias"] = torch.zeros(4)
    path = tmp_path / "broken.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=key_named):
        load_vae(path)


class Arbitrary:
    """A class a weights-only load must not instantiate."""


def test_checkpoint_with_code_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Arbitrary()}, path)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_weights(path, ("model",))


def test_missing_vae_file_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="util/download.py"):
        load_vae(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("size", [256, 64, 32])
def test_encode_decode_shapes(vae, size):
    with torch.no_grad():
        post = vae.encode(torch.randn(1, 3, size, size))
        assert post.parameters.shape == (1, 32, size // 16, size // 16)
        assert post.sample().shape == (1, 16, size // 16, size // 16)
        assert torch.equal(post.mode(), post.parameters[:, :16])
        assert vae.decode(post.sample()).shape == (1, 3, size, size)


def test_an_edit_keeps_the_posterior_mean(vae):
    """Editing encodes the kept region with the posterior mean (no draw), as MAR's cache keeps
    the moments; training's encode draws from the posterior."""
    from models.tokenizer import VAETokenizer
    from models.vae import LATENT_SCALE
    tokenizer = VAETokenizer(None, load=False)
    tokenizer.vae = vae
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).mode() * LATENT_SCALE
        assert torch.equal(tokenizer.encode_mean(images), mean)
        assert torch.equal(tokenizer.encode_mean(images), tokenizer.encode_mean(images))
        assert not torch.equal(tokenizer.encode(images), mean)


def test_posterior_clamps_log_variance():
    from models.vae import DiagonalGaussian
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([[[[-100.0]], [[100.0]]]])], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]


def test_center_crop():
    from PIL import Image
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(center_crop_arr(square, 32)), np.asarray(square))
    wide = Image.fromarray(rng.integers(0, 256, (70, 300, 3), dtype=np.uint8))  # box-halved once
    assert np.asarray(center_crop_arr(wide, 32)).shape == (32, 32, 3)
    # A wide image with a flat left and right third: the centre crop sees only the middle.
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[:, 30:90] = 200
    assert np.all(np.asarray(center_crop_arr(Image.fromarray(arr), 16)) == 200)


def test_fetch_vae_is_pinned_and_verified_before_reading(tmp_path, monkeypatch, vae):
    """The download path of util/download.py, with the Hub stood in for by a local file: the
    pinned revision is asked for, size and hash are checked before the file is unpickled, and a
    strict load test follows."""
    source = tmp_path / "hub" / "kl16.ckpt"
    source.parent.mkdir()
    calls = []

    def fake_hub(repo_id, filename, revision, local_dir):  # stands in for the network
        calls.append((repo_id, filename, revision))
        target = f"{local_dir}/{filename}"
        shutil.copy(source, target)
        return target

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)

    def publish(state_dict):
        torch.save({"model": state_dict}, source)
        return source.stat().st_size, download.sha256(source)

    size, digest = publish(dict(vae.state_dict()))
    ckpt = download.fetch_vae(tmp_path / "out", size=size, digest=digest)
    assert calls == [("jadechoghari/mar", "kl16.ckpt", download.VAE_REVISION)]
    assert len(download.VAE_REVISION) == 40 and len(download.VAE_SHA256) == 64
    assert ckpt == tmp_path / "out" / "kl16.ckpt" and download.sha256(ckpt) == digest
    for path in (ckpt, tmp_path / "out" / "kl16.safetensors"):
        loaded = load_vae(path)
        assert torch.equal(loaded.state_dict()["quant_conv.weight"], vae.state_dict()["quant_conv.weight"])

    # A file that is not the pinned one is refused before it is read, and nothing is written.
    with pytest.raises(ValueError, match="does not match the pinned"):
        download.fetch_vae(tmp_path / "out2", size=size, digest="0" * 64)
    with pytest.raises(ValueError, match=f"{size} bytes, expected {size + 1}"):
        download.fetch_vae(tmp_path / "out2", size=size + 1, digest=digest)
    assert list((tmp_path / "out2").iterdir()) == []

    broken = dict(vae.state_dict())
    broken.pop("encoder.conv_in.weight")
    size, digest = publish(broken)
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        download.fetch_vae(tmp_path / "out3", size=size, digest=digest)


def test_fetch_fid_stats_checks_shapes(tmp_path):
    good = tmp_path / "VIRTUAL_like.npz"
    np.savez(good, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    out = download.fetch_fid_stats(tmp_path / "fid" / "adm.npz", url=good.as_uri())
    with np.load(out) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match=r"expected mu \(2048,\)"):
        download.fetch_fid_stats(tmp_path / "fid" / "bad.npz", url=bad.as_uri())
    with pytest.raises(ValueError, match="sha256"):
        download.fetch_fid_stats(tmp_path / "fid" / "x.npz", url=good.as_uri(), expected_sha256="0" * 64)
    assert not (tmp_path / "fid" / "bad.npz").exists()


def test_fetch_ref_batch_checks_images_and_statistics(tmp_path):
    good = tmp_path / "source.npz"
    np.savez(good, arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    out = download.fetch_ref_batch(tmp_path / "fid" / "VIRTUAL.npz", url=good.as_uri())
    with np.load(out) as data:
        assert data["arr_0"].shape == (3, 8, 8, 3)
    no_images = tmp_path / "stats_only.npz"
    np.savez(no_images, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="no reference images"):
        download.fetch_ref_batch(tmp_path / "fid" / "bad.npz", url=no_images.as_uri())
    assert not (tmp_path / "fid" / "bad.npz").exists()
