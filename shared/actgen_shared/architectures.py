"""The classifier architectures the trainer and the generator both know, by name.

Two kinds of name: the fixed registry (hand-written CIFAR nets, torchvision's ResNets, and the
timm models of the paper's Table 5 under their bare timm names), and ``timm/<name>`` for any
model timm lists (``timm.list_models()``: ``timm/resnet18``, ``timm/convnext_tiny`` ...), built
with ``timm.create_model(name, pretrained=False, num_classes=...)``.

The generator rebuilds an uploaded classifier from its architecture name and safetensors
weights, so a name is all that comes from a request, never code, and only a name in the
registry or in timm's list is built. torch (and timm) are imported lazily so that
``actgen_shared`` stays light for plain clients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _simple_cnn(num_classes: int) -> nn.Module:
    """A small CNN for 32x32 inputs: the demo's classifier (seconds per epoch on a CPU)."""
    from torch import nn

    return nn.Sequential(
        _conv_bn(3, 32),
        _conv_bn(32, 32),
        nn.MaxPool2d(2),
        _conv_bn(32, 64),
        _conv_bn(64, 64),
        nn.MaxPool2d(2),
        _conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def _tiny_cnn(num_classes: int) -> nn.Module:
    """A tenth of simple_cnn's compute (three 16-32-64 stages): the backgrounds testbed's
    classifier, so a cell of its ablation trains and tests in seconds on one CPU thread."""
    from torch import nn

    return nn.Sequential(
        _conv_bn(3, 16),
        nn.MaxPool2d(2),
        _conv_bn(16, 32),
        nn.MaxPool2d(2),
        _conv_bn(32, 64),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    """torchvision ResNet with the CIFAR stem: 3x3 stride-1 first conv, no max-pool."""
    from torch import nn
    from torchvision.models import resnet18, resnet50

    model = (resnet18 if depth == 18 else resnet50)(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _cifar_vgg16(num_classes: int) -> nn.Module:
    """VGG-16 with batch norm for 32x32 inputs, with the authors' head: 512 -> 512 -> classes."""
    from torch import nn

    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    channels = 3
    for entry in plan:  # a width is a conv-bn-relu, "M" a 2x2 max-pool
        if isinstance(entry, int):
            layers.append(_conv_bn(channels, entry))
            channels = entry
        else:
            layers.append(nn.MaxPool2d(2))
    head = [
        nn.Flatten(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    ]
    return nn.Sequential(*layers, *head)


def _imagenet_resnet50(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=num_classes)


def _imagenet_resnet152(num_classes: int) -> nn.Module:
    from torchvision.models import resnet152

    return resnet152(weights=None, num_classes=num_classes)


# Table 5's timm models under their bare names (any other: timm/<name>).
TIMM_ARCHITECTURES = ("vit_small_patch16_224", "deit_small_patch16_224")


def _timm(name: str) -> Callable[[int], nn.Module]:
    """A factory for one allow-listed timm model, randomly initialised (no weight download)."""

    def factory(num_classes: int) -> nn.Module:
        try:
            import timm
        except ImportError:  # a ValueError: the generator answers 4xx, never 500
            raise ValueError(f"architecture {name!r} needs the timm package (pip install timm)") from None
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    factory.__doc__ = f"timm's {name}, randomly initialised."
    return factory


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "simple_cnn": _simple_cnn,
    "tiny_cnn": _tiny_cnn,
    "cifar_resnet18": lambda n: _cifar_resnet(18, n),
    "cifar_resnet50": lambda n: _cifar_resnet(50, n),
    "cifar_vgg16": _cifar_vgg16,
    "resnet50": _imagenet_resnet50,
    "resnet152": _imagenet_resnet152,
    **{name: _timm(name) for name in TIMM_ARCHITECTURES},
}


TIMM_PREFIX = "timm/"  # "timm/<any name of timm.list_models()>"


def timm_name(architecture: str) -> str | None:
    """The timm model name of a ``timm/<name>`` architecture; None for a registry name."""
    return architecture[len(TIMM_PREFIX) :] if architecture.startswith(TIMM_PREFIX) else None


@cache  # timm's list is fixed for the process; asked on every upload and every build
def _timm_models() -> frozenset[str]:
    try:
        import timm
    except ImportError:  # a ValueError: the generator answers 4xx, never 500
        raise ValueError("timm/<name> architectures need the timm package (pip install timm)") from None
    return frozenset(timm.list_models())


def check_architecture(architecture: str) -> None:
    """ValueError naming the architecture unless it is in the registry or timm lists it."""
    name = timm_name(architecture)
    if name is None:
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}, or "
                f"{TIMM_PREFIX}<name> for any model of timm.list_models() (e.g. {TIMM_PREFIX}resnet18)"
            )
    elif name not in _timm_models():
        raise ValueError(
            f"unknown architecture {architecture!r}: {name!r} is not a model of timm.list_models() "
            "(a bare model name, no pretrained tag or hub path)"
        )


def build_classifier(architecture: str, num_classes: int) -> nn.Module:
    """A fresh, randomly initialised classifier of a known architecture (``check_architecture``)."""
    check_architecture(architecture)
    name = timm_name(architecture)
    if name is not None:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    return ARCHITECTURES[architecture](num_classes)


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` from a strict load where ``expected`` is: missing, unexpected and
    mis-shaped keys (a few of each, with counts), or None when it fits."""

    def few(keys: list[str]) -> str:
        return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k} {tuple(given[k].shape)} for {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{what} {few(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    return "; ".join(parts) or None


def load_classifier(architecture: str, num_classes: int, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a classifier and load weights strictly; a mismatch raises ValueError naming the
    missing, unexpected and mis-shaped keys."""
    model = build_classifier(architecture, num_classes)
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch is not None:
        raise ValueError(f"weights do not match {architecture} with {num_classes} classes: {mismatch}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
