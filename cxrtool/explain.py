"""Explainers: the spec plugins register and the base class every method implements.

Three kinds of method (``Explainer.kind``):

``attribution``
    a map per input image (occlusion, Integrated Gradients, Grad-CAM): implement :meth:`attribute`.
``dataset``
    looks over a set of images (receptive fields of the most activating units): implement
    :meth:`run_dataset`.
``synthesis``
    makes inputs (activation maximisation), optionally starting from an image: implement
    :meth:`synthesize`.

Shared validation of options lives in the base class; the CLI (``cxrtool explain``) turns results
into overlays, ``.npy`` maps, manifests and contact sheets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cxrtool import registry
from cxrtool.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from cxrtool.data import ImageSet
    from cxrtool.imaging import Preprocessing


@dataclass(frozen=True)
class ExplainerSpec:
    """A named explanation method. ``build(**options)`` returns an :class:`Explainer`."""

    name: str
    build: Callable[..., "Explainer"]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "attribution"
    reference: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "options": dict(self.options),
                "kind": self.kind, "reference": self.reference}


@dataclass
class ExplainContext:
    """What every method may use: the model (eval mode), how inputs were made, where to report."""

    model: Any  # torch.nn.Module returning logits (N, C)
    preprocessing: "Preprocessing"
    class_names: list[str]
    layer: str | None = None  # dotted module name chosen with --layer (None: the method's default)
    default_layer: str | None = None  # the model's last explainable layer
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    progress: Callable[[int], None] | None = None


@dataclass
class Attribution:
    """Maps for a batch: ``maps`` float32 (N, H, W) at model-input resolution, plus per-image extras
    (e.g. ``{"delta": [...]}`` for Integrated Gradients) that go into the manifest."""

    maps: "np.ndarray"
    extras: dict[str, list] = field(default_factory=dict)


class Explainer:
    """Base class. Subclasses set ``name``/``kind`` and implement the method for their kind."""

    name = "base"
    kind = "attribution"

    def __init__(self, **options: Any) -> None:
        self.options = options

    def attribute(self, x: "torch.Tensor", target: "torch.Tensor", ctx: ExplainContext) -> Attribution:
        """x: (N, 1, H, W) normalised model input; target: (N,) class indices."""
        raise NotImplementedError

    def run_dataset(self, ds: "ImageSet", ctx: ExplainContext, out_dir: Path) -> dict[str, Any]:
        """Look over ``ds``; write PNGs into ``out_dir``; return a JSON-ready summary."""
        raise NotImplementedError

    def synthesize(self, targets: list[Any], ctx: ExplainContext, out_dir: Path,
                   start: "torch.Tensor | None" = None) -> dict[str, Any]:
        """Make one input per target; write PNGs into ``out_dir``; return a JSON-ready summary."""
        raise NotImplementedError


def build_explainer(name: str, options: dict[str, Any]) -> Explainer:
    """The explainer ``name`` with ``options`` merged over its defaults (unknown options: UsageError)."""
    spec: ExplainerSpec = registry.get("explainer", name)
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "(none)"
        raise UsageError(f"explainer {name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return spec.build(**{**spec.options, **options})
