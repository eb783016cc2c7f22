"""Pydantic models for every message on the wire (docs/architecture.md sections 3 and 4).

The REST API validates bodies with these, the queue stores them, the client sends them:
one definition each, so the two services cannot drift apart.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actgen_shared.labels import LABEL_SETS, LabelSetName, class_names_for
from actgen_shared.seeds import MAX_SEED

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BANK_KEY_PATTERN = RUN_ID_PATTERN
CLASSIFIER_REF_PATTERN = r"^sha256:[0-9a-f]{64}$"
# The error code of a 422 for an idempotency key reused with another body (the first job stands).
IDEMPOTENCY_CONFLICT = "idempotency_conflict"
# where a results (or progress) cursor starts: before the first entry of the stream
START_CURSOR = "0-0"


class Mode(str, Enum):  # noqa: UP042  (str() stays "Name.member", as before)
    """Generation modes of the paper's ablation (Table 4)."""

    random = "random"  # plain SD, prompt only
    ig = "ig"  # image guidance, mask = 1
    aig = "aig"  # attentive image guidance
    actgen = "actgen"  # aig + gradient guidance (contrastive + adversarial)


class JobStatus(str, Enum):  # noqa: UP042  (str() stays "Name.member", as before)
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


# How a guide of another aspect is fit to the generation size (actgen_generator.guide_fit).
GuideFit = Literal["crop", "pad", "stretch"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PresetName = Literal["released", "paper", "fast"]
# eq. 10's decoder: the model's VAE, or its tiny surrogate (TAESD for SD 2.1; the returned image is the VAE's)
AdvDecoder = Literal["vae", "tiny"]
# The options whose default depends on the preset and the model (actgen_shared.presets resolves them).
PRESET_FIELDS = (
    "guidance_scale",
    "lr",
    "grad_norm",
    "update_uncond",
    "contrastive_margin",
    "normalize_mask",
    "prompt",
    "adv_decoder",
)
PROMPT_MAX_CHARS = 300


class GenerationOptions(_Strict):
    """Sampler options. The paper's where it states them (section 5.1, appendix A.4); the fields
    left None come from the preset, the model's defaults file or the released code
    (actgen_shared.presets, docs/architecture.md 3)."""

    mode: Mode = Mode.actgen
    preset: PresetName | None = Field(
        None,
        description="released: the authors' released code; paper: the text; fast: released with eq. "
        "10's tiny decoder and eq. 11's backward through the conditional rows only. None: the model's "
        "own defaults file, else released. Options set here override it",
    )
    num_inference_steps: int = Field(40, ge=1, le=500, description="DDPM steps")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=100.0, description="CFG scale s (eq. 4); released 7.5, paper 15"
    )
    image_guidance_strength: float = Field(
        12.5,
        ge=-1000.0,
        le=1000.0,
        description="i in gamma = 1 - sigmoid(step - i) (eq. 7), stated for image_guidance_reference_steps",
    )
    image_guidance_reference_steps: int | None = Field(
        40,
        ge=1,
        le=1000,
        description="the step count i (and few-shot eta_f) is stated for (the paper's 40): the "
        "midpoint used is i * num_inference_steps / this (12.5 of 40 -> 6.25 of 20); null: i as given",
    )
    grad_steps: int = Field(
        10,
        ge=0,
        le=1000,
        description="gradient guidance on the first steps (the default clamps to num_inference_steps)",
    )
    lr: float | None = Field(
        None, ge=0.0, le=100.0, description="nu, step of the normalised update (eq. 11); released 0.05"
    )
    grad_norm: Literal["token", "global"] | None = Field(
        None,
        description="eq. 11's norm: token (released code: each channel over the tokens, moves "
        "nu*sqrt(D)) or global (paper text: the whole embedding, moves nu)",
    )
    update_uncond: bool | None = Field(
        None, description="also move the unconditional embedding by its own gradient (released code)"
    )
    contrastive_margin: float | None = Field(
        None, ge=0.0, le=1e6, description="rho (eq. 9); released 100, paper 200"
    )
    bank_sample: int = Field(1024, ge=0, le=65536, description="N, latents sampled from the bank")
    adv_weight: float = Field(0.1, ge=0.0, le=1000.0, description="lambda")
    adv_prob: float = Field(0.0, ge=0.0, le=1.0, description="chance that an item uses L_adv")
    height: int | None = Field(None, ge=64, le=2048, description="None: the model's native size")
    width: int | None = Field(None, ge=64, le=2048, description="None: the model's native size")
    output_size: int | None = Field(None, ge=8, le=2048, description="also resize to this square")
    guide_fit: GuideFit = Field(
        "crop",
        description="a guide of another aspect than height x width: its centre kept (crop), all of it "
        "with mid-grey borders (pad), or squashed to fit (stretch)",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="fixes all noise of the job")
    return_latents: bool = True
    prompt: str | None = Field(
        None,
        min_length=2,
        max_length=PROMPT_MAX_CHARS,
        description="prompt template with exactly one {} for the class name (paper and released "
        "code: 'a photo of {}')",
    )
    normalize_mask: bool | None = Field(
        None, description="scale the mask to [0, 1] (paper) or keep the sum from ones (released code)"
    )
    adv_decoder: AdvDecoder | None = Field(
        None,
        description="eq. 10's decode of x0_hat: the model's VAE (released, paper) or its tiny surrogate "
        "decoder (fast; TAESD for SD 2.1), whose gradient approximates the VAE's; the image a job "
        "returns is always the VAE's",
    )
    plain_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="chance that an item is drawn as plain SD (released code)"
    )
    # Few-shot (appendix A.3): strength from the guide's confidence when set.
    fewshot_u: float | None = Field(
        None, ge=-10.0, le=10.0, description="u of eta_f = L/(1+exp(k(f-u)))+p; needs confidence"
    )

    @field_validator("prompt")
    @classmethod
    def _one_placeholder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.count("{}") != 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
            raise ValueError(
                "must hold exactly one {} (where the class name goes) and no other brace, "
                f"e.g. 'a photo of {{}}'; got {value!r}"
            )
        if not value.replace("{}", "").strip():
            raise ValueError("must hold words besides the {} placeholder")
        before, after = value.split("{}")
        if before[-1:].isalnum() or after[:1].isalnum():  # "{}s" would tokenise "cats", not "cat"
            raise ValueError(
                f"the class name must stand as its own word(s): no letter or digit next to {{}}, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.grad_steps > self.num_inference_steps:
            if "grad_steps" in self.model_fields_set:
                raise ValueError(
                    f"options.grad_steps ({self.grad_steps}) must not exceed "
                    f"options.num_inference_steps ({self.num_inference_steps})"
                )
            self.grad_steps = self.num_inference_steps  # a default never makes a request invalid
        if self.fewshot_u is not None and self.mode is not Mode.ig:
            raise ValueError(
                f"options.fewshot_u is few-shot image guidance (appendix A.3) and needs mode 'ig', "
                f"got mode {self.mode.value!r}"
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"options.{name} must be a multiple of 8, got {value}")
        return self

    def batch_signature(self) -> tuple:
        """Items whose options share this signature can run in one sampler batch."""
        return (self.mode.value, self.num_inference_steps, self.height, self.width)


class ResolvedOptions(BaseModel):
    """The preset-dependent options as a job ran with them (actgen_shared.presets.resolve_options)."""

    defaults: Literal["released", "paper", "fast", "model"] = Field(
        ..., description="where the values the request left out came from: a preset, or the model's file"
    )
    guidance_scale: float
    lr: float
    grad_norm: Literal["token", "global"]
    update_uncond: bool
    contrastive_margin: float
    normalize_mask: bool
    prompt: str
    adv_decoder: AdvDecoder = "vae"


class JobItem(_Strict):
    """One hard sample: the guide image and its true class."""

    image: str = Field(..., min_length=1, description="guide image, base64-encoded PNG (or JPEG)")
    class_id: int = Field(..., ge=0)
    guide_id: str | None = Field(None, max_length=256)
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="classifier's true-class prob")


class JobRequest(_Strict):
    """Body of POST /v1/jobs."""

    run_id: str = Field(..., pattern=RUN_ID_PATTERN)
    epoch: int = Field(0, ge=0)
    items: list[JobItem] = Field(..., min_length=1)
    class_names: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=100_000
    )
    label_set: LabelSetName | None = None
    classifier_ref: str | None = Field(None, pattern=CLASSIFIER_REF_PATTERN)
    memory_bank_key: str | None = Field(None, pattern=BANK_KEY_PATTERN)
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _consistent(self) -> JobRequest:
        if (self.class_names is None) == (self.label_set is None):
            raise ValueError("give exactly one of class_names or label_set")
        n = len(self.resolved_class_names())
        for k, item in enumerate(self.items):
            if item.class_id >= n:
                raise ValueError(f"items[{k}].class_id {item.class_id} is out of range for {n} classes")
        if self.options.fewshot_u is not None:
            missing = [k for k, item in enumerate(self.items) if item.confidence is None]
            if missing:
                raise ValueError(f"options.fewshot_u needs items[{missing[0]}].confidence")
        if self.needs_classifier and self.classifier_ref is None:
            raise ValueError("classifier_ref is required when options.adv_prob > 0 in actgen mode")
        return self

    @property
    def needs_classifier(self) -> bool:
        return self.options.mode is Mode.actgen and self.options.adv_prob > 0

    def resolved_class_names(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        assert self.label_set is not None
        return class_names_for(self.label_set)


class JobAccepted(BaseModel):
    job_id: str
    status_url: str
    duplicate: bool = Field(False, description="True when the idempotency key matched a job")


class Progress(BaseModel):
    step: int = 0
    total: int = 0


class GradStepRecord(BaseModel):
    """What gradient guidance did at one step for one item (provenance)."""

    step: int
    l_contra: float
    l_adv: float | None = None
    prediction: int | None = None


class ItemResult(BaseModel):
    """Provenance of one generated image: everything that made it."""

    index: int
    class_id: int
    class_name: str
    guide_id: str | None = None
    seed: int
    mode: Mode
    adversarial: bool = False
    image_guidance_strength: float = Field(
        ..., description="the i gamma used: options' (or few-shot eta_f) scaled to the steps"
    )
    grad_records: list[GradStepRecord] = Field(default_factory=list)
    # gradient steps whose eq. 11 gradient was all zero (nothing within the margin, or underflow)
    # or not finite (that step's move skipped): docs/architecture.md 5
    zero_grad_steps: int = 0
    nonfinite_grad_steps: int = 0
    width: int
    height: int
    resolved: ResolvedOptions | None = Field(None, description="the preset-dependent options it used")


class JobResult(BaseModel):
    items: list[ItemResult]
    options: GenerationOptions
    classifier_ref: str | None = None
    replica: str | None = None


class JobState(BaseModel):
    """Body of GET /v1/jobs/{id}."""

    job_id: str
    run_id: str
    epoch: int = 0
    status: JobStatus
    progress: Progress = Field(default_factory=Progress)
    error: str | None = None
    result: JobResult | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    replica: str | None = None
    deliveries: int = 0
    cancel_requested: bool = Field(
        False, description="DELETE asked this running job to stop; it stops at its next step"
    )


class ResultItem(BaseModel):
    """One entry of a run's results stream, as served by GET /v1/runs/{run}/results."""

    id: str = Field(..., description="stream id; pass it as ?after= to resume")
    job_id: str
    index: int
    epoch: int
    class_id: int
    guide_id: str | None = None
    image: str = Field(..., description="base64 PNG")
    latent_key: str | None = None


class ResultsPage(BaseModel):
    items: list[ResultItem]
    next: str


class ClassifierMeta(_Strict):
    """Metadata uploaded with a classifier's safetensors weights."""

    architecture: str = Field(..., min_length=1, max_length=64)
    num_classes: int = Field(..., ge=2, le=100_000)
    input_size: int = Field(..., ge=8, le=1024)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[
        Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
    ] = (
        0.229,
        0.224,
        0.225,
    )


class ClassifierRef(BaseModel):
    ref: str
    architecture: str
    num_classes: int


class MemoryBankInfo(BaseModel):
    key: str
    counts: dict[int, int]


class Info(BaseModel):
    model: str
    model_description: str | None = Field(None, description="what the model is and what it is for")
    model_classes: list[str] | None = Field(
        None, description="the class names the model was trained on (None: any, as SD 2.1)"
    )
    device: str
    dtype: str
    replica_id: str
    version: str
    max_batch: int
    native_size: int
    defaults: GenerationOptions
    resolved_defaults: ResolvedOptions | None = Field(
        None,
        description="the options defaults leaves None, as this replica's model resolves them for a "
        "request naming no preset (None: an API-only replica, which loads no model)",
    )
    label_sets: list[str] = Field(default_factory=lambda: sorted(LABEL_SETS))
    # the per-job caps, so a client splits its work before a 422 (None: a server too old to say)
    max_items_per_job: int | None = Field(None, description="items in one job (ACTGEN_MAX_ITEMS_PER_JOB)")
    max_job_image_steps: int | None = Field(
        None, description="items x steps x (height x width / 512^2) of one job (ACTGEN_MAX_JOB_IMAGE_STEPS)"
    )
    adv_decode: str | None = Field(
        None, description="eq. 10's decode (ACTGEN_ADV_DECODE): full or classifier"
    )
    grad_checkpointing: str | None = Field(
        None, description="eq. 11's backward (ACTGEN_GRAD_CHECKPOINTING): auto, on or off"
    )


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail
