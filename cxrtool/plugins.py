"""Plugin manager: built-ins and third-party plugins load through the same entry-point group.

Environment variables:

``CXRTOOL_LOAD_PLUGINS``
    Comma-separated plugin names to load, nothing else (an empty value loads no plugin at all).
``CXRTOOL_DISABLE_PLUGINS``
    Comma-separated plugin names to skip.
``CXRTOOL_PLUGINS_DIR``
    A folder of one-off ``*.py`` plugin files (os.pathsep-separated for several) loaded after the
    entry points; handy for experiments before packaging.

A plugin that fails to import, raises inside a hook or registers a name that is already taken is
recorded in :data:`PluginInfo.errors`, reported with a warning and by ``cxrtool plugins``, and skipped;
everything else keeps working.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pluggy

from cxrtool import hookspecs

ENTRY_POINT_GROUP = "cxrtool"


class PluginWarning(UserWarning):
    """A plugin was skipped (failed import, failing hook, duplicate name)."""


@dataclass
class PluginInfo:
    """What ``cxrtool plugins`` shows for one plugin."""

    name: str
    source: str  # "entry point", "plugins dir" or "runtime"
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: list[str] = field(default_factory=list)
    registers: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": sorted(self.hooks),
            "registers": {k: sorted(v) for k, v in sorted(self.registers.items())},
            "status": "ok" if self.ok else "error",
            "errors": list(self.errors),
        }


def _split_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {p.strip() for p in value.split(",") if p.strip()}


class PluginManager:
    """A pluggy manager plus bookkeeping of which plugin provided what and which ones failed."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}

    # -- loading -------------------------------------------------------------------------------
    def _warn(self, info: PluginInfo, message: str) -> None:
        info.errors.append(message)
        warnings.warn(f"plugin {info.name!r} skipped: {message}", PluginWarning, stacklevel=3)

    def _add(self, obj: object, info: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=info.name)
        except Exception as exc:  # a malformed hookimpl (wrong argument names, ...)
            self._warn(info, f"{type(exc).__name__}: {exc}")
        else:
            info.hooks = [h.name for h in self.pm.get_hookcallers(obj) or []]
        self.info[info.name] = info

    def load_entry_points(self) -> None:
        only = _split_env("CXRTOOL_LOAD_PLUGINS")
        disabled = _split_env("CXRTOOL_DISABLE_PLUGINS") or set()
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
        # cxrtool's own plugins first, so a third-party plugin cannot take a built-in name
        for ep in sorted(eps, key=lambda e: (_dist_name(e) != "cxrtool", e.name)):
            if (only is not None and ep.name not in only) or ep.name in disabled:
                continue
            dist = getattr(ep, "dist", None)
            if ep.name in self.info:
                warnings.warn(
                    f"plugin {ep.name!r} from {_dist_name(ep)} skipped: the name is already taken by "
                    f"{self.info[ep.name].distribution or self.info[ep.name].module}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            info = PluginInfo(
                name=ep.name,
                source="entry point",
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
                module=ep.value,
            )
            try:
                obj = ep.load()
            except Exception as exc:
                self.info[ep.name] = info
                self._warn(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._add(obj, info)

    def load_plugins_dirs(self) -> None:
        dirs = os.environ.get("CXRTOOL_PLUGINS_DIR")
        if not dirs:
            return
        only = _split_env("CXRTOOL_LOAD_PLUGINS")
        disabled = _split_env("CXRTOOL_DISABLE_PLUGINS") or set()
        for d in dirs.split(os.pathsep):
            for path in sorted(Path(d).glob("*.py")) if d else []:
                if only is None or path.stem in only:
                    self.load_file(path, disabled)

    def load_file(self, path: Path, disabled: set[str] = frozenset()) -> None:
        name = path.stem
        if name in disabled or name in self.info:
            return
        info = PluginInfo(name=name, source="plugins dir", module=str(path))
        try:
            spec = importlib.util.spec_from_file_location(f"cxrtool_plugin_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            info.version = getattr(module, "__version__", None)
        except Exception as exc:
            self.info[name] = info
            self._warn(info, f"import failed: {type(exc).__name__}: {exc}")
            return
        self._add(module, info)

    def register(self, obj: object | ModuleType, name: str, version: str | None = None) -> None:
        """Register a plugin object at run time (tests, notebooks)."""
        self._add(obj, PluginInfo(name=name, source="runtime", version=version, module=repr(obj)))

    # -- collecting ----------------------------------------------------------------------------
    def collect(self, hook_name: str, kind: str, key=lambda spec: spec.name) -> dict[str, tuple[object, str]]:
        """Call ``hook_name(register)`` on each plugin separately and gather ``{name: (spec, plugin)}``.

        Each plugin is called on its own so a failure or a duplicate is pinned on the plugin that
        caused it. The first plugin to register a name keeps it; later duplicates are skipped.
        """
        found: dict[str, tuple[object, str]] = {}
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order: built-ins (loaded first) keep their names
            plugin_name = impl.plugin_name
            info = self.info.setdefault(plugin_name, PluginInfo(name=plugin_name, source="runtime"))
            if not info.ok:
                continue
            mine: list[tuple[str, object]] = []
            try:
                impl.function(partial(_append_named, mine, key))
            except Exception as exc:
                self._warn(info, f"{hook_name} raised {type(exc).__name__}: {exc}")
                continue
            for name, spec in mine:
                if name in found:
                    self._warn(info, f"{kind} {name!r} is already registered by plugin {found[name][1]!r}")
                    continue
                found[name] = (spec, plugin_name)
                info.registers.setdefault(kind, []).append(name)
        return found


def _append_named(store: list, key, spec) -> None:
    store.append((key(spec), spec))


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loading plugins on first use (thread-safe: decoding threads
    may be the first to ask, and none may see a manager whose plugins are still loading)."""
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                manager = PluginManager()
                manager.load_entry_points()
                manager.load_plugins_dirs()
                _manager = manager
    return _manager


def reset_manager() -> None:
    """Forget loaded plugins (tests, or after changing the environment variables)."""
    global _manager
    _manager = None
    from cxrtool import registry

    registry.clear_cache()


def read_image_hook(path, max_size):
    """Run the ``read_image`` hook: the first reader returning non-None wins.

    A reader that fails with anything but :class:`~cxrtool.errors.ImageReadError` (its way of saying
    "this file is mine but broken") is a broken plugin: it is named in a warning, marked in
    ``cxrtool plugins`` and skipped, so one bad reader cannot stop every image from being read.
    """
    from cxrtool.errors import ImageReadError

    manager = get_manager()
    kwargs = {"path": path, "max_size": max_size}
    for impl in reversed(manager.pm.hook.read_image.get_hookimpls()):  # pluggy's own call order
        info = manager.info.get(impl.plugin_name)
        if info is not None and not info.ok:
            continue
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
        except ImageReadError:
            raise
        except Exception as exc:
            if info is not None:
                manager._warn(info, f"read_image raised {type(exc).__name__}: {exc}")
            continue
        if result is not None:
            return result
    return None


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist else "?"


__all__ = ["PluginInfo", "PluginManager", "PluginWarning", "get_manager", "reset_manager", "read_image_hook"]
