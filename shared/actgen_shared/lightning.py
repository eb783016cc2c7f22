"""ActGen as a PyTorch Lightning callback, on the client API (``pip install 'actgen-shared[lightning]'``).

Algorithm 1 of the paper, the way the trainer runs it (docs/architecture.md 6 and 10): at the end
of each epoch of the first ``generate_fraction`` of training (after its validation), the model
scores a held-out ``hard_samples`` dataset, the misclassified images (or another rule of
``actgen_shared.selection``) are posted with the current model, and training goes on; the images
that have arrived are taken in at the end of every epoch, so the next epoch trains on them. One
epoch after the last post the callback waits (at most ``final_wait_s``) for the jobs still out.

How the images join the training data: Lightning builds the next epoch's train loader before
``on_train_epoch_start``, so the callback takes them in at the end of the epoch before, and your
``train_dataloader`` asks for the real data plus what has arrived::

    actgen = ActGenCallback(hard_set, classes=names, architecture="cifar_resnet18", image_size=32,
                            mean=MEAN, std=STD, transform=train_transform, images_per_epoch=64)

    class Module(L.LightningModule):
        def train_dataloader(self):
            return DataLoader(actgen.train_dataset(real_train_set), batch_size=128, shuffle=True)

    L.Trainer(max_epochs=100, reload_dataloaders_every_n_epochs=1, callbacks=[actgen]).fit(Module())

``reload_dataloaders_every_n_epochs=1`` is required (checked at setup): without it the loader of
epoch 0 would be used throughout. The callback is drop-in or loud: DataLoaders given to ``fit()``
directly stop it at setup, and a ``train_dataloader`` that does not call
``actgen.train_dataset(...)`` stops it before the first training step, each with the fix; a
wrong keyword (one ActGenRun does not take) is refused when the callback is built. ``hard_samples`` yields ``(normalised image tensor, label)``
like a validation set (the run's ``mean``/``std`` undo the normalisation for the guides);
``images_per_epoch`` counts all ranks together, as the trainer's does (the paper's budget is the
run's): under DDP each rank scores its own shard of ``hard_samples`` and posts its share of it
(``ranks.share``: near-equal, the remainder to the low ranks); every rank receives every image (ActGenRun's rule), and
Lightning's DistributedSampler shards the grown training set. The callback's state (cursor, jobs)
is saved in Lightning checkpoints; a resumed fit reads the arrived images again from the service.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from actgen_shared.guides import GuideError
from actgen_shared.ranks import share
from actgen_shared.run import ActGenRun
from actgen_shared.schedule import final_wait_epoch, generation_epochs
from actgen_shared.selection import Rule, select_guides

# ActGenRun's arguments the callback sets itself
OWN_RUN_ARGS = ("epochs", "generate_fraction", "images_per_epoch", "seed")


def _check_run_kwargs(run_kwargs: dict[str, Any]) -> None:
    """A keyword ActGenRun does not take is named now, with the callback's own way to say it."""
    if "normalized" in run_kwargs:
        raise TypeError(
            "ActGenCallback takes no normalized=: hard_samples are normalised images, undone with the "
            "callback's mean= and std= (pass those)"
        )
    taken = set(inspect.signature(ActGenRun.__init__).parameters) - {"self", *OWN_RUN_ARGS}
    unknown = sorted(set(run_kwargs) - taken)
    if unknown:
        raise TypeError(
            f"ActGenCallback got unexpected keyword {unknown[0]!r}; it takes its own arguments "
            f"(images_per_epoch, generate_fraction, ...) and ActGenRun's: {', '.join(sorted(taken))}"
        )
    if (run_kwargs.get("classes") is None) == (run_kwargs.get("label_set") is None):
        raise ValueError("ActGenCallback needs exactly one of classes= (the class names) or label_set=")


class ActGenCallback(pl.Callback):
    """Posts each early epoch's hard samples and folds the generated images into training.

    ``run_kwargs`` go to :class:`~actgen_shared.run.ActGenRun` (``classes`` or ``label_set``,
    ``architecture``, ``image_size``, ``mean``, ``std``, ``transform``, ``options``, ``url``,
    ``api_key``, ...). ``classifier`` picks the network to upload out of the LightningModule
    (default: the module itself; its state_dict keys must be the registry architecture's).
    The adversarial chance grows as in the paper (section 4.3): the run is given ``epochs`` (the
    Trainer's max_epochs) and follows the preset's schedule (actgen_shared.schedule), unless
    ``options`` fixes ``adv_prob`` (or the mode is not actgen).
    """

    def __init__(
        self,
        hard_samples: Dataset,
        *,
        images_per_epoch: int = 64,
        generate_fraction: float = 0.5,
        final_wait_s: float = 300.0,
        sync: bool = False,
        selection: Rule = "misclassified",
        threshold: float = 0.5,
        batch_size: int = 256,
        seed: int = 0,
        classifier: Callable[[pl.LightningModule], nn.Module] | None = None,
        **run_kwargs: Any,
    ) -> None:
        if not 0 < generate_fraction <= 1:
            raise ValueError(f"generate_fraction must be in (0, 1], got {generate_fraction}")
        if images_per_epoch < 1:
            raise ValueError(f"images_per_epoch must be at least 1, got {images_per_epoch}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if selection not in get_args(Rule):
            raise ValueError(f"selection must be one of {', '.join(get_args(Rule))}, got {selection!r}")
        if final_wait_s < 0:
            raise ValueError(f"final_wait_s must be >= 0, got {final_wait_s}")
        if (
            not hasattr(hard_samples, "__getitem__")
            or not hasattr(hard_samples, "__len__")
            or not len(hard_samples)
        ):
            raise ValueError(
                "hard_samples must be a non-empty map-style Dataset of (normalised image, label)"
            )
        _check_run_kwargs(run_kwargs)
        self.hard_samples = hard_samples
        self.images_per_epoch = images_per_epoch
        self.generate_fraction = generate_fraction
        self.final_wait_s = final_wait_s
        self.sync = sync
        self.selection: Rule = selection
        self.threshold = threshold
        self.batch_size = batch_size
        self.seed = seed
        self.classifier = classifier
        self.run_kwargs = {"seed": seed, **run_kwargs}
        self.run: ActGenRun | None = None
        self.history: list[dict[str, Any]] = []  # per epoch: hard, posted, taken in, arrived so far
        self._restored: Mapping[str, Any] | None = None
        self._asked = 0  # calls of train_dataset since setup: the user's train_dataloader cooperates

    # --- the data --------------------------------------------------------------------------
    def train_dataset(self, base: Dataset) -> Dataset:
        """``base`` plus every generated image arrived so far: call it in ``train_dataloader``."""
        self._asked += 1
        if self.run is None or self.run.dataset is None or not len(self.run.dataset):
            return base
        return self.run.train_dataset(base)

    # --- the schedule (actgen_shared.schedule, as the trainer and ActGenRun) -----------------
    @staticmethod
    def generation_epochs(epochs: int, fraction: float) -> int:
        """Hard samples are posted after epochs 0 .. this - 1."""
        return generation_epochs(epochs, fraction)

    @staticmethod
    def final_wait_epoch(epochs: int, generation_epochs: int) -> int | None:
        """The epoch that starts after the wait for the jobs still out: one after the last post's."""
        return final_wait_epoch(epochs, generation_epochs)

    # --- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise ValueError(
                "ActGenCallback schedules generation over max_epochs: give the Trainer max_epochs"
            )
        if getattr(trainer, "reload_dataloaders_every_n_epochs", 0) != 1:  # set by its data connector
            raise ValueError(
                "ActGenCallback adds the generated images to the training data at each epoch: "
                "create the Trainer with reload_dataloaders_every_n_epochs=1"
            )
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        instance = getattr(source, "instance", None)
        if instance is not None and not isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
            raise ValueError(
                "ActGenCallback cannot add its images to DataLoaders given to fit(): build the loader in "
                "your LightningModule's (or DataModule's) train_dataloader() as "
                "DataLoader(actgen.train_dataset(real_train_set), ...), and call fit(module) without loaders"
            )
        self._asked = 0
        if self.run is None:
            self.run = ActGenRun(
                epochs=int(trainer.max_epochs),
                generate_fraction=self.generate_fraction,
                images_per_epoch=self.images_per_epoch,
                **self.run_kwargs,
            )
        if self._restored is not None:
            self.run.load_state_dict(self._restored)
            self._restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch 0's loader is built: it must have come through :meth:`train_dataset`, or the
        generated images would never be trained on."""
        if self._asked == 0:
            raise RuntimeError(
                "ActGenCallback: your train_dataloader() did not call actgen.train_dataset(real_train_set), "
                "so the generated images would never reach training; return "
                "DataLoader(actgen.train_dataset(real_train_set), ...) from it"
            )

    def _mine(self, pl_module: pl.LightningModule, rank: int, world: int, epoch: int) -> dict[str, Any]:
        """This rank's share of the hard-sample set, scored; the chosen guides."""
        shard = Subset(self.hard_samples, range(rank, len(self.hard_samples), world))
        was_training = pl_module.training
        pl_module.eval()
        probs, targets = [], []
        with torch.no_grad():
            for images, labels in DataLoader(shard, batch_size=self.batch_size):
                probs.append(torch.softmax(pl_module(images.to(pl_module.device)).float(), 1).cpu())
                targets.append(torch.as_tensor(labels))
        pl_module.train(was_training)
        p, t = torch.cat(probs).numpy(), torch.cat(targets).numpy()
        rng = np.random.default_rng([self.seed, epoch, rank])
        count = share(self.images_per_epoch, world, rank)  # the run's count, split over the ranks
        chosen, n_hard = select_guides(p, t, self.selection, self.threshold, count, rng)
        return {
            "images": [shard[int(k)][0] for k in chosen],
            "labels": t[chosen],
            "confidences": p[chosen, t[chosen]],
            "hard": n_hard,
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        assert run is not None, "ActGenCallback.setup did not run"
        epoch, epochs = trainer.current_epoch, int(trainer.max_epochs or 1)
        generation_epochs = self.generation_epochs(epochs, self.generate_fraction)
        row: dict[str, Any] = {"epoch": epoch, "hard": None, "posted": 0}
        if epoch < generation_epochs:
            mined = self._mine(pl_module, run.ranks.rank, run.ranks.world, epoch)
            model = self.classifier(pl_module) if self.classifier is not None else pl_module
            try:  # the run follows the schedule (epochs=max_epochs): the paper's ramp of adv_prob
                sub = run.submit(
                    mined["images"],
                    mined["labels"],
                    epoch=epoch,
                    model=model,
                    confidences=mined["confidences"],
                    normalized=True,
                )
            except GuideError as exc:
                raise GuideError(
                    f"hard_samples: {exc} (the callback undoes the normalisation with its mean= and std=)"
                ) from None
            if self.sync:
                run.wait(sub.jobs)
            row.update(hard=mined["hard"], posted=sub.posted, error=sub.error)
        following = epoch + 1
        taken = 0
        if following < epochs:  # what arrived trains from the next epoch on
            if following == self.final_wait_epoch(epochs, generation_epochs):
                taken += run.drain(self.final_wait_s, following)
            taken += run.refresh(following)
        row.update(taken=taken, arrived=len(run.dataset) if run.dataset is not None else None)
        self.history.append(row)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training is over: cancel what is still out, delete the run's classifiers and bank."""
        if self.run is not None:
            self.run.cancel_pending()
            self.run.finish()
            self.run.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.run is not None:  # the service keeps the run's state: a resumed fit continues it
            self.run.close()

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run.state_dict() if self.run is not None else None, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        saved = state_dict.get("run")
        if saved is None:
            return
        if self.run is not None:
            self.run.load_state_dict(saved)
        else:
            self._restored = saved
