"""The ablation's arms and testbeds: which configs a grid runs (:mod:`actgen_lab.ablation`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actgen_trainer.config import ConfigError

# The arms: name -> ``--set`` overrides of the base config. Adding an arm is one line. The base
# config names no preset, so every arm runs on the digits model's own defaults (its folder's
# actgen_defaults.json: nu 0.01, token norm on [uncond, c], CFG 15, margin 200, [0, 1] mask) but
# for what the arm sets; ``actgen-released`` names the released preset (and so its schedule).
ARMS: dict[str, list[str]] = {
    "real": ["generation.mode=real"],
    "focal": ["generation.mode=real", "optim.loss=focal"],
    "random": ["generation.mode=random"],
    "ig": ["generation.mode=ig"],
    "aig": ["generation.mode=aig"],
    "aig+contrastive": ["generation.mode=actgen", "generation.guidance=contrastive"],
    "aig+adversarial": ["generation.mode=actgen", "generation.guidance=adversarial"],
    "actgen": ["generation.mode=actgen", "generation.guidance=both"],
    # the released code's eq. 11 exactly (the token norm on [uncond, c], nu 0.05): too far on this model
    "actgen-nu0.05": ["generation.mode=actgen", "generation.guidance=both", "generation.options.lr=0.05"],
    # eq. 11 as the paper's text reads it (the global norm, c alone, nu 0.05): with the digits'
    # CFG 15, margin 200 and [0, 1] mask, the values of the paper preset
    "actgen-global": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.options.lr=0.05",
        "generation.options.grad_norm=global",
        "generation.options.update_uncond=false",
    ],
    # the released train.py's schedule: adv_prob 0.5 by mid-training, plain-SD items early on
    "actgen-authors": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.adv_schedule=authors",
    ],
    # everything as the released code has it: the released preset (CFG 7.5, margin 100, nu 0.05,
    # token norm on [uncond, c], the mask summed from ones) and the authors' schedule
    "actgen-released": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.preset=released",
        "generation.adv_schedule=null",
    ],
    # our own: actgen, but the budget goes to the lowest-confidence slice images, all distinct
    "actgen+lowconf": [
        "generation.mode=actgen",
        "generation.guidance=both",
        "generation.selection=lowest_confidence",
    ],
}

# The backgrounds testbed's arms. Options no arm sets come from models/tiny-backgrounds'
# actgen_defaults.json (the settings the testbed's predictions were written for: CFG 15, margin 200,
# nu 0.01 with the token norm on [uncond, c], the [0, 1] mask); `released` and `paper` name a preset
# instead, which replaces that file. gamma's midpoint 12.5 is scaled to the 20 steps (6.25) by
# options.image_guidance_reference_steps.
_ACTGEN = ["generation.mode=actgen", "generation.guidance=both"]
ARMS_BACKGROUNDS: dict[str, list[str]] = {
    "real": ["generation.mode=real"],
    "focal": ["generation.mode=real", "optim.loss=focal"],
    "random": ["generation.mode=random"],
    "ig": ["generation.mode=ig"],
    "aig": ["generation.mode=aig"],
    # eq. 8 with the released code's unnormalised attention sum (m >= 1 everywhere) instead
    "aig-unnormalised": ["generation.mode=aig", "generation.options.normalize_mask=false"],
    "aig+contrastive": ["generation.mode=actgen", "generation.guidance=contrastive"],
    # L_adv on half the items from the first job (the paper's schedule reaches only 0.25 by mid-run)
    "aig+adversarial": [
        "generation.mode=actgen",
        "generation.guidance=adversarial",
        "generation.adv_schedule=constant",
    ],
    "actgen": _ACTGEN,
    # the released code: its preset (CFG 7.5, margin 100, nu 0.05 with the token norm on
    # [uncond, c], the unnormalised mask) and train.py's schedule (plain-SD items early on)
    "released": [*_ACTGEN, "generation.preset=released", "generation.adv_schedule=authors"],
    # the paper's text: its preset (CFG 15, margin 200, nu 0.05 with the global norm on c alone,
    # the [0, 1] mask) and its schedule (adv_prob 0.5 * epoch / epochs)
    "paper": [*_ACTGEN, "generation.preset=paper"],
    # as in real use: the trainer does not wait for its images (they arrive an epoch or more later)
    "actgen-async": [*_ACTGEN, "generation.sync=false"],
    # our own: eq. 9's margin scaled to these latents, 200 x sqrt(4*8*8 / (4*64*64)) = 25, so the
    # hinge repels near-duplicates as 200 does on SD 2.1's, instead of pushing every image away
    "ours": [*_ACTGEN, "generation.options.contrastive_margin=25"],
}
# The oracle arms (actgen_lab.oracle): the same trainer loop, selection, budget and schedule, the
# images drawn by the testbed itself as each mechanism promises them. ``oracle=POLICY`` is the
# harness's, not a config key: ``draw`` answers each job as its mode asks, ``guides`` returns the
# guides themselves (no generator). Controls: random with the slice's classes (not the hard ones),
# aig with guides not mined (any slice sample).
_ORACLE = "oracle=draw"
ARMS_ORACLE: dict[str, list[str]] = {
    "oracle-guides": ["oracle=guides", "generation.mode=ig"],
    "oracle-random": [_ORACLE, "generation.mode=random"],
    "oracle-random-uniform": [_ORACLE, "generation.mode=random", "generation.selection=random"],
    # random as the testbed's generator draws it: the hard style half the time (added in 8.7)
    "oracle-random-pool-styles": ["oracle=pool-styles", "generation.mode=random"],
    "oracle-ig": [_ORACLE, "generation.mode=ig"],
    # ig as a variation, not a near-copy: the digit also moved and resized (added after seed 1)
    "oracle-ig-moved": ["oracle=moved", "generation.mode=ig"],
    "oracle-aig": [_ORACLE, "generation.mode=aig"],
    "oracle-aig-unmined": [_ORACLE, "generation.mode=aig", "generation.selection=random"],
    "oracle-aig+contrastive": [_ORACLE, "generation.mode=actgen", "generation.guidance=contrastive"],
    "oracle-aig+adversarial": [
        _ORACLE,
        "generation.mode=actgen",
        "generation.guidance=adversarial",
        "generation.adv_schedule=constant",
    ],
    "oracle-actgen": [_ORACLE, *_ACTGEN],
    # the oracle's images through the generator's VAE and back: the autoencoder's share of a
    # diffusion arm's gap to its oracle (added in 8.10)
    "oracle-ig-through-vae": ["oracle=through-vae", "generation.mode=ig"],
    "oracle-aig-through-vae": ["oracle=through-vae", "generation.mode=aig"],
}
ARMS_BACKGROUNDS.update(ARMS_ORACLE)
# What `make ablation TESTBED=backgrounds` runs unless --arms names others (`--arms all`: every arm):
# each diffusion arm beside its oracle counterpart: 45 cells in 35 min for 5 seeds on a quiet 2-core
# CPU, measured with the v4 generator (a diffusion cell 65-92 s, an oracle or real cell 20-30 s).
BACKGROUNDS_DEFAULT_ARMS = (
    "real",
    "random",
    "oracle-random",
    "ig",
    "oracle-ig",
    "aig",
    "oracle-aig",
    "actgen",
    "oracle-actgen",
)
ORACLE_KEY = "oracle="
BASELINES = ("real", "random")  # the paired differences of the table (oracle arms: oracle-random)
DEFAULT_CONFIG = "configs/ablation.yaml"
DEFAULT_MODEL = "models/tiny-digits"
DEFAULT_OUT = "runs/ablation"
DEFAULT_SEEDS = 5
DEFAULT_THREADS = 1


# ----------------------------------------------------------------------- the testbeds
@dataclass(frozen=True)
class Testbed:
    """A data set, its base config, its generator, its arms, and where its results go."""

    name: str
    title: str
    config: str
    model: str
    out: str
    seeds: int
    arms: Mapping[str, list[str]]
    default_arms: tuple[str, ...] = ()  # what runs when --arms is not given (empty: every arm)


TESTBEDS: dict[str, Testbed] = {
    "digits": Testbed(
        "digits", "the digits (low data)", DEFAULT_CONFIG, DEFAULT_MODEL, DEFAULT_OUT, DEFAULT_SEEDS, ARMS
    ),
    "backgrounds": Testbed(
        "backgrounds",
        "digits on backgrounds (class-correlated in training, random in test)",
        "configs/ablation_backgrounds.yaml",
        "models/tiny-backgrounds",
        "runs/ablation-backgrounds",
        10,
        ARMS_BACKGROUNDS,
        BACKGROUNDS_DEFAULT_ARMS,
    ),
}


def testbed_named(name: str) -> Testbed:
    """The testbed called ``name``; an unknown one fails naming the known ones."""
    try:
        return TESTBEDS[name]
    except KeyError:
        raise ConfigError(f"unknown testbed {name!r}: the testbeds are {', '.join(TESTBEDS)}") from None


# ----------------------------------------------------------------------- the grid
def oracle_policy(overrides: Sequence[str]) -> str | None:
    """The oracle policy an arm's overrides name (``oracle=draw``), None for a generator arm."""
    found = [o.removeprefix(ORACLE_KEY) for o in overrides if o.startswith(ORACLE_KEY)]
    return found[-1] if found else None


def config_overrides(overrides: Sequence[str]) -> list[str]:
    """An arm's overrides without the harness's own ``oracle=``: what load_config gets."""
    return [o for o in overrides if not o.startswith(ORACLE_KEY)]


def baseline_of(arm: str, baseline: str) -> str:
    """The arm a table column compares ``arm`` with: an oracle arm's ``random`` is ``oracle-random``."""
    if baseline == "random" and arm.startswith("oracle-"):
        return "oracle-random"
    return baseline


def parse_arms(
    text: str | None, table: Mapping[str, list[str]] = ARMS, default: Sequence[str] = ()
) -> list[str]:
    """``a,b,c`` -> the arms in that order; None: ``default`` (every arm of ``table`` when empty);
    ``all``: every arm. Unknown names fail."""
    if text is None:
        return list(default or table)
    if text.strip() == "all":
        return list(table)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--arms is empty: give arm names separated by commas")
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}: the arms are {', '.join(table)}")
    return list(dict.fromkeys(names))


def check_seeds(seeds: int) -> list[int]:
    """Seeds 0 .. n-1; at least 2 are needed for a paired interval, 1 still runs."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    return list(range(seeds))
