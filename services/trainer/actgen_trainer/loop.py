"""Algorithm 1 of the paper, as a resumable training loop that never blocks on generation.

Per epoch: fold in every finished generated image (results cursor), merge the validation slice
back at mid-training, train one epoch, test; during the first half also evaluate the slice,
pick hard samples, post them as ONE job with the current classifier, and keep going (``sync``
waits for the job, as the paper's code does). A checkpoint after every epoch makes ``resume``
continue where it stopped: the results cursor and the stream ids in the generated set's index
fold every finished image exactly once, and per-epoch idempotency keys make a re-posted job
the same job.

Under torchrun (DDP) every rank trains on its shard with its own augmentation seed, evaluates
its shard of the test set and of the validation slice (metrics all-reduced), and posts its own
hard samples; rank 0 uploads the classifier once per epoch and decides how far the results
stream is read, and every rank then folds the same items in the same order into a folder of
its own, so no shared filesystem is needed. Backpressure: at most ``max_inflight`` unfinished
jobs per rank; one epoch after mid-training (``Config.final_wait_epoch``: the last job has had
an epoch, as every job has before its images are due) a bounded wait for the jobs still out.

Here: the Trainer and its epoch loop. Its other parts are mixins in their own modules: the
generator link (``link.py``, on the client API ``actgen_shared.run``: post, fold, drop, record), the run folder and checkpoints
(``checkpoint.py``), and the torchrun helper (``distributed.py``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from actgen_shared.ranks import share
from actgen_shared.run import new_run_id
from actgen_shared.seeds import derive_seed
from actgen_trainer.checkpoint import (
    METRICS_NAME,
    RUN_INFO_NAME,
    Checkpoints,
    State,
    _append_jsonl,
)
from actgen_trainer.config import Config, TrainMode
from actgen_trainer.data import (
    EpochSampler,
    GeneratedSet,
    Subset,
    TrainingImages,
    load_sources,
    split_train,
    transforms_for,
)
from actgen_trainer.distributed import device_for, local_rank, rank_seed, setup_dist, unwrap
from actgen_trainer.link import GeneratorAPI, GeneratorLink
from actgen_trainer.mixing import build_mixing
from actgen_trainer.models import (
    build_model,
    build_optimizer,
    build_scheduler,
    predict,
    scaled_lr,
)
from actgen_trainer.precision import Compute
from actgen_trainer.report import delivery_counts, write_report
from actgen_trainer.selection import select_guides
from actgen_trainer.tracking import Tracking

log = logging.getLogger("actgen_trainer")


@dataclass
class Summary:
    """What a finished run prints and returns."""

    run_dir: Path
    test_acc: float
    images_generated: int
    seconds_training: float
    seconds_waiting: float
    epochs: int
    report: Path | None = None

    delivery: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        out = (
            f"test accuracy {self.test_acc:.2%} | images generated {self.images_generated} | "
            f"seconds training {self.seconds_training:.1f} vs waiting {self.seconds_waiting:.1f}"
        )
        d = self.delivery
        if d.get("asked"):
            out += f" | asked {d['asked']}: on time {d['on_time']}, late {d['late']}, never {d['never']}"
        return out


def images_for_epoch(cfg: Config, train_size: int, epoch: int) -> int:
    """Hard samples the whole run (all ranks together) posts after generation epoch ``epoch``.

    ``images_per_epoch``; or, with ``generation.budget`` (a fraction of the ``train_size`` images,
    e.g. 0.10), that many images over the run, spread over the generation epochs (the remainder
    to the early ones), so the run asks for exactly the budget however many ranks share it.
    """
    budget = cfg.generation.budget
    if budget is None:
        return cfg.generation.images_per_epoch
    total = max(1, round(budget * train_size))
    return share(total, cfg.generation_epochs, epoch)


def images_per_rank_epoch(cfg: Config, train_size: int, world: int, rank: int, epoch: int) -> int:
    """Rank ``rank``'s share of epoch ``epoch``'s images (docs/architecture.md 6): the run's count
    split over the ranks, the remainder to the low ranks; a rank whose share is 0 posts nothing."""
    return share(images_for_epoch(cfg, train_size, epoch), world, rank)


class Trainer(Checkpoints, GeneratorLink):
    """One run of Algorithm 1. ``client`` is needed unless ``generation.mode`` is ``real``."""

    def __init__(
        self,
        cfg: Config,
        client: GeneratorAPI | None = None,
        resume: bool = False,
        progress: bool = True,
        stop_after_epoch: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.progress = progress
        self.stop_after_epoch = stop_after_epoch
        self.mode = cfg.generation.mode
        self.info = None
        self.actgen = None  # the client API run (actgen_shared.run), once the state is known
        if self.mode is not TrainMode.real:
            if client is None:
                raise ValueError(f"generation.mode={self.mode.value} needs a generator client")
            self.info = self._connect()  # fail fast on a wrong URL or key, before any training
        self.device = device_for(cfg.train.device, local_rank())
        self.dist = setup_dist(self.device)
        # TensorBoard, MLflow (rank 0); a missing extra is named here, before any work
        self.tracking = Tracking(cfg, main=self.dist.main, broadcast=self.dist.broadcast)
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        prompts = self.mode is not TrainMode.real and cfg.generation.label_set is None  # names in prompts
        self.train_source, self.test_source = load_sources(cfg.data, prompts)
        self.classes = list(self.train_source.classes)
        self.num_classes = len(self.classes)
        self.split = split_train(self.train_source, cfg.data, cfg.seed)  # val_folder, or val_size of train
        self.train_tf = transforms_for(cfg.data, train=True)
        self.eval_tf = transforms_for(cfg.data, train=False)
        test_idx = np.arange(len(self.test_source))[: cfg.data.test_subset]
        # each rank tests its own shard; the counts are summed over the ranks
        self.test_set = Subset(self.test_source, test_idx[self.dist.rank :: self.dist.world], self.eval_tf)
        # each rank folds the results stream into a folder of its own (no shared filesystem)
        gen_dir = "generated" if self.dist.main else f"generated-rank{self.dist.rank}"
        self.generated = GeneratedSet(self.run_dir / gen_dir, cfg.data.image_size, self.classes)

        model = build_model(cfg, self.num_classes).to(self.device)  # same init on every rank
        # train.amp and channels_last (a conv net on CUDA): actgen_trainer.precision
        self.compute = Compute.for_model(model, self.device, cfg.train.amp)
        model = self.compute.prepare(model)
        if self.dist.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            # augmentation draws from the global RNGs: one stream per rank
            seed = rank_seed(cfg.seed, self.dist.rank)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.model = model
        global_batch = cfg.train.batch_size * self.dist.world
        self.optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, global_batch))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs, global_batch)
        self.train_size = len(self.split.train) + len(
            self.split.val
        )  # what generation.budget is a fraction of
        self.scaler = self.compute.grad_scaler()  # enabled for float16 only
        self.mixer, self.loss_fn = build_mixing(cfg, self.num_classes)  # mixer: None unless Mixup/CutMix
        self._build_loaders(val_idx=self.split.val[self.dist.rank :: self.dist.world])

        if resume:
            self.state = self._restore()
        else:
            self._fresh_run_folder()
            run_id = self.dist.broadcast(new_run_id(cfg.run_name))  # 128 random bits
            self.state = State(run_id=run_id)
        if client is not None and self.mode is not TrainMode.real:
            self._link(self.state)
        self.tracking.start(self.state.run_id, resume=resume)  # TensorBoard, MLflow (rank 0)
        if self.dist.main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            self._write_run_info()

    def _write_run_info(self) -> None:
        info = {
            "run_id": self.state.run_id,
            "classes": self.classes,
            "mode": self.mode.value,
            "epochs": self.cfg.train.epochs,
            "generation_epochs": self.cfg.generation_epochs,
            "images_per_epoch": images_for_epoch(self.cfg, self.train_size, 0),  # the whole run's
            "budget": self.cfg.generation.budget,
            "sync": self.cfg.generation.sync,
            "dataset": self.cfg.data.dataset,
            "architecture": self.cfg.model.architecture,
            "seed": self.cfg.seed,
            "world_size": self.dist.world,
            "max_inflight": self.cfg.generation.max_inflight,
        }
        (self.run_dir / RUN_INFO_NAME).write_text(json.dumps(info, indent=2))

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Summary:
        cfg = self.cfg
        epochs = cfg.train.epochs
        bar = _tqdm(
            range(self.state.epoch, epochs),
            self.progress and self.dist.main,
            desc=f"{cfg.run_name} [{self.mode.value}]",
            unit="epoch",
            initial=self.state.epoch,
            total=epochs,
        )
        stopped = False
        try:
            for epoch in bar:
                row = self._epoch(epoch)
                bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", gen=row["generated_total"])
                if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                    log.info("stopping after epoch %d as asked", epoch)
                    stopped = True
                    break
        finally:
            bar.close()
            self._stop_loader_workers()
        if not stopped:
            self._cancel_leftovers()
        if self.client is not None and self.dist.main and self.state.epoch >= epochs:
            self._end_of_run()
        self._record_jobs()
        summary = self._summary()
        if self.dist.main:
            summary.report = write_report(self.run_dir)
        final = {
            "final_test_acc": summary.test_acc,
            "images_generated": summary.images_generated,
            **{f"delivery_{k}": v for k, v in summary.delivery.items()},
        }
        self.tracking.finish(final, self.generated, complete=self.state.epoch >= epochs)
        return summary

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        generating = self.mode is not TrainMode.real
        row: dict[str, Any] = {"epoch": epoch, "lr": self.scheduler.lr_at(epoch)}

        t0 = time.perf_counter()
        folded = 0
        if generating and epoch == cfg.final_wait_epoch:
            folded += self._final_wait(epoch)
            row["seconds_final_wait"] = time.perf_counter() - t0
        folded += self._fold(epoch) if generating else 0
        row["seconds_fold"] = time.perf_counter() - t0
        if epoch >= cfg.generation_epochs and not s.val_merged:
            s.val_merged = True  # Algorithm 1 at mid-training: the slice trains from now on
            row["merged_validation"] = True
        train_idx = np.concatenate([self.split.train, self.split.val]) if s.val_merged else self.split.train

        t0 = time.perf_counter()
        train_loss, train_acc, train_size = self._train_epoch(epoch, train_idx)
        row["seconds_train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        row["test_acc"] = self._test_accuracy()
        row["seconds_eval"] = time.perf_counter() - t0

        row.update(hard=None, posted=0, job_id=None, val_acc=None, seconds_post=0.0, seconds_wait=0.0)
        if generating and epoch < cfg.generation_epochs:
            gen_row = self._generate(epoch)
            folded += gen_row.pop("folded_early", 0)
            row.update(gen_row)

        s.epoch = epoch + 1
        row.update(
            train_loss=train_loss,
            train_acc=train_acc,
            train_size=train_size,
            folded=folded,
            generated_total=len(self.generated),
            pending_jobs=len(s.pending),
            time=time.time(),
        )
        s.metrics.append(row)
        if self.dist.main:
            _append_jsonl(self.run_dir / METRICS_NAME, row)
        self.tracking.log_epoch(epoch, row)
        self._checkpoint()
        return row

    def _loader_seed(self, epoch: int) -> int:
        """Shuffling (one process) and worker seeds: per epoch, and per rank under DDP."""
        if self.dist.rank == 0:
            return self.cfg.seed * 10_007 + epoch
        return derive_seed(self.cfg.seed, epoch, self.dist.rank, 1) % 2**63

    def _stop_loader_workers(self) -> None:
        """End the loaders' persistent workers (and, on CUDA, their pin-memory threads) with the
        loop rather than at garbage collection: a process that forks again later (a second run, as
        gpu-check's trainer section does) would hand their open queues to its children, which print
        QueueFeederThread errors when they exit. A later loop over a loader starts its workers again."""
        for loader in (self.train_loader, self.test_loader, self.val_loader):
            iterator = getattr(loader, "_iterator", None)  # a persistent loader keeps its iterator here
            if iterator is not None:
                iterator._shutdown_workers()
                loader._iterator = None

    def _build_loaders(self, val_idx: np.ndarray) -> None:
        """The run's three loaders, built once: training (its sampler follows the growing set),
        test shard, and this rank's share of the validation slice.

        With ``data.num_workers`` > 0 their workers persist across epochs (no start-up per
        epoch); on CUDA batches come in pinned memory, so the copy to the GPU is asynchronous.
        """
        cfg = self.cfg
        workers = cfg.data.num_workers
        common: dict[str, Any] = {
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": self.device.type == "cuda",
        }
        self.train_sampler = EpochSampler(
            self.generated,
            self._loader_seed,
            rank=self.dist.rank,
            world=self.dist.world,
            shuffle_seed=cfg.seed,
            size=cfg.train.epoch_images,
        )
        self.train_loader = DataLoader(
            TrainingImages(self.train_source, self.generated.root, self.train_tf),
            batch_size=cfg.train.batch_size,
            sampler=self.train_sampler,
            drop_last=False,
            # the workers' first base seed (each epoch reseeds them: SampleKey), kept off the global RNG
            generator=torch.Generator().manual_seed(self._loader_seed(0)),
            **common,
        )
        self.test_loader = DataLoader(
            self.test_set, batch_size=cfg.train.eval_batch_size, shuffle=False, **common
        )
        self.val_loader = DataLoader(
            Subset(self.train_source, val_idx, self.eval_tf),
            batch_size=cfg.train.eval_batch_size,
            shuffle=False,
            **common,
        )

    def _train_epoch(self, epoch: int, train_idx: np.ndarray) -> tuple[float, float, int]:
        """One epoch on this rank's shard; loss and accuracy are over all ranks.

        Nothing is read back to the host per step: the loss and the correct count are summed on
        the device and read once, at the end (float16's GradScaler still checks its gradients
        for infinities each step).
        """
        self.train_sampler.set_epoch(epoch, train_idx)  # the set as it is now, generated images included
        loader = self.train_loader
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        steps = max(len(loader), 1)
        # one iterator an epoch: given the loader itself, tqdm.auto's bar calls iter() on it once
        # more (a second start of its workers, and a second shuffle draw)
        batches = iter(loader)
        for step, (images, labels) in enumerate(
            _tqdm(
                batches,
                self.progress and self.dist.main,
                total=steps,
                leave=False,
                desc=f"epoch {epoch}",
                unit="batch",
            )
        ):
            self.scheduler.set(epoch + (step + 0.5) / steps)  # per-iteration warmup and cosine
            images = self.compute.inputs(images)
            labels = labels.to(self.device, non_blocking=True)
            targets = labels
            if self.mixer is not None:  # the whole batch, generated images included; soft targets
                images, targets = self.mixer(images, labels)
            with self.compute.autocast():
                logits = self.model(images)
                loss = self.loss_fn(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach().float() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
        # the epoch's one read from the device
        total, right, count = self.dist.sum(float(loss_sum), float(correct), seen)
        return total / max(count, 1), right / max(count, 1), self.train_sampler.total

    @property
    def _net(self) -> torch.nn.Module:
        """The bare network, for evaluation: it needs none of DDP's machinery, and the ranks'
        shards may differ by a batch, so nothing per batch may be a collective."""
        return unwrap(self.model)

    def _test_accuracy(self) -> float:
        """Each rank scores its shard of the test set; the counts are summed."""
        correct, count = 0.0, 0.0
        if len(self.test_set):
            probs, targets = predict(self._net, self.test_loader, self.device, self.compute)
            correct, count = float((probs.argmax(1) == targets).sum()), float(len(targets))
        correct, count = self.dist.sum(correct, count)
        return correct / max(count, 1.0)

    # --- generation ------------------------------------------------------------------------
    def _generate(self, epoch: int) -> dict[str, Any]:
        """Evaluate this rank's share of the slice, post its hard samples, wait only if sync.

        Collective: every rank calls it. Backpressure first: a rank with ``max_inflight`` jobs
        still out posts nothing this epoch (``skipped_backpressure``).
        """
        cfg, gen = self.cfg, self.cfg.generation
        rank = self.dist.rank
        val_idx = self.split.val[rank :: self.dist.world]
        t0 = time.perf_counter()
        probs, targets = predict(self._net, self.val_loader, self.device, self.compute)
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        count = images_per_rank_epoch(cfg, self.train_size, self.dist.world, rank, epoch)
        chosen, n_rank_hard = select_guides(probs, targets, gen.selection, gen.threshold, count, rng)
        val_correct, val_count, n_hard = self.dist.sum(
            float((probs.argmax(1) == targets).sum()), float(len(targets)), float(n_rank_hard)
        )
        out: dict[str, Any] = {
            "val_acc": val_correct / max(val_count, 1.0),
            "hard": int(n_hard),
            "seconds_eval_val": time.perf_counter() - t0,
            "skipped_backpressure": 0,
            "wait_timeouts": 0,
        }
        t0 = time.perf_counter()
        # backpressure (generation.max_inflight), the classifier upload by rank 0, the post
        sub = self._submit(epoch, val_idx, chosen, probs, targets)
        out["folded_early"] = sub.folded
        out["skipped_backpressure"] = int(sub.skipped)
        if sub.error is not None:
            out["post_error"] = sub.error
        out["seconds_post"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if gen.sync:
            assert self.actgen is not None
            out["wait_timeouts"] = self.actgen.wait(sub.jobs, timeout_s=gen.wait_timeout_s)
        self.dist.barrier()
        out["seconds_wait"] = time.perf_counter() - t0

        per_rank = self.dist.gather((out["skipped_backpressure"], out["wait_timeouts"]))
        out["posted"] = sub.posted
        out["skipped_backpressure"] = sum(skipped for skipped, _ in per_rank)
        out["wait_timeouts"] = sum(timeouts for _, timeouts in per_rank)
        out["job_id"] = sub.jobs[0][0] if sub.jobs else None
        return out

    def _summary(self) -> Summary:
        m = self.state.metrics
        training = sum(r["seconds_train"] + r["seconds_eval"] + r.get("seconds_eval_val", 0.0) for r in m)
        waiting = sum(r["seconds_fold"] + r["seconds_post"] + r["seconds_wait"] for r in m)
        return Summary(
            run_dir=self.run_dir,
            test_acc=m[-1]["test_acc"] if m else 0.0,
            images_generated=len(self.generated),
            seconds_training=training,
            seconds_waiting=waiting,
            epochs=len(m),
            delivery=delivery_counts(self.state.jobs, self.generated.state(), m),
        )


def _tqdm(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)
