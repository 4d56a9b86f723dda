"""FID reference statistics: the 2048-d Inception pool-feature mean `mu` and covariance `sigma`."""
from pathlib import Path

import numpy as np
import torch

FEATURE_DIM = 2048
IS_SPLITS = 10


def load_fid_stats(path, fetch_hint: str = "python util/download.py --fid_stats") -> tuple:
    """(mu (2048,), sigma (2048, 2048)) as float64 from an .npz holding `mu` and `sigma`
    (ADM's VIRTUAL_imagenet256_labeled.npz qualifies too); anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics {path} not found; fetch them with `{fetch_hint}`")
    try:
        data = np.load(path)
    except Exception as e:  # garbage, a pickle, a truncated download ...
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with arrays 'mu' and 'sigma', "
                         "found a single .npy array")
    with data:
        if not {"mu", "sigma"} <= set(data.files):
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(data.files)}")
        try:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        except Exception as e:
            raise ValueError(f"{path}: cannot read mu/sigma ({e})") from e
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, "
                         f"{FEATURE_DIM}), found {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain non-finite values")
    return mu, sigma


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DEFAULT_INCEPTION = Path("pretrained_models") / "inception" / INCEPTION_FILE


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, computed by the
    released torch-fidelity (the dtypes must match there, so both sides are cast)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    out = fid_statistics_to_metric({"mu": f64(mu1), "sigma": f64(sigma1)},
                                   {"mu": f64(mu2), "sigma": f64(sigma2)}, verbose=False)
    return out[KEY_METRIC_FID]


INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch-fidelity's name
FETCH_INCEPTION = "python util/download.py --inception"


def resolve_inception_weights(path) -> Path:
    """The Inception weights file: `path`, else the one `util/download.py --inception` writes.

    Never None: torch-fidelity's own fallback download unpickles with weights_only=False and
    checks no hash, so a missing file is an error that names the fetch command.
    """
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--inception_weights {path}: no such file; fetch the weights "
                                    f"with `{FETCH_INCEPTION}`")
        return Path(path)
    if not DEFAULT_INCEPTION.is_file():
        raise FileNotFoundError(f"no Inception weights at {DEFAULT_INCEPTION}: fetch them with "
                                f"`{FETCH_INCEPTION}` (where there is network), or pass "
                                "--inception_weights PATH")
    return DEFAULT_INCEPTION


def inception_extractor(device, weights_path=None):
    """torch-fidelity's `inception-v3-compat` network giving pool features and logits.

    The file is read once; its bytes are loaded with weights_only=True (plain tensors only)
    before torch-fidelity loads the same bytes, so nothing in the file can run code. A file whose
    SHA-256 is not that of the standard weights gets a warning: its FID is not comparable. The
    digest is kept as `extractor.weights_sha256` (cached reference features are keyed by it).
    """
    import hashlib
    import io
    import sys

    from torch_fidelity.utils import create_feature_extractor
    path = resolve_inception_weights(weights_path)
    data = path.read_bytes()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a plain state dict of tensors ({e})") from e
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        print(f"warning: {path} has sha256 {digest[:16]}..., not the standard Inception weights "
              f"({INCEPTION_SHA256_PREFIX}...): its FID/IS are not comparable with published ones",
              file=sys.stderr)
    extractor = create_feature_extractor(
        "inception-v3-compat", ["2048", "logits_unbiased"], cuda=False, verbose=False,
        feature_extractor_weights_path=io.BytesIO(data))
    extractor.weights_sha256 = digest
    return extractor.to(torch.device(device))


def dinov2_extractor(device, name: str = "dinov2-vit-l-14"):
    """torch-fidelity's DINOv2 network (ViT-L/14, as the FD_DINOv2 literature uses). torch-fidelity
    takes it from torch.hub (the facebookresearch/dinov2 repository: code and weights from the
    network, with no offline path), so this needs network and trusts that repository."""
    import hashlib

    from torch_fidelity.utils import create_feature_extractor
    extractor = create_feature_extractor(name, ["dinov2"], cuda=False, verbose=False)
    h = hashlib.sha256(name.encode())
    for key, value in extractor.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    extractor.weights_sha256 = h.hexdigest()
    return extractor.to(torch.device(device))


class ImageArray(torch.utils.data.Dataset):
    """uint8 images (N, H, W, 3) as torch-fidelity reads image files: uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def extract_features(extractor, dataset, device, batch_size: int = 64) -> dict:
    """One pass of `extractor` over a torch-fidelity dataset: {feature name: (N, F) tensor}."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    return get_featuresdict_from_dataset(dataset, extractor, batch_size,
                                         cuda=torch.device(device).type == "cuda",
                                         save_cpu_ram=True, verbose=False)


def folder_images(folder):
    """The PNGs of a folder as torch-fidelity reads them (its own `prepare_input_from_id`)."""
    from torch_fidelity.utils import prepare_input_from_id
    return prepare_input_from_id(1, input1=str(folder), samples_find_ext="png", verbose=False)


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fit to two feature sets (N, F)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return fid_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


FETCH_REF_BATCH = "python util/download.py --ref_batch"


class ReferenceBatch:
    """ADM's reference batch (VIRTUAL_imagenet256_labeled.npz): the real images `arr_0`
    (N, H, W, 3) uint8, 10,000 for ImageNet 256, beside `mu`/`sigma`.

    Precision/recall (and FD_DINOv2) compare the samples with these images. Their features are
    computed once per network and cached beside the file as <stem>.<feature>.npz, with the
    SHA-256 of the batch and of the network's weights: another file or network recomputes them.
    """

    def __init__(self, path):
        self.path, self._sha256 = Path(path), None

    def check(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"reference batch {self.path} not found; fetch ADM's "
                                    f"VIRTUAL_imagenet256_labeled.npz with `{FETCH_REF_BATCH}`")
        with np.load(self.path) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{self.path} holds {sorted(data.files)} but no reference images "
                                 "`arr_0`: precision/recall need ADM's reference batch "
                                 f"VIRTUAL_imagenet256_labeled.npz; fetch it with `{FETCH_REF_BATCH}`")

    def sha256(self) -> str:
        if self._sha256 is None:
            from util.fileio import sha256
            self._sha256 = sha256(self.path)
        return self._sha256

    def images(self) -> np.ndarray:
        self.check()
        with np.load(self.path) as data:
            images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.path}: `arr_0` must be uint8 images (N, H, W, 3), found "
                             f"{images.dtype} {images.shape}")
        return images

    def features(self, extractor, feature: str, device):
        """The reference images' `feature` (N, F) from `extractor`, cached as described."""
        from util.fileio import atomic_write
        cache = self.path.with_name(f"{self.path.stem}.{feature}.npz")
        key = {"source_sha256": self.sha256(), "extractor_sha256": extractor.weights_sha256}
        if cache.is_file():
            with np.load(cache) as data:
                if all(str(data[k]) == v for k, v in key.items()):
                    return torch.from_numpy(data["features"])
        features = extract_features(extractor, ImageArray(self.images()), device)[feature]
        atomic_write(cache, lambda f: np.savez(f, features=features.numpy(), **key))
        return features


class InceptionMetrics:
    """`evaluate()` metrics for ImageNet, from one Inception pass over the samples: FID against
    reference statistics, IS, and, with a reference batch, precision and recall (k = 3, as ADM's
    evaluator; torch-fidelity's implementation). With fd_dinov2, also the Frechet distance in
    DINOv2 features to the reference batch. Everything is loaded, and the reference features
    computed, once, by `check()`, before anything is generated."""

    def __init__(self, stats_path, weights_path, device, ref_batch=None, fd_dinov2: bool = False):
        self.stats_path, self.weights_path, self.device = stats_path, weights_path, device
        self.ref_batch = ReferenceBatch(ref_batch) if ref_batch else None
        self.fd_dinov2 = fd_dinov2
        self.reference = self.extractor = None

    def check(self) -> None:
        """Fail before generating anything if something the metrics need is unavailable."""
        if self.extractor is not None:
            return
        self.reference = load_fid_stats(self.stats_path)
        if self.ref_batch is not None:
            self.ref_batch.check()
        extractor = inception_extractor(self.device, self.weights_path)
        if self.ref_batch is not None:
            self.ref_pool = self.ref_batch.features(extractor, "2048", self.device)
            if self.fd_dinov2:
                self.dinov2 = dinov2_extractor(self.device)
                self.ref_dinov2 = self.ref_batch.features(self.dinov2, "dinov2", self.device)
        self.extractor = extractor

    def measure(self, folder, labels, name: str) -> dict:
        from torch_fidelity.metric_isc import (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD,
                                               isc_featuresdict_to_metric)
        from torch_fidelity.metric_prc import prc_features_to_metric
        self.check()
        images = folder_images(folder)
        feats = extract_features(self.extractor, images, self.device)
        pool = feats["2048"].double().numpy()
        result = {"fid": fid_from_statistics(pool.mean(0), np.cov(pool, rowvar=False), *self.reference)}
        # The standard 10 splits; fewer images than that would leave splits empty (IS = NaN).
        splits = min(IS_SPLITS, len(images))
        isc = isc_featuresdict_to_metric(feats, "logits_unbiased", isc_splits=splits,
                                         samples_shuffle=True, rng_seed=2020, verbose=False)
        result.update({"is": isc[KEY_METRIC_ISC_MEAN], "is_std": isc[KEY_METRIC_ISC_STD],
                       "is_splits": splits})
        if self.ref_batch is not None:  # generated first, real second: torch-fidelity's order
            # On the device: 50,000 x 10,000 distances in 2048 dimensions are slow on a CPU.
            prc = prc_features_to_metric(feats["2048"].to(self.device), self.ref_pool.to(self.device),
                                         prc_neighborhood=3, prc_batch_size=10000,
                                         save_cpu_ram=True, verbose=False)
            result.update({"precision": prc["precision"], "recall": prc["recall"]})
            if self.fd_dinov2:
                gen = extract_features(self.dinov2, images, self.device)["dinov2"]
                result["fd_dinov2"] = frechet_distance(gen.numpy(), self.ref_dinov2.numpy())
        return {**result, "num_images": len(images)}

    # The sweep plot's axes: FID against IS.
    sweep_axes = ("fid", "is")
