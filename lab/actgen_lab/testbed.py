"""Diagnostics of the backgrounds testbed: what each of ActGen's mechanisms did to a cell's images.

The digits ablation's diagnostics could not see the method's effects (docs/ablation.md): hardness
was the final classifier's loss on images it had trained on, diversity pooled every guide of a
class. Here, on the digits on backgrounds (``actgen_shared.backgrounds``), where every guide's
true foreground mask is known, each finished cell is measured by:

* **group accuracies** of the final classifier on the whole test split (3590 images; the loop's
  per-epoch test reads a subset): overall, on majority and minority backgrounds, worst
  (class, background kind) group;
* **hardness at ask**: cross-entropy of each generated image under the classifier of the epoch
  that asked for it (a snapshot taken when the job is posted), next to that classifier's
  cross-entropy on the guide itself;
* **diversity within a guide**: mean pairwise RMS pixel distance between the images of one guide
  (across jobs when a guide recurs), the share of images whose guide was used before, and the
  mean distance of an image to its guide;
* **change inside vs outside the true foreground**: mean absolute pixel change from the guide
  inside the guide's digit mask and outside it (eq. 8 promises little inside, much outside);
* **faithfulness**: share of generated images a reference classifier (a small CNN trained on
  every digit on every background, shipped in the model folder) reads as their class;
* **eq. 8's mask**: a few of the cell's guides are sampled again in-process with the cell's
  options through the service's sampler, whose ``last_attention`` is eq. 8's attention sum; its
  IoU with the true digit mask, as eq. 8 applies it (``m`` clipped to [0, 1], >= 0.5) and as
  attention alone (min-max normalised, >= 0.5), next to what a uniform mask scores (the digit's
  share of the image).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from actgen_lab.backgrounds import (
    REFERENCE_FILE,
    BackgroundsSplit,
    ReferenceClassifier,
    group_accuracies,
    load_backgrounds_split,
)
from actgen_lab.oracle import OracleClient
from actgen_shared.labels import DIGITS
from actgen_trainer.config import Config, TrainMode
from actgen_trainer.data import Subset
from actgen_trainer.link import job_options
from actgen_trainer.loop import Trainer
from actgen_trainer.models import build_model, predict

MASK_PROBES = 8  # guides of a cell sampled again in-process for eq. 8's mask
MASK_THRESHOLD = 0.5


class SnapshotTrainer(Trainer):
    """The trainer, keeping the classifier of every epoch that posts a job (hardness at ask)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def _generate(self, epoch: int) -> dict[str, Any]:
        # the weights the job's classifier is uploaded with (eq. 10 reads the same ones)
        self.snapshots[epoch] = copy.deepcopy(self._net.state_dict())
        return super()._generate(epoch)


def _guide_index(guide_id: str | None) -> int | None:
    """``train-123`` (the link's guide id) -> 123, the index into the train source."""
    if guide_id is None or not guide_id.startswith("train-"):
        return None
    return int(guide_id.removeprefix("train-"))


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0)


def within_guide_diversity(images: np.ndarray, guide_ids: list[str | None]) -> tuple[float | None, float]:
    """Mean over guides with 2+ images of their mean pairwise RMS distance, and the share of
    images whose guide had already guided an earlier image (records in arrival order)."""
    groups: dict[str, list[int]] = {}
    repeats = 0
    for i, gid in enumerate(guide_ids):
        if gid is None:
            continue
        repeats += gid in groups
        groups.setdefault(gid, []).append(i)
    per_guide = [
        float(np.mean([_rms(images[i], images[j]) for i, j in combinations(members, 2)]))
        for members in groups.values()
        if len(members) >= 2
    ]
    return (float(np.mean(per_guide)) if per_guide else None), repeats / max(len(guide_ids), 1)


def change_by_region(images: np.ndarray, guides: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean absolute pixel change (in [0, 1]) from guide to image inside and outside the guide's
    digit mask, pooled over the pixels of all images."""
    diff = np.abs(images.astype(np.float64) - guides.astype(np.float64)).mean(-1) / 255.0
    return float(diff[masks].mean()), float(diff[~masks].mean())


def applied_mask(maps: torch.Tensor, side: int, normalise: bool) -> torch.Tensor:
    """A (B, h, w) map as eq. 8 applies it, upsampled bilinearly to ``side`` px: (B, side, side).

    ``normalise``: min-max per item first (where attention points); otherwise the map clipped to
    [0, 1] (an unnormalised sum >= 1 covers everything).
    """
    x = maps.float()
    if normalise:
        flat = x.flatten(1)
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        x = ((flat - low) / (high - low).clamp(min=1e-12)).view_as(x)
    return F.interpolate(x[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0].clamp(
        0, 1
    )


def mask_iou(maps: torch.Tensor, masks: np.ndarray, normalise: bool) -> np.ndarray:
    """IoU per item of a (B, h, w) map (:func:`applied_mask`) cut at 0.5, with bool masks."""
    pred = (applied_mask(maps, masks.shape[-1], normalise) >= MASK_THRESHOLD).cpu().numpy()
    inter = (pred & masks).sum((1, 2))
    union = (pred | masks).sum((1, 2))
    return inter / np.maximum(union, 1)


def mask_by_region(maps: torch.Tensor, masks: np.ndarray, normalise: bool) -> tuple[float, float]:
    """The mean of the map eq. 8 applies (:func:`applied_mask`) inside and outside the true digit
    masks: how hard each guided step pulls the digit's pixels and the background's to the guide."""
    applied = applied_mask(maps, masks.shape[-1], normalise).cpu().numpy()
    return float(applied[masks].mean()), float(applied[~masks].mean())


def cell_mask(masks: np.ndarray, grid: int) -> torch.Tensor:
    """The true digit masks averaged over the cells of a ``grid`` x ``grid`` latent: the best map
    a mask on that grid can be (the digit's share of each cell), as (B, grid, grid)."""
    x = torch.from_numpy(masks).float()[:, None]
    return F.adaptive_avg_pool2d(x, grid)[:, 0]


@dataclass
class MaskProbe:
    """The service's sampler in this process, for eq. 8's mask of a cell's options."""

    sampler: Any  # actgen_generator.sampler.GuidedSampler

    @classmethod
    def load(cls, model: str | Path) -> MaskProbe:
        try:
            from actgen_generator.pipeline import load_pipeline
            from actgen_generator.sampler import GuidedSampler
        except ImportError:  # the trainer image alone: the testbed runs where the generator is installed
            raise RuntimeError(
                "the backgrounds testbed measures eq. 8's mask with the generator package: "
                "install actgen-generator next to the trainer (make setup does)"
            ) from None
        return cls(GuidedSampler(load_pipeline(model=str(model), device="cpu")))

    def attention(
        self,
        cfg: Config,
        epoch: int,
        guides: np.ndarray,
        labels: np.ndarray,
        classifier: torch.nn.Module | None,
    ) -> tuple[torch.Tensor, bool] | None:
        """Eq. 8's attention sum for these guides under the cell's options at ``epoch``, and whether
        eq. 8 normalises it (None: the mode has no mask)."""
        from actgen_generator.sampler import Classifier, SampleItem
        from actgen_shared.schemas import GenerationOptions, Mode

        gen = cfg.generation
        options = GenerationOptions.model_validate(
            {
                **gen.options,
                **gen.section_options,  # preset, prompt: as the loop posts them
                **job_options(cfg, epoch),
                "seed": cfg.seed,
                "plain_prob": 0.0,
            }
        )
        if options.mode not in (Mode.aig, Mode.actgen):
            return None
        clf = None
        if options.mode is Mode.actgen and options.adv_prob > 0 and classifier is not None:
            clf = Classifier(classifier, cfg.data.image_size, cfg.data.mean, cfg.data.std)
        elif options.adv_prob > 0:
            options = options.model_copy(update={"adv_prob": 0.0})
        items = [
            SampleItem(
                guide=g,
                class_id=int(c),
                class_name=DIGITS[int(c)],
                seed=cfg.seed * 1000 + k,
                bank_group="probe",
            )
            for k, (g, c) in enumerate(zip(guides, labels, strict=True))
        ]
        self.sampler(items, options, clf)
        maps = self.sampler.last_attention
        # the value eq. 8 ran with: the option, else the preset's or the model's defaults file's
        return None if maps is None else (maps, self.sampler.resolve(options).normalize_mask)


class BackgroundsDiagnostics:
    """Everything a backgrounds cell is measured with: the split, the reference, the mask probe."""

    title = "digits on backgrounds (class-correlated training backgrounds)"

    def __init__(self, model: str | Path, split: BackgroundsSplit | None = None) -> None:
        # the cells' data set's split (actgen_lab.sources.load_split): its guides and test groups
        self.split: BackgroundsSplit = load_backgrounds_split() if split is None else split
        self.reference = ReferenceClassifier.load(Path(model) / REFERENCE_FILE)
        self.model = model
        self._probe: MaskProbe | None = None
        correct = self.reference.predict(self.split.test.images) == self.split.test.labels
        self.reference_accuracy = group_accuracies(correct, self.split.test)
        self.uniform_iou = float(self.split.train.masks.mean())  # an all-ones mask's IoU, on average

    trainer_class: type[Trainer] = SnapshotTrainer

    @property
    def probe(self) -> MaskProbe:
        if self._probe is None:
            self._probe = MaskProbe.load(self.model)
        return self._probe

    def setup(self) -> dict[str, Any]:
        return {
            "reference_test": self.reference_accuracy,
            "uniform_mask_iou": self.uniform_iou,
            "test_images": len(self.split.test),
        }

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        """The cell's figures (module docstring); generation figures are None without images."""
        assert isinstance(trainer, SnapshotTrainer)
        out: dict[str, Any] = {"test_acc_monitor": trainer.state.metrics[-1]["test_acc"]}
        out.update(self._groups(trainer))
        out["test_acc"] = out.pop("accuracy")
        keys = (
            "hardness_at_ask",
            "guide_hardness_at_ask",
            "guide_diversity",
            "repeat_share",
            "distance_to_guide",
            "change_inside",
            "change_outside",
            "faithfulness",
            "mask_iou",
            "attention_iou",
        )
        out.update(dict.fromkeys(keys))
        records = trainer.generated.records
        if not records:
            return out
        images = np.stack(
            [np.asarray(trainer.generated.image(i), dtype=np.uint8) for i in range(len(records))]
        )
        labels = np.array([r.class_id for r in records])
        out["faithfulness"] = float(np.mean(self.reference.predict(images) == labels))
        out["guide_diversity"], out["repeat_share"] = within_guide_diversity(
            images, [r.guide_id for r in records]
        )
        # record position -> index of its guide in the train source
        index = {i: g for i, r in enumerate(records) if (g := _guide_index(r.guide_id)) is not None}
        known = list(index)
        if known:
            train = self.split.train
            rows = [index[i] for i in known]
            guides = _at_size(train.images[rows], images.shape[1])
            masks = _mask_at_size(train.masks[rows], images.shape[1])
            out["change_inside"], out["change_outside"] = change_by_region(images[known], guides, masks)
            out["distance_to_guide"] = float(
                np.mean([_rms(images[i], g) for i, g in zip(known, guides, strict=True)])
            )
        out.update(self._hardness(trainer, records, index))
        out.update(self._masks(trainer, records, index))
        return out

    def _groups(self, trainer: Trainer) -> dict[str, float]:
        test = self.split.test
        subset = Subset(trainer.test_source, np.arange(len(test)), trainer.eval_tf)
        loader = DataLoader(subset, batch_size=trainer.cfg.train.eval_batch_size, shuffle=False)
        probs, targets = predict(trainer.model, loader, trainer.device)
        return group_accuracies(probs.argmax(1) == targets, test)

    def _classifier(self, trainer: SnapshotTrainer, epoch: int) -> torch.nn.Module:
        net = build_model(trainer.cfg, trainer.num_classes)
        net.load_state_dict(trainer.snapshots[epoch])
        return net.eval()

    def _hardness(
        self, trainer: SnapshotTrainer, records: list, index: dict[int, int]
    ) -> dict[str, float | None]:
        """Mean cross-entropy of generated images (and of their guides) under the asking epoch's classifier."""
        generated, guides = [], []
        trainer.generated.transform = trainer.eval_tf
        for epoch in sorted({r.epoch for r in records}):
            if epoch not in trainer.snapshots:
                continue
            net = self._classifier(trainer, epoch)
            rows = [i for i, r in enumerate(records) if r.epoch == epoch]
            x = torch.stack([trainer.generated[i][0] for i in rows])
            y = torch.tensor([records[i].class_id for i in rows])
            with torch.no_grad():
                generated.extend(F.cross_entropy(net(x), y, reduction="none").tolist())
                known = [i for i in rows if i in index]
                if known:
                    g = torch.stack(
                        [trainer.eval_tf(Image.fromarray(self.split.train.images[index[i]])) for i in known]
                    )
                    yg = torch.tensor([records[i].class_id for i in known])
                    guides.extend(F.cross_entropy(net(g), yg, reduction="none").tolist())
        return {
            "hardness_at_ask": float(np.mean(generated)) if generated else None,
            "guide_hardness_at_ask": float(np.mean(guides)) if guides else None,
        }

    def _masks(
        self, trainer: SnapshotTrainer, records: list, index: dict[int, int]
    ) -> dict[str, float | None]:
        """Eq. 8's mask on up to MASK_PROBES of the cell's guides (spread over the run), sampled again."""
        cfg = trainer.cfg
        if cfg.generation.mode in (TrainMode.real, TrainMode.random, TrainMode.ig):
            return {}
        if isinstance(getattr(trainer, "client", None), OracleClient):
            return {}  # no diffusion, no eq. 8: the oracle keeps the true digit by construction
        known = list(index)
        picks = [known[int(k)] for k in np.linspace(0, len(known) - 1, min(MASK_PROBES, len(known)))]
        picks = list(dict.fromkeys(picks))
        if not picks:
            return {}
        epoch = records[picks[-1]].epoch  # one job's options for all probes: the latest's
        rows = [index[i] for i in picks]
        guides = self.split.train.images[rows]
        labels = self.split.train.labels[rows]
        classifier = self._classifier(trainer, epoch) if epoch in trainer.snapshots else None
        probed = self.probe.attention(cfg, epoch, guides, labels, classifier)
        if probed is None:
            return {}
        maps, normalise = probed  # what eq. 8 applies: the normalised map or the raw sum
        masks = self.split.train.masks[rows]
        return {
            "mask_iou": float(np.mean(mask_iou(maps, masks, normalise=normalise))),
            "attention_iou": float(np.mean(mask_iou(maps, masks, normalise=True))),
        }


def _at_size(images: np.ndarray, side: int) -> np.ndarray:
    if images.shape[1] == side:
        return images
    return np.stack(
        [np.asarray(Image.fromarray(i).resize((side, side), Image.Resampling.BICUBIC)) for i in images]
    )


def _mask_at_size(masks: np.ndarray, side: int) -> np.ndarray:
    if masks.shape[1] == side:
        return masks
    t = torch.from_numpy(masks[:, None].astype(np.float32))
    return (F.interpolate(t, size=(side, side), mode="area")[:, 0] >= 0.5).numpy()
