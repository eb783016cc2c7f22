"""How a testbed measures a finished cell: the digits' figures here, the backgrounds' in
:mod:`actgen_lab.testbed`."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader

from actgen_lab.arms import Testbed
from actgen_shared.digits import ReferenceClassifier as DigitsReference
from actgen_shared.digits import load_digits_split
from actgen_trainer.config import Config
from actgen_trainer.loop import Trainer
from actgen_trainer.models import predict


class ReferenceClassifier(DigitsReference):
    """The digits reference, with its own score on the real test split and the real diversity."""

    def __init__(self, image_size: int) -> None:
        split = load_digits_split(image_size)
        super().__init__(split)
        self.test_accuracy = float(np.mean(self.predict(split.test_images) == split.test_labels))
        self.real_diversity = class_diversity(split.train_images, split.train_labels)


def class_diversity(images: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean over classes (with 2+ images) of the mean pairwise RMS distance of pixels in [0, 1]."""
    from scipy.spatial.distance import pdist

    per_class = []
    for c in np.unique(labels):
        group = images[labels == c].reshape(int(np.sum(labels == c)), -1).astype(np.float64) / 255.0
        if len(group) >= 2:
            per_class.append(float(np.mean(pdist(group)) / math.sqrt(group.shape[1])))
    return float(np.mean(per_class)) if per_class else None


def diagnostics(trainer: Trainer, reference: ReferenceClassifier) -> dict[str, float | None]:
    """Hardness, diversity and faithfulness of a finished run's generated images (None if none)."""
    generated = trainer.generated
    if len(generated) == 0:
        return {"hardness": None, "diversity": None, "faithfulness": None}
    labels = np.array([r.class_id for r in generated.records], dtype=np.int64)
    images = np.stack([np.asarray(generated.image(i), dtype=np.uint8) for i in range(len(generated))])
    generated.transform = trainer.eval_tf
    loader = DataLoader(generated, batch_size=trainer.cfg.train.eval_batch_size, shuffle=False)
    probs, _ = predict(trainer.model, loader, trainer.device)
    hardness = float(np.mean(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    faithfulness = float(np.mean(reference.predict(images) == labels))
    return {"hardness": hardness, "diversity": class_diversity(images, labels), "faithfulness": faithfulness}


class Diagnostics(Protocol):
    """How a testbed measures a finished cell (the digits' below, the backgrounds' in testbed.py)."""

    trainer_class: type[Trainer]

    def setup(self) -> dict[str, Any]:
        """What results.json keeps of the references (their own scores)."""
        ...

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        """The cell's figures; a ``test_acc`` among them replaces the loop's."""
        ...


class DigitsDiagnostics:
    """Hardness, diversity and faithfulness on the digits (:func:`diagnostics`)."""

    trainer_class = Trainer

    def __init__(self, image_size: int) -> None:
        self.reference = ReferenceClassifier(image_size)

    def setup(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.reference.test_accuracy,
            "real_diversity": self.reference.real_diversity,
        }

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        return dict(diagnostics(trainer, self.reference))


def testbed_diagnostics(testbed: Testbed, cfg: Config, model: str) -> Diagnostics:
    """The diagnostics of ``testbed`` (the backgrounds' import the generator lazily)."""
    if testbed.name == "backgrounds":
        from actgen_lab.sources import load_split
        from actgen_lab.testbed import BackgroundsDiagnostics

        return BackgroundsDiagnostics(model, load_split(cfg.data.dataset))
    return DigitsDiagnostics(cfg.data.image_size)
