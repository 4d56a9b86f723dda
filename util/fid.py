"""FID reference statistics: the 2048-d Inception pool-feature mean `mu` and covariance `sigma`."""
from pathlib import Path

import numpy as np

FEATURE_DIM = 2048


def load_fid_stats(path, fetch_hint: str = "python util/download.py --fid_stats") -> tuple:
    """(mu (2048,), sigma (2048, 2048)) as float64 from an .npz holding `mu` and `sigma`
    (ADM's VIRTUAL_imagenet256_labeled.npz qualifies too); anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics {path} not found; fetch them with `{fetch_hint}`")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(keys)}")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, "
                         f"{FEATURE_DIM}), found {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain non-finite values")
    return mu, sigma
