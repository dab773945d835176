"""Run a model over labelled (or unlabelled) images: predictions, top-1, and agreement between models."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..data import ImageSet
from ..log import progress
from .core import image_input


@dataclasses.dataclass
class Predictions:
    logits: np.ndarray                 # N × classes, float32
    labels: Optional[np.ndarray]

    @property
    def argmax(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def top1(self) -> Optional[float]:
        """Percentage of correct predictions, or None without labels."""
        if self.labels is None:
            return None
        return float((self.argmax == self.labels).mean() * 100.0)

    @property
    def n(self) -> int:
        return int(len(self.logits))


def predict(runner, images: ImageSet, batch_size: int = 128, desc: str = "evaluate") -> Predictions:
    """Logits of a Polygraphy runner (OrtRunner, TrtRunner, TorchRunner) over ``images``."""
    input_name = image_input(runner)[0]
    outputs, labels = [], []
    for x, y in progress(images.batches(batch_size), desc, total=images.num_batches(batch_size)):
        outputs.append(next(iter(runner.infer({input_name: x}, check_inputs=False).values())).astype(np.float32))
        if y is not None:
            labels.append(y)
    return Predictions(np.concatenate(outputs), np.concatenate(labels) if labels else None)


def agreement(a: Predictions, b: Predictions) -> float:
    """Share (%) of images on which two models predict the same class."""
    return float((a.argmax == b.argmax).mean() * 100.0)


#: A flip whose logits moved by at most this share of their spread is a near tie (`near_tie_flips`).
NEAR_TIE_TOLERANCE = 0.01


def near_tie_flips(a: Predictions, b: Predictions, tolerance: float = NEAR_TIE_TOLERANCE) -> int:
    """Images whose argmax differs only because the top two logits nearly tie.

    Two runtimes executing the same INT8 graph can round an activation to neighbouring codes
    (different summation order); that moves an image's logits by a small fraction of their spread,
    enough to swap two classes that nearly tie. A flip counts here when the largest logit difference
    is within ``tolerance`` (default 1 %) of the image's logit spread (max - min in ``a``): the two models
    still compute the same thing there. A wrong scale or a misplaced Q/DQ moves logits far more.
    """
    flipped = a.argmax != b.argmax
    spread = a.logits.max(axis=1) - a.logits.min(axis=1)
    close = np.abs(a.logits - b.logits).max(axis=1) <= tolerance * spread
    return int((flipped & close).sum())


def cosine_similarity(a: Predictions, b: Predictions) -> float:
    """Mean over images of the cosine between the two logit vectors."""
    num = (a.logits * b.logits).sum(axis=1)
    den = np.linalg.norm(a.logits, axis=1) * np.linalg.norm(b.logits, axis=1) + 1e-12
    return float((num / den).mean())


def kl_divergence(reference: Predictions, other: Predictions) -> float:
    """Mean over images of KL(softmax(reference) ‖ softmax(other)), in float64."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(reference.logits), log_softmax(other.logits)
    return float(np.clip((np.exp(p) * (p - q)).sum(axis=1), 0, None).mean())
