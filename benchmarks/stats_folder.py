"""main_stats.py on a small image folder, then the evaluation's measurement against its file.

    python benchmarks/stats_folder.py [--inception_weights PATH] [--out /tmp/stats_demo]

The folder: scikit-learn's digits as 32 x 32 RGB PNGs in the ImageNet layout
(<out>/digits/train/<digit>/<i>.png), --per_class of each. `main_stats.py --classes 5,6,7,8,9` writes the statistics
and a reference batch of digits 5-9; then the evaluation's metrics (FID, IS, precision/recall
against that file) measure two sample folders: the digits 5-9 themselves (FID ~ 0 up to float
error) and the digits 0-4 (another distribution). Without --inception_weights (no network here)
a randomly initialised Inception network in torch-fidelity's format stands in: the mechanics are
the real ones, the values are not comparable with published FIDs.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util.digits import digits_split  # noqa: E402
from util.fid import InceptionMetrics  # noqa: E402
from util.images import sample_file  # noqa: E402


def write_digits(root: Path, per_class: int) -> dict:
    """The first `per_class` training digits of each class as RGB PNGs in class folders;
    {digit: [image paths]}."""
    images, labels, _, _ = digits_split()
    paths = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        if len(paths.get(int(label), [])) == per_class:
            continue
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray(image).resize((32, 32), Image.BICUBIC).convert("RGB").save(path)
        paths.setdefault(int(label), []).append(path)
    return paths


def stand_in_inception(path: Path) -> Path:
    """torch-fidelity's Inception network with random weights, saved in its file format."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    original = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(net.state_dict(), path)
    return path


def samples_folder(paths: list, folder: Path) -> Path:
    """Images as evaluation writes its samples: <folder>/00000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        Image.open(path).save(sample_file(folder, i))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inception_weights", default="")
    p.add_argument("--out", type=Path, default=Path("/tmp/stats_demo"))
    p.add_argument("--per_class", type=int, default=40, help="digits per class in the folder")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_digits(args.out / "digits", args.per_class)
    weights = args.inception_weights or stand_in_inception(args.out / "weights-inception-stand-in.pth")
    stats = args.out / "digits5-9_32.npz"
    command = [sys.executable, REPO / "main_stats.py", "--data_path", args.out / "digits",
               "--classes", "5,6,7,8,9", "--img_size", 32, "--out", stats, "--ref_images", 100,
               "--inception_weights", weights, "--device", "cpu", "--num_workers", 0]
    subprocess.run([str(a) for a in command], check=True, cwd=REPO)
    metrics = InceptionMetrics(stats, weights, "cpu", ref_batch=stats, resolution=32)
    with np.load(stats) as data:
        print(f"trace of sigma: {np.trace(data['sigma']):.6g} (the scale FID is measured on)")
    for name, digits in (("digits 5-9 (the folder itself)", range(5, 10)),
                         ("digits 0-4 (other images)", range(5))):
        folder = samples_folder([q for d in digits for q in paths[d]],
                                args.out / f"samples-{digits[0]}-{digits[-1]}")
        result = metrics.measure(folder, None, name)
        print(f"{name}: " + json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v
                                        for k, v in result.items()}))


if __name__ == "__main__":
    main()
