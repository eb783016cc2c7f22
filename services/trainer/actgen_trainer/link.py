"""The trainer's link to the generator: Algorithm 1's calls on the client API
(``actgen_shared.run.ActGenRun``, docs/architecture.md 10), the same code path any training loop uses.

What is the trainer's own is here: the options each epoch's job gets (mode, guidance, the
adversarial schedule), the guide images written to the run folder for the report, the generated
images written to the run folder (:class:`RunFolder`), and each job's timing in jobs.jsonl.
Posting, reading results, retries, backpressure, the final wait, cancelling and cleanup are the
API's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actgen_shared.client import GeneratorClient
from actgen_shared.run import (
    ActGenRun,
    Arrival,
    GeneratorUnavailable,
    ResultsLost,
    Submission,
    connect,
    http_logging,
    idempotency_key,
    job_seed,
)
from actgen_shared.run import stream_key as _stream_key
from actgen_shared.schedule import adversarial_options
from actgen_shared.schemas import Info, Mode
from actgen_trainer.checkpoint import JOBS_NAME, State, _write_jsonl
from actgen_trainer.config import Config, Guidance
from actgen_trainer.data import DataError, GeneratedSet, ImageSource, guide_png
from actgen_trainer.distributed import Dist

log = logging.getLogger("actgen_trainer")

# the client the Trainer is given: actgen_shared.client.GeneratorClient
GeneratorAPI = GeneratorClient

__all__ = [
    "GeneratorAPI",
    "GeneratorLink",
    "GeneratorUnavailable",
    "RunFolder",
    "_stream_key",
    "idempotency_key",
    "job_options",
    "job_seed",
]


def job_options(cfg: Config, epoch: int) -> dict[str, Any]:
    """The options the loop owns for the job of ``epoch``: mode, guidance and its schedule.

    ``GenerationConfig.schedule`` (``adv_schedule``, else the preset's) ``paper``: adv_prob =
    0.5 e / E. ``authors``: a share r = max(1 - e / (0.5 E - 1),
    0) / 2 of the items is drawn as plain SD and adv_prob = 0.5 - r (the released train.py).
    ``constant``: adv_prob = 0.5 from the first job.
    ``guidance`` picks Table 4's rows: contrastive only (adv_prob 0), adversarial only (no bank
    sample), both, or none (``aig`` mode).
    """
    gen, epochs = cfg.generation, cfg.train.epochs
    mode = cfg.generation.mode.generator_mode
    if mode is None:
        raise ValueError("generation.mode=real posts no jobs")
    if mode is not Mode.actgen:
        return {"mode": mode.value, "adv_prob": 0.0}
    if gen.guidance is Guidance.aig:
        return {"mode": Mode.aig.value, "adv_prob": 0.0}
    # the one schedule code of the trainer, the client API and the Lightning callback
    out: dict[str, Any] = {"mode": mode.value, **adversarial_options(gen.schedule.value, epoch, epochs)}
    if gen.guidance is Guidance.contrastive:
        out["adv_prob"] = 0.0
    elif gen.guidance is Guidance.adversarial:
        out["bank_sample"] = 0
    return out


class RunFolder:
    """The trainer's sink for arrived images: its GeneratedSet on disk (PNG + index.jsonl), each
    image resized to the dataset resolution and stamped with the first epoch that trains on it."""

    def __init__(self, generated: GeneratedSet) -> None:
        self.generated = generated

    def __contains__(self, stream_id: object) -> bool:
        return isinstance(stream_id, str) and stream_id in self.generated

    def add(self, arrival: Arrival) -> bool:
        assert arrival.first_epoch is not None, "the trainer always says which epoch folds"
        record = self.generated.add(
            stream_id=arrival.stream_id,
            job_id=arrival.job_id,
            index=arrival.index,
            epoch=arrival.epoch,
            class_id=arrival.class_id,
            guide_id=arrival.guide_id,
            image=arrival.image,
            folded_before_epoch=arrival.first_epoch,
        )
        return record is not None


class GeneratorLink:
    """The Trainer's calls to the generator. A mixin of :class:`~actgen_trainer.loop.Trainer`,
    whose attributes it reads; the methods marked collective are called by every rank."""

    cfg: Config
    client: GeneratorClient | None
    dist: Dist
    state: State
    generated: GeneratedSet
    run_dir: Path
    model: torch.nn.Module
    num_classes: int
    classes: list[str]
    train_source: ImageSource
    info: Info | None
    actgen: ActGenRun | None

    def _connect(self) -> Info:
        """/v1/info before any training: a wrong URL or key fails fast, saying what to fix."""
        assert self.client is not None
        http_logging()  # no INFO line per request in the progress bars (ACTGEN_LOG_HTTP=1 to see them)
        return connect(self.client, self.client.base_url, getattr(self.client, "has_api_key", False))

    def _link(self, state: State) -> ActGenRun:
        """The client API run over this trainer's ``state`` (its ledger) and run folder."""
        if self.actgen is not None and self.actgen.ledger is state:
            return self.actgen
        assert self.client is not None and self.info is not None
        cfg, gen = self.cfg, self.cfg.generation
        names: dict[str, Any] = {"label_set": gen.label_set} if gen.label_set else {"classes": self.classes}
        self.actgen = ActGenRun(
            **names,
            client=self.client,
            info=self.info,
            ranks=self.dist,
            sink=RunFolder(self.generated),
            ledger=state,
            num_classes=self.num_classes,
            architecture=cfg.model.architecture,
            input_size=cfg.data.image_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            options={**gen.options, **gen.section_options},
            epochs=cfg.train.epochs,  # each job's options come from job_options (the same schedule)
            generate_fraction=gen.generate_fraction,
            schedule=gen.schedule.value,
            seed=cfg.seed,
            max_items_per_job=self.actgen.item_cap if self.actgen is not None else gen.max_items_per_job,
            max_inflight=gen.max_inflight,
            retries=gen.retries,
            backoff_s=gen.retry_backoff_s,
            backoff_max_s=gen.retry_backoff_max_s,
            logger=log,
        )
        return self.actgen

    @property
    def _item_cap(self) -> int | None:
        """Items per job: the generator's cap (from /v1/info or learnt from a 422), or the config's."""
        return self.actgen.item_cap if self.actgen is not None else self.cfg.generation.max_items_per_job

    @_item_cap.setter
    def _item_cap(self, value: int | None) -> None:
        assert self.actgen is not None
        self.actgen.item_cap = value

    def _refetch(self, records: list[dict[str, Any]], state: State) -> None:
        """Rebuild this rank's generated set from the results stream up to the cursor."""
        self.generated.restore([])
        try:
            self._link(state).replay(state.cursor, {r["id"]: r["folded_before_epoch"] for r in records})
        except ResultsLost as exc:
            raise DataError(f"rank {self.dist.rank}: {exc}") from None
        if [r.id for r in self.generated.records] != [r["id"] for r in records]:
            raise DataError(
                f"rank {self.dist.rank}: the results stream no longer holds every "
                "generated image of the checkpoint in its order (expired?)"
            )

    # --- posting ---------------------------------------------------------------------------
    def _submit(
        self, epoch: int, val_idx: np.ndarray, chosen: np.ndarray, probs: np.ndarray, targets: np.ndarray
    ) -> Submission:
        """Post this rank's hard samples (positions ``chosen`` of its slice shard). Collective.

        Each guide is also written to run_dir/guides for the report's gallery.
        """
        assert self.actgen is not None
        guides = self.run_dir / "guides"
        guides.mkdir(exist_ok=True)
        pngs, guide_ids = [], []
        for pos in chosen:
            guide_id = f"train-{int(val_idx[pos])}"
            png = guide_png(self.train_source.image(int(val_idx[pos])))
            (guides / f"{guide_id}.png").write_bytes(png)
            pngs.append(png)
            guide_ids.append(guide_id)
        labels = targets[chosen]
        return self.actgen.submit(
            pngs,
            labels,
            epoch=epoch,
            model=self.model,
            confidences=probs[chosen, labels] if len(chosen) else [],
            guide_ids=guide_ids,
            options=job_options(self.cfg, epoch),
        )

    # --- folding ---------------------------------------------------------------------------
    def _fold(self, epoch: int, wait_s: float = 0.0) -> int:
        """Fold the finished items after the cursor; ``epoch`` is the first to train on them.
        Collective (``ActGenRun.refresh``)."""
        assert self.actgen is not None
        try:
            return self.actgen.refresh(epoch, wait_s=wait_s)
        except ResultsLost as exc:
            raise DataError(str(exc)) from None

    def _final_wait(self, epoch: int) -> int:
        """After the last post (``Config.final_wait_epoch``): wait up to ``final_wait_s`` for the
        jobs still out. Collective."""
        assert self.actgen is not None
        return self.actgen.drain(self.cfg.generation.final_wait_s, epoch)

    # --- the end ---------------------------------------------------------------------------
    def _cancel_leftovers(self) -> None:
        """The run is over: jobs still out would only keep a GPU busy for nothing."""
        if self.actgen is not None:
            self.actgen.cancel_pending()

    def _end_of_run(self) -> None:
        """The run is complete: delete its classifiers and (once no job is left) its memory bank."""
        if self.actgen is not None:
            self.actgen.finish()

    def _record_jobs(self) -> None:
        """Each job's timing from the generator (for the report's throughput), in jobs.jsonl."""
        if not self.dist.main or self.client is None:
            return
        rows = []
        for job in self.state.jobs:
            if job.get("lost"):  # the generator forgot it (logged when it was found lost)
                rows.append({**job, "status": "lost"})
                continue
            try:
                st = self.client.status(job["job_id"])
            except Exception as exc:  # the report can live without one job's timing
                log.warning("no status for job %s: %s", job["job_id"], exc)
                rows.append(dict(job))
                continue
            rows.append(
                {
                    **job,
                    "status": st.status.value,
                    "created_at": st.created_at,
                    "started_at": st.started_at,
                    "finished_at": st.finished_at,
                    "replica": st.replica,
                }
            )
        _write_jsonl(self.run_dir / JOBS_NAME, rows)
