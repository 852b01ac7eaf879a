"""Look up plugin-provided things by name: ``get("model", "resnet18")``.

Core code asks the registry and never imports a built-in plugin directly. Unknown names raise
:class:`~cxrtool.errors.UnknownNameError`, which lists the valid names.
"""

from __future__ import annotations

from cxrtool.errors import UnknownNameError
from cxrtool.plugins import get_manager

#: kind -> hook that registers it
KINDS: dict[str, str] = {
    "model": "register_models",
    "augmentation": "register_augmentations",
    "explainer": "register_explainers",
    "anomaly detector": "register_anomaly_detectors",
    "projection": "register_projections",
}

_cache: dict[str, dict[str, tuple[object, str]]] = {}
_cache_owner: list = [None]  # the manager the cache was collected from


def clear_cache() -> None:
    _cache.clear()


def _all(kind: str) -> dict[str, tuple[object, str]]:
    manager = get_manager()
    if _cache_owner[0] is not manager:  # plugins were reloaded: collect again
        _cache.clear()
        _cache_owner[0] = manager
    if kind not in _cache:
        _cache[kind] = manager.collect(KINDS[kind], kind)
    return _cache[kind]


def all_specs(kind: str) -> dict[str, object]:
    """``{name: spec}`` for every registered thing of ``kind``, sorted by name."""
    return {name: spec for name, (spec, _) in sorted(_all(kind).items())}


def provider(kind: str, name: str) -> str:
    """The plugin that registered ``name``."""
    get(kind, name)
    return _all(kind)[name][1]


def get(kind: str, name: str):
    """The spec registered as ``name``; unknown names list the valid ones."""
    found = _all(kind)
    if name not in found:
        raise UnknownNameError(kind, name, list(found))
    return found[name][0]


def collect_all() -> None:
    """Run every register hook once so that ``cxrtool plugins`` can say who registers what."""
    for kind in KINDS:
        _all(kind)
