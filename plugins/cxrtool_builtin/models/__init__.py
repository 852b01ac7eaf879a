"""Built-in model architectures.

Importing this package is cheap: it does not import torch. Each spec's ``build`` imports the module
of its family (``compact``, ``vgg``, ``resnet``, ``densenet``; those import torch) when it is called.
Every model takes 1-channel images of any size >= 64 px and returns logits ``(N, num_classes)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cxrtool.hookspecs import hookimpl
from cxrtool.models import ModelSpec
from cxrtool_builtin.models._layout import VGG16_PARAM_LAYERS, VGG16_STAGE_ENDS

RESNET_BLOCKS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
RESNET_EXPLAINABLE = ("layer1", "layer2", "layer3", "layer4")
DENSENET_BLOCKS = (
    "features.conv0",
    "features.norm0",
    "features.denseblock1",
    "features.transition1",
    "features.denseblock2",
    "features.transition2",
    "features.denseblock3",
    "features.transition3",
    "features.denseblock4",
    "features.norm5",
)


def lazy_build(module: str, function: str, defaults: dict[str, Any], **fixed: Any) -> Callable[..., Any]:
    """A ``build(num_classes, in_channels=1, **options)`` that imports ``module`` only when called.

    Missing options take ``defaults``; an option not in ``defaults`` is a ``TypeError`` (the CLI
    checks options against the spec first and reports a usage error).
    """

    defaults = dict(defaults)

    def build(num_classes: int, in_channels: int = 1, **options: Any):
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected model option(s): {', '.join(sorted(unknown))}")
        func = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return func(num_classes, in_channels, **fixed, **{**defaults, **options})

    build.__qualname__ = build.__name__ = f"build_{module}_{function}"
    return build


def _resnet_spec(name: str, depth: int, description: str, activation: str = "relu", reference: str = "") -> ModelSpec:
    return ModelSpec(
        name=name,
        build=lazy_build("resnet", "build", {}, depth=depth, activation=activation),
        description=description,
        embedding_layer="avgpool",
        explainable_layers=RESNET_EXPLAINABLE,
        blocks=RESNET_BLOCKS,
        head="fc",
        options={},
        default_size=224,
        pretrained=f"ResNet{depth}_Weights.IMAGENET1K_V1",
        reference=reference or "He et al. 2016, Deep Residual Learning for Image Recognition (torchvision)",
    )


def specs() -> list[ModelSpec]:
    """Every built-in model spec (no torch import)."""
    compact_opts = {"width": 16, "dropout": 0.2}
    small_opts = {"dropout": 0.3, "first_pool": True}
    vgg16_opts = {"dropout": 0.5, "hidden": 256}
    return [
        ModelSpec(
            name="compact",
            build=lazy_build("compact", "build", compact_opts),
            description="Default. Compact 10-conv VGG-style CNN (~1.2M params), trains on a CPU at 128 px",
            embedding_layer="avgpool",
            explainable_layers=("stage1", "stage2", "stage3", "stage4", "stage5"),
            blocks=("stage1", "stage2", "stage3", "stage4", "stage5"),
            head="fc",
            options=compact_opts,
            default_size=128,
            pretrained=None,
            reference="cxrtool; conv-BN-ReLU stages after Simonyan & Zisserman 2015 (VGG)",
        ),
        ModelSpec(
            name="vgg-small",
            build=lazy_build("vgg", "build_small", small_opts),
            description="Three wide conv-BN-ReLU-Dropout2d blocks (256-128-64); first_pool=False is Net3",
            embedding_layer="flatten",
            explainable_layers=("block1", "block2", "block3", "lastcnn"),
            blocks=("block1", "block2", "block3", "lastcnn"),
            head="classifier",
            options=small_opts,
            default_size=128,
            pretrained=None,
            reference="seed report 000 (Net2/Net3), ending adapted to any input size",
        ),
        ModelSpec(
            name="vgg16-bn",
            build=lazy_build("vgg", "build_vgg16_bn", vgg16_opts),
            description="VGG-16 with batch norm, Dropout-Dense(256)-Dropout-Dense head; blocks = conv/BN layers",
            embedding_layer="classifier.3",
            explainable_layers=tuple(f"features.{i}" for i in VGG16_STAGE_ENDS),
            blocks=tuple(f"features.{i}" for i in VGG16_PARAM_LAYERS),
            head="classifier",
            options=vgg16_opts,
            default_size=150,
            pretrained="VGG16_BN_Weights.IMAGENET1K_V1",
            reference="Simonyan & Zisserman 2015; seed reports 001 (from scratch, 150 px) and 004 (transfer, head)",
        ),
        _resnet_spec("resnet18", 18, "ResNet-18 (11M params), 1-channel stem"),
        _resnet_spec("resnet34", 34, "ResNet-34 (21M params), 1-channel stem"),
        _resnet_spec("resnet50", 50, "ResNet-50 (24M params, bottleneck blocks), 1-channel stem"),
        _resnet_spec(
            "resnet34-gelu",
            34,
            "ResNet-34 with every ReLU replaced by GELU (report 003: from scratch, AdamW, 83.28% test)",
            activation="gelu",
            reference="seed report 003 (3-class ResNet-34 with GELU, AdamW lr 1e-3 wd 0.005, warmup cosine)",
        ),
        ModelSpec(
            name="densenet121",
            build=lazy_build("densenet", "build", {}),
            description="DenseNet-121 (7M params), 1-channel stem",
            embedding_layer="avgpool",
            explainable_layers=(
                "features.denseblock1",
                "features.denseblock2",
                "features.denseblock3",
                "features.denseblock4",
            ),
            blocks=DENSENET_BLOCKS,
            head="classifier",
            options={},
            default_size=224,
            pretrained="DenseNet121_Weights.IMAGENET1K_V1",
            reference="Huang et al. 2017, Densely Connected Convolutional Networks (torchvision)",
        ),
    ]


@hookimpl
def register_models(register):
    for spec in specs():
        register(spec)
