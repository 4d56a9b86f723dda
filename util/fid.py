"""FID reference statistics: the 2048-d Inception pool-feature mean `mu` and covariance `sigma`."""
from pathlib import Path

import numpy as np

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
    SHA-256 is not that of the standard weights gets a warning: its FID is not comparable.
    """
    import hashlib
    import io
    import sys

    import torch
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
    return extractor.to(torch.device(device))


def fid_and_inception_score(folder, reference: tuple, extractor, device="cpu",
                            batch_size: int = 64) -> dict:
    """FID against reference (mu, sigma) and Inception Score of the PNGs in `folder`, from one
    pass of `extractor` (see `inception_extractor`)."""
    import torch
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
    from torch_fidelity.utils import get_featuresdict_from_dataset, prepare_input_from_id
    images = prepare_input_from_id(1, input1=str(folder), samples_find_ext="png", verbose=False)
    feats = get_featuresdict_from_dataset(images, extractor, batch_size,
                                          cuda=torch.device(device).type == "cuda",
                                          save_cpu_ram=True, verbose=False)
    pool = feats["2048"].double().numpy()
    fid = fid_from_statistics(pool.mean(0), np.cov(pool, rowvar=False), *reference)
    # The standard 10 splits; fewer images than that would leave splits empty (IS = NaN).
    splits = min(IS_SPLITS, len(images))
    isc = isc_featuresdict_to_metric(feats, "logits_unbiased", isc_splits=splits,
                                     samples_shuffle=True, rng_seed=2020, verbose=False)
    return {"fid": fid, "is": isc[KEY_METRIC_ISC_MEAN], "is_std": isc[KEY_METRIC_ISC_STD],
            "is_splits": splits, "num_images": len(images)}


class InceptionMetrics:
    """`evaluate()` metrics for ImageNet: FID against reference statistics, and IS. The
    statistics and the network are loaded once, by `check()`, and reused."""

    def __init__(self, stats_path, weights_path, device):
        self.stats_path, self.weights_path, self.device = stats_path, weights_path, device
        self.reference = self.extractor = None

    def check(self) -> None:
        """Fail before generating anything if the statistics or the network are unavailable."""
        if self.extractor is None:
            self.reference = load_fid_stats(self.stats_path)
            self.extractor = inception_extractor(self.device, self.weights_path)

    def measure(self, folder, labels, name: str) -> dict:
        self.check()
        return fid_and_inception_score(folder, self.reference, self.extractor, self.device)
