"""Algorithm 1 of the paper, as a resumable training loop that never blocks on generation.

Per epoch: fold in every finished generated image (results cursor), merge the validation slice
back at mid-training, train one epoch, test; during the first half also evaluate the slice,
pick hard samples, post them as ONE job with the current classifier, and keep going (``sync``
waits for the job, as the paper's code does). A checkpoint after every epoch makes ``resume``
continue where it stopped: the results cursor and the stream ids in the generated set's index
fold every finished image exactly once, and per-epoch idempotency keys make a re-posted job
the same job.
"""

from __future__ import annotations

import json
import logging
import os
import random
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

from actgen_trainer.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from actgen_trainer.config import AdvSchedule, Config, Guidance, TrainMode
from actgen_trainer.data import (
    GeneratedSet,
    Subset,
    guide_png,
    load_sources,
    partition,
    training_set,
    transforms_for,
)
from actgen_trainer.models import (
    Loss,
    build_model,
    build_optimizer,
    build_scheduler,
    classifier_payload,
    predict,
)
from actgen_trainer.report import write_report
from actgen_trainer.selection import select_guides

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

    def results(
        self, run_id: str, after: str = START_CURSOR, limit: int = RESULTS_PAGE, wait_s: float = 0
    ) -> ResultsPage: ...


def _transient(exc: Exception) -> bool:
    """Network trouble or a 5xx: generation is auxiliary, so training goes on and retries later."""
    if isinstance(exc, GeneratorError):
        return exc.status >= 500
    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException))


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

    def line(self) -> str:
        return (
            f"test accuracy {self.test_acc:.2%} | images generated {self.images_generated} | "
            f"seconds training {self.seconds_training:.1f} vs waiting {self.seconds_waiting:.1f}"
        )


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

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


def _setup_dist() -> _Dist:
    """torchrun sets WORLD_SIZE/RANK; one process is the plain (and tested) path."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return _Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


def _device(name: str, dist: _Dist) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


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


def idempotency_key(run_id: str, epoch: int, rank: int) -> str:
    """One job per (run, epoch, rank): a resumed trainer that re-posts gets the same job."""
    return f"{run_id}:epoch{epoch}:rank{rank}"


@dataclass
class _State:
    """Everything besides the torch objects that a checkpoint carries."""

    run_id: str
    epoch: int = 0  # next epoch to run
    cursor: str = START_CURSOR
    pending: dict[str, dict[str, int]] = field(default_factory=dict)  # job -> epoch/items/folded
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
        self.dist = _setup_dist()
        self.device = _device(cfg.train.device, self.dist)
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
        self.test_set = Subset(self.test_source, test_idx, self.eval_tf)
        self.generated = GeneratedSet(
            self.run_dir / "generated", cfg.data.image_size, self.classes
        )

        model = build_model(cfg, self.num_classes).to(self.device)
        if self.dist.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_fn = Loss(cfg.optim)

        if resume:
            self.state = self._restore()
        else:
            self._fresh_run_folder()
            self.state = _State(run_id=f"{cfg.run_name}-{os.urandom(4).hex()}")
        self._tb = self._tensorboard()
        if self.dist.main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            self._write_run_info()

    # --- run folder and checkpoints --------------------------------------------------------
    def _fresh_run_folder(self) -> None:
        if (self.run_dir / "checkpoint.pt").exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose "
                "another run_name / output_dir"
            )
        if self.dist.main:
            for name in (METRICS_NAME, JOBS_NAME, f"generated/{GeneratedSet.INDEX}"):
                (self.run_dir / name).unlink(missing_ok=True)

    def _restore(self) -> _State:
        ckpt = load_checkpoint(self.run_dir, self.cfg.run_name)
        module = self.model.module if hasattr(self.model, "module") else self.model
        module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if self.dist.main:
            self.generated.restore(ckpt["generated"])
        self.dist.barrier()
        if not self.dist.main:
            self.generated.reload()
        state = _State(
            run_id=ckpt["run_id"], epoch=ckpt["epoch"], cursor=ckpt["cursor"],
            pending=ckpt["pending"], jobs=ckpt["jobs"], metrics=ckpt["metrics"],
            val_merged=ckpt["val_merged"], classifiers=list(ckpt.get("classifiers", [])),
        )
        if self.dist.main:
            _write_jsonl(self.run_dir / METRICS_NAME, state.metrics)
        log.info("resumed %s at epoch %d (cursor %s)", state.run_id, state.epoch, state.cursor)
        return state

    def _checkpoint(self) -> None:
        if not self.dist.main:
            return
        module = self.model.module if hasattr(self.model, "module") else self.model
        s = self.state
        save_checkpoint(
            self.run_dir,
            {
                "run_name": self.cfg.run_name, "run_id": s.run_id, "epoch": s.epoch,
                "model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "generated": self.generated.state(), "cursor": s.cursor, "pending": s.pending,
                "jobs": s.jobs, "metrics": s.metrics, "val_merged": s.val_merged,
                "classifiers": s.classifiers,
            },
        )

    def _write_run_info(self) -> None:
        info = {
            "run_id": self.state.run_id, "classes": self.classes, "mode": self.mode.value,
            "epochs": self.cfg.train.epochs, "generation_epochs": self.cfg.generation_epochs,
            "images_per_epoch": self.cfg.generation.images_per_epoch,
            "sync": self.cfg.generation.sync, "dataset": self.cfg.data.dataset,
            "architecture": self.cfg.model.architecture, "seed": self.cfg.seed,
        }
        (self.run_dir / RUN_INFO_NAME).write_text(json.dumps(info, indent=2))

    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Summary:
        cfg = self.cfg
        epochs = cfg.train.epochs
        bar = _tqdm(range(self.state.epoch, epochs), self.progress and self.dist.main,
                    desc=f"{cfg.run_name} [{self.mode.value}]", unit="epoch",
                    initial=self.state.epoch, total=epochs)
        for epoch in bar:
            row = self._epoch(epoch)
            bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", gen=row["generated_total"])
            if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                log.info("stopping after epoch %d as asked", epoch)
                break
        bar.close()
        if self.client is not None and self.dist.main and self.state.epoch >= epochs:
            self._end_of_run()
        self._record_jobs()
        summary = self._summary()
        if self.dist.main:
            summary.report = write_report(self.run_dir)
        if self._tb is not None:
            self._tb.close()
        return summary

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        generating = self.mode is not TrainMode.real
        row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}

        t0 = time.perf_counter()
        folded = self._fold(epoch) if generating else 0
        row["seconds_fold"] = time.perf_counter() - t0
        if epoch >= cfg.generation_epochs and not s.val_merged:
            s.val_merged = True  # Algorithm 1 at mid-training: the slice trains from now on
            row["merged_validation"] = True
        train_idx = (
            np.concatenate([self.split.train, self.split.val]) if s.val_merged else self.split.train
        )

        t0 = time.perf_counter()
        train_loss, train_acc, train_size = self._train_epoch(epoch, train_idx)
        self.scheduler.step()
        row["seconds_train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        row["test_acc"] = self._test_accuracy()
        row["seconds_eval"] = time.perf_counter() - t0

        row.update(hard=None, posted=0, job_id=None, val_acc=None, seconds_post=0.0, seconds_wait=0.0)
        if generating and epoch < cfg.generation_epochs:
            row.update(self._generate(epoch))

        s.epoch = epoch + 1
        row.update(
            train_loss=train_loss, train_acc=train_acc, train_size=train_size, folded=folded,
            generated_total=len(self.generated), pending_jobs=len(s.pending),
            time=time.time(),
        )
        s.metrics.append(row)
        if self.dist.main:
            _append_jsonl(self.run_dir / METRICS_NAME, row)
            if self._tb is not None:
                for key in ("test_acc", "train_loss", "train_acc", "generated_total", "lr"):
                    self._tb.add_scalar(key, row[key], epoch)
                self._tb.flush()
        self._checkpoint()
        return row

    def _train_epoch(self, epoch: int, train_idx: np.ndarray) -> tuple[float, float, int]:
        cfg = self.cfg
        dataset = training_set(self.train_source, train_idx, self.generated, self.train_tf)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed * 10_007 + epoch)
        sampler = None
        if self.dist.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed)
            sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=shuffle_gen, num_workers=cfg.data.num_workers, drop_last=False,
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in _tqdm(loader, self.progress and self.dist.main, leave=False,
                                    desc=f"epoch {epoch}", unit="batch"):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(images)
                loss = self.loss_fn(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
        return total_loss / max(seen, 1), correct / max(seen, 1), len(dataset)

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.train.eval_batch_size, shuffle=False,
                          num_workers=self.cfg.data.num_workers)

    def _test_accuracy(self) -> float:
        probs, targets = predict(self.model, self._loader(self.test_set), self.device, self.amp)
        return float((probs.argmax(1) == targets).mean())

    # --- generation ------------------------------------------------------------------------
    def _generate(self, epoch: int) -> dict[str, Any]:
        """Evaluate this rank's share of the slice, post its hard samples, wait only if sync."""
        cfg, gen = self.cfg, self.cfg.generation
        val_idx = self.split.val[self.dist.rank :: self.dist.world]
        t0 = time.perf_counter()
        probs, targets = predict(
            self.model, self._loader(Subset(self.train_source, val_idx, self.eval_tf)),
            self.device, self.amp,
        )
        rng = np.random.default_rng([cfg.seed, epoch, self.dist.rank])
        chosen, n_hard = select_guides(probs, targets, gen.selection, gen.threshold,
                                       gen.images_per_epoch, rng)
        out: dict[str, Any] = {
            "val_acc": float((probs.argmax(1) == targets).mean()), "hard": n_hard,
            "seconds_eval_val": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        job_id = None
        if len(chosen):
            try:
                job_id = self._post(epoch, val_idx, chosen, probs, targets)
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("epoch %d: could not post hard samples (%s); training goes on", epoch, exc)
                out["post_error"] = str(exc)
        out["seconds_post"] = time.perf_counter() - t0
        out["posted"] = int(len(chosen))
        out["job_id"] = job_id
        t0 = time.perf_counter()
        if gen.sync and job_id is not None:
            assert self.client is not None
            final = self.client.wait(job_id, timeout_s=gen.wait_timeout_s)
            if final.status.value != "done":
                log.warning("job %s ended %s: %s", job_id, final.status.value, final.error)
        self.dist.barrier()
        out["seconds_wait"] = time.perf_counter() - t0
        posted = self.dist.gather((job_id, int(len(chosen))))
        for jid, count in posted:
            if jid is not None and not self._known_job(jid):
                self.state.pending[jid] = {"epoch": epoch, "items": count, "folded": 0}
                self.state.jobs.append({"job_id": jid, "epoch": epoch, "items": count,
                                        "posted_at": time.time()})
        return out

    def _known_job(self, job_id: str) -> bool:
        return any(j["job_id"] == job_id for j in self.state.jobs)

    def _post(
        self, epoch: int, val_idx: np.ndarray, chosen: np.ndarray, probs: np.ndarray,
        targets: np.ndarray,
    ) -> str:
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
        classifier_ref = None
        if options.mode is Mode.actgen and options.adv_prob > 0:
            weights, meta = classifier_payload(self.model, cfg, self.num_classes)
            classifier_ref = self.client.upload_classifier(weights, meta).ref
            self._retire_classifiers(keep=classifier_ref)
        names: dict[str, Any] = (
            {"label_set": gen.label_set} if gen.label_set else {"class_names": self.classes}
        )
        request = JobRequest(
            run_id=self.state.run_id, epoch=epoch, items=items, classifier_ref=classifier_ref,
            memory_bank_key=self.state.run_id, options=options,
            idempotency_key=idempotency_key(self.state.run_id, epoch, self.dist.rank), **names,
        )
        accepted = self.client.submit(request)
        log.info("epoch %d: posted %d hard samples as job %s%s", epoch, len(items),
                 accepted.job_id, " (already posted)" if accepted.duplicate else "")
        return accepted.job_id

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

    def _fold(self, epoch: int) -> int:
        """Fold every finished item after the cursor into the generated set (rank 0 reads)."""
        before = len(self.generated)
        if self.dist.main:
            try:
                self._fold_pages(epoch)
            except Exception as exc:
                if not _transient(exc):
                    raise
                log.warning("epoch %d: could not read results (%s); they fold in later", epoch, exc)
        self.dist.barrier()
        if not self.dist.main:
            self.generated.reload()
        return len(self.generated) - before

    def _fold_pages(self, epoch: int) -> None:
        """Page through the results after the cursor; stream ids already folded are skipped."""
        s = self.state
        assert self.client is not None
        while True:
            page = self.client.results(s.run_id, after=s.cursor, limit=RESULTS_PAGE)
            for item in page.items:
                record = self.generated.add(
                    stream_id=item.id, job_id=item.job_id, index=item.index,
                    epoch=item.epoch, class_id=item.class_id, guide_id=item.guide_id,
                    image=image_from_b64(item.image), folded_before_epoch=epoch,
                )
                if record is None:
                    continue
                job = s.pending.get(item.job_id)
                if job is not None:
                    job["folded"] += 1
                    if job["folded"] >= job["items"]:
                        del s.pending[item.job_id]
            s.cursor = page.next
            if len(page.items) < RESULTS_PAGE:
                break
        self._drop_failed_jobs()

    def _drop_failed_jobs(self) -> None:
        """Pending jobs that failed or were cancelled will never deliver: stop waiting on them."""
        assert self.client is not None
        for job_id in list(self.state.pending):
            state = self.client.status(job_id)
            if state.status.value in ("failed", "cancelled"):
                log.warning("job %s %s: %s", job_id, state.status.value, state.error)
                del self.state.pending[job_id]

    # --- the end ---------------------------------------------------------------------------
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
