"""The fixed registry of classifier architectures, shared by the trainer and the generator.

It is the allow-list: hand-written CIFAR nets, torchvision's ResNets, and a few timm models by name
(ViT-S/16 and DeiT-S of the paper's Table 5), nothing else.

The generator rebuilds an uploaded classifier from its architecture name and safetensors
weights, so only names in this registry can be loaded: no code ever comes from a request.
torch is imported lazily so that ``actgen_shared`` stays light for plain clients.
"""

from __future__ import annotations

from collections.abc import Callable
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


# timm models by their timm names: only these, never a name from a request.
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


def build_classifier(architecture: str, num_classes: int) -> nn.Module:
    """A fresh, randomly initialised classifier of a registered architecture."""
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}") from None
    return factory(num_classes)


def load_classifier(architecture: str, num_classes: int, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a classifier and load weights strictly; a mismatch raises ValueError naming it."""
    model = build_classifier(architecture, num_classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match {architecture} with {num_classes} classes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in expected.items():
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"weights do not match {architecture} with {num_classes} classes: "
                f"{name} has shape {tuple(state_dict[name].shape)}, expected {tuple(tensor.shape)}"
            )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
