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
jobs per rank; at mid-training a bounded wait for the jobs still out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import torch
from torch.utils.data import DataLoader

from actgen_shared.client import GeneratorError
from actgen_shared.codecs import b64encode, image_from_b64
from actgen_shared.schemas import (
    ClassifierMeta,
    ClassifierRef,
    GenerationOptions,
    JobAccepted,
    JobItem,
    JobRequest,
    JobState,
    Mode,
    ResultsPage,
)
from actgen_shared.seeds import derive_seed

from actgen_trainer.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from actgen_trainer.config import AdvSchedule, Config, Guidance, TrainMode
from actgen_trainer.data import (
    DataError,
    GeneratedSet,
    Subset,
    guide_png,
    load_sources,
    partition,
    training_set,
    transforms_for,
)
from actgen_trainer.mixing import build_mixing
from actgen_trainer.models import (
    build_model,
    build_optimizer,
    build_scheduler,
    classifier_payload,
    predict,
    scaled_lr,
)
from actgen_trainer.report import delivery_counts, write_report
from actgen_trainer.selection import select_guides
from actgen_trainer.tracking import Tracking

log = logging.getLogger("actgen_trainer")

RESULTS_PAGE = 100
METRICS_NAME = "metrics.jsonl"
JOBS_NAME = "jobs.jsonl"
RUN_INFO_NAME = "run.json"
START_CURSOR = "0-0"


class GeneratorAPI(Protocol):
    """The part of ``actgen_shared.client.GeneratorClient`` the loop uses."""

    def info(self) -> Any: ...

    def upload_classifier(self, weights: bytes, meta: ClassifierMeta) -> ClassifierRef: ...

    def submit(self, request: JobRequest) -> JobAccepted: ...

    def status(self, job_id: str) -> JobState: ...

    def wait(self, job_id: str, timeout_s: float) -> JobState: ...

    def cancel(self, job_id: str) -> JobState: ...

    def results(
        self, run_id: str, after: str = START_CURSOR, limit: int = RESULTS_PAGE, wait_s: float = 0
    ) -> ResultsPage: ...


def _transient(exc: Exception) -> bool:
    """Network trouble or a 5xx: generation is auxiliary, so training goes on and retries later."""
    if isinstance(exc, GeneratorError):
        return exc.status >= 500
    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException))


_CAP_RE = re.compile(r"cap of (\d+)")


def _item_cap_from(exc: Exception) -> int | None:
    """The per-job item cap a 422 names ("... more than the cap of 256 per job"), else None."""
    if isinstance(exc, GeneratorError) and exc.status == 422 and exc.message.startswith("items"):
        found = _CAP_RE.search(exc.message)
        return int(found.group(1)) if found else None
    return None


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class GeneratorUnavailable(RuntimeError):
    """The generator did not answer at start; the message names the URL to check."""


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
            out += (f" | asked {d['asked']}: on time {d['on_time']}, late {d['late']}, "
                    f"never {d['never']}")
        return out


@dataclass
class _Dist:
    """This process's place in a torchrun job; every method is a no-op for one process.

    Every collective here must be called by all ranks in the same order.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks (metrics of sharded evaluation and training)."""
        if self.world == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return [float(v) for v in tensor.cpu()]


def _device(name: str) -> torch.device:
    """``auto``: this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _setup_dist(device: torch.device) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process is the plain path.

    On CUDA the process binds to its own GPU before the process group starts (NCCL's object
    collectives run on the current device, cuda:0 for every rank otherwise); gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                 device=device)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run seed (a one-process run is rank 0); others get a hash of it."""
    return seed if rank == 0 else derive_seed(seed, rank) % 2**31


def job_seed(seed: int, epoch: int, rank: int) -> int:
    """The noise seed of one job: a hash of (run seed, epoch, rank), so no two jobs share one."""
    return derive_seed(seed, epoch, rank)


def job_options(cfg: Config, epoch: int) -> dict[str, Any]:
    """The options the loop owns for the job of ``epoch``: mode, guidance and its schedule.

    ``adv_schedule=paper``: adv_prob = 0.5 e / E. ``authors``: a share r = max(1 - e / (0.5 E - 1),
    0) / 2 of the items is drawn as plain SD and adv_prob = 0.5 - r (the released train.py).
    ``guidance`` picks Table 4's rows: contrastive only (adv_prob 0), adversarial only (no bank
    sample), both, or none (``aig`` mode).
    """
    gen, epochs = cfg.generation, cfg.train.epochs
    mode = Mode(cfg.generation.mode.value)
    if mode is not Mode.actgen:
        return {"mode": mode.value, "adv_prob": 0.0}
    if gen.guidance is Guidance.aig:
        return {"mode": Mode.aig.value, "adv_prob": 0.0}
    out: dict[str, Any] = {"mode": mode.value}
    if gen.adv_schedule is AdvSchedule.authors:
        ramp = 0.5 * epochs - 1
        plain = max(1.0 - epoch / ramp, 0.0) * 0.5 if ramp > 0 else 0.0
        out.update(plain_prob=plain, adv_prob=0.5 - plain)
    else:
        out["adv_prob"] = 0.5 * epoch / epochs
    if gen.guidance is Guidance.contrastive:
        out["adv_prob"] = 0.0
    elif gen.guidance is Guidance.adversarial:
        out["bank_sample"] = 0
    return out


def images_per_rank_epoch(cfg: Config, train_size: int, world: int) -> int:
    """Hard samples each rank posts per generation epoch.

    ``generation.budget`` (a fraction of the ``train_size`` images, e.g. 0.10) is spread evenly
    over the generation epochs and the ranks, rounded up; without it, ``images_per_epoch``.
    """
    budget = cfg.generation.budget
    if budget is None:
        return cfg.generation.images_per_epoch
    total = max(1, round(budget * train_size))
    return max(1, math.ceil(total / (cfg.generation_epochs * world)))


def idempotency_key(run_id: str, epoch: int, rank: int) -> str:
    """One job per (run, epoch, rank): a resumed trainer that re-posts gets the same job."""
    return f"{run_id}:epoch{epoch}:rank{rank}"


@dataclass
class _State:
    """Everything besides the torch objects that a checkpoint carries (identical on all ranks)."""

    run_id: str
    epoch: int = 0  # next epoch to run
    cursor: str = START_CURSOR
    # job -> epoch / items / folded / rank: jobs whose items have not all arrived
    pending: dict[str, dict[str, int]] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    val_merged: bool = False
    classifiers: list[str] = field(default_factory=list)  # uploaded refs not yet deleted


class Trainer:
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
        self._item_cap = cfg.generation.max_items_per_job
        self._fold_failed = False
        if self.mode is not TrainMode.real:
            if client is None:
                raise ValueError(f"generation.mode={self.mode.value} needs a generator client")
            try:
                client.info()
            except Exception as exc:  # fail fast on a wrong URL or key, before any training
                raise GeneratorUnavailable(
                    f"generator at {cfg.generation.generator_url} did not answer /v1/info: {exc} "
                    "(start one with `actgen-generator serve`, or pass --generator-url)"
                ) from None
        self.device = _device(cfg.train.device)
        self.dist = _setup_dist(self.device)
        # TensorBoard, MLflow (rank 0); a missing extra is named here, before any work
        self.tracking = Tracking(cfg, main=self.dist.main, broadcast=self.dist.broadcast)
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.train_source, self.test_source = load_sources(cfg.data)
        self.classes = list(self.train_source.classes)
        self.num_classes = len(self.classes)
        self.split = partition(
            len(self.train_source), cfg.data.val_size, cfg.seed, cfg.data.train_subset
        )
        self.train_tf = transforms_for(cfg.data, train=True)
        self.eval_tf = transforms_for(cfg.data, train=False)
        test_idx = np.arange(len(self.test_source))[: cfg.data.test_subset]
        # each rank tests its own shard; the counts are summed over the ranks
        self.test_set = Subset(self.test_source, test_idx[self.dist.rank :: self.dist.world],
                               self.eval_tf)
        # each rank folds the results stream into a folder of its own (no shared filesystem)
        gen_dir = "generated" if self.dist.main else f"generated-rank{self.dist.rank}"
        self.generated = GeneratedSet(self.run_dir / gen_dir, cfg.data.image_size, self.classes)

        model = build_model(cfg, self.num_classes).to(self.device)  # same init on every rank
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
        self.images_per_epoch = images_per_rank_epoch(
            cfg, len(self.split.train) + len(self.split.val), self.dist.world)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.mixer, self.loss_fn = build_mixing(cfg, self.num_classes)  # mixer: None unless Mixup/CutMix

        if resume:
            self.state = self._restore()
        else:
            self._fresh_run_folder()
            run_id = self.dist.broadcast(f"{cfg.run_name}-{os.urandom(4).hex()}")
            self.state = _State(run_id=run_id)
        self.tracking.start(self.state.run_id, resume=resume)  # TensorBoard, MLflow (rank 0)
        if self.dist.main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            self._write_run_info()

    # --- run folder and checkpoints --------------------------------------------------------
    def _fresh_run_folder(self) -> None:
        taken = self.dist.broadcast((self.run_dir / "checkpoint.pt").exists())
        if taken:
            raise FileExistsError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose "
                "another run_name / output_dir"
            )
        (self.generated.root / GeneratedSet.INDEX).unlink(missing_ok=True)
        if self.dist.main:
            for name in (METRICS_NAME, JOBS_NAME):
                (self.run_dir / name).unlink(missing_ok=True)

    def _restore(self) -> _State:
        """Rank 0 reads the checkpoint and hands it to the others (no shared filesystem)."""
        ckpt: Any = None
        error: str | None = None
        if self.dist.main:
            try:
                ckpt = load_checkpoint(self.run_dir, self.cfg.run_name)
            except CheckpointError as exc:
                error = str(exc)
        error = self.dist.broadcast(error)
        if error is not None:
            raise CheckpointError(error)
        ckpt = self.dist.broadcast(ckpt)
        module = self.model.module if hasattr(self.model, "module") else self.model
        module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world:
            set_rng_state(ranks[self.dist.rank])
        elif self.dist.main:
            set_rng_state(ckpt["rng"])
        else:  # resumed with another world size: fresh streams for the new ranks
            log.warning("checkpoint has no RNG state for rank %d; seeding it anew", self.dist.rank)
        state = _State(
            run_id=ckpt["run_id"], epoch=ckpt["epoch"], cursor=ckpt["cursor"],
            pending=ckpt["pending"], jobs=ckpt["jobs"], metrics=ckpt["metrics"],
            val_merged=ckpt["val_merged"], classifiers=list(ckpt.get("classifiers", [])),
        )
        try:
            self.generated.restore(ckpt["generated"])
        except DataError:
            if self.dist.main:
                raise
            self._refetch(ckpt["generated"], state)  # another machine: rebuild from the stream
        if self.dist.main:
            _write_jsonl(self.run_dir / METRICS_NAME, state.metrics)
        log.info("resumed %s at epoch %d (cursor %s)", state.run_id, state.epoch, state.cursor)
        return state

    def _refetch(self, records: list[dict[str, Any]], state: _State) -> None:
        """Rebuild this rank's generated set from the results stream up to the cursor."""
        assert self.client is not None
        wanted = {r["id"]: r for r in records}
        self.generated.restore([])
        after = START_CURSOR
        while True:
            page = self._retry(lambda: self.client.results(state.run_id, after=after,
                                                           limit=RESULTS_PAGE), "read results")
            for item in page.items:
                if _stream_key(item.id) > _stream_key(state.cursor):
                    break
                if item.id in wanted:
                    self._add_item(item, wanted[item.id]["folded_before_epoch"])
            after = page.next
            if len(page.items) < RESULTS_PAGE or _stream_key(after) >= _stream_key(state.cursor):
                break
        if [r.id for r in self.generated.records] != [r["id"] for r in records]:
            raise DataError(f"rank {self.dist.rank}: the results stream no longer holds every "
                            "generated image of the checkpoint (expired?)")

    def _checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; every rank's RNG state goes in it."""
        rng_ranks = self.dist.gather(rng_state()) if self.dist.world > 1 else None
        if not self.dist.main:
            return
        module = self.model.module if hasattr(self.model, "module") else self.model
        s = self.state
        payload = {
            "run_name": self.cfg.run_name, "run_id": s.run_id, "epoch": s.epoch,
            "model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "generated": self.generated.state(), "cursor": s.cursor, "pending": s.pending,
            "jobs": s.jobs, "metrics": s.metrics, "val_merged": s.val_merged,
            "classifiers": s.classifiers,
        }
        if rng_ranks is not None:
            payload["rng_ranks"] = rng_ranks
        save_checkpoint(self.run_dir, payload)

    def _write_run_info(self) -> None:
        info = {
            "run_id": self.state.run_id, "classes": self.classes, "mode": self.mode.value,
            "epochs": self.cfg.train.epochs, "generation_epochs": self.cfg.generation_epochs,
            "images_per_epoch": self.images_per_epoch * self.dist.world,
            "budget": self.cfg.generation.budget,
            "sync": self.cfg.generation.sync, "dataset": self.cfg.data.dataset,
            "architecture": self.cfg.model.architecture, "seed": self.cfg.seed,
            "world_size": self.dist.world, "max_inflight": self.cfg.generation.max_inflight,
        }
        (self.run_dir / RUN_INFO_NAME).write_text(json.dumps(info, indent=2))

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Summary:
        cfg = self.cfg
        epochs = cfg.train.epochs
        bar = _tqdm(range(self.state.epoch, epochs), self.progress and self.dist.main,
                    desc=f"{cfg.run_name} [{self.mode.value}]", unit="epoch",
                    initial=self.state.epoch, total=epochs)
        stopped = False
        for epoch in bar:
            row = self._epoch(epoch)
            bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", gen=row["generated_total"])
            if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                log.info("stopping after epoch %d as asked", epoch)
                stopped = True
                break
        bar.close()
        if not stopped:
            self._cancel_leftovers()
        if self.client is not None and self.dist.main and self.state.epoch >= epochs:
            self._end_of_run()
        self._record_jobs()
        summary = self._summary()
        if self.dist.main:
            summary.report = write_report(self.run_dir)
        final = {"final_test_acc": summary.test_acc, "images_generated": summary.images_generated,
                 **{f"delivery_{k}": v for k, v in summary.delivery.items()}}
        self.tracking.finish(final, self.generated, complete=self.state.epoch >= epochs)
        return summary

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        generating = self.mode is not TrainMode.real
        row: dict[str, Any] = {"epoch": epoch, "lr": self.scheduler.lr_at(epoch)}

        t0 = time.perf_counter()
        folded = 0
        if generating and epoch == cfg.generation_epochs:
            folded += self._final_wait(epoch)
            row["seconds_final_wait"] = time.perf_counter() - t0
        folded += self._fold(epoch) if generating else 0
        row["seconds_fold"] = time.perf_counter() - t0
        if epoch >= cfg.generation_epochs and not s.val_merged:
            s.val_merged = True  # Algorithm 1 at mid-training: the slice trains from now on
            row["merged_validation"] = True
        train_idx = (
            np.concatenate([self.split.train, self.split.val]) if s.val_merged else self.split.train
        )

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
            train_loss=train_loss, train_acc=train_acc, train_size=train_size, folded=folded,
            generated_total=len(self.generated), pending_jobs=len(s.pending),
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

    def _train_epoch(self, epoch: int, train_idx: np.ndarray) -> tuple[float, float, int]:
        """One epoch on this rank's shard; loss and accuracy are over all ranks."""
        cfg = self.cfg
        dataset = training_set(self.train_source, train_idx, self.generated, self.train_tf)
        shuffle_gen = torch.Generator().manual_seed(self._loader_seed(epoch))
        sampler = None
        if self.dist.world > 1:  # same permutation on every rank (same seed), one shard each
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed)
            sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=shuffle_gen, num_workers=cfg.data.num_workers, drop_last=False,
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        steps = max(len(loader), 1)
        for step, (images, labels) in enumerate(_tqdm(loader, self.progress and self.dist.main,
                                                      leave=False, desc=f"epoch {epoch}",
                                                      unit="batch")):
            self.scheduler.set(epoch + (step + 0.5) / steps)  # per-iteration warmup and cosine
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            targets = labels
            if self.mixer is not None:  # the whole batch, generated images included; soft targets
                images, targets = self.mixer(images, labels)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(images)
                loss = self.loss_fn(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
        total_loss, correct, seen = self.dist.sum(total_loss, correct, seen)
        return total_loss / max(seen, 1), correct / max(seen, 1), len(dataset)

    @property
    def _net(self) -> torch.nn.Module:
        """The bare network, for evaluation: it needs none of DDP's machinery, and the ranks'
        shards may differ by a batch, so nothing per batch may be a collective."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.train.eval_batch_size, shuffle=False,
                          num_workers=self.cfg.data.num_workers)

    def _test_accuracy(self) -> float:
        """Each rank scores its shard of the test set; the counts are summed."""
        correct, count = 0.0, 0.0
        if len(self.test_set):
            probs, targets = predict(self._net, self._loader(self.test_set), self.device, self.amp)
            correct, count = float((probs.argmax(1) == targets).sum()), float(len(targets))
        correct, count = self.dist.sum(correct, count)
        return correct / max(count, 1.0)

    # --- talking to the generator ----------------------------------------------------------
    def _retry(self, call, what: str):
        """``call()`` retried with exponential backoff on 5xx and connection errors."""
        gen = self.cfg.generation
        delay = gen.retry_backoff_s
        for attempt in range(gen.retries + 1):
            try:
                return call()
            except Exception as exc:
                if not _transient(exc) or attempt == gen.retries:
                    raise
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt + 1,
                            gen.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, gen.retry_backoff_max_s)
        raise AssertionError("unreachable")

    def _inflight(self, rank: int) -> int:
        return sum(1 for job in self.state.pending.values() if job.get("rank", 0) == rank)

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
        probs, targets = predict(
            self._net, self._loader(Subset(self.train_source, val_idx, self.eval_tf)),
            self.device, self.amp,
        )
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        chosen, n_rank_hard = select_guides(probs, targets, gen.selection, gen.threshold,
                                            self.images_per_epoch, rng)
        val_correct, val_count, n_hard = self.dist.sum(
            float((probs.argmax(1) == targets).sum()), float(len(targets)), float(n_rank_hard))
        out: dict[str, Any] = {
            "val_acc": val_correct / max(val_count, 1.0), "hard": int(n_hard),
            "seconds_eval_val": time.perf_counter() - t0, "skipped_backpressure": 0,
            "wait_timeouts": 0,
        }
        t0 = time.perf_counter()
        cap = gen.max_inflight
        if cap is not None and any(self._inflight(r) >= cap for r in range(self.dist.world)):
            # before skipping, take in what has arrived since the epoch began (same on all ranks)
            out["folded_early"] = self._fold(epoch + 1)
        skip = cap is not None and self._inflight(rank) >= cap and len(chosen) > 0
        if skip:
            log.warning("epoch %d: rank %d has %d unfinished jobs (generation.max_inflight=%d): "
                        "the generator lags, so this epoch posts nothing", epoch, rank,
                        self._inflight(rank), cap)
            out["skipped_backpressure"] = 1
            chosen = chosen[:0]

        jobs: list[tuple[str, int]] = []
        classifier_ref = self._classifier_for(epoch, len(chosen))
        if len(chosen) and classifier_ref is not False:
            try:
                jobs = self._post(epoch, val_idx, chosen, probs, targets, classifier_ref or None)
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("epoch %d: could not post hard samples (%s); training goes on", epoch, exc)
                out["post_error"] = str(exc)
        elif len(chosen):
            out["post_error"] = "no classifier uploaded"
        out["seconds_post"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if gen.sync:
            out["wait_timeouts"] = self._wait_sync(jobs)
        self.dist.barrier()
        out["seconds_wait"] = time.perf_counter() - t0

        per_rank = self.dist.gather((jobs, out["skipped_backpressure"], out["wait_timeouts"]))
        out["posted"] = sum(count for rank_jobs, _, _ in per_rank for _, count in rank_jobs)
        out["skipped_backpressure"] = sum(skipped for _, skipped, _ in per_rank)
        out["wait_timeouts"] = sum(timeouts for _, _, timeouts in per_rank)
        out["job_id"] = jobs[0][0] if jobs else None
        for r, (rank_jobs, _, _) in enumerate(per_rank):
            for jid, count in rank_jobs:
                if not self._known_job(jid):
                    self.state.pending[jid] = {"epoch": epoch, "items": count, "folded": 0,
                                               "rank": r}
                    self.state.jobs.append({
                        "job_id": jid, "epoch": epoch, "items": count, "rank": r,
                        "classifier_ref": classifier_ref if isinstance(classifier_ref, str) else None,
                        "posted_at": time.time(),
                    })
        return out

    def _wait_sync(self, jobs: list[tuple[str, int]]) -> int:
        """``--sync``: wait for this rank's jobs; one that times out is skipped, not fatal."""
        assert self.client is not None
        timeouts = 0
        for job_id, _ in jobs:
            try:
                final = self.client.wait(job_id, timeout_s=self.cfg.generation.wait_timeout_s)
            except TimeoutError as exc:
                log.warning("%s: training goes on without waiting for it (its images fold in "
                            "if they arrive)", exc)
                timeouts += 1
                continue
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("waiting for job %s failed (%s); training goes on", job_id, exc)
                continue
            if final.status.value != "done":
                log.warning("job %s ended %s: %s", job_id, final.status.value, final.error)
        return timeouts

    def _classifier_for(self, epoch: int, n_items: int) -> str | None | bool:
        """Rank 0 uploads the current classifier once per epoch when some rank's job needs it.

        Collective. Returns the ref, None when no job needs one, False when the upload failed.
        """
        cfg = self.cfg
        options = {**job_options(cfg, epoch)}
        needed = options["mode"] == Mode.actgen.value and options.get("adv_prob", 0.0) > 0
        wanted = any(self.dist.gather(n_items > 0)) if needed else False
        if not wanted:
            return None
        ref: str | bool = False
        if self.dist.main:
            assert self.client is not None
            weights, meta = classifier_payload(self.model, cfg, self.num_classes)
            try:
                ref = self._retry(lambda: self.client.upload_classifier(weights, meta).ref,
                                  "classifier upload")
                self._retire_classifiers(keep=ref)  # earlier epochs' checkpoints: not needed
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("epoch %d: classifier upload failed (%s); no job this epoch", epoch, exc)
        return self.dist.broadcast(ref)

    def _known_job(self, job_id: str) -> bool:
        return any(j["job_id"] == job_id for j in self.state.jobs)

    def _post(
        self, epoch: int, val_idx: np.ndarray, chosen: np.ndarray, probs: np.ndarray,
        targets: np.ndarray, classifier_ref: str | None,
    ) -> list[tuple[str, int]]:
        """Post this rank's hard samples as one job, or several of at most the item cap."""
        assert self.client is not None
        cfg, gen = self.cfg, self.cfg.generation
        guides = self.run_dir / "guides"
        guides.mkdir(exist_ok=True)
        items = []
        for pos in chosen:
            index = int(val_idx[pos])
            guide_id = f"train-{index}"
            png = guide_png(self.train_source.image(index))
            (guides / f"{guide_id}.png").write_bytes(png)
            items.append(JobItem(
                image=b64encode(png), class_id=int(targets[pos]), guide_id=guide_id,
                confidence=float(np.clip(probs[pos, targets[pos]], 0.0, 1.0)),
            ))
        options = GenerationOptions.model_validate({
            **gen.options, **job_options(cfg, epoch), "seed": job_seed(cfg.seed, epoch, self.dist.rank),
        })
        names: dict[str, Any] = (
            {"label_set": gen.label_set} if gen.label_set else {"class_names": self.classes}
        )
        key = idempotency_key(self.state.run_id, epoch, self.dist.rank)
        while True:
            cap = self._item_cap or len(items)
            parts = [items[k : k + cap] for k in range(0, len(items), cap)]
            posted: list[tuple[str, int]] = []
            try:
                for k, part in enumerate(parts):
                    request = JobRequest(
                        run_id=self.state.run_id, epoch=epoch, items=part,
                        classifier_ref=classifier_ref, memory_bank_key=self.state.run_id,
                        options=options.model_copy(
                            update={"seed": derive_seed(options.seed, k)} if k else {}),
                        idempotency_key=key if len(parts) == 1 else f"{key}:part{k}", **names,
                    )
                    accepted = self._retry(lambda: self.client.submit(request), "submit")
                    posted.append((accepted.job_id, len(part)))
                    log.info("epoch %d: posted %d hard samples as job %s%s", epoch, len(part),
                             accepted.job_id, " (already posted)" if accepted.duplicate else "")
                return posted
            except GeneratorError as exc:
                learnt = _item_cap_from(exc)
                if learnt is None or learnt >= cap:
                    raise
                log.info("the generator takes at most %d items per job: splitting %d items",
                         learnt, len(items))
                self._item_cap = learnt

    def _end_of_run(self) -> None:
        """The run is over: none of its classifiers is needed, nor (once no job of it is left
        to run) its memory bank. What cannot be deleted now expires on the generator."""
        self._retire_classifiers()
        clear = getattr(self.client, "clear_memory_bank", None)
        if clear is not None and not self.state.pending:
            try:
                clear(self.state.run_id)
            except Exception as exc:
                log.info("memory bank %s left to expire: %s", self.state.run_id, exc)

    def _retire_classifiers(self, keep: str | None = None) -> None:
        """Delete the classifiers this run uploaded before (one per generation epoch, ~94 MB each
        for a CIFAR ResNet-50) except ``keep``. The generator refuses (409) while a job still
        uses one: it stays listed and is tried again after the next upload (or expires)."""
        s = self.state
        if keep is not None and keep not in s.classifiers:
            s.classifiers.append(keep)
        delete = getattr(self.client, "delete_classifier", None)
        if delete is None:
            return
        for ref in [r for r in s.classifiers if r != keep]:
            try:
                delete(ref)
            except Exception as exc:  # in use (409) or unreachable: later
                log.info("classifier %s kept for now: %s", ref, exc)
                continue
            s.classifiers.remove(ref)

    # --- folding ---------------------------------------------------------------------------
    def _fold(self, epoch: int, wait_s: float = 0.0) -> int:
        """Fold the finished items after the cursor; ``epoch`` is the first to train on them.

        Collective. Rank 0 reads first and says how far (a stream id); every rank then folds
        exactly the items up to there, in stream order, into its own folder.
        """
        before = len(self.generated)
        target: str | None = None
        if self.dist.main:
            try:
                self._fold_pages(epoch, until=None, wait_s=wait_s)
                self._fold_failed = False
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("epoch %d: could not read results (%s); they fold in later", epoch, exc)
                self._fold_failed = True
            target = self.state.cursor
        target = self.dist.broadcast(target)
        if not self.dist.main:
            self._retry(lambda: self._fold_pages(epoch, until=target), "read results")
        dropped: list[str] = []
        if self.dist.main:
            try:
                dropped = self._ended_jobs()
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("could not check pending jobs (%s)", exc)
        for job_id in self.dist.broadcast(dropped):
            self.state.pending.pop(job_id, None)
        return len(self.generated) - before

    def _fold_pages(self, epoch: int, until: str | None, wait_s: float = 0.0) -> None:
        """Page through the results after the cursor (up to ``until``, inclusive, if given)."""
        s = self.state
        assert self.client is not None
        while until is None or _stream_key(s.cursor) < _stream_key(until):
            page = self.client.results(s.run_id, after=s.cursor, limit=RESULTS_PAGE, wait_s=wait_s)
            wait_s = 0.0
            for item in page.items:
                if until is not None and _stream_key(item.id) > _stream_key(until):
                    s.cursor = until
                    return
                self._add_item(item, epoch)
                s.cursor = item.id
            s.cursor = page.next if until is None else s.cursor
            if len(page.items) < RESULTS_PAGE:
                if until is not None and _stream_key(s.cursor) < _stream_key(until):
                    raise DataError(f"results of run {s.run_id} end before {until} (expired?)")
                break

    def _add_item(self, item: Any, epoch: int) -> None:
        s = self.state
        record = self.generated.add(
            stream_id=item.id, job_id=item.job_id, index=item.index,
            epoch=item.epoch, class_id=item.class_id, guide_id=item.guide_id,
            image=image_from_b64(item.image), folded_before_epoch=epoch,
        )
        if record is None:
            return
        job = s.pending.get(item.job_id)
        if job is not None:
            job["folded"] += 1
            if job["folded"] >= job["items"]:
                del s.pending[item.job_id]

    def _ended_jobs(self) -> list[str]:
        """Pending jobs that have ended (rank 0 asks): they are no longer out.

        A failed or cancelled job will never deliver; a done job's items are all in the
        results stream already (result and ack are one step), so they fold in regardless.
        """
        assert self.client is not None
        out = []
        for job_id in list(self.state.pending):
            state = self.client.status(job_id)
            if state.status.value in ("failed", "cancelled"):
                log.warning("job %s %s: %s", job_id, state.status.value, state.error)
                out.append(job_id)
            elif state.status.value == "done":
                out.append(job_id)
        return out

    def _final_wait(self, epoch: int) -> int:
        """End of generation: wait up to ``final_wait_s`` for the jobs still out. Collective."""
        budget = self.cfg.generation.final_wait_s
        deadline = time.monotonic() + budget
        folded = 0
        while True:
            left = deadline - time.monotonic() if self.dist.main else 0.0
            done = self.dist.broadcast(not self.state.pending or left <= 0)
            if done:
                break
            folded += self._fold(epoch, wait_s=min(max(left, 0.0), 2.0))
            if self.dist.main and self._fold_failed:  # the generator is away: do not spin
                time.sleep(min(self.cfg.generation.retry_backoff_s, max(left, 0.0)))
        if self.state.pending:
            log.warning("after waiting %.0fs, %d jobs (%d images) are still out; their images "
                        "fold in if they arrive", budget, len(self.state.pending),
                        sum(j["items"] - j["folded"] for j in self.state.pending.values()))
        return folded

    # --- the end ---------------------------------------------------------------------------
    def _cancel_leftovers(self) -> None:
        """The run is over: jobs still out would only keep a GPU busy for nothing."""
        if not self.dist.main or self.client is None:
            return
        for job_id in list(self.state.pending):
            try:
                self.client.cancel(job_id)
                log.info("cancelled job %s: the run ended before it finished", job_id)
            except Exception as exc:  # finished meanwhile, or the generator is gone
                log.info("job %s not cancelled: %s", job_id, exc)

    def _record_jobs(self) -> None:
        """Each job's timing from the generator (for the report's throughput), in jobs.jsonl."""
        if not self.dist.main or self.client is None:
            return
        rows = []
        for job in self.state.jobs:
            try:
                st = self.client.status(job["job_id"])
            except Exception as exc:  # the report can live without one job's timing
                log.warning("no status for job %s: %s", job["job_id"], exc)
                rows.append(dict(job))
                continue
            rows.append({**job, "status": st.status.value, "created_at": st.created_at,
                         "started_at": st.started_at, "finished_at": st.finished_at,
                         "replica": st.replica})
        _write_jsonl(self.run_dir / JOBS_NAME, rows)

    def _summary(self) -> Summary:
        m = self.state.metrics
        training = sum(r["seconds_train"] + r["seconds_eval"] + r.get("seconds_eval_val", 0.0)
                       for r in m)
        waiting = sum(r["seconds_fold"] + r["seconds_post"] + r["seconds_wait"] for r in m)
        return Summary(
            run_dir=self.run_dir, test_acc=m[-1]["test_acc"] if m else 0.0,
            images_generated=len(self.generated), seconds_training=training,
            seconds_waiting=waiting, epochs=len(m),
            delivery=delivery_counts(self.state.jobs, self.generated.state(), m),
        )


def _tqdm(iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
