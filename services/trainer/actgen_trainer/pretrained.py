"""A timm classifier's starting weights (``model.pretrained``): timm's own, or a checkpoint file.

``true``: the model's default pretrained weights through timm, from the Hugging Face cache
(``HF_HOME``), or from the Hub when it can be reached; timm adapts them to the model and
drops their classifier head when the class count is not the pretrained one.

``PATH``: the model's own state dict (what ``model.state_dict()`` holds, e.g. saved with
safetensors) as a .safetensors file, or a .pth / .pt / .bin read with ``torch.load(weights_only=
True)`` (tensors and plain containers only: nothing arbitrary is unpickled). It must fit the
model exactly but for the classifier head: a head of another class count is left out (the
model's new head starts random, sized for the dataset); any other missing, unexpected or
mis-shaped key is an error that names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from actgen_shared.architectures import state_dict_mismatch
from actgen_trainer.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class PretrainedError(ConfigError):
    """Pretrained weights that cannot be had or do not fit; names model.pretrained."""


def pretrained_timm(name: str, num_classes: int, source: bool | str) -> nn.Module:
    """timm's ``name`` with ``num_classes`` outputs, started from ``source`` (true or a path)."""
    import timm

    if not isinstance(source, bool):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        load_checkpoint_file(model, Path(source), f"timm/{name}")
        return model
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as exc:  # what timm or huggingface_hub raise: not cached, offline, no weights
        raise PretrainedError(_unavailable(name, exc)) from None


def _head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of a timm model's classifier head (``get_classifier()``)."""
    head = model.get_classifier()  # type: ignore[operator]
    prefixes = [f"{n}." for n, module in model.named_modules() if module is head and n]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def load_checkpoint_file(model: nn.Module, path: Path, architecture: str) -> None:
    """Load a checkpoint file into ``model``: strictly, but for a head of another class count."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise PretrainedError(f"model.pretrained: {path} is not a file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise PretrainedError(
            f"model.pretrained: {path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    try:  # safetensors, or torch.load(weights_only=True); a "state_dict" / "model" entry unwrapped
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        raise PretrainedError(
            f"model.pretrained: {path} is not a weights-only checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    expected = model.state_dict()
    new_head = {
        k for k in _head_keys(model) if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    }
    state = {k: v for k, v in state.items() if k not in new_head}
    mismatch = state_dict_mismatch({k: v for k, v in expected.items() if k not in new_head}, state)
    if mismatch is not None:
        raise PretrainedError(f"model.pretrained: {path} does not fit {architecture}: {mismatch}")
    model.load_state_dict(state, strict=not new_head)


def _unavailable(name: str, exc: Exception) -> str:
    """Why timm's pretrained weights could not be had, and the two ways out."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    if not hub_id:
        return f"model.pretrained=true: timm has no pretrained weights for timm/{name} ({detail})"
    why = (
        "HF_HUB_OFFLINE=1 is set, so they must already be in"
        if constants.HF_HUB_OFFLINE
        else "the Hub could not be reached (or refused) and they are not in"
    )
    return (
        f"model.pretrained=true: no weights for timm/{name} (Hugging Face repo {hub_id}): {why} "
        f"the Hugging Face cache {constants.HF_HUB_CACHE} ({detail}). Fetch them once where the Hub "
        "can be reached, with the same HF_HOME, or give model.pretrained the path of a .safetensors "
        "checkpoint"
    )
