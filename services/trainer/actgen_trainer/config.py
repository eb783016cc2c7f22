"""The trainer's typed configuration: a YAML file plus ``--set dotted.key=value`` overrides.

Every knob of a run lives here, so a run folder's ``config.yaml`` says exactly what ran.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actgen_shared.architectures import check_architecture, timm_name
from actgen_shared.labels import LabelSetName
from actgen_shared.schemas import RUN_ID_PATTERN, GenerationOptions, Mode, PresetName

# GenerationOptions fields the loop fills in per job (Algorithm 1), never from the config.
LOOP_OWNED_OPTIONS = ("mode", "adv_prob", "seed")
# GenerationOptions fields with a key of their own in the generation section.
SECTION_OPTIONS = ("preset", "prompt")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class TrainMode(str, Enum):  # noqa: UP042  (str() stays "Name.member", as before)
    """The paper's ablation (Table 4): no generation (``real``), or one of the generator's
    :class:`~actgen_shared.schemas.Mode` (its values; the check below keeps the two in step)."""

    real = "real"
    random = Mode.random.value
    ig = Mode.ig.value
    aig = Mode.aig.value
    actgen = Mode.actgen.value

    @property
    def generator_mode(self) -> Mode | None:
        """The generator's mode for this run, None for ``real``."""
        return None if self is TrainMode.real else Mode(self.value)


if {m.value for m in TrainMode} != {TrainMode.real.value, *(m.value for m in Mode)}:
    raise RuntimeError("TrainMode must be 'real' plus every actgen_shared.schemas.Mode")


class Guidance(str, Enum):  # noqa: UP042  (str() stays "Name.member", as before)
    """Which gradient guidance an ``actgen`` run uses (Table 4, rows 3-6)."""

    aig = "aig"  # none: attentive image guidance alone
    contrastive = "contrastive"  # L_contra only (eq. 9)
    adversarial = "adversarial"  # L_adv only (eq. 10)
    both = "both"  # L_contra + lambda L_adv: ActGen


class AdvSchedule(str, Enum):  # noqa: UP042  (str() stays "Name.member", as before)
    """How the chance of adversarial guidance grows over the generation epochs.

    ``paper``: adv_prob = 0.5 * epoch / epochs (appendix A.4). ``authors``: the released code,
    with r = max(1 - epoch / (0.5 * epochs - 1), 0) * 0.5 of the items drawn as plain SD and
    adv_prob = 0.5 - r, so it reaches 0.5 by mid-training (hunto/ActGen@f9f3aa7
    classification/tools/train.py:345 sets r; lib/gen/guided_gen.py:203 draws a plain item with
    probability r, l. 267 an adversarial one with 1 - (r + 0.5) = 0.5 - r). ``constant``:
    adv_prob = 0.5 (the schedules' end value) from the first job: eq. 10 alone gets as many items
    as it will ever have.
    """

    paper = "paper"
    authors = "authors"
    constant = "constant"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


BUILTIN_DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "imagenet")
DATASETS_GROUP = "actgen_trainer.datasets"  # entry points: name -> callable(DataConfig) -> (train, test)


def registered_datasets() -> list[str]:
    """Data sets other packages register in :data:`DATASETS_GROUP` (the lab's backgrounds testbed)."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=DATASETS_GROUP)})


class DataConfig(_Section):
    """Where images come from and how the validation slice is cut."""

    dataset: str = Field(
        "digits",
        description=f"one of {', '.join(BUILTIN_DATASETS)}, or a data set a package registers in the "
        f"entry-point group {DATASETS_GROUP} (the lab's backgrounds and backgrounds-v2)",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name in BUILTIN_DATASETS or name in (registered := registered_datasets()):
            return name
        raise ValueError(
            f"data.dataset={name} is neither built in ({', '.join(BUILTIN_DATASETS)}) nor registered "
            f"by an installed package in the entry-point group {DATASETS_GROUP!r} (backgrounds: the "
            f"lab, pip install -e ./lab; make setup does); registered here: {', '.join(registered) or 'none'}"
        )

    root: str | None = Field(
        None, description="dataset folder: the CIFAR files, or the class folders' parent folders"
    )
    train_folder: str = Field("train", min_length=1, description="imagefolder / imagenet: under root")
    val_folder: str | None = Field(
        None,
        min_length=1,
        description="imagefolder / imagenet: the validation slice from this folder under root "
        "instead of val_size of the train folder",
    )
    test_folder: str = Field(
        "val", min_length=1, description="imagefolder / imagenet: the held-out test set, under root"
    )
    class_names: list[str] | str | None = Field(
        None,
        description="the class names for the prompts, in class-id order (the sorted folder "
        "names): a list, or a file with one name per line; null: the dataset's own names "
        "(folder names; ImageNet synset ids read as their names)",
    )
    download: bool = Field(False, description="let torchvision download CIFAR into root")
    image_size: int = Field(32, ge=8, le=1024, description="training resolution")
    val_size: float = Field(
        0.1, gt=0, description="validation slice: a count (>= 1) or a fraction of the train set"
    )
    train_subset: int | None = Field(None, ge=1, description="use only this many train images")
    test_subset: int | None = Field(None, ge=1, description="use only this many test images")
    augment: Literal["none", "crop", "crop_flip", "imagenet"] = "crop_flip"
    randaugment: str | None = Field(
        None,
        description="augment=imagenet: timm's RandAugment policy, e.g. rand-m9-mstd0.5-inc1",
    )
    random_erasing: float = Field(
        0.0,
        ge=0,
        le=1,
        description="augment=imagenet: probability of timm's random erasing",
    )
    mixup_alpha: float = Field(
        0.0,
        ge=0,
        description="Beta(alpha, alpha) of timm's Mixup; 0: off (Table 5's ViT-S/16: 0.2)",
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        description="Beta(alpha, alpha) of timm's CutMix; 0: off (Table 5's ViT-S/16: 1.0)",
    )
    mix_prob: float = Field(1.0, ge=0, le=1, description="chance a batch (or element) is mixed at all")
    mix_switch_prob: float = Field(
        0.5,
        ge=0,
        le=1,
        description="both on: chance of CutMix rather than Mixup for a batch",
    )
    mix_mode: Literal["batch", "pair", "elem"] = Field(
        "batch",
        description="one lambda per batch, per pair or per element (timm's modes)",
    )
    num_workers: int = Field(0, ge=0)
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

    @model_validator(mode="after")
    def _timm_augment(self) -> DataConfig:
        if (self.randaugment or self.random_erasing) and self.augment != "imagenet":
            raise ValueError("data.randaugment / data.random_erasing need data.augment=imagenet")
        if self.randaugment is not None and not self.randaugment.startswith("rand-"):
            raise ValueError(
                f"data.randaugment {self.randaugment!r} is not a timm RandAugment "
                "policy (rand-m<magnitude>[-n<ops>][-mstd<std>]...)"
            )
        return self

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix is on: every training batch, generated images included, is mixed."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class ModelConfig(_Section):
    """The classifier: a registry name or ``timm/<name>`` (actgen_shared.architectures)."""

    architecture: str = Field(
        "simple_cnn", description="a registry name, or timm/<name> for any model of timm.list_models()"
    )
    pretrained: bool | str = Field(
        False,
        description="timm/<name> only: true: timm's pretrained weights from the Hugging Face cache "
        "(or the Hub when online); a path: a .safetensors (or .pth/.pt/.bin, read with "
        "weights_only) checkpoint of the model; the classifier head is new when the class count "
        "differs; false: random init",
    )

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        try:
            check_architecture(self.architecture)
        except ValueError as exc:
            raise ValueError(f"model.architecture: {exc}") from None
        if self.pretrained is not False and timm_name(self.architecture) is None:
            raise ValueError(
                f"model.pretrained needs a timm/<name> architecture, got {self.architecture!r} "
                f"(e.g. timm/resnet18)"
            )
        if isinstance(self.pretrained, str) and not self.pretrained:
            raise ValueError("model.pretrained: an empty path (true, false or a checkpoint file)")
        return self


class OptimConfig(_Section):
    """Optimizer, schedule and loss (Tables 5, 6 and 12)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="learning rate for a global batch of lr_batch")
    lr_batch: int = Field(
        256,
        ge=1,
        description="the global batch lr is stated for; the run scales lr linearly "
        "by (train.batch_size x processes) / lr_batch (Goyal et al.)",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0, ge=0, description="linear warmup, per iteration, then cosine")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss: Literal["ce", "focal", "weighted_ce"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, gt=0, le=1)
    weighted_ce_factor: float = Field(5.0, gt=0, description="weight of misclassified samples")


class TrainConfig(_Section):
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    epoch_images: int | None = Field(
        None,
        ge=1,
        description="images drawn per epoch (a shuffle of the training set, cut or cycled to this "
        "size); None: the whole set. Fixed, every arm takes the same SGD steps however many "
        "generated images joined (the ablation sets it)",
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="mixed precision (actgen_trainer.precision): auto = bf16 on a CUDA GPU that has it, "
        "fp16 on an older one, off on the CPU; fp16 scales the loss (GradScaler); bf16 and fp16 also "
        "run on the CPU",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_switch(cls, value: Any) -> Any:
        """``true``/``false`` (the older switch, and YAML's ``on``/``off``): auto / off."""
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value


class GenerationConfig(_Section):
    """The active loop: what to post, how often, and how to talk to the generator."""

    mode: TrainMode = TrainMode.actgen
    guidance: Guidance = Field(Guidance.both, description="actgen mode: which gradient guidance")
    preset: PresetName | None = Field(
        "released",
        description="options.preset of every job: released (the authors' code) or paper (the "
        "text); null: the generator model's own defaults file (a toy model's), else released",
    )
    prompt: str | None = Field(
        None, description="options.prompt of every job (one {}); null: the preset's or the model's"
    )
    adv_schedule: AdvSchedule | None = Field(
        None,
        description="paper or authors (see AdvSchedule); null: authors with preset released, paper otherwise",
    )
    images_per_epoch: int = Field(
        64,
        ge=1,
        description="hard samples posted per generation epoch by the whole run (all ranks "
        "together: rank r posts its share, the remainder going to the low ranks)",
    )
    budget: float | None = Field(
        None,
        gt=0,
        le=10,
        description="images the whole run generates, as a fraction of the training set "
        "(0.10: the paper's ImageNet 10 %), spread evenly over the generation epochs and then "
        "the ranks; overrides images_per_epoch when set",
    )
    selection: Literal["misclassified", "threshold", "lowest_confidence", "random"] = "misclassified"
    threshold: float = Field(0.5, gt=0, le=1, description="true-class confidence below this is hard")
    generate_fraction: float = Field(
        0.5, gt=0, le=1, description="post jobs during this first fraction of the epochs"
    )
    sync: bool = Field(False, description="wait for each job, as the paper's code does")
    generator_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    request_timeout_s: float = Field(120.0, gt=0)
    wait_timeout_s: float = Field(3600.0, gt=0, description="--sync: give up on a job after this")
    max_inflight: int | None = Field(
        2,
        ge=1,
        description="backpressure: at most this many unfinished jobs per rank; an epoch "
        "that would exceed it posts nothing (counted as skipped_backpressure); null: no limit",
    )
    final_wait_s: float = Field(
        300.0,
        ge=0,
        description="one epoch after mid-training (the end of generation), wait at most this "
        "long for the jobs still out, so the second half trains on what was asked for",
    )
    retries: int = Field(
        5,
        ge=0,
        description="submit / classifier upload / results read: retries on 5xx and "
        "connection errors (the idempotency key makes a resubmit safe)",
    )
    retry_backoff_s: float = Field(0.5, gt=0, description="first retry delay; doubles per retry")
    retry_backoff_max_s: float = Field(30.0, gt=0, description="cap of one retry delay")
    max_items_per_job: int | None = Field(
        None,
        ge=1,
        description="split an epoch's items into jobs of at most this many; null: "
        "learnt from the generator's 422 (ACTGEN_MAX_ITEMS_PER_JOB)",
    )
    label_set: LabelSetName | None = Field(
        None, description="bundled class names for prompts; None: the dataset's own names"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="GenerationOptions fields (steps, output_size, ...)"
    )

    @model_validator(mode="after")
    def _options_valid(self) -> GenerationConfig:
        reserved = sorted(set(self.options) & set(LOOP_OWNED_OPTIONS))
        if reserved:
            raise ValueError(
                f"generation.options.{reserved[0]} is set by the trainer itself "
                f"(use generation.mode / the run seed)"
            )
        own = sorted(set(self.options) & set(SECTION_OPTIONS))
        if own:
            raise ValueError(f"generation.options.{own[0]}: set generation.{own[0]} instead")
        GenerationOptions.model_validate({**self.options, **self.section_options})  # names a bad field
        return self

    @property
    def section_options(self) -> dict[str, Any]:
        """The GenerationOptions this section sets with keys of its own (preset, prompt)."""
        return {name: getattr(self, name) for name in SECTION_OPTIONS if getattr(self, name) is not None}

    @property
    def schedule(self) -> AdvSchedule:
        """``adv_schedule``, else the preset's: the released code's with ``released``, the text's
        otherwise (``paper``, and null: a toy model's own defaults, as the digits ablation ran)."""
        if self.adv_schedule is not None:
            return self.adv_schedule
        return AdvSchedule.authors if self.preset == "released" else AdvSchedule.paper


class TrackingConfig(_Section):
    """Where the per-epoch metrics go besides metrics.jsonl: TensorBoard, MLflow, W&B (actgen_trainer.tracking)."""

    tensorboard: bool = Field(True, description="write run_dir/tensorboard when tensorboard is installed")
    mlflow: bool = Field(
        False, description="log metrics, config, report and sample images to MLflow (the [mlflow] extra)"
    )
    mlflow_uri: str | None = Field(
        None,
        min_length=1,
        description="tracking server or store URI; null: a file store in run_dir/mlruns",
    )
    mlflow_experiment: str = Field("actgen", min_length=1, description="MLflow experiment name")
    mlflow_samples: int = Field(8, ge=0, description="generated images logged as artifacts at the end")
    wandb: bool = Field(
        False,
        description="log metrics, config, final numbers, records and sample images to Weights & "
        "Biases (the [wandb] extra); files under run_dir/wandb",
    )
    wandb_project: str = Field("actgen", min_length=1, description="W&B project")
    wandb_entity: str | None = Field(None, min_length=1, description="W&B team or user; null: yours")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None,
        description="offline: no network, no account (wandb sync later); null: WANDB_MODE, else online",
    )
    wandb_samples: int = Field(8, ge=0, description="generated images logged at the end")

    @model_validator(mode="after")
    def _uri_needs_mlflow(self) -> TrackingConfig:
        if self.mlflow_uri is not None and not self.mlflow:
            raise ValueError("tracking.mlflow_uri is set but tracking.mlflow is off")
        for key in ("wandb_entity", "wandb_mode"):
            if getattr(self, key) is not None and not self.wandb:
                raise ValueError(f"tracking.{key} is set but tracking.wandb is off")
        return self


class Config(_Section):
    """A whole run."""

    run_name: str = Field("run", pattern=RUN_ID_PATTERN)
    output_dir: str = "runs"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _mixing_needs_ce(self) -> Config:
        if self.data.mixing and self.optim.loss != "ce":
            raise ValueError(
                f"optim.loss={self.optim.loss} cannot take the soft targets of data.mixup_alpha / "
                "data.cutmix_alpha (they train with soft-target cross-entropy): use optim.loss=ce"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def generation_epochs(self) -> int:
        """Jobs are posted after epochs 0 .. generation_epochs-1; the slice merges back then."""
        return max(1, int(self.train.epochs * self.generation.generate_fraction))

    @property
    def final_wait_epoch(self) -> int | None:
        """The epoch that starts with the bounded wait for the jobs still out (``final_wait_s``).

        The one after mid-training: the last job (posted after epoch ``generation_epochs - 1``)
        has had an epoch to finish, so a generator that keeps up is never waited for, and its
        images are still on time (trained on from epoch e + 2, as every job's). Mid-training
        itself when that is the last epoch; None when no epoch follows the last post.
        """
        last = self.train.epochs - 1
        return min(self.generation_epochs + 1, last) if last >= self.generation_epochs else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _parse_value(raw: str) -> Any:
    """``--set`` values are YAML scalars: ``3``, ``0.1``, ``true``, ``null``, ``[1, 2]``, text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a nested dict, creating sections as needed."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set wants key=value, got {assignment!r}")
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply overrides in order, validate; errors name the bad key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None
