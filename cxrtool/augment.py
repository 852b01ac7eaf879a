"""Batch augmentations: the spec plugins register and the pipeline training applies.

An augmentation works on a whole batch ``(N, 1, H, W)`` of float images in [0, 1] (before
normalisation) with an explicit ``torch.Generator`` so runs are repeatable. Doing it per batch
with tensor ops (one ``grid_sample`` for all geometric changes) keeps it off the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cxrtool import registry
from cxrtool.errors import UsageError

#: what ``--augment default`` means: small rotation / translation / scale in one resampling (``affine``)
#: and contrast jitter; no flips, because anatomy is lateralised
DEFAULT_AUGMENT = "affine,contrast"


@dataclass(frozen=True)
class AugmentationSpec:
    """A named augmentation.

    ``build(**options)`` returns ``fn(batch, generator) -> batch`` with batch ``(N, 1, H, W)``
    float32 in [0, 1]; ``fn`` must keep shape, dtype and device.
    """

    name: str
    build: Callable[..., Callable[[Any, Any], Any]]
    description: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "options": dict(self.options)}


def parse_augment(text: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``"rotate:degrees=10,translate"`` into ``[("rotate", {"degrees": 10.0}), ("translate", {})]``.

    ``"none"`` or empty gives no augmentation, ``"default"`` gives :data:`DEFAULT_AUGMENT`.
    """
    if not text or text == "none":
        return []
    items = [DEFAULT_AUGMENT if i.strip() == "default" else i for i in text.split(",")]
    out = []
    for item in ",".join(items).split(","):
        item = item.strip()
        if not item:
            continue
        name, _, opts = item.partition(":")
        options: dict[str, Any] = {}
        for kv in filter(None, opts.split(";")):
            key, eq, value = kv.partition("=")
            if not eq:
                raise UsageError(f"--augment: expected key=value in {item!r}")
            try:
                options[key.strip()] = float(value)
            except ValueError:
                options[key.strip()] = value.strip()
        out.append((name.strip(), options))
    return out


def build_pipeline(items: list[tuple[str, dict[str, Any]]]) -> Callable[[Any, Any], Any] | None:
    """Compose named augmentations into one batch function (None when there are none)."""
    fns = []
    for name, options in items:
        spec: AugmentationSpec = registry.get("augmentation", name)
        unknown = set(options) - set(spec.options)
        if unknown:
            valid = ", ".join(sorted(spec.options)) or "(none)"
            raise UsageError(f"augmentation {name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
        fns.append(spec.build(**{**spec.options, **options}))
    if not fns:
        return None

    def pipeline(batch, generator):
        for fn in fns:
            batch = fn(batch, generator)
        return batch

    return pipeline
