"""The entry point: ``[project.entry-points.cxrtool] example = "cxrtool_example.plugin"``.

Only the spec dataclasses and the hook marker are imported here (no torch), so listing plugins and
``cxrtool --help`` stay fast. Each spec's ``build`` imports its implementation module when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cxrtool.augment import AugmentationSpec
from cxrtool.explain import ExplainerSpec
from cxrtool.hookspecs import hookimpl
from cxrtool.models import ModelSpec

MOBILE_OPTIONS: dict[str, Any] = {"width": 16, "dropout": 0.1}
GAMMA_OPTIONS: dict[str, Any] = {"low": 0.7, "high": 1.5, "p": 0.8}
GRADCAMPP_OPTIONS: dict[str, Any] = {"interpolate": "bilinear", "batch": 16}


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    """A build function that imports ``cxrtool_example.<module>`` (and so torch) only when called."""

    def build(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"cxrtool_example.{module}"), attr)(*args, **kwargs)

    build.__name__ = build.__qualname__ = f"build_{module}_{attr}"
    return build


MODEL = ModelSpec(
    name="mobile-cxr",
    build=_lazy("mobile", "build"),
    description="Example plugin: depthwise-separable CNN (MobileNet-style, ~0.14M params at width 16)",
    embedding_layer="avgpool",
    explainable_layers=("stage1", "stage2", "stage3", "stage4"),
    blocks=("stem", "stage1", "stage2", "stage3", "stage4"),
    head="fc",
    options=dict(MOBILE_OPTIONS),
    default_size=128,
    pretrained=None,
    reference="Howard et al. 2017, MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
)

AUGMENTATION = AugmentationSpec(
    name="gamma",
    build=_lazy("gamma", "build"),
    description="Example plugin: with probability p, raise each image to a random power in [low, high] "
                "(log-uniform): exposure / post-processing variation",
    options=dict(GAMMA_OPTIONS),
)

EXPLAINER = ExplainerSpec(
    name="gradcam-plus-plus",
    build=_lazy("gradcampp", "GradCAMPlusPlus"),
    description="Example plugin: Grad-CAM++ of a conv layer (--layer; default the last explainable one): "
                "channel weights from positive gradients with per-pixel alpha, upsampled to the input",
    options=dict(GRADCAMPP_OPTIONS),
    kind="attribution",
    reference="Chattopadhyay et al. 2018, Grad-CAM++: Generalized Gradient-Based Visual Explanations "
              "for Deep Convolutional Networks (WACV)",
)


@hookimpl
def register_models(register):
    register(MODEL)


@hookimpl
def register_augmentations(register):
    register(AUGMENTATION)


@hookimpl
def register_explainers(register):
    register(EXPLAINER)
