"""The oracle generator: the backgrounds testbed draws what each arm asks for, no diffusion.

If the testbed cannot separate the arms when their images are exactly what each mechanism
promises, no generator will: the oracle says what the testbed can show before any model trains
(docs/ablation.md). It answers the generator's service contract (the calls the trainer's link makes
on :class:`actgen_shared.client.GeneratorClient`: info, classifier upload, submit, status, wait,
results pages, cancel, memory banks), in process, so a cell runs the real trainer loop, its
selection, budget, schedule and folding, and only the images come from elsewhere. Each item's
guide is the train source's scene ``train-<index>`` (the link's guide id), which the testbed can
draw again with one thing changed (:func:`actgen_lab.backgrounds.rerender`):

* ``random`` mode: a train digit of the item's class (any, not the guide's), the hard style as
  rare as in training, on a uniformly random kind with random colours and box;
* ``ig``: the guide's digit, style, box and colours on the guide's own kind, the pattern redrawn
  (new frequency and phase);
* ``aig``: the guide's digit, style, box and digit colour on another kind, fresh background colours
  (what eq. 8 promises: the foreground kept, the background changed);
* ``actgen`` with ``bank_sample`` > 0 (contrastive): as aig, the kind never one this guide already
  had in this run (until every other kind has been used);
* ``actgen`` items drawn adversarial (``adv_prob``, as the service draws them): the kind the
  uploaded classifier (the asking epoch's) finds hardest for this digit: highest cross-entropy
  over the ten renders;
* policy ``guides`` (a control, no generator): the guide itself, unchanged;
* policy ``moved``: as ``draw``, but ``ig`` also moves and resizes the digit (a variation of the
  guide, as img2img varies it, where plain ``ig`` is a near-copy);
* policy ``pool-styles``: as ``draw``, but ``random`` draws the hard style as often as the testbed's
  generator was trained on it (:data:`~actgen_lab.backgrounds.HARD_SHARE_POOL`, half), not as
  rarely as training: the oracle of that generator's random mode (docs/ablation.md 8.7);
* policy ``through-vae``: as ``draw``, each image then encoded and decoded by the testbed
  generator's VAE (``vae_model``): what the mechanism promises, less what the autoencoder loses, so
  a diffusion arm's gap to its oracle splits into the VAE's share and the sampler's (8.10).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from actgen_lab.backgrounds import (
    BACKGROUND_KINDS,
    HARD_SHARE_POOL,
    HARD_SHARE_TRAIN,
    BackgroundsSplit,
    _colours,
    compose,
    draw_box,
    load_backgrounds_split,
    rerender,
)
from actgen_shared.codecs import png_encode
from actgen_shared.labels import DIGITS
from actgen_shared.schemas import (
    ClassifierMeta,
    ClassifierRef,
    GenerationOptions,
    Info,
    ItemResult,
    JobAccepted,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Mode,
    ResultItem,
    ResultsPage,
)

# draw: what the job's mode asks (module docstring); guides: the guide itself; moved: as draw, but
# ig also moves and resizes the digit (a variation of the guide, not a near-copy); pool-styles: as
# draw, but random draws the hard style as often as the testbed's generator learnt it; through-vae:
# as draw, each image through the generator's VAE and back
POLICIES = ("draw", "guides", "moved", "pool-styles", "through-vae")
VAE_POLICIES = ("through-vae",)  # the policies that read the generator model's VAE
ORACLE_URL = "oracle://backgrounds"


def _b64_png(image: np.ndarray) -> str:
    import base64

    return base64.b64encode(png_encode(image)).decode("ascii")


def guide_index(guide_id: str | None) -> int:
    """``train-123`` (the link's guide id) -> 123; anything else is not a train scene."""
    if guide_id is None or not guide_id.startswith("train-"):
        raise ValueError(f"the oracle draws from train scenes; guide id {guide_id!r} names none")
    return int(guide_id.removeprefix("train-"))


@dataclass
class _Classifier:
    """An uploaded classifier as the oracle runs it: the module and its input normalisation."""

    module: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    def losses(self, images: np.ndarray, label: int) -> np.ndarray:
        """Cross-entropy of ``label`` for each uint8 N x S x S x 3 image."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        with torch.no_grad():
            logits = self.module(x)
        return F.cross_entropy(logits, torch.full((len(x),), label), reduction="none").numpy()


@dataclass
class OracleClient:
    """The service contract answered by the testbed (module docstring). Jobs finish on submit."""

    policy: str = "draw"
    split: BackgroundsSplit = field(default_factory=load_backgrounds_split)
    vae_model: str | None = None  # a model folder whose ``vae`` the through-vae policy round-trips
    base_url: str = ORACLE_URL
    has_api_key: bool = False
    jobs: dict[str, JobState] = field(default_factory=dict)
    stream: dict[str, list[ResultItem]] = field(default_factory=dict)  # run id -> its results
    classifiers: dict[str, _Classifier] = field(default_factory=dict)
    kinds_used: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # (run, guide) -> kinds
    drawn_kinds: list[int | None] = field(default_factory=list)  # per result drawn, its kind (None: a copy)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown oracle policy {self.policy!r}: {', '.join(POLICIES)}")
        self._vae: Any = None
        if self.policy in VAE_POLICIES:
            if self.vae_model is None:
                raise ValueError(f"oracle policy {self.policy!r} needs vae_model, a model folder with a vae")
            from actgen_generator.diffusers_classes import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.vae_model, subfolder="vae").eval()
        train = self.split.train
        self._by_class = {c: np.flatnonzero(train.labels == c) for c in np.unique(train.labels)}

    # --- service --------------------------------------------------------------------------------
    def info(self) -> Info:
        return Info(
            model=f"oracle:{self.policy}",
            device="cpu",
            dtype="uint8",
            replica_id="oracle",
            version="oracle",
            max_batch=1024,
            native_size=self.split.train.images.shape[1],
            defaults=GenerationOptions(),
        )

    def upload_classifier(self, weights: bytes, meta: ClassifierMeta | dict[str, Any]) -> ClassifierRef:
        from safetensors.torch import load

        from actgen_shared.architectures import load_classifier

        meta = ClassifierMeta.model_validate(meta)
        module = load_classifier(meta.architecture, meta.num_classes, load(weights)).eval()
        import hashlib

        ref = "sha256:" + hashlib.sha256(weights).hexdigest()  # the service's refs are content hashes
        self.classifiers[ref] = _Classifier(module, torch.tensor(meta.mean), torch.tensor(meta.std))
        return ClassifierRef(ref=ref, architecture=meta.architecture, num_classes=meta.num_classes)

    def delete_classifier(self, ref: str) -> bool:
        return self.classifiers.pop(ref, None) is not None

    def clear_memory_bank(self, key: str) -> None:
        self.kinds_used = {k: v for k, v in self.kinds_used.items() if k[0] != key}

    def close(self) -> None:
        pass

    def __enter__(self) -> OracleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- jobs -----------------------------------------------------------------------------------
    def submit(self, request: JobRequest | dict[str, Any]) -> JobAccepted:
        """Validate the job as the service does, draw every item, and put them in the run's stream."""
        request = JobRequest.model_validate(request)
        job_id = f"job{next(self._ids)}"
        now = time.time()
        seed = request.options.seed if request.options.seed is not None else 0
        rng = np.random.default_rng([seed, int(job_id.removeprefix("job"))])
        results, stream = [], self.stream.setdefault(request.run_id, [])
        drawn = [self._draw(request, item.class_id, item.guide_id, rng) for item in request.items]
        images = np.stack([image for image, _, _ in drawn])
        if self._vae is not None:
            from actgen_lab.tiny_vae_training import reconstruct

            images = reconstruct(self._vae, images)
        for index, (item, image, (_, kind, adversarial)) in enumerate(
            zip(request.items, images, drawn, strict=True)
        ):
            self.drawn_kinds.append(kind)
            stream_id = f"{len(stream) + 1}-0"
            stream.append(
                ResultItem(
                    id=stream_id,
                    job_id=job_id,
                    index=index,
                    epoch=request.epoch,
                    class_id=item.class_id,
                    guide_id=item.guide_id,
                    image=_b64_png(image),
                )
            )
            results.append(
                ItemResult(
                    index=index,
                    class_id=item.class_id,
                    class_name=DIGITS[item.class_id % len(DIGITS)],
                    guide_id=item.guide_id,
                    seed=seed,
                    mode=request.options.mode,
                    adversarial=adversarial,
                    image_guidance_strength=0.0,
                    width=image.shape[1],
                    height=image.shape[0],
                )
            )
        self.jobs[job_id] = JobState(
            job_id=job_id,
            run_id=request.run_id,
            epoch=request.epoch,
            status=JobStatus.done,
            result=JobResult(items=results, options=request.options, classifier_ref=request.classifier_ref),
            created_at=now,
            started_at=now,
            finished_at=time.time(),
            replica="oracle",
        )
        return JobAccepted(job_id=job_id, status_url=f"/v1/jobs/{job_id}")

    def status(self, job_id: str, timeout_s: float | None = None) -> JobState:
        return self.jobs[job_id]  # in process: answers at once, whatever the request's time bound

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.1) -> JobState:
        return self.jobs[job_id]  # done on submit

    def cancel(self, job_id: str) -> JobState:
        return self.jobs[job_id]

    def results(
        self,
        run_id: str,
        after: str = "0-0",
        limit: int = 100,
        wait_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> ResultsPage:
        """The run's results after the cursor ``after`` (``n-0``: the n-th result)."""
        items = self.stream.get(run_id, [])
        start = int(after.partition("-")[0])
        page = items[start : start + limit]
        return ResultsPage(items=page, next=page[-1].id if page else after)

    # --- drawing --------------------------------------------------------------------------------
    def _draw(
        self, request: JobRequest, class_id: int, guide_id: str | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, int | None, bool]:
        """One item's image, its background kind (None: the guide copied) and whether it was drawn
        adversarially."""
        train, options = self.split.train, request.options
        if options.mode is Mode.random and self.policy in ("draw", "pool-styles"):
            share = HARD_SHARE_POOL if self.policy == "pool-styles" else HARD_SHARE_TRAIN
            image, kind = self._pool_scene(class_id, rng, share)
            return image, kind, False
        index = guide_index(guide_id)
        if self.policy == "guides":
            return train.images[index], None, False
        guide_kind = int(train.kinds[index])
        if options.mode is Mode.ig:
            return rerender(train, index, rng, new_box=self.policy == "moved")[0], guide_kind, False
        others = [k for k in range(len(BACKGROUND_KINDS)) if k != guide_kind]
        if options.mode is Mode.aig:
            kind = int(rng.choice(others))
            return rerender(train, index, rng, kind=kind, new_colours=True)[0], kind, False
        # actgen: adversarial items (adv_prob, as the service draws them), the rest contrastive
        classifier = self.classifiers.get(request.classifier_ref or "")
        if classifier is not None and options.adv_prob > 0 and rng.random() < options.adv_prob:
            image, kind = self._hardest(index, classifier, rng)
            return image, kind, True
        if options.bank_sample > 0:  # contrastive: no kind twice for one guide (until all were used)
            used = self.kinds_used.setdefault(
                (request.memory_bank_key or request.run_id, str(guide_id)), set()
            )
            fresh = [k for k in others if k not in used]
            if not fresh:  # every other kind used: start over
                used.clear()
                fresh = others
            kind = int(rng.choice(fresh))
            used.add(kind)
        else:
            kind = int(rng.choice(others))
        return rerender(train, index, rng, kind=kind, new_colours=True)[0], kind, False

    def _pool_scene(
        self, class_id: int, rng: np.random.Generator, hard_share: float
    ) -> tuple[np.ndarray, int]:
        """A train digit of the class, in the hard style at ``hard_share``, on a random kind; and the kind."""
        train = self.split.train
        assert train.digits is not None
        pick = int(rng.choice(self._by_class[class_id]))
        style = int(rng.random() < hard_share)
        kind = int(rng.integers(len(BACKGROUND_KINDS)))
        image, _ = compose(train.digits[pick], class_id, kind, style, _colours(rng), draw_box(rng), rng)
        return image, kind

    def _hardest(
        self, index: int, classifier: _Classifier, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """The guide's digit on the kind the asking classifier finds hardest (same colours, pattern draw)."""
        train = self.split.train
        draw_seed = int(rng.integers(2**31))
        images = np.stack(
            [  # the same colours and pattern draw on every kind: only the kind differs
                rerender(train, index, np.random.default_rng(draw_seed), kind=kind, new_colours=True)[0]
                for kind in range(len(BACKGROUND_KINDS))
            ]
        )
        kind = int(np.argmax(classifier.losses(images, int(train.labels[index]))))
        return images[kind], kind
