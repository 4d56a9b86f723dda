"""FID reference statistics: the 2048-d Inception pool-feature mean `mu` and covariance `sigma`."""
import contextlib
from pathlib import Path

import numpy as np
import torch

FEATURE_DIM = 2048
IS_SPLITS = 10


def load_stats(path, dim: int = FEATURE_DIM, fetch_hint: str = "python util/download.py --fid_stats") -> tuple:
    """(mu (dim,), sigma (dim, dim)) as float64 from an .npz holding `mu` and `sigma` (ADM's
    VIRTUAL_imagenet256_labeled.npz qualifies too); anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics {path} not found; fetch them with `{fetch_hint}`")
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
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: expected mu ({dim},) and sigma ({dim}, {dim}), found "
                         f"{mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain non-finite values")
    return mu, sigma


def load_fid_stats(path, fetch_hint: str = "python util/download.py --fid_stats") -> tuple:
    """The Inception statistics (2048-d) of `path`: see `load_stats`."""
    return load_stats(path, FEATURE_DIM, fetch_hint)


def stats_resolution(path):
    """The image side the statistics of `path` were computed at (its `resolution` entry, which
    the files we write carry), or None where the file does not say."""
    with np.load(path) as data:
        if "resolution" not in data.files:
            return None
        try:
            return int(data["resolution"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: `resolution` must be one whole number, found "
                             f"{data['resolution']!r}") from None


def npz_array_shape(path, name: str) -> tuple:
    """The shape of array `name` in an .npz, read from its header (a 1.6 GB reference batch is
    not loaded to learn its resolution)."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(f)
    return shape


def check_resolution(source: str, found, resolution) -> None:
    """Samples of side `resolution` can only be compared with a reference at the same side."""
    if resolution is not None and found is not None and found != resolution:
        raise ValueError(f"{source} is for {found}x{found} images but the samples are "
                         f"{resolution}x{resolution} (--img_size): measure against a reference "
                         "at the samples' resolution")


@contextlib.contextmanager
def exact_float32():
    """Features in full float32: TF32 off for cuDNN convolutions and CUDA matmuls while they
    are computed (PyTorch leaves TF32 on for convolutions by default, so on Ampere and later
    GPUs Inception would run at a 10-bit mantissa), restored afterwards. Recorded in every
    result as `feature_precision`."""
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


FEATURE_PRECISION = "fp32 (TF32 off)"


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


# FD_DINOv2 as dgm-eval computes it (the numbers EDM2 and later papers publish): ViT-L/14 from
# torch.hub, the CLS token after the final norm (the hub model's output), 1024-d.
DINOV2_REPO, DINOV2_MODEL, DINOV2_DIM, DINOV2_SIDE = "facebookresearch/dinov2", "dinov2_vitl14", 1024, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 (B, 3, 224, 224) as dgm-eval feeds DINOv2: PIL's
    bicubic resize (which antialiases when it shrinks) to 224 x 224, scaled to [0, 1],
    normalised with ImageNet's mean and std. (torch-fidelity resizes without antialiasing, which
    changes the inputs by 0.45-2.2 levels on 256-px photos: its FD_DINOv2 is not comparable.)"""
    from PIL import Image
    resized = np.stack([np.asarray(Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
                                   .resize((DINOV2_SIDE, DINOV2_SIDE), Image.BICUBIC))
                        for img in images])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2Features:
    """dgm-eval's FD_DINOv2 feature network. torch.hub fetches its code and weights from the
    facebookresearch/dinov2 repository (needs network once; torch.hub caches both), so this
    trusts that repository. `weights_sha256` keys cached reference features."""

    def __init__(self, device):
        import hashlib
        net = torch.hub.load(DINOV2_REPO, DINOV2_MODEL)
        h = hashlib.sha256(DINOV2_MODEL.encode())
        for key, value in net.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.weights_sha256 = h.hexdigest()
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    @torch.no_grad()
    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, 1024) of uint8 images (B, 3, H, W)."""
        return self.net(dinov2_inputs(images).to(self.device)).float().cpu()

    def __call__(self, dataset, batch_size: int = 64) -> torch.Tensor:
        """Features (N, 1024) of a dataset of uint8 (3, H, W) images."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        return torch.cat([self.batch(images) for images in loader])


class ImageArray(torch.utils.data.Dataset):
    """uint8 images (N, H, W, 3) as torch-fidelity reads image files: uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def extract_features(extractor, dataset, device, batch_size: int = 64,
                     read_workers: bool = False) -> dict:
    """One pass of `extractor` over a torch-fidelity dataset: {feature name: (N, F) tensor}.

    With `read_workers`, torch-fidelity's loader reads the dataset in min(4, 2 * CPUs) worker
    processes (its `save_cpu_ram=False`): for image files (50,000 sample PNGs are decoded while
    Inception runs). Without, in this process: for an array in memory (a reference batch),
    which a spawned worker would get a copy of."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    with workers_outlive_sigterm() if read_workers else contextlib.nullcontext():
        return get_featuresdict_from_dataset(dataset, extractor, batch_size,
                                             cuda=torch.device(device).type == "cuda",
                                             save_cpu_ram=not read_workers, verbose=False)


@contextlib.contextmanager
def workers_outlive_sigterm():
    """Block the save signals (SIGTERM, SIGINT, SIGUSR1) in this thread while the block runs, so
    that loader workers started in it inherit them blocked. A preemption's signal often reaches
    the whole process group (SLURM, torchrun), and would end the workers (torch's handler, or
    SIGUSR1's default action) and the measurement with them; this process gets the signal when
    the block ends, and acts on it then (a save signal: the run saves and exits for requeueing,
    as anywhere else)."""
    import signal

    from util.signals import DEFAULT_SAVE_SIGNALS, parse_signals
    before = signal.pthread_sigmask(signal.SIG_BLOCK, parse_signals(DEFAULT_SAVE_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@torch.no_grad()
def inception_pool(extractor, images: torch.Tensor, device) -> torch.Tensor:
    """The 2048-d pool features (B, 2048) of uint8 images (B, 3, H, W), as extract_features
    computes them."""
    out = extractor.convert_features_tuple_to_dict(extractor(images.to(device)))
    return out["2048"].float().cpu()


def folder_images(folder):
    """The PNGs of a folder as torch-fidelity reads them (its own `prepare_input_from_id`)."""
    from torch_fidelity.utils import prepare_input_from_id
    return prepare_input_from_id(1, input1=str(folder), samples_find_ext="png", verbose=False)


def gaussian(features: np.ndarray) -> tuple:
    """(mean, covariance) of features (N, F), in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fit to two feature sets (N, F)."""
    return fid_from_statistics(*gaussian(a), *gaussian(b))


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

    def resolution(self) -> int:
        """The side of the reference images (from `arr_0`'s header, without loading it)."""
        self.check()
        shape = npz_array_shape(self.path, "arr_0")
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"{self.path}: `arr_0` must be square RGB images (N, H, W, 3), "
                             f"found shape {shape}")
        return shape[1]

    def features(self, feature: str, extractor_sha256: str, compute) -> torch.Tensor:
        """The reference images' `feature` (N, F), `compute(dataset)` on first use and cached
        as described."""
        from util.fileio import atomic_write
        cache = self.path.with_name(f"{self.path.stem}.{feature}.npz")
        key = {"source_sha256": self.sha256(), "extractor_sha256": extractor_sha256}
        if cache.is_file():
            with np.load(cache) as data:
                if all(str(data[k]) == v for k, v in key.items()):
                    return torch.from_numpy(data["features"])
        features = compute(ImageArray(self.images()))
        atomic_write(cache, lambda f: np.savez(f, features=features.numpy(), **key))
        return features


class InceptionMetrics:
    """`evaluate()` metrics for ImageNet, from one Inception pass over the samples: FID against
    reference statistics, IS, and, with a reference batch, precision and recall (k = 3, as ADM's
    evaluator; torch-fidelity's implementation). With fd_dinov2, also FD_DINOv2 as dgm-eval
    computes it, against `dinov2_stats` (mu/sigma of DINOv2 features, e.g. of a training set, as
    EDM2 reports it) or else the reference batch's images. Every result names its references.

    Everything is loaded, the references' resolutions compared with the samples' (`resolution`),
    and the reference features computed, once, by `check()`, before anything is generated.
    Features are computed in full float32 (`exact_float32`)."""

    def __init__(self, stats_path, weights_path, device, ref_batch=None, fd_dinov2: bool = False,
                 dinov2_stats=None, resolution: int = None):
        self.stats_path, self.weights_path, self.device = stats_path, weights_path, device
        self.ref_batch = ReferenceBatch(ref_batch) if ref_batch else None
        self.fd_dinov2, self.dinov2_stats, self.resolution = fd_dinov2, dinov2_stats, resolution
        self.reference = self.extractor = None

    def check_stats_resolution(self, path, flag: str) -> None:
        import sys
        found = stats_resolution(path)
        check_resolution(f"{flag} {path}", found, self.resolution)
        if found is None and self.resolution is not None:
            print(f"warning: {flag} {path} does not record the resolution it was computed at; "
                  f"it must be {self.resolution}x{self.resolution}, the samples' (--img_size)",
                  file=sys.stderr)

    def check(self) -> None:
        """Fail before generating anything if something the metrics need is unavailable or
        does not match the samples."""
        if self.extractor is not None:
            return
        self.reference = load_fid_stats(self.stats_path)
        self.check_stats_resolution(self.stats_path, "--fid_stats")
        if self.ref_batch is not None:
            check_resolution(f"--ref_batch {self.ref_batch.path}", self.ref_batch.resolution(),
                             self.resolution)
        if self.fd_dinov2 and self.dinov2_stats:
            self.dinov2_reference = load_stats(self.dinov2_stats, DINOV2_DIM,
                                               "python main_stats.py ... --fd_dinov2")
            self.check_stats_resolution(self.dinov2_stats, "--fd_dinov2_stats")
        extractor = inception_extractor(self.device, self.weights_path)
        with exact_float32():
            if self.ref_batch is not None:
                self.ref_pool = self.ref_batch.features(
                    "2048", extractor.weights_sha256,
                    lambda images: extract_features(extractor, images, self.device)["2048"])
            if self.fd_dinov2:
                self.dinov2 = DinoV2Features(self.device)
                if not self.dinov2_stats:
                    self.dinov2_reference = gaussian(self.ref_batch.features(
                        "dinov2", self.dinov2.weights_sha256, self.dinov2).numpy())
        self.extractor = extractor

    def references(self) -> dict:
        """What each number was measured against, for the JSON line."""
        refs = {"fid_reference": str(self.stats_path)}
        if self.ref_batch is not None:
            refs["precision_recall_reference"] = str(self.ref_batch.path)
        if self.fd_dinov2:
            refs["fd_dinov2_reference"] = str(self.dinov2_stats or self.ref_batch.path)
        return refs

    def measure(self, folder, labels, name: str) -> dict:
        self.check()
        with exact_float32():
            result = self.scores(folder_images(folder))
        return {**result, **self.references(), "feature_precision": FEATURE_PRECISION}

    def scores(self, images) -> dict:
        from torch_fidelity.metric_isc import (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD,
                                               isc_featuresdict_to_metric)
        from torch_fidelity.metric_prc import prc_features_to_metric
        # Workers on a GPU run, where every other rank waits for this pass; on the CPU they would
        # only compete with the Inception network for the same cores.
        feats = extract_features(self.extractor, images, self.device,
                                 read_workers=torch.device(self.device).type == "cuda")
        result = {"fid": fid_from_statistics(*gaussian(feats["2048"].numpy()), *self.reference)}
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
            result["fd_dinov2"] = fid_from_statistics(*gaussian(self.dinov2(images).numpy()),
                                                      *self.dinov2_reference)
        return {**result, "num_images": len(images)}

    # The sweep plot's axes: FID against IS.
    sweep_axes = ("fid", "is")
