"""A client API for any training loop: one :class:`ActGenRun` per training run
(docs/architecture.md 10).

It posts a loop's hard samples (tensors, PIL images, arrays or PNG bytes) with the current model,
and hands back the images that have arrived as a growing torch Dataset. What a loop would
otherwise write itself is here: base64 and PNG, the classifier as safetensors with its
metadata (uploaded once per change of weights, ``uploads.py``), an idempotency key per (run,
epoch, rank), jobs split to the service's per-job cap, retries with backoff on network trouble
and 5xx, paging through the results with a cursor that a checkpoint can keep (``intake.py``),
the run's ledger of jobs and its per-epoch tally (``ledger.py``), errors that say what to fix,
and cleanup of the run's classifiers and memory bank at the end.

The whole method by default: given ``epochs=`` (the run's length) the jobs follow the preset's
adversarial schedule (actgen_shared.schedule: the paper's ramp of adv_prob to 0.5, as the
trainer and the Lightning callback), so the classifier is uploaded once the ramp starts. A part
of the method that is off (no ``epochs=``, no ``architecture=``, a mode without gradient
guidance) is said once in the log. ``images_per_epoch=`` or ``budget=`` caps what is posted.

Generation is auxiliary: network trouble or a 5xx (``client.is_retryable``) that outlasts the
retries is logged and the loop goes on (a submit says so in :attr:`Submission.error`); a job the
generator forgot (404: it restarted without its Redis) is counted as lost and the loop goes on;
a 4xx on a request is the caller's fault and is raised, explained.

DDP (torch.distributed initialised, or ``ranks=`` given): :meth:`ActGenRun.submit`,
:meth:`~ActGenRun.refresh`, :meth:`~ActGenRun.drain` and :meth:`~ActGenRun.upload` are
collective (every rank calls them, in the same order). Rank 0 uploads the classifier and
broadcasts its ref; each rank posts its own share (its own idempotency key); every rank reads
*every* rank's images, up to the cursor rank 0 reached, in stream order, so all ranks hold the
same generated dataset and a DistributedSampler shards it like the real data.

torch is imported only inside the methods that need it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np

from actgen_shared.client import GeneratorClient, GeneratorError, is_retryable
from actgen_shared.codecs import b64encode
from actgen_shared.guides import guide_pngs
from actgen_shared.intake import RESULTS_PAGE, ResultsIntake, ResultsLost
from actgen_shared.labels import class_names_for
from actgen_shared.ledger import (
    Arrival,
    EpochTally,
    ImageSink,
    RunLedger,
    Submission,
    idempotency_key,
    job_seed,
    record_jobs,
    stream_key,
)
from actgen_shared.ranks import Ranks, current_ranks, share
from actgen_shared.schedule import (
    adversarial_options,
    final_wait_epoch,
    generation_epochs,
    images_for_epoch,
    schedule_for,
)
from actgen_shared.schemas import (
    IDEMPOTENCY_CONFLICT,
    GenerationOptions,
    Info,
    JobItem,
    JobRequest,
    JobStatus,
    Mode,
)
from actgen_shared.seeds import derive_seed
from actgen_shared.settings import ClientSettings
from actgen_shared.uploads import ClassifierUploads, model_weights

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from actgen_shared.arrived import ArrivedImages

T = TypeVar("T")
HTTP_LOGGERS = ("httpx", "httpcore")
RUN_ID_BYTES = 16  # 128 random bits: no two runs on one service share an id (or its memory bank)

log = logging.getLogger("actgen_shared.run")

__all__ = [
    "RESULTS_PAGE",
    "ActGenRun",
    "Arrival",
    "GeneratorRefused",
    "GeneratorUnavailable",
    "ImageSink",
    "ResultsLost",
    "RunLedger",
    "Submission",
    "connect",
    "explain",
    "http_logging",
    "idempotency_key",
    "job_seed",
    "model_weights",
    "new_run_id",
    "stream_key",
]


# --- errors -------------------------------------------------------------------------------
class GeneratorUnavailable(RuntimeError):
    """The generator did not answer at start, or refused us; the message says what to fix."""


class GeneratorRefused(GeneratorError):
    """A request the generator refused (4xx), with a message that names the cause and the fix;
    ``status``, ``code`` and ``message`` are the server's."""

    def __init__(self, exc: GeneratorError, explanation: str) -> None:
        super().__init__(exc.status, exc.code, exc.message)
        self.args = (explanation,)


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


def new_run_id(prefix: str = "run") -> str:
    """A fresh run id: ``prefix`` and 128 random bits in hex."""
    return f"{prefix}-{os.urandom(RUN_ID_BYTES).hex()}"


def _item_cap_from(exc: Exception) -> int | None:
    """The per-job item cap a 422 names ("... more than the cap of 256 per job"), else None."""
    if isinstance(exc, GeneratorError) and exc.status == 422 and exc.message.startswith("items"):
        found = re.search(r"cap of (\d+)", exc.message)
        return int(found.group(1)) if found else None
    return None


def _unknown_class_names(info: Info, names: Sequence[str]) -> list[str]:
    """The class names the served model declares it was not trained on ([] when it declares none)."""
    known = getattr(info, "model_classes", None)
    if not known:
        return []
    return [name for name in names if name not in set(known)]


class ActGenRun(ClassifierUploads, ResultsIntake):
    """One training run's link to the generator; a context manager that cleans up at the end.

    ``classes`` (the class names, for the prompts) or ``label_set`` (cifar10, imagenet, ...);
    ``url``/``api_key`` default to ACTGEN_GENERATOR_URL / ACTGEN_API_KEY. To send the model
    (gradient guidance), ``architecture`` names it in the service's registry
    (actgen_shared.architectures) and ``input_size``/``mean``/``std`` say what it eats; the
    same ``mean``/``std`` undo a normalised batch given to :meth:`submit` (seen from its
    values, or ``normalized=True``).

    ``epochs``: the run's length; with it the jobs follow ``schedule`` (default: the preset's,
    actgen_shared.schedule) and :meth:`generating` / :meth:`drain_epoch` say when to post and
    when to wait (the first ``generate_fraction`` of the epochs; the epoch after). Budget:
    ``images_per_epoch`` (all ranks together), or ``budget`` (a share of ``train_size`` over
    the whole run, spread over the generating epochs); a larger submit posts a random subset.

    ``options`` are GenerationOptions fields for every job (an ``adv_prob`` there replaces the
    schedule); ``seed`` fixes each job's noise (a hash of seed, epoch, rank). Arrived images
    are resized to ``image_size`` and served through ``transform`` (a PIL -> tensor callable;
    default: float CHW in [0, 1]). ``max_inflight``: a rank with that many unfinished jobs posts
    nothing (backpressure).

    ``history``: one dict per epoch (the rows of the per-epoch log line): ``epoch``, ``posted``,
    ``arrived``, ``late``, ``lost`` (images in that epoch), ``in_flight`` (images still out at
    its end), ``arrived_total`` (see actgen_shared.ledger.EpochTally).
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
        epochs: int | None = None,
        generate_fraction: float = 0.5,
        schedule: str | None = None,
        images_per_epoch: int | None = None,
        budget: float | None = None,
        train_size: int | None = None,
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
        self._check_schedule(epochs, generate_fraction, images_per_epoch, budget, train_size)
        self.epochs = epochs
        self.generate_fraction = generate_fraction
        self.schedule = schedule or schedule_for(self.options.get("preset"))
        adversarial_options(self.schedule, 0, 1)  # an unknown schedule is named now
        self.images_per_epoch, self.budget, self.train_size = images_per_epoch, budget, train_size
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
            ledger = RunLedger(run_id or self.ranks.broadcast(new_run_id()))
        self.ledger = ledger
        self.tally = EpochTally(ledger, self.log, self.ranks.main)
        self.read_failed = False  # the last refresh could not read the results (generator away)
        self._taken = 0  # images taken in by this object (what refresh counts)
        self._classifier: tuple[str, str] | None = None  # (digest of meta + weights, ref)
        self._said: set[str] = set()  # notes logged once
        self._method = self._method_note()
        if self._method is not None:
            self._say_once("method", self._method)
        self._warn_class_names()

    def train_dataset(self, real: Any) -> Any:
        """``real`` (a labelled Dataset) plus every image arrived so far, as one ConcatDataset; the
        generated images' labels are served as ``real``'s are (int, or 0-dim tensors)."""
        from torch.utils.data import ConcatDataset

        if self.dataset is None:
            raise ValueError("this run's images go to its sink, not to run.dataset: nothing to add")
        self.dataset.labels_like(real)
        return ConcatDataset([real, self.dataset])

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per epoch: what was posted, arrived (late), lost and still out (see the class doc)."""
        return self.ledger.history

    # --- the schedule -----------------------------------------------------------------------
    @staticmethod
    def _check_schedule(
        epochs: int | None,
        fraction: float,
        images_per_epoch: int | None,
        budget: float | None,
        train_size: int | None,
    ) -> None:
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if not 0 < fraction <= 1:
            raise ValueError(f"generate_fraction must be in (0, 1], got {fraction}")
        if images_per_epoch is not None and budget is not None:
            raise ValueError("give images_per_epoch or budget, not both")
        if images_per_epoch is not None and images_per_epoch < 0:
            raise ValueError(f"images_per_epoch must be >= 0, got {images_per_epoch}")
        if budget is not None:
            if not 0 < budget <= 1:
                raise ValueError(f"budget is a share of the training set, in (0, 1], got {budget}")
            if epochs is None or not train_size:
                raise ValueError(
                    "budget= is a share of the training set over the run: give epochs= and train_size= too"
                )

    @property
    def generation_epochs(self) -> int | None:
        """Epochs 0 .. this - 1 post hard samples (None without ``epochs``)."""
        return None if self.epochs is None else generation_epochs(self.epochs, self.generate_fraction)

    def generating(self, epoch: int) -> bool:
        """Whether ``epoch`` posts hard samples (all of them, without ``epochs``)."""
        gen = self.generation_epochs
        return gen is None or epoch < gen

    @property
    def drain_epoch(self) -> int | None:
        """The epoch that starts with :meth:`drain`: the one after the last post (None without
        ``epochs``, or when no epoch follows the last post)."""
        gen = self.generation_epochs
        return None if self.epochs is None or gen is None else final_wait_epoch(self.epochs, gen)

    def epoch_budget(self, epoch: int) -> int | None:
        """Hard samples the whole run (all ranks) may post after ``epoch``; None: no cap."""
        if self.images_per_epoch is not None:
            return self.images_per_epoch
        if self.budget is not None:
            assert self.train_size is not None and self.generation_epochs is not None
            total = max(1, round(self.budget * self.train_size))
            return images_for_epoch(total, self.generation_epochs, epoch)
        return None

    def _method_note(self) -> str | None:
        """Which part of the method is off for this run and why (None: all of it is on)."""
        mode = self.options.get("mode", Mode.actgen.value)
        if mode != Mode.actgen.value:
            return (
                f"options mode={mode}: gradient guidance (the memory bank and the classifier) is off; "
                "mode actgen is the whole method"
            )
        if "adv_prob" in self.options:
            if float(self.options["adv_prob"]) == 0:
                return "options adv_prob=0: adversarial guidance (the classifier's gradient, eq. 10) is off"
            return None
        if self.epochs is None:
            return (
                "no epochs=: the run cannot follow the adversarial schedule, so its jobs run without the "
                "classifier (adv_prob 0: eq. 10 off); pass epochs= (the run's length) or options={'adv_prob': ...}"
            )
        missing = self.can_upload()
        if missing is not None:
            return f"adversarial guidance (eq. 10) is off: {missing}"
        return None

    def _say_once(self, key: str, message: str) -> None:
        if key in self._said or not self.ranks.main:
            return
        self._said.add(key)
        self.log.warning(message)

    def _warn_class_names(self) -> None:
        """Class names the served model was not trained on: refused when it declares its classes."""
        unknown = _unknown_class_names(self.info, self.class_names)
        if unknown:
            known = list(getattr(self.info, "model_classes", []) or [])
            raise ValueError(
                f"the generator's model ({self.info.model}) was trained on the classes {', '.join(known)}; "
                f"not on {', '.join(repr(n) for n in unknown[:5])}: name the classes as it knows them"
            )

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

    def _options(
        self, epoch: int, options: Mapping[str, Any] | None, model: nn.Module | None
    ) -> GenerationOptions:
        """The job's options: the schedule's (when the run follows it), the run's, the call's."""
        given = {**self.options, **(options or {})}
        scheduled: dict[str, Any] = {}
        if self.epochs is not None and self._method is None and "adv_prob" not in given:
            scheduled = adversarial_options(self.schedule, epoch, self.epochs)
            if model is None and scheduled["adv_prob"] > 0:
                self._say_once(
                    "no-model",
                    f"epoch {epoch}: submit got no model=, so its jobs run without adversarial guidance "
                    "(eq. 10); pass model= to submit",
                )
                scheduled = {"adv_prob": 0.0}
        merged = {**scheduled, **given}
        if self.seed is not None:
            merged["seed"] = job_seed(self.seed, epoch, self.ranks.rank)
        return GenerationOptions.model_validate(merged)

    # --- posting ---------------------------------------------------------------------------
    def _items(
        self,
        images: Any,
        labels: Sequence[int] | Any,
        confidences: Sequence[float] | Any | None,
        guide_ids: Sequence[str | None] | None,
        normalized: bool | None,
    ) -> list[JobItem]:
        labels = [int(x) for x in _as_list(labels)]
        for k, label in enumerate(labels):  # before any image work: a wrong label is the usual slip
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"labels[{k}] is {label}, outside 0..{len(self.class_names) - 1}")
        # normalized None: the batch's values say whether the run's mean/std must be undone
        pngs = guide_pngs(images, self.mean, self.std, normalized=normalized)
        confs = None if confidences is None else [float(x) for x in _as_list(confidences)]
        for name, seq in (("labels", labels), ("confidences", confs), ("guide_ids", guide_ids)):
            if seq is not None and len(seq) != len(pngs):
                raise ValueError(f"{len(pngs)} images but {len(seq)} {name}")
        return [
            JobItem(
                image=b64encode(png),
                class_id=labels[k],
                guide_id=None if guide_ids is None else guide_ids[k],
                confidence=None if confs is None else float(np.clip(confs[k], 0.0, 1.0)),
            )
            for k, png in enumerate(pngs)
        ]

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

    def _budgeted(self, epoch: int, n: int) -> np.ndarray | None:
        """Positions of this rank's ``n`` hard samples to post when the budget caps them (a random
        subset, seeded by the run's seed, the epoch and the rank); None when all go."""
        cap = self.epoch_budget(epoch)
        if cap is None:
            return None
        mine = share(cap, self.ranks.world, self.ranks.rank)
        if n <= mine:
            return None
        rng = np.random.default_rng([self.seed or 0, epoch, self.ranks.rank])
        return np.sort(rng.choice(n, size=mine, replace=False))

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
        normalized: bool | None = None,
    ) -> Submission:
        """Post this rank's hard samples of ``epoch`` (possibly none). Collective under DDP.

        ``images``: a batch (N x C x H x W tensor) or a sequence of CHW tensors (float in [0, 1],
        uint8, or normalised with the run's mean/std: ``normalized`` None tells from the
        values), PIL images, uint8 arrays or PNG/JPEG bytes; ``labels`` their true classes.
        ``model``: the classifier, uploaded when the job uses adversarial guidance (the
        schedule's adv_prob > 0, or the options'). The budget (``images_per_epoch``/``budget``)
        keeps a random subset. One call per epoch and rank: under the epoch's idempotency key a
        second call with the same samples gets the first job back, and one with other samples (a
        resumed run re-posting an epoch) posts nothing and says so in the log.
        """
        self.tally.at(epoch)
        n = len(_as_list(labels))
        rank, world = self.ranks.rank, self.ranks.world
        out = Submission(jobs=[], posted=0)
        keep = self._budgeted(epoch, n)
        if keep is not None:
            out.capped = n - len(keep)
            images, labels = _pick(images, keep), _pick(labels, keep)
            confidences = None if confidences is None else _pick(confidences, keep)
            guide_ids = None if guide_ids is None else _pick(guide_ids, keep)
            n = len(keep)
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
        job_options = self._options(epoch, options, model)
        out.adv_prob = job_options.adv_prob if job_options.mode is Mode.actgen else 0.0
        adversarial = job_options.mode is Mode.actgen and job_options.adv_prob > 0
        if adversarial and model is None:
            raise ValueError(
                "these options use adversarial guidance (mode actgen, adv_prob > 0): pass model="
            )
        items: list[JobItem] = []
        if posting:  # a bad image or label is named before anything is uploaded
            items = self._items(images, labels, confidences, guide_ids, normalized)
        ref: str | None = None
        if any(self.ranks.gather(adversarial and posting)):  # rank 0 uploads once for all ranks
            ref = out.classifier_ref = self.upload(model)
        if posting and adversarial and ref is None:
            out.error = "no classifier uploaded"
        elif posting:
            try:
                out.jobs = self._post(epoch, items, job_options, ref)
            except GeneratorRefused as exc:
                if exc.code != IDEMPOTENCY_CONFLICT:
                    raise
                # a resumed run posting an epoch it had posted before the stop, with other samples:
                # the first job stands (its images arrive as before) and this call posts nothing
                self.log.warning(
                    "epoch %d: already posted before; its new samples are not posted (%s)", epoch, exc.message
                )
                out.error = exc.message
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("epoch %d: could not post hard samples (%s); training goes on", epoch, exc)
                out.error = str(exc)
        per_rank = self.ranks.gather(out.jobs)
        out.posted = sum(count for rank_jobs in per_rank for _, count in rank_jobs)
        record_jobs(self.ledger, per_rank, epoch, ref, time.time())
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
                if isinstance(exc, GeneratorError) and exc.status == 404:
                    continue  # gone: the next refresh counts it as lost (and says so, once)
                if not is_retryable(exc):
                    raise
                self.log.warning("waiting for job %s failed (%s); training goes on", job_id, exc)
                continue
            if final.status is not JobStatus.done:
                self.log.warning("job %s ended %s: %s", job_id, final.status.value, final.error)
        return timeouts

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
        self.tally.close()
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
            "arrived": s.arrived,
            "late": s.late,
            "history": [dict(row) for row in s.history],
        }
        if self.dataset is not None:
            out["images"] = [[a.stream_id, a.first_epoch] for a in self.dataset.items]
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = False) -> None:
        """Continue the run a :meth:`state_dict` describes; the arrived images are read again
        from the results stream. Images the stream no longer holds (a generator that restarted
        without its Redis, or expiry) are named in a warning and the run goes on without them;
        ``strict``: ResultsLost instead. Its jobs still out are checked at the next refresh."""
        s = self.ledger
        s.run_id, s.cursor = state["run_id"], state["cursor"]
        s.pending = {k: dict(v) for k, v in state["pending"].items()}
        s.jobs = [dict(j) for j in state["jobs"]]
        s.classifiers = list(state["classifiers"])
        s.arrived, s.late = int(state.get("arrived", 0)), int(state.get("late", 0))
        s.history = [dict(row) for row in state.get("history", [])]
        self.tally = EpochTally(s, self.log, self.ranks.main)
        self.item_cap = state.get("item_cap", self.item_cap)
        last = state.get("classifier")
        self._classifier = (str(last[0]), str(last[1])) if last else None
        if self.dataset is not None:
            self.dataset.clear()
            try:
                self.replay(s.cursor, {sid: first for sid, first in state.get("images", [])})
            except ResultsLost as exc:
                if strict:
                    raise
                if self.ranks.main:
                    self.log.warning(
                        "%s: the resumed run goes on with the %d it found", exc, len(self.dataset)
                    )


def _as_list(values: Any) -> list[Any]:
    """A tensor, an array or a sequence as a list of Python values."""
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


def _pick(values: Any, keep: np.ndarray) -> Any:
    """The entries of a batch (tensor, array) or a sequence at positions ``keep``."""
    if hasattr(values, "shape") and hasattr(values, "__getitem__") and not isinstance(values, (list, tuple)):
        import sys

        if "torch" in sys.modules and hasattr(values, "detach"):
            import torch

            return values[torch.as_tensor(keep, dtype=torch.long)]
        return values[keep]
    seq = list(values)
    return [seq[int(k)] for k in keep]
