"""A client API for any training loop: one :class:`ActGenRun` per training run
(docs/architecture.md 10).

It posts a loop's hard samples (tensors, PIL images, arrays or PNG bytes) with the current model,
and hands back the images that have arrived as a growing torch Dataset. What a loop would
otherwise write itself is here: base64 and PNG, the classifier as safetensors with its
metadata (uploaded once per change of weights), an idempotency key per (run, epoch, rank), jobs
split to the service's per-job cap, retries with backoff on network trouble and 5xx, paging
through the results with a cursor that a checkpoint can keep, errors that say what to fix, and
cleanup of the run's classifiers and memory bank at the end.

Generation is auxiliary: network trouble or a 5xx (``client.is_retryable``) that outlasts the
retries is logged and the loop goes on (a submit says so in :attr:`Submission.error`); a 4xx is
the caller's fault and is raised, explained.

DDP (torch.distributed initialised, or ``ranks=`` given): :meth:`ActGenRun.submit`,
:meth:`~ActGenRun.refresh`, :meth:`~ActGenRun.drain` and :meth:`~ActGenRun.upload` are
collective (every rank calls them, in the same order). Rank 0 uploads the classifier and
broadcasts its ref; each rank posts its own share (its own idempotency key); every rank reads
*every* rank's images, up to the cursor rank 0 reached, in stream order, so all ranks hold the
same generated dataset and a DistributedSampler shards it like the real data.

torch is imported only inside the methods that need it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import numpy as np

from actgen_shared.client import GeneratorClient, GeneratorError, is_retryable
from actgen_shared.codecs import DecodeError, b64encode, image_from_b64
from actgen_shared.guides import guide_pngs
from actgen_shared.labels import class_names_for
from actgen_shared.ranks import Ranks, current_ranks
from actgen_shared.schemas import (
    START_CURSOR,
    ClassifierMeta,
    GenerationOptions,
    Info,
    JobItem,
    JobRequest,
    JobStatus,
    Mode,
    ResultItem,
)
from actgen_shared.seeds import derive_seed
from actgen_shared.settings import ClientSettings

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from actgen_shared.arrived import ArrivedImages

T = TypeVar("T")
RESULTS_PAGE = 100
HTTP_LOGGERS = ("httpx", "httpcore")

log = logging.getLogger("actgen_shared.run")


# --- errors -------------------------------------------------------------------------------
class GeneratorUnavailable(RuntimeError):
    """The generator did not answer at start, or refused us; the message says what to fix."""


class GeneratorRefused(GeneratorError):
    """A request the generator refused (4xx), with a message that names the cause and the fix;
    ``status``, ``code`` and ``message`` are the server's."""

    def __init__(self, exc: GeneratorError, explanation: str) -> None:
        super().__init__(exc.status, exc.code, exc.message)
        self.args = (explanation,)


class ResultsLost(RuntimeError):
    """The results stream no longer holds images a checkpoint names (they expired)."""


def explain(exc: GeneratorError, url: str, has_key: bool) -> str:
    """What a refusal means for the person running the loop, and what to do about it."""
    if exc.status == 401:
        if has_key:
            return (
                f"the generator at {url} refused the API key (401): set ACTGEN_API_KEY to the service's key"
            )
        return f"the generator at {url} needs an API key (401): set ACTGEN_API_KEY (or pass api_key=)"
    if exc.status == 403:
        return f"the generator at {url} refused access (403: {exc.message}): check ACTGEN_API_KEY"
    if exc.status == 404 and exc.code == "http_error":
        return f"{url} answered 404: is it the generator's base URL (ACTGEN_GENERATOR_URL, e.g. http://host:8000)?"
    return f"the generator at {url} refused the request ({exc.status}): {exc.message}"


def connect(client: GeneratorClient, url: str, has_key: bool) -> Info:
    """GET /v1/info, failing fast with a message that says what to fix (wrong URL, no or wrong key)."""
    try:
        return client.info()
    except GeneratorError as exc:
        raise GeneratorUnavailable(explain(exc, url, has_key)) from None
    except httpx.HTTPError as exc:
        raise GeneratorUnavailable(
            f"no generator answers at {url} ({type(exc).__name__}: {exc}): start one with "
            "`actgen-generator serve`, or point ACTGEN_GENERATOR_URL (actgen-trainer: --generator-url) at one"
        ) from None


def http_logging(enabled: bool | None = None) -> None:
    """httpx logs one INFO line per request, which breaks progress bars: keep httpx and httpcore
    at WARNING unless asked (``enabled``, else ACTGEN_LOG_HTTP); asked, they follow the root logger."""
    if enabled is None:
        enabled = ClientSettings().log_http
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if enabled else logging.WARNING)


# --- what a run keeps ---------------------------------------------------------------------
@dataclass
class RunLedger:
    """A run's bookkeeping, identical on every rank, all a checkpoint needs to resume the link."""

    run_id: str
    cursor: str = START_CURSOR  # results folded up to here (a stream id)
    # job -> epoch / items / folded / rank: jobs whose items have not all arrived
    pending: dict[str, dict[str, int]] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # every job posted, in order
    classifiers: list[str] = field(default_factory=list)  # uploaded refs not yet deleted


@dataclass(frozen=True)
class Arrival:
    """One generated image that arrived, with its provenance."""

    stream_id: str  # the results-stream id: unique, so nothing is taken twice
    job_id: str
    index: int  # the item's index within its job
    epoch: int  # the epoch whose hard samples guided it
    class_id: int
    guide_id: str | None
    first_epoch: int | None  # the first epoch to train on it (refresh's ``epoch``)
    image: np.ndarray = field(repr=False)  # H x W x 3 uint8


class ImageSink(Protocol):
    """Where arrived images go: the default is an in-memory :class:`~actgen_shared.arrived.ArrivedImages`;
    the trainer's writes them to its run folder."""

    def __contains__(self, stream_id: object) -> bool: ...

    def add(self, arrival: Arrival) -> bool:
        """Keep it; False when this stream id is already kept."""
        ...


@dataclass
class Submission:
    """What one :meth:`ActGenRun.submit` did."""

    jobs: list[tuple[str, int]]  # this rank's (job id, items)
    posted: int  # items posted by all ranks together
    classifier_ref: str | None = None
    skipped: bool = False  # this rank had max_inflight jobs out: it posted nothing
    folded: int = 0  # images taken in before deciding to skip (see max_inflight)
    error: str | None = None  # why this rank posted nothing though it had items (generator away)


def stream_key(stream_id: str) -> tuple[int, int]:
    """A Redis stream id as a sortable pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def idempotency_key(run_id: str, epoch: int, rank: int) -> str:
    """One job per (run, epoch, rank): a resumed loop that re-posts gets the same job."""
    return f"{run_id}:epoch{epoch}:rank{rank}"


def job_seed(seed: int, epoch: int, rank: int) -> int:
    """The noise seed of one job: a hash of (run seed, epoch, rank), so no two jobs share one."""
    return derive_seed(seed, epoch, rank)


def _item_cap_from(exc: Exception) -> int | None:
    """The per-job item cap a 422 names ("... more than the cap of 256 per job"), else None."""
    import re

    if isinstance(exc, GeneratorError) and exc.status == 422 and exc.message.startswith("items"):
        found = re.search(r"cap of (\d+)", exc.message)
        return int(found.group(1)) if found else None
    return None


def model_weights(model: nn.Module) -> bytes:
    """A model's weights as safetensors bytes (never a pickle), unwrapped from DDP."""
    from safetensors.torch import save
    from torch.nn.parallel import DistributedDataParallel

    module = model.module if isinstance(model, DistributedDataParallel) else model
    return save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


class ActGenRun:
    """One training run's link to the generator; a context manager that cleans up at the end.

    ``classes`` (the class names, for the prompts) or ``label_set`` (cifar10, imagenet, ...);
    ``url``/``api_key`` default to ACTGEN_GENERATOR_URL / ACTGEN_API_KEY. To send the model
    (gradient guidance with adv_prob > 0), ``architecture`` names it in the service's registry
    (actgen_shared.architectures) and ``input_size``/``mean``/``std`` say what it eats; the
    same ``mean``/``std`` undo a normalised batch given to :meth:`submit` (``normalized=True``).
    ``options`` are GenerationOptions fields for every job; ``seed`` fixes each job's noise
    (a hash of seed, epoch, rank). Arrived images are resized to ``image_size`` and served
    through ``transform`` (a PIL -> tensor callable; default: float CHW in [0, 1]).
    ``max_inflight``: a rank with that many unfinished jobs posts nothing (backpressure).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        classes: Sequence[str] | None = None,
        label_set: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        architecture: str | None = None,
        num_classes: int | None = None,
        input_size: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        image_size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        max_items_per_job: int | None = None,
        max_inflight: int | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        timeout_s: float = 120.0,
        cancel_on_exit: bool = False,
        log_http: bool | None = None,
        client: GeneratorClient | None = None,
        ranks: Ranks | None = None,
        sink: ImageSink | None = None,
        ledger: RunLedger | None = None,
        info: Info | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if (classes is None) == (label_set is None):
            raise ValueError("give exactly one of classes (the class names) or label_set")
        self.class_names = list(classes) if classes is not None else class_names_for(label_set)  # type: ignore[arg-type]
        self.label_set = label_set
        self.num_classes = num_classes or len(self.class_names)
        self.architecture = architecture
        self.input_size = input_size or image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.options = dict(options or {})
        GenerationOptions.model_validate(self.options)  # a bad option is named now, not per epoch
        self.seed = seed
        self.max_inflight = max_inflight
        self.retries, self.backoff_s, self.backoff_max_s = retries, backoff_s, backoff_max_s
        self.cancel_on_exit = cancel_on_exit
        self.log = logger or log
        http_logging(log_http)

        env = ClientSettings()
        self._owns_client = client is None
        if client is None:
            key = api_key if api_key is not None else env.api_key
            client = GeneratorClient(url or env.generator_url, api_key=key, timeout_s=timeout_s)
        self.client = client
        self.url = client.base_url
        try:
            self.info = info or connect(client, self.url, client.has_api_key)
        except BaseException:
            if self._owns_client:
                client.close()
            raise
        self.item_cap = max_items_per_job
        if self.info.max_items_per_job is not None:  # split to the service's cap before a 422 says it
            self.item_cap = min(self.item_cap or self.info.max_items_per_job, self.info.max_items_per_job)

        self.ranks = ranks or current_ranks()
        self.dataset: ArrivedImages | None = None
        if sink is None:
            from actgen_shared.arrived import ArrivedImages

            self.dataset = ArrivedImages(image_size=image_size, transform=transform)
            sink = self.dataset
        self.sink = sink
        if ledger is None:
            ledger = RunLedger(run_id or self.ranks.broadcast(f"run-{os.urandom(6).hex()}"))
        self.ledger = ledger
        self.read_failed = False  # the last refresh could not read the results (generator away)
        self._taken = 0  # images taken in by this object (what refresh counts)
        self._classifier: tuple[str, str] | None = None  # (digest of meta + weights, ref)

    @property
    def run_id(self) -> str:
        return self.ledger.run_id

    # --- plumbing --------------------------------------------------------------------------
    def _retry(self, call: Callable[[], T], what: str) -> T:
        """``call()`` retried with exponential backoff on 5xx and network errors; a 4xx is raised
        explained (:class:`GeneratorRefused`)."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except GeneratorRefused:
                raise
            except Exception as exc:
                if isinstance(exc, GeneratorError) and not is_retryable(exc):
                    raise GeneratorRefused(exc, explain(exc, self.url, self.client.has_api_key)) from None
                if not is_retryable(exc) or attempt == self.retries:
                    raise
                self.log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt + 1, self.retries, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    def inflight(self, rank: int | None = None) -> int:
        """Unfinished jobs of ``rank`` (default: this one)."""
        rank = self.ranks.rank if rank is None else rank
        return sum(1 for job in self.ledger.pending.values() if job.get("rank", 0) == rank)

    def _options(self, epoch: int, options: Mapping[str, Any] | None) -> GenerationOptions:
        merged = {**self.options, **(options or {})}
        if self.seed is not None:
            merged["seed"] = job_seed(self.seed, epoch, self.ranks.rank)
        return GenerationOptions.model_validate(merged)

    # --- the classifier --------------------------------------------------------------------
    def _upload(self, model: nn.Module | None) -> str:
        """Upload the model's weights, or reuse the last ref when they did not change."""
        if model is None:
            raise ValueError("rank 0 has no model to upload: pass model= on every rank")
        if self.architecture is None or self.input_size is None:
            raise ValueError(
                "uploading the model needs architecture= (a name of actgen_shared.architectures) "
                "and input_size= (or image_size=) on the ActGenRun"
            )
        weights = model_weights(model)
        meta = ClassifierMeta(
            architecture=self.architecture,
            num_classes=self.num_classes,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
        )
        digest = hashlib.sha256(meta.model_dump_json().encode() + b"\0" + weights).hexdigest()
        if self._classifier is not None and self._classifier[0] == digest:
            return self._classifier[1]
        ref = self._retry(lambda: self.client.upload_classifier(weights, meta).ref, "classifier upload")
        self._classifier = (digest, ref)
        return ref

    def upload(self, model: nn.Module | None) -> str | None:
        """Collective: rank 0 uploads ``model`` (unless its weights are those of the last upload)
        and every rank gets the ref; the run's earlier classifiers are deleted. None when the
        generator stayed away through the retries (logged); a refusal (4xx) is raised on every rank."""
        outcome: Any = None
        error: BaseException | None = None
        if self.ranks.main:
            try:
                outcome = self._upload(model)
                self.retire_classifiers(keep=outcome)  # earlier uploads: not needed any more
            except Exception as exc:
                if is_retryable(exc):
                    self.log.warning("classifier upload failed (%s); no job this epoch", exc)
                else:
                    error, outcome = exc, ("error", str(exc))
        outcome = self.ranks.broadcast(outcome)
        if isinstance(outcome, (tuple, list)):
            raise error if error is not None else RuntimeError(f"rank 0: {outcome[1]}")
        return outcome

    def retire_classifiers(self, keep: str | None = None) -> None:
        """Delete the classifiers this run uploaded before, except ``keep`` (each can be tens of
        MB). The generator refuses (409) while a job still uses one: it stays listed and is
        tried again after the next upload (or expires on the generator)."""
        s = self.ledger
        if keep is not None and keep not in s.classifiers:
            s.classifiers.append(keep)
        delete = getattr(self.client, "delete_classifier", None)
        if delete is None:
            return
        for ref in [r for r in s.classifiers if r != keep]:
            try:
                delete(ref)
            except Exception as exc:  # in use (409) or unreachable: later
                self.log.info("classifier %s kept for now: %s", ref, exc)
                continue
            s.classifiers.remove(ref)

    # --- posting ---------------------------------------------------------------------------
    def _items(
        self,
        images: Any,
        labels: Sequence[int] | Any,
        confidences: Sequence[float] | Any | None,
        guide_ids: Sequence[str | None] | None,
        normalized: bool,
    ) -> list[JobItem]:
        pngs = guide_pngs(images, *((self.mean, self.std) if normalized else (None, None)))
        labels = [int(x) for x in _as_list(labels)]
        confs = None if confidences is None else [float(x) for x in _as_list(confidences)]
        for name, seq in (("labels", labels), ("confidences", confs), ("guide_ids", guide_ids)):
            if seq is not None and len(seq) != len(pngs):
                raise ValueError(f"{len(pngs)} images but {len(seq)} {name}")
        items = []
        for k, png in enumerate(pngs):
            if not 0 <= labels[k] < len(self.class_names):
                raise ValueError(f"labels[{k}] is {labels[k]}, outside 0..{len(self.class_names) - 1}")
            items.append(
                JobItem(
                    image=b64encode(png),
                    class_id=labels[k],
                    guide_id=None if guide_ids is None else guide_ids[k],
                    confidence=None if confs is None else float(np.clip(confs[k], 0.0, 1.0)),
                )
            )
        return items

    def _post(
        self, epoch: int, items: list[JobItem], options: GenerationOptions, ref: str | None
    ) -> list[tuple[str, int]]:
        """This rank's items as one job, or several of at most the item cap (learnt from a 422
        when the service did not say it); one idempotency key per part."""
        names: dict[str, Any] = (
            {"label_set": self.label_set} if self.label_set else {"class_names": self.class_names}
        )
        key = idempotency_key(self.run_id, epoch, self.ranks.rank)
        while True:
            cap = self.item_cap or len(items)
            parts = [items[k : k + cap] for k in range(0, len(items), cap)]
            posted: list[tuple[str, int]] = []
            try:
                for k, part in enumerate(parts):
                    seed = options.seed
                    request = JobRequest(
                        run_id=self.run_id,
                        epoch=epoch,
                        items=part,
                        classifier_ref=ref,
                        memory_bank_key=self.run_id,
                        options=options.model_copy(
                            update={"seed": derive_seed(seed, k)} if k and seed is not None else {}
                        ),
                        idempotency_key=key if len(parts) == 1 else f"{key}:part{k}",
                        **names,
                    )
                    accepted = self._retry(partial(self.client.submit, request), "submit")
                    posted.append((accepted.job_id, len(part)))
                    self.log.info(
                        "epoch %d: posted %d hard samples as job %s%s",
                        epoch,
                        len(part),
                        accepted.job_id,
                        " (already posted)" if accepted.duplicate else "",
                    )
                return posted
            except GeneratorError as exc:
                learnt = _item_cap_from(exc)
                if learnt is None or learnt >= cap:
                    raise
                self.log.info(
                    "the generator takes at most %d items per job: splitting %d items", learnt, len(items)
                )
                self.item_cap = learnt

    def submit(
        self,
        images: Any,
        labels: Sequence[int] | Any,
        *,
        epoch: int,
        model: nn.Module | None = None,
        confidences: Sequence[float] | Any | None = None,
        guide_ids: Sequence[str | None] | None = None,
        options: Mapping[str, Any] | None = None,
        normalized: bool = False,
    ) -> Submission:
        """Post this rank's hard samples of ``epoch`` (possibly none). Collective under DDP.

        ``images``: a batch (N x C x H x W tensor) or a sequence of CHW tensors (float in [0, 1]
        or uint8; ``normalized=True``: normalised with the run's mean/std), PIL images, uint8
        arrays or PNG/JPEG bytes; ``labels`` their true classes. ``model`` is needed when the
        options ask for adversarial guidance (mode actgen, adv_prob > 0). One call per epoch
        and rank: the idempotency key makes a second call for the same epoch the first job.
        """
        n = len(_as_list(labels))
        rank, world = self.ranks.rank, self.ranks.world
        out = Submission(jobs=[], posted=0)
        cap = self.max_inflight
        if cap is not None and any(self.inflight(r) >= cap for r in range(world)):
            out.folded = self.refresh(epoch + 1)  # take in what arrived first (the same on all ranks)
        if cap is not None and self.inflight(rank) >= cap and n > 0:
            self.log.warning(
                "epoch %d: rank %d has %d unfinished jobs (max_inflight=%d): the generator lags, "
                "so this epoch posts nothing",
                epoch,
                rank,
                self.inflight(rank),
                cap,
            )
            out.skipped = True
        posting = n > 0 and not out.skipped
        job_options = self._options(epoch, options)
        adversarial = job_options.mode is Mode.actgen and job_options.adv_prob > 0
        if adversarial and model is None:
            raise ValueError(
                "these options use adversarial guidance (mode actgen, adv_prob > 0): pass model="
            )
        ref: str | None = None
        if any(self.ranks.gather(adversarial and posting)):  # rank 0 uploads once for all ranks
            ref = out.classifier_ref = self.upload(model)
        if posting and adversarial and ref is None:
            out.error = "no classifier uploaded"
        elif posting:
            try:
                items = self._items(images, labels, confidences, guide_ids, normalized)
                out.jobs = self._post(epoch, items, job_options, ref)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("epoch %d: could not post hard samples (%s); training goes on", epoch, exc)
                out.error = str(exc)
        per_rank = self.ranks.gather(out.jobs)
        out.posted = sum(count for rank_jobs in per_rank for _, count in rank_jobs)
        known = {j["job_id"] for j in self.ledger.jobs}
        for r, rank_jobs in enumerate(per_rank):
            for job_id, count in rank_jobs:
                if job_id in known:  # re-posted after a resume: the same job
                    continue
                self.ledger.pending[job_id] = {"epoch": epoch, "items": count, "folded": 0, "rank": r}
                self.ledger.jobs.append(
                    {
                        "job_id": job_id,
                        "epoch": epoch,
                        "items": count,
                        "rank": r,
                        "classifier_ref": ref,
                        "posted_at": time.time(),
                    }
                )
        return out

    def wait(
        self, jobs: Sequence[tuple[str, int]] | Sequence[str] | None = None, timeout_s: float = 3600.0
    ) -> int:
        """Wait for ``jobs`` (default: this rank's pending ones) to end; returns how many timed
        out. A job that times out is skipped, not fatal: its images arrive later if they do."""
        ids = (
            [j if isinstance(j, str) else j[0] for j in jobs]
            if jobs is not None
            else [
                job_id for job_id, job in self.ledger.pending.items() if job.get("rank", 0) == self.ranks.rank
            ]
        )
        timeouts = 0
        for job_id in ids:
            try:
                final = self.client.wait(job_id, timeout_s=timeout_s)
            except TimeoutError as exc:
                self.log.warning(
                    "%s: training goes on without waiting for it (its images fold in if they arrive)", exc
                )
                timeouts += 1
                continue
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("waiting for job %s failed (%s); training goes on", job_id, exc)
                continue
            if final.status is not JobStatus.done:
                self.log.warning("job %s ended %s: %s", job_id, final.status.value, final.error)
        return timeouts

    # --- reading the results ---------------------------------------------------------------
    def refresh(self, epoch: int | None = None, wait_s: float = 0.0) -> int:
        """Take in the images that arrived (``epoch``: the first epoch to train on them, kept as
        provenance); returns how many. Collective: rank 0 reads first (long-polling up to
        ``wait_s`` for the first one) and says how far; every rank then takes exactly the images
        up to there, in stream order. Jobs that ended stop counting as unfinished."""
        s = self.ledger
        before = self._taken
        target: str | None = None
        if self.ranks.main:
            try:
                self._read(epoch, until=None, wait_s=wait_s)
                self.read_failed = False
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("epoch %s: could not read results (%s); they fold in later", epoch, exc)
                self.read_failed = True
            target = s.cursor
        target = self.ranks.broadcast(target)
        if not self.ranks.main:
            self._retry(lambda: self._read(epoch, until=target), "read results")
        dropped: list[str] = []
        if self.ranks.main:
            try:
                dropped = self._ended_jobs()
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("could not check pending jobs (%s)", exc)
        for job_id in self.ranks.broadcast(dropped):
            s.pending.pop(job_id, None)
        return self._taken - before

    def _read(self, epoch: int | None, until: str | None, wait_s: float = 0.0) -> None:
        """Page through the results after the cursor (up to ``until``, inclusive, if given)."""
        s = self.ledger
        while until is None or stream_key(s.cursor) < stream_key(until):
            after = s.cursor
            page = self.client.results(s.run_id, after=after, limit=RESULTS_PAGE, wait_s=wait_s)
            wait_s = 0.0
            for item in page.items:
                if until is not None and stream_key(item.id) > stream_key(until):
                    s.cursor = until
                    return
                self._take(item, epoch)
                s.cursor = item.id
            if until is None or stream_key(page.next) <= stream_key(until):
                s.cursor = page.next  # past entries whose images expired, too
            if page.next == after:  # nothing more in the stream
                if until is not None and stream_key(s.cursor) < stream_key(until):
                    raise ResultsLost(f"results of run {s.run_id} end before {until} (expired?)")
                break

    def _arrival(self, item: ResultItem, first_epoch: int | None) -> Arrival:
        try:
            image = image_from_b64(item.image)
        except DecodeError as exc:
            raise DecodeError(f"result {item.id} (job {item.job_id}, item {item.index}): {exc}") from None
        return Arrival(
            stream_id=item.id,
            job_id=item.job_id,
            index=item.index,
            epoch=item.epoch,
            class_id=item.class_id,
            guide_id=item.guide_id,
            first_epoch=first_epoch,
            image=image,
        )

    def _take(self, item: ResultItem, epoch: int | None) -> None:
        if item.id in self.sink or not self.sink.add(self._arrival(item, epoch)):
            return
        self._taken += 1
        job = self.ledger.pending.get(item.job_id)
        if job is not None:
            job["folded"] += 1
            if job["folded"] >= job["items"]:
                del self.ledger.pending[item.job_id]

    def _ended_jobs(self) -> list[str]:
        """Pending jobs that have ended (rank 0 asks): they are no longer out.

        A failed or cancelled job will never deliver; a done job's items are all in the
        results stream already (result and ack are one step), so they are taken regardless.
        """
        out = []
        for job_id in list(self.ledger.pending):
            state = self.client.status(job_id)
            if state.status in (JobStatus.failed, JobStatus.cancelled):
                self.log.warning("job %s %s: %s", job_id, state.status.value, state.error)
                out.append(job_id)
            elif state.status is JobStatus.done:
                out.append(job_id)
        return out

    def drain(self, timeout_s: float, epoch: int | None = None) -> int:
        """Wait up to ``timeout_s`` for the jobs still out, taking their images in; returns how
        many arrived. Collective."""
        deadline = time.monotonic() + timeout_s
        taken = 0
        while True:
            left = deadline - time.monotonic() if self.ranks.main else 0.0
            if self.ranks.broadcast(not self.ledger.pending or left <= 0):
                break
            taken += self.refresh(epoch, wait_s=min(max(left, 0.0), 2.0))
            if self.ranks.main and self.read_failed:  # the generator is away: do not spin
                time.sleep(min(self.backoff_s, max(left, 0.0)))
        if self.ledger.pending:
            self.log.warning(
                "after waiting %.0fs, %d jobs (%d images) are still out; their images fold in if they arrive",
                timeout_s,
                len(self.ledger.pending),
                sum(j["items"] - j["folded"] for j in self.ledger.pending.values()),
            )
        return taken

    def replay(self, until: str, wanted: Mapping[str, int | None]) -> None:
        """Take again, from the start of the stream up to ``until``, the images whose stream ids
        ``wanted`` names (id -> first epoch): a checkpoint's images, on a machine without them.
        The run's bookkeeping is not touched. ResultsLost when one is no longer there."""
        after = START_CURSOR
        while stream_key(after) < stream_key(until):
            page = self._retry(
                partial(self.client.results, self.run_id, after=after, limit=RESULTS_PAGE), "read results"
            )
            for item in page.items:
                if stream_key(item.id) > stream_key(until):
                    break
                if item.id in wanted and item.id not in self.sink:
                    self.sink.add(self._arrival(item, wanted[item.id]))
            if page.next == after:
                break
            after = page.next
        missing = [sid for sid in wanted if sid not in self.sink]
        if missing:
            raise ResultsLost(
                f"the results stream of run {self.run_id} no longer holds {len(missing)} generated "
                f"images of the checkpoint (e.g. {missing[0]}; expired?)"
            )

    # --- the end ---------------------------------------------------------------------------
    def cancel_pending(self) -> None:
        """Cancel this run's unfinished jobs (rank 0): they would only keep a GPU busy for nothing."""
        if not self.ranks.main:
            return
        for job_id in list(self.ledger.pending):
            try:
                self.client.cancel(job_id)
                self.log.info("cancelled job %s: the run ended before it finished", job_id)
            except Exception as exc:  # finished meanwhile, or the generator is gone
                self.log.info("job %s not cancelled: %s", job_id, exc)

    def finish(self) -> None:
        """The run is over (rank 0): none of its classifiers is needed, nor (once no job of it
        is left to run) its memory bank. What cannot be deleted now expires on the generator."""
        if not self.ranks.main:
            return
        self.retire_classifiers()
        if not self.ledger.pending:
            try:
                self.client.clear_memory_bank(self.run_id)
            except Exception as exc:
                self.log.info("memory bank %s left to expire: %s", self.run_id, exc)

    def close(self) -> None:
        """Close the HTTP connections (when this object opened them)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> ActGenRun:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        """On a clean exit: cancel the unfinished jobs if ``cancel_on_exit``, delete the run's
        classifiers and memory bank. After an exception all stays (a resumed run needs it)."""
        try:
            if exc_type is None:
                if self.cancel_on_exit:
                    self.cancel_pending()
                self.finish()
        finally:
            self.close()

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers (torch.save-able with weights_only): the ledger, the learnt item cap,
        the last classifier, and which images arrived (rebuilt from the stream on load)."""
        s = self.ledger
        out: dict[str, Any] = {
            "run_id": s.run_id,
            "cursor": s.cursor,
            "pending": {k: dict(v) for k, v in s.pending.items()},
            "jobs": [dict(j) for j in s.jobs],
            "classifiers": list(s.classifiers),
            "item_cap": self.item_cap,
            "classifier": list(self._classifier) if self._classifier else None,
        }
        if self.dataset is not None:
            out["images"] = [[a.stream_id, a.first_epoch] for a in self.dataset.items]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run a :meth:`state_dict` describes; the arrived images are read again
        from the results stream (ResultsLost when they expired)."""
        s = self.ledger
        s.run_id, s.cursor = state["run_id"], state["cursor"]
        s.pending = {k: dict(v) for k, v in state["pending"].items()}
        s.jobs = [dict(j) for j in state["jobs"]]
        s.classifiers = list(state["classifiers"])
        self.item_cap = state.get("item_cap", self.item_cap)
        last = state.get("classifier")
        self._classifier = (str(last[0]), str(last[1])) if last else None
        if self.dataset is not None:
            self.dataset.clear()
            self.replay(s.cursor, {sid: first for sid, first in state.get("images", [])})


def _as_list(values: Any) -> list[Any]:
    """A tensor, an array or a sequence as a list of Python values."""
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)
