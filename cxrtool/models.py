"""Model specs and the helpers every command uses to build, adapt and inspect models.

A plugin registers a :class:`ModelSpec`; registration is cheap (no torch import), ``build`` is
called only when a model is needed. Models take ``(N, in_channels, H, W)`` float tensors (the
preprocessing contract gives ``in_channels == 1``) and return logits ``(N, num_classes)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtool import registry
from cxrtool.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    """A model architecture a plugin provides.

    Attributes:
        name: registry name, e.g. ``"resnet18"``.
        build: ``build(num_classes, in_channels=1, **options) -> nn.Module`` returning logits.
        description: one line for ``cxrtool models``.
        embedding_layer: dotted module name whose output, global-average-pooled if spatial, is the
            embedding (``cxrtool embed``).
        explainable_layers: dotted names of conv layers / blocks worth explaining (Grad-CAM,
            receptive fields), shallow to deep.
        blocks: dotted names of the trunk's stages, input to output; ``--freeze N`` trains the last N.
        head: dotted name of the classifier head (always trainable).
        options: option name -> default value, the only options ``build`` accepts.
        default_size: suggested input size in pixels.
        pretrained: torchvision weights enum entry (``"ResNet18_Weights.IMAGENET1K_V1"``) or None.
        reference: where the architecture comes from (paper / seed report).
    """

    name: str
    build: Callable[..., Any]
    description: str
    embedding_layer: str
    explainable_layers: tuple[str, ...]
    blocks: tuple[str, ...] = ()
    head: str = "fc"
    options: dict[str, Any] = field(default_factory=dict)
    default_size: int = 224
    pretrained: str | None = None
    reference: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "default_size": self.default_size,
            "embedding_layer": self.embedding_layer,
            "explainable_layers": list(self.explainable_layers),
            "blocks": list(self.blocks),
            "head": self.head,
            "options": dict(self.options),
            "pretrained": self.pretrained,
            "reference": self.reference,
        }


def get_spec(name: str) -> ModelSpec:
    return registry.get("model", name)


def check_options(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """Merge ``options`` over the spec defaults; unknown keys are a usage error."""
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(sorted(spec.options)) or "(none)"
        raise UsageError(f"model {spec.name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return {**spec.options, **options}


def build_model(name: str, num_classes: int, options: dict[str, Any] | None = None) -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs with 1 input channel."""
    spec = get_spec(name)
    return spec.build(num_classes=num_classes, in_channels=1, **check_options(spec, options or {}))


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise UsageError(f"model has no layer {dotted!r}; see `cxrtool layers`") from None


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable (named) submodule, in definition order."""
    return [n for n, _ in model.named_modules() if n]


def freeze(model: nn.Module, spec: ModelSpec, trainable_blocks: int) -> None:
    """Freeze all parameters except the head and the last ``trainable_blocks`` trunk blocks."""
    if trainable_blocks < 0:
        return
    if trainable_blocks > len(spec.blocks):
        raise UsageError(f"--freeze {trainable_blocks}: model {spec.name!r} has only {len(spec.blocks)} blocks")
    keep = [spec.head, *spec.blocks[len(spec.blocks) - trainable_blocks :]] if trainable_blocks else [spec.head]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in keep:
        for p in get_submodule(model, name).parameters():
            p.requires_grad_(True)


#: torchvision's DenseNet checkpoints name ``denselayerN.norm1`` as ``denselayerN.norm.1`` (torchvision
#: renames them in its own loader; ``WeightsEnum.get_state_dict`` returns them raw)
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _adapt_state_dict(model: nn.Module, state: dict) -> tuple[dict, list[str]]:
    """Fit a pretrained state dict to ``model``: 3->1 input channels by summing, drop mismatched heads."""
    own = model.state_dict()
    out, skipped = {}, []
    for key, value in state.items():
        legacy = _LEGACY_DENSENET_KEY.match(key)
        if legacy and key not in own:
            key = legacy.group(1) + legacy.group(2)
        if key not in own:
            skipped.append(key)
            continue
        target = own[key]
        if value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # keeps the response to a grey image unchanged
        if value.shape != target.shape:
            skipped.append(key)
            continue
        out[key] = value
    return out, skipped


def load_pretrained(model: nn.Module, spec: ModelSpec, source: str) -> list[str]:
    """Load ``source`` ("imagenet" for the spec's torchvision weights, or a local weights file).

    Returns the keys that were not loaded (typically the classifier head). Local files are read
    with safetensors or ``torch.load(weights_only=True)``: nothing is unpickled.
    """
    import torch

    if source == "imagenet":
        if not spec.pretrained:
            raise UsageError(f"model {spec.name!r} has no published pretrained weights; pass a weights file")
        import torchvision.models as tvm

        enum_name, member = spec.pretrained.split(".")
        weights = getattr(tvm, enum_name)[member]
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:  # URLError, socket errors, hash mismatch ...
            raise CheckpointError(
                f"could not download {spec.pretrained} ({type(exc).__name__}: {exc}); offline? "
                f"download {weights.url} elsewhere and pass the file to --pretrained"
            ) from None
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--pretrained: {source!r} is neither 'imagenet' nor an existing weights file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
    fitted, skipped = _adapt_state_dict(model, state)
    if not fitted:
        raise CheckpointError(f"none of the weights in {source} fit model {spec.name!r}")
    model.load_state_dict(fitted, strict=False)
    head = f"{spec.head}."
    untouched = [k for k in model.state_dict() if k not in fitted and not k.startswith(head)
                 and not k.endswith("num_batches_tracked")]
    if untouched:
        import warnings

        warnings.warn(
            f"--pretrained {source}: {len(untouched)} of the model's weights outside the head were not in the "
            f"file and stay randomly initialised (e.g. {untouched[0]})",
            UserWarning,
            stacklevel=2,
        )
    return skipped
