"""Built-in explainers: occlusion, integrated-gradients, grad-cam, receptive-fields, input-synthesis.

Registration is cheap: it does not import torch or captum. The attribution methods' specs live here
and import their module (``occlusion``, ``integrated_gradients``, ``gradcam``) only when built; the
``receptive_fields`` and ``input_synthesis`` modules define their own ``SPEC`` and import torch only
inside their methods. A broken one of those two is reported as a warning and skipped, so the others
stay usable.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from cxrtool.explain import ExplainerSpec
from cxrtool.hookspecs import hookimpl

OCCLUSION_OPTIONS: dict[str, Any] = {"patch": None, "stride": None, "fill": "zero", "batch": 64, "engine": "auto"}
IG_OPTIONS: dict[str, Any] = {"baseline": "black", "n_steps": 50, "method": "gausslegendre",
                              "internal_batch_size": None, "output": "logit", "smoothgrad": 0, "noise": 0.1}
GRADCAM_OPTIONS: dict[str, Any] = {"relu": True, "interpolate": "bilinear"}

#: modules of this package that define a module-level ``SPEC`` (written against cxrtool.explain)
SPEC_MODULES = ("receptive_fields", "input_synthesis")


def lazy(module: str, cls: str) -> Callable[..., Any]:
    """``build(**options)`` importing ``module`` (and so torch) only when called."""

    def build(**options: Any):
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**options)

    build.__qualname__ = build.__name__ = f"build_{module}"
    return build


def specs() -> list[ExplainerSpec]:
    """The attribution methods of this package (no torch import)."""
    return [
        ExplainerSpec(
            name="occlusion",
            build=lazy("occlusion", "Occlusion"),
            description="Drop in the target probability when a patch is covered (patch/stride in original-image "
                        "pixels; fill zero/mean/blur); batched windows, receptive-field-cone engine",
            options=dict(OCCLUSION_OPTIONS),
            reference="Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks; captum Occlusion",
        ),
        ExplainerSpec(
            name="integrated-gradients",
            build=lazy("integrated_gradients", "IntegratedGradients"),
            description="Path integral of gradients from a baseline (black/mean/blur); reports the convergence "
                        "delta; optional SmoothGrad noise tunnel",
            options=dict(IG_OPTIONS),
            reference="Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks; Smilkov et al. 2017 "
                      "(SmoothGrad); captum IntegratedGradients / NoiseTunnel",
        ),
        ExplainerSpec(
            name="grad-cam",
            build=lazy("gradcam", "GradCAM"),
            description="Gradient-weighted class activation map of a conv layer (--layer; default the last "
                        "explainable one), upsampled to the input",
            options=dict(GRADCAM_OPTIONS),
            reference="Selvaraju et al. 2017, Grad-CAM; captum LayerGradCam",
        ),
    ]


@hookimpl
def register_explainers(register):
    for spec in specs():
        register(spec)
    for module in SPEC_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                continue  # not written (yet)
            warnings.warn(f"explainer module {module} skipped: {exc}", UserWarning, stacklevel=2)
            continue
        except Exception as exc:  # a broken module must not take the other explainers down
            warnings.warn(f"explainer module {module} skipped: {type(exc).__name__}: {exc}", UserWarning, stacklevel=2)
            continue
        spec = getattr(mod, "SPEC", None)
        if spec is not None:
            register(spec)
