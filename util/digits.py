"""The built-in dataset: scikit-learn's handwritten digits, and a way to score generated ones.

1,797 grayscale 8x8 images (values 0-16) in 10 classes, shipped inside scikit-learn, so the whole
pipeline runs offline. A fixed split (seed 0, 20% held out) serves everything here: EAR trains on
the training part; a logistic-regression classifier fit on the same part scores samples by
(a) the accuracy of the classes it assigns to class-conditional samples, and
(b) the Frechet distance between held-out real digits and samples in its 10-d logit space.
The same two numbers for the held-out real digits are the ceiling.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from util.fid import frechet_distance
from util.images import read_sample

NUM_CLASSES = 10
SIDE = 8


def digits_split(held_out: float = 0.2, seed: int = 0):
    """(train images, train labels, held-out images, held-out labels), images uint8 (N, 8, 8)
    on the 0-255 scale that saved PNGs use."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = np.round(data.images / 16.0 * 255.0).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, data.target, test_size=held_out,
                                              random_state=seed, stratify=data.target)
    return x_tr, y_tr, x_te, y_te


class DigitsDataset(Dataset):
    """Training digits as (image (1, 8, 8) in [-1, 1], label); `classes` as an ImageFolder's."""

    channels, side = 1, SIDE

    def __init__(self):
        x, y, _, _ = digits_split()
        self.images = torch.from_numpy(x).float().div(127.5).sub(1.0)[:, None]
        self.labels = torch.from_numpy(y).long()
        self.classes = [str(c) for c in range(NUM_CLASSES)]

    @property
    def targets(self) -> list:
        return self.labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class DigitClassifier:
    """Logistic regression on the training digits (pixels / 255)."""

    def __init__(self, seed: int = 0):
        from sklearn.linear_model import LogisticRegression
        x_tr, y_tr, self.x_held, self.y_held = digits_split()
        self.x_train, self.y_train = x_tr, y_tr
        self.model = LogisticRegression(max_iter=2000, random_state=seed).fit(self.inputs(x_tr), y_tr)

    @staticmethod
    def inputs(images: np.ndarray) -> np.ndarray:
        return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's logits (N, 10), an affine function of the pixels."""
        return self.model.decision_function(self.inputs(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.model.predict(self.inputs(images)) == np.asarray(labels)))

    def held_out(self, classes) -> tuple:
        """The held-out real digits (and labels) of these classes (None: all ten)."""
        keep = np.ones(len(self.y_held), bool) if classes is None else np.isin(self.y_held, classes)
        return self.x_held[keep], self.y_held[keep]

    def quality(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """Accuracy of the assigned classes and Frechet distance to the held-out real digits of
        the same classes (a model of digits 5-9 is compared with real 5-9s, not with all ten)."""
        reference, _ = self.held_out(np.unique(labels))
        return {"accuracy": self.accuracy(images, labels),
                "frechet": frechet_distance(self.features(reference), self.features(images))}

    def ceiling(self, classes=None) -> dict:
        """The same numbers for real digits of these classes: held-out accuracy; held-out vs
        training distance."""
        x_held, y_held = self.held_out(classes)
        x_train = self.x_train if classes is None else self.x_train[np.isin(self.y_train, classes)]
        return {"accuracy": self.accuracy(x_held, y_held),
                "frechet": frechet_distance(self.features(x_held), self.features(x_train))}


class DigitMetrics:
    """`evaluate()` metrics for the digits: reads the saved PNGs back, scores them, and saves
    them as one array file (images uint8 (N, 8, 8), labels) beside the grid."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.classifier = None

    def check(self) -> None:
        self.classifier = self.classifier or DigitClassifier()

    def measure(self, folder, labels: np.ndarray, name: str) -> dict:
        self.check()
        # By index, not by name: as strings, 100000.png would sort before 10001.png.
        images = np.stack([read_sample(folder, i, "L") for i in range(len(labels))])
        np.savez(self.output_dir / f"samples-{name}.npz", images=images, labels=labels)
        classes = np.unique(labels)
        return {**self.classifier.quality(images, labels), "num_images": len(images),
                "ceiling": self.classifier.ceiling(None if len(classes) == NUM_CLASSES else classes)}

    # The sweep plot's axes: Frechet distance against accuracy.
    sweep_axes = ("frechet", "accuracy")
