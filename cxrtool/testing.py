"""Conformance kit: check that what a plugin registers honours cxrtool's contracts.

A plugin author calls these from their own pytest tests::

    from cxrtool import testing

    def test_my_model():
        testing.check_model("my-net")            # a registered name, or the ModelSpec itself

    @pytest.mark.parametrize("kind, name", testing.registered_params(plugin="my-plugin"))
    def test_everything_i_register(kind, name):
        testing.check(kind, name)

    def test_registration_is_cheap():
        testing.check_registration_is_cheap(plugins=["my-plugin"])

Every check raises :class:`AssertionError` with a message saying which rule was broken and how to fix
it, and returns a small dict of what it measured. What is checked, per kind:

* **all specs**: the spec is the right dataclass; the name is usable on a command line
  (letters, digits, ``.``, ``_``, ``+``, ``-``); description and options are well-formed and
  ``to_dict()`` is JSON; an unknown option is a :class:`~cxrtool.errors.UsageError` through the
  core build helper (``build_model``, ``build_pipeline``, ``build_explainer``, ``build_detector``,
  ``build_projection``); an invalid option value (text for a number, or your own ``bad_values``)
  raises a :class:`~cxrtool.errors.CxrtoolError`, never a bare ``ValueError`` / ``TypeError``.
* **models** (:func:`check_model`): builds the same weights twice under one seed; logits
  ``(N, num_classes)`` float32 and finite at ``size`` px; eval mode is deterministic and free of
  cross-batch effects; the named layers exist, run shallow to deep, explainable layers give feature
  maps, the embedding is ``(N, D)`` after pooling; gradients reach the input and the head;
  ``blocks`` + ``head`` hold every parameter exactly once, so ``--freeze`` works.
* **augmentations** (:func:`check_augmentation`): shape, dtype and device kept, values in [0, 1],
  finite, input not modified, the same generator seed gives the same batch whatever the global seed.
* **explainers** (:func:`check_explainer`): ``attribution`` methods return float32 finite maps
  ``(N, H, W)`` and per-image extras; repeatable with a seed; the model's weights, ``.grad``,
  ``requires_grad`` flags and mode, the input and the hooks are left as they were; unsigned methods
  give non-negative maps; a bad layer is a cxrtool error. ``dataset`` / ``synthesis`` methods run on
  tiny phantoms and return JSON.
* **anomaly detectors** (:func:`check_detector`): fit on normal uint8 images, scores ``(N,)`` and
  heatmaps ``(N, H, W)`` finite, repeatable with a seed, and identical after a
  ``state_dict`` / ``extra_meta`` -> ``load_state`` round trip through JSON.
* **projections** (:func:`check_projection`): ``(N, D) -> (N, 2)`` float32, finite, repeatable
  when ``deterministic``, too few points a cxrtool error.
* **readers** (:func:`check_reader`): float32 ``(H, W)`` in [0, 1] or None; the ``max_size`` hint
  keeps both sides >= max_size; missing / empty / garbage files give None or an ``ImageReadError``
  naming the path.
* **registration** (:func:`check_registration_is_cheap`): loading the plugin and running its
  ``register_*`` hooks imports no torch (checked in a fresh interpreter).

Heavy libraries are imported inside the functions; importing this module imports neither torch nor
pytest. Checks run torch on one thread (restored afterwards) and restore the global RNG state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cxrtool.errors import CxrtoolError, UsageError

#: registry kinds (see :data:`cxrtool.registry.KINDS`) and the hook that registers each
KINDS = ("model", "augmentation", "explainer", "anomaly detector", "projection")
#: modules that registering a plugin must not import (checked in a subprocess)
HEAVY_MODULES = ("torch", "torchvision", "captum", "sklearn", "matplotlib")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_UNKNOWN = "__conformance_no_such_option__"
_NOT_A_NUMBER = "not-a-number"

__all__ = [
    "KINDS",
    "run_cli",
    "check",
    "check_all_registered",
    "check_augmentation",
    "check_detector",
    "check_explainer",
    "check_model",
    "check_projection",
    "check_reader",
    "check_registration_is_cheap",
    "registered",
    "registered_params",
    "tiny_model",
]


# ---------------------------------------------------------------------------------------------------
# small helpers


def _ensure(condition: Any, message: str) -> None:
    """``assert`` that survives ``python -O``."""
    if not condition:
        raise AssertionError(message)


@contextlib.contextmanager
def _torch_env(threads: int | None = 1) -> Iterator[None]:
    """One torch thread (tiny inputs gain nothing from more, and busy CPUs spin) and the global RNG
    state restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)


def _raises(fn: Callable[[], Any], what: str,
            expected: type[BaseException] | tuple[type[BaseException], ...] = CxrtoolError) -> BaseException | None:
    """Run ``fn``; None if it did not raise; the exception if it raised ``expected``; else fail."""
    try:
        fn()
    except expected as exc:
        return exc
    except Exception as exc:
        names = ", ".join(e.__name__ for e in (expected if isinstance(expected, tuple) else (expected,)))
        raise AssertionError(
            f"{what} raised {type(exc).__name__}: {exc}; expected {names} (plugins raise cxrtool errors, "
            "cxrtool.errors.*, so that the CLI shows one line instead of a traceback)"
        ) from exc
    return None


def _json_ok(data: Any, what: str) -> None:
    from cxrtool.io import to_json

    try:
        to_json(data)
    except Exception as exc:
        raise AssertionError(f"{what} is not JSON-serialisable ({type(exc).__name__}: {exc}): {data!r:.300}") from exc


def _resolve(kind: str, spec_or_name: Any, cls: type) -> tuple[Any, bool]:
    """(spec, registered): a name is looked up in the registry; a spec counts as registered when the
    registry holds this very object under its name."""
    from cxrtool import registry

    if isinstance(spec_or_name, str):
        return registry.get(kind, spec_or_name), True
    spec = spec_or_name
    _ensure(isinstance(spec, cls), f"expected a {cls.__name__} (or a registered {kind} name), got {type(spec).__name__}")
    try:
        registered_spec = registry.all_specs(kind).get(spec.name)
    except Exception:  # noqa: BLE001 - a broken registry is not this spec's fault
        registered_spec = None
    return spec, registered_spec is spec


def _check_spec(spec: Any, kind: str) -> None:
    name = getattr(spec, "name", None)
    _ensure(isinstance(name, str) and NAME_RE.fullmatch(name),
            f"{kind} name {name!r} must be a non-empty string of letters, digits, '.', '_', '+', '-' (it is "
            "typed on command lines, in comma-separated lists and in KEY=VALUE options)")
    _ensure(callable(spec.build), f"{kind} {name!r}: build must be callable, got {type(spec.build).__name__}")
    _ensure(isinstance(spec.description, str) and spec.description.strip(),
            f"{kind} {name!r}: description must be a non-empty one-line string")
    _ensure("\n" not in spec.description.strip(), f"{kind} {name!r}: description must be one line")
    _ensure(isinstance(spec.options, dict) and all(isinstance(k, str) and k for k in spec.options),
            f"{kind} {name!r}: options must be a dict of option name -> default value")
    for key in spec.options:
        _ensure(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key),
                f"{kind} {name!r}: option name {key!r} must be a Python identifier (it is passed as a keyword)")
    _json_ok(spec.to_dict(), f"{kind} {name!r}: to_dict()")


def _bad_values(spec: Any, bad_values: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """(option, value) pairs that must be rejected: text for numeric options, plus the author's own."""
    out = [(key, _NOT_A_NUMBER) for key, default in spec.options.items()
           if isinstance(default, (int, float)) and not isinstance(default, bool)]
    for key, value in (bad_values or {}).items():
        _ensure(key in spec.options, f"bad_values: {key!r} is not an option of {spec.name!r}")
        out.append((key, value))
    return out


def _check_option_values(spec: Any, kind: str, build: Callable[[dict[str, Any]], Any],
                         bad_values: dict[str, Any] | None, base: dict[str, Any]) -> list[str]:
    """Each bad value must raise a CxrtoolError when the thing is built (never another exception)."""
    checked = []
    for key, value in _bad_values(spec, bad_values):
        what = f"{kind} {spec.name!r} built with option {key}={value!r}"
        exc = _raises(lambda key=key, value=value: build({**base, key: value}), what)
        _ensure(exc is not None, f"{what} was accepted; validate options when building and raise "
                                 "cxrtool.errors.UsageError for values that cannot work")
        checked.append(f"{key}={value!r}")
    return checked


def _merged(spec: Any, options: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    options = dict(options or {})
    unknown = set(options) - set(spec.options)
    _ensure(not unknown, f"options {sorted(unknown)} are not options of {kind} {spec.name!r}")
    return {**spec.options, **options}


def _skip(reason: str) -> dict[str, Any]:
    try:
        import pytest
    except ImportError:  # pragma: no cover - used outside pytest
        return {"skipped": reason}
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pragma: no cover


def _allclose(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1.0)
    return bool(np.allclose(a, b, rtol=rtol, atol=atol * scale))


# ---------------------------------------------------------------------------------------------------
# models


def _module_order(model: Any) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def check_model(spec_or_name: Any, *, num_classes: int = 3, size: int = 64, batch: int = 2,
                options: dict[str, Any] | None = None, bad_values: dict[str, Any] | None = None,
                seed: int = 0, rebuild: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Check a :class:`~cxrtool.models.ModelSpec` (or registered model name); returns what was measured.

    ``size``: input side in pixels (every model must work from 64 px); ``options``: overrides of the
    spec's defaults; ``bad_values``: ``{option: value}`` that must be rejected with a cxrtool error;
    ``rebuild``: build a second time under the same seed and compare the weights (False saves time
    for models whose weight init takes seconds).
    """
    import torch

    from cxrtool import models as M

    spec, registered = _resolve("model", spec_or_name, M.ModelSpec)
    _check_spec(spec, "model")
    name = spec.name
    for attr in ("embedding_layer", "head"):
        _ensure(isinstance(getattr(spec, attr), str) and getattr(spec, attr),
                f"model {name!r}: {attr} must name a module of the model")
    for attr in ("explainable_layers", "blocks"):
        value = getattr(spec, attr)
        _ensure(isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value),
                f"model {name!r}: {attr} must be a tuple of dotted module names")
    _ensure(spec.explainable_layers, f"model {name!r}: list at least one explainable layer (Grad-CAM's default)")
    _ensure(isinstance(spec.default_size, int) and spec.default_size >= 8,
            f"model {name!r}: default_size must be an int >= 8")
    merged = _merged(spec, options, "model")

    # options: unknown -> UsageError through the core helper; build accepts only the spec's options
    if registered:
        exc = _raises(lambda: M.build_model(name, 2, {_UNKNOWN: 1}), f"build_model({name!r}, unknown option)")
    else:
        exc = _raises(lambda: M.check_options(spec, {_UNKNOWN: 1}), f"check_options({name!r}, unknown option)")
    _ensure(isinstance(exc, UsageError), f"model {name!r}: an unknown option was not a UsageError")
    exc = _raises(lambda: spec.build(num_classes=2, in_channels=1, **merged, **{_UNKNOWN: 1}),
                  f"model {name!r}: build(..., unknown option)", expected=(TypeError, CxrtoolError))
    _ensure(exc is not None, f"model {name!r}: build accepted an option that is not in spec.options; "
                             "build must take exactly the spec's options")

    def build(opts: dict[str, Any]):
        return spec.build(num_classes=num_classes, in_channels=1, **opts)

    with _torch_env(threads):
        bad = _check_option_values(spec, "model", build, bad_values, merged)

        torch.manual_seed(seed)
        model = build(merged)
        _ensure(isinstance(model, torch.nn.Module), f"model {name!r}: build returned {type(model).__name__}, "
                                                    "not a torch.nn.Module")
        if rebuild:
            torch.manual_seed(seed)
            again = build(merged)
            sd1, sd2 = model.state_dict(), again.state_dict()
            _ensure(list(sd1) == list(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1),
                    f"model {name!r}: two builds under torch.manual_seed({seed}) differ; draw initial weights "
                    "from torch's global generator only")
            del again, sd1, sd2

        # named layers: exist, in order, blocks + head partition the parameters
        order = _module_order(model)
        for layer in (spec.embedding_layer, spec.head, *spec.explainable_layers, *spec.blocks):
            _ensure(layer in order, f"model {name!r}: no module named {layer!r} (named modules start: "
                                    f"{', '.join(order[:12])}, ...)")
        for attr in ("explainable_layers", "blocks"):
            seq = getattr(spec, attr)
            positions = [order.index(n) for n in seq]
            _ensure(positions == sorted(positions), f"model {name!r}: {attr} {list(seq)} are not shallow to deep")
        head_params = {id(p) for p in model.get_submodule(spec.head).parameters()}
        _ensure(head_params, f"model {name!r}: head {spec.head!r} has no parameters")
        all_params = {id(p) for p in model.parameters()}
        if spec.blocks:
            groups = [{id(p) for p in model.get_submodule(b).parameters()} for b in (*spec.blocks, spec.head)]
            union = set().union(*groups)
            _ensure(sum(len(g) for g in groups) == len(union),
                    f"model {name!r}: blocks / head overlap (a parameter is in two of them)")
            _ensure(union == all_params, f"model {name!r}: {len(all_params - union)} parameter tensor(s) are in "
                                         "no block and not in the head; --freeze could never train them")

        # forward in eval mode: shapes, dtype, finite, deterministic, no cross-batch effects
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 1, size, size, generator=gen)
        seen: dict[str, Any] = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: seen.setdefault(n, out)) for n in {spec.embedding_layer, *spec.explainable_layers}]
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            for h in hooks:
                h.remove()
        _ensure(isinstance(out, torch.Tensor), f"model {name!r}: forward returned {type(out).__name__}, not logits")
        _ensure(tuple(out.shape) == (batch, num_classes),
                f"model {name!r}: logits have shape {tuple(out.shape)} at {size} px, expected {(batch, num_classes)}")
        _ensure(out.dtype == torch.float32, f"model {name!r}: logits are {out.dtype}, expected torch.float32")
        _ensure(torch.isfinite(out).all(), f"model {name!r}: non-finite logits")
        for layer in spec.explainable_layers:
            act = seen.get(layer)
            _ensure(isinstance(act, torch.Tensor) and act.ndim == 4 and act.shape[0] == batch,
                    f"model {name!r}: explainable layer {layer!r} must output a feature map (N, C, h, w), got "
                    f"{tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__}")
        emb = seen.get(spec.embedding_layer)
        _ensure(isinstance(emb, torch.Tensor), f"model {name!r}: embedding layer {spec.embedding_layer!r} gave no tensor")
        emb = emb.mean(dim=(2, 3)) if emb.ndim == 4 else emb.flatten(1)
        _ensure(emb.shape[0] == batch and emb.shape[1] >= 2 and torch.isfinite(emb).all(),
                f"model {name!r}: embedding from {spec.embedding_layer!r} pools to {tuple(emb.shape)}; expected "
                f"({batch}, D >= 2), finite")
        with torch.no_grad():
            out2 = model(x)
            single = model(x[:1])
        _ensure(_allclose(out, out2), f"model {name!r}: eval-mode forward is not deterministic")
        _ensure(_allclose(out[:1], single, rtol=1e-3, atol=1e-4),
                f"model {name!r}: in eval mode an image's logits depend on the rest of the batch")

        # train mode: gradients reach the head and the input, and are finite
        model.train()
        xg = x.clone().requires_grad_(True)
        model(xg).log_softmax(dim=1)[:, 0].sum().backward()
        _ensure(xg.grad is not None and torch.isfinite(xg.grad).all() and bool(xg.grad.abs().sum() > 0),
                f"model {name!r}: no finite gradient reaches the input (gradient explainers need one)")
        for pname, p in model.named_parameters():
            if p.grad is not None:
                _ensure(torch.isfinite(p.grad).all(), f"model {name!r}: non-finite gradient for {pname}")
        _ensure(any(p.grad is not None for p in model.get_submodule(spec.head).parameters()),
                f"model {name!r}: no gradient reaches the head {spec.head!r}")
        model.zero_grad(set_to_none=True)

        # --freeze: 0 trains the head only; all blocks train everything; too many is a usage error
        M.freeze(model, spec, 0)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        _ensure(trainable == head_params, f"model {name!r}: --freeze 0 does not leave exactly the head trainable")
        if spec.blocks:
            M.freeze(model, spec, len(spec.blocks))
            _ensure(all(p.requires_grad for p in model.parameters()),
                    f"model {name!r}: --freeze {len(spec.blocks)} (all blocks) leaves parameters frozen")
        exc = _raises(lambda: M.freeze(model, spec, len(spec.blocks) + 1), f"model {name!r}: freeze(too many)")
        _ensure(isinstance(exc, UsageError), f"model {name!r}: --freeze beyond the number of blocks is not a UsageError")
        n_params = sum(p.numel() for p in model.parameters())
    return {"name": name, "parameters": n_params, "logits": list(out.shape), "embedding_dim": int(emb.shape[1]),
            "bad_values_rejected": bad}


# ---------------------------------------------------------------------------------------------------
# augmentations


def check_augmentation(spec_or_name: Any, *, options: dict[str, Any] | None = None,
                       bad_values: dict[str, Any] | None = None, size: int = 32, batch: int = 4, seed: int = 0,
                       threads: int | None = 1) -> dict[str, Any]:
    """Check an :class:`~cxrtool.augment.AugmentationSpec` (or registered name)."""
    import torch

    from cxrtool import augment as A

    spec, registered = _resolve("augmentation", spec_or_name, A.AugmentationSpec)
    _check_spec(spec, "augmentation")
    name = spec.name
    for ch in ",:;=":
        _ensure(ch not in name, f"augmentation name {name!r} must not contain {ch!r} (used by --augment syntax)")
    merged = _merged(spec, options, "augmentation")
    if registered:
        exc = _raises(lambda: A.build_pipeline([(name, {_UNKNOWN: 1.0})]), f"build_pipeline({name!r}, unknown option)")
        _ensure(isinstance(exc, UsageError), f"augmentation {name!r}: an unknown option was not a UsageError")
        pipeline = A.build_pipeline([(name, dict(options or {}))])
        _ensure(callable(pipeline), f"augmentation {name!r}: build_pipeline gave no callable")

    with _torch_env(threads):
        bad = _check_option_values(spec, "augmentation", lambda o: spec.build(**o), bad_values, merged)
        fn = spec.build(**merged)
        _ensure(callable(fn), f"augmentation {name!r}: build(**options) must return fn(batch, generator)")
        x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed + 1))
        x[0, 0, 0, 0], x[-1, 0, -1, -1] = 0.0, 1.0  # the extremes of the range
        original = x.clone()

        def run(n: int = batch, global_seed: int = 0) -> Any:
            torch.manual_seed(global_seed)  # the result must depend on the generator only
            return fn(x[:n].clone(), torch.Generator().manual_seed(seed))

        out = fn(x, torch.Generator().manual_seed(seed))
        _ensure(torch.equal(x, original), f"augmentation {name!r} modified its input batch in place; work on a copy")
        _ensure(isinstance(out, torch.Tensor), f"augmentation {name!r} returned {type(out).__name__}, not a tensor")
        _ensure(out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
                f"augmentation {name!r}: output {tuple(out.shape)} {out.dtype} {out.device} != input "
                f"{tuple(x.shape)} {x.dtype} {x.device}; keep shape, dtype and device")
        _ensure(torch.isfinite(out).all(), f"augmentation {name!r}: non-finite output")
        lo, hi = float(out.min()), float(out.max())
        _ensure(lo >= -1e-6 and hi <= 1 + 1e-6, f"augmentation {name!r}: output range [{lo:.4g}, {hi:.4g}] leaves [0, 1]")
        again = run(global_seed=12345)
        _ensure(torch.equal(out, run(global_seed=1)) and torch.equal(out, again),
                f"augmentation {name!r}: the same generator seed gave different batches (draw every random number "
                "from the generator passed in, never from torch's global generator)")
        one = run(1)
        _ensure(one.shape == (1, 1, size, size), f"augmentation {name!r}: a batch of one gave shape {tuple(one.shape)}")
        changed = float((out - original).abs().mean())
    return {"name": name, "mean_abs_change": changed, "bad_values_rejected": bad}


# ---------------------------------------------------------------------------------------------------
# explainers


def tiny_model(num_classes: int = 2, seed: int = 0) -> Any:
    """A small CNN for explainer checks: ``block1`` -> ``block2`` (conv feature maps) -> ``pool`` -> ``fc``.

    ``TINY_LAYERS`` lists its explainable layers; ``block2`` is the default one.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("block1", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    model.add_module("block2", nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(8, num_classes))
    with torch.no_grad():  # non-trivial BN statistics, so eval mode is not the identity
        model.block1[1].running_mean.uniform_(-0.1, 0.1)
        model.block1[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


TINY_LAYERS = ("block1", "block2")


def _explain_model(model_factory: Any, num_classes: int, seed: int) -> tuple[Any, list[str], str | None, dict]:
    """(model, explainable layers, head, meta) from None (tiny model), a model name or a factory."""
    import torch

    if model_factory is None:
        return tiny_model(num_classes, seed), list(TINY_LAYERS), "fc", {}
    if isinstance(model_factory, str):
        from cxrtool.models import build_model, get_spec

        mspec = get_spec(model_factory)
        torch.manual_seed(seed)
        model = build_model(model_factory, num_classes)
        meta = {"model": {"name": model_factory, "options": {}}, "explainable_layers": list(mspec.explainable_layers)}
        return model.eval(), list(mspec.explainable_layers), mspec.head, meta
    made = model_factory()
    model, layers = (made if isinstance(made, tuple) else (made, []))
    if isinstance(layers, str):
        layers = [layers]
    return model.eval(), list(layers), None, {"explainable_layers": list(layers)}


def _model_state(model: Any) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: (None if p.grad is None else p.grad.detach().clone()) for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: _hook_count(m) for k, m in model.named_modules()},
    }


def _hook_count(module: Any) -> int:
    return sum(len(getattr(module, attr, None) or {}) for attr in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _compare_state(name: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    import torch

    for key, value in before["params"].items():
        _ensure(torch.equal(value, after["params"][key]), f"explainer {name!r} changed the model's {key}")
    _ensure(before["requires_grad"] == after["requires_grad"],
            f"explainer {name!r} left requires_grad flags changed; restore them (try / finally)")
    for key, grad in before["grad"].items():
        new = after["grad"][key]
        _ensure((grad is None and new is None) or (grad is not None and new is not None and torch.equal(grad, new)),
                f"explainer {name!r} changed {key}.grad; use torch.autograd.grad or zero what you accumulate")
    _ensure(before["training"] == after["training"], f"explainer {name!r} changed the model's train / eval mode")
    leaked = [k or "(model)" for k, n in after["hooks"].items() if n != before["hooks"].get(k, 0)]
    _ensure(not leaked, f"explainer {name!r} left hooks on module(s) {', '.join(leaked[:5])}; remove them "
                        "in a finally block")


def _phantom_files(folder: Path, n: int, size: int, seed: int) -> list[str]:
    """``n`` phantom chest X-ray PNGs (half with lesions) written into ``folder``."""
    from PIL import Image

    from cxrtool.synthetic import make_arrays, to_uint8

    images, _, _ = make_arrays(n_per_class=max(1, (n + 1) // 2), size=size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images[:n]):
        path = folder / f"phantom{i:02d}.png"
        Image.fromarray(to_uint8(img), "L").save(path)
        paths.append(str(path))
    return paths


def check_explainer(spec_or_name: Any, *, model_factory: Any = None, layer: str | None = None,
                    options: dict[str, Any] | None = None, bad_values: dict[str, Any] | None = None,
                    size: int = 32, batch: int = 2, num_classes: int = 2, seed: int = 0,
                    tmp_dir: str | os.PathLike | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Check an :class:`~cxrtool.explain.ExplainerSpec` (or registered name).

    ``model_factory``: None for :func:`tiny_model`, a registered model name, or a callable returning a
    model (or ``(model, explainable_layers)``); ``layer``: the ``--layer`` to pass (default: the
    model's last explainable layer is ``ctx.default_layer``). ``dataset`` and ``synthesis`` methods
    write into ``tmp_dir`` (a temporary folder by default).
    """
    import numpy as np

    from cxrtool import explain as E
    from cxrtool.imaging import Preprocessing

    spec, registered = _resolve("explainer", spec_or_name, E.ExplainerSpec)
    _check_spec(spec, "explainer")
    name = spec.name
    _ensure("," not in name, f"explainer name {name!r} must not contain ',' (--method takes comma-separated lists)")
    _ensure(spec.kind in E.KINDS, f"explainer {name!r}: kind {spec.kind!r} is not one of {', '.join(E.KINDS)}")
    merged = _merged(spec, options, "explainer")
    if registered:
        exc = _raises(lambda: E.build_explainer(name, {_UNKNOWN: 1}), f"build_explainer({name!r}, unknown option)")
        _ensure(isinstance(exc, UsageError), f"explainer {name!r}: an unknown option was not a UsageError")

    with _torch_env(threads):
        bad = _check_option_values(spec, "explainer", lambda o: spec.build(**o), bad_values, merged)
        explainer = spec.build(**merged)
        _ensure(isinstance(explainer, E.Explainer), f"explainer {name!r}: build returned {type(explainer).__name__}, "
                                                    "not a cxrtool.explain.Explainer")
        _ensure(explainer.kind == spec.kind, f"explainer {name!r}: the spec says kind {spec.kind!r} but the "
                                             f"Explainer's kind is {explainer.kind!r}")
        model, layers, head, meta = _explain_model(model_factory, num_classes, seed)
        class_names = [f"class{i}" for i in range(num_classes)]
        progress: list[int] = []
        ctx = E.ExplainContext(model=model, preprocessing=Preprocessing(size=size), class_names=class_names,
                               layer=layer, default_layer=layers[-1] if layers else None, seed=seed, batch_size=8,
                               progress=progress.append, memory_mb=64, meta=meta)
        result: dict[str, Any] = {"name": name, "kind": spec.kind, "bad_values_rejected": bad}
        if spec.kind == "attribution":
            result.update(_check_attribution(explainer, name, model, ctx, head, size, batch, num_classes, seed))
        else:
            tmp = Path(tmp_dir) if tmp_dir else Path(tempfile.mkdtemp(prefix="cxrtool-conformance-"))
            paths = _phantom_files(tmp / "images", 4, size, seed)
            before = _model_state(model)
            if spec.kind == "dataset":
                from cxrtool.data import ImageSet

                ds = ImageSet(paths, np.full(len(paths), -1, dtype=np.int64), class_names, paths)
                summary = explainer.run_dataset(ds, ctx, tmp / "out")
            else:
                summary = explainer.synthesize([class_names[0]], ctx, tmp / "out", None)
            _compare_state(name, before, _model_state(model))
            _ensure(isinstance(summary, dict), f"explainer {name!r}: a {spec.kind} method must return a dict summary")
            _json_ok(summary, f"explainer {name!r}: summary")
            written = [p for p in (tmp / "out").rglob("*") if p.is_file()] if (tmp / "out").exists() else []
            _ensure(written, f"explainer {name!r}: a {spec.kind} method wrote nothing into its out_dir")
            result.update({"files": len(written)})
    return result


def _check_attribution(explainer: Any, name: str, model: Any, ctx: Any, head: str | None, size: int, batch: int,
                       num_classes: int, seed: int) -> dict[str, Any]:
    import dataclasses

    import numpy as np
    import torch

    from cxrtool.explain import Attribution

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen)
    target = torch.arange(batch) % num_classes
    x0, t0 = x.clone(), target.clone()
    before = _model_state(model)
    try:
        att = explainer.attribute(x, target, ctx)
    except CxrtoolError as exc:
        hint = "" if ctx.target_layer else " (no layer: pass layer=..., or a model_factory returning (model, layers))"
        raise AssertionError(f"explainer {name!r} failed on a valid input{hint}: {type(exc).__name__}: {exc}") from exc
    _compare_state(name, before, _model_state(model))
    _ensure(torch.equal(x, x0) and torch.equal(target, t0), f"explainer {name!r} modified its input or target")
    _ensure(isinstance(att, Attribution), f"explainer {name!r}: attribute must return a cxrtool.explain.Attribution, "
                                          f"got {type(att).__name__}")
    maps = att.maps
    _ensure(isinstance(maps, np.ndarray), f"explainer {name!r}: Attribution.maps must be a numpy array, "
                                          f"got {type(maps).__name__}")
    _ensure(maps.shape == (batch, size, size), f"explainer {name!r}: maps have shape {maps.shape}, expected "
                                               f"{(batch, size, size)} (one map per image at model-input resolution)")
    _ensure(maps.dtype == np.float32, f"explainer {name!r}: maps are {maps.dtype}, expected float32")
    _ensure(np.isfinite(maps).all(), f"explainer {name!r}: non-finite values in the maps")
    if not getattr(explainer, "signed", True):
        _ensure(float(maps.min()) >= -1e-6 * max(1.0, float(np.abs(maps).max())),
                f"explainer {name!r}: signed = False but the maps have negative values ({float(maps.min()):.3g})")
    _ensure(isinstance(getattr(explainer, "unit", None), str), f"explainer {name!r}: unit must be a string")
    _ensure(isinstance(att.extras, dict), f"explainer {name!r}: Attribution.extras must be a dict")
    for key, value in att.extras.items():
        _ensure(isinstance(value, list) and len(value) == batch,
                f"explainer {name!r}: extras[{key!r}] must be a list with one entry per image ({batch})")
    _json_ok(att.extras, f"explainer {name!r}: Attribution.extras")
    again = explainer.attribute(x.clone(), target.clone(), ctx)
    _ensure(_allclose(maps, again.maps), f"explainer {name!r}: two calls with the same seed gave different maps "
                                         "(seed random parts from ctx.seed)")
    # a layer that does not exist, and a layer without a feature map: cxrtool errors (or ignored)
    checked_layers = []
    for bad_layer in ("no.such.layer", head):
        if bad_layer is None:
            continue
        bad_ctx = dataclasses.replace(ctx, layer=bad_layer, progress=None)
        before = _model_state(model)
        _raises(lambda c=bad_ctx: explainer.attribute(x[:1].clone(), target[:1].clone(), c),
                f"explainer {name!r} with --layer {bad_layer!r}")
        _compare_state(name, before, _model_state(model))
        checked_layers.append(bad_layer)
    return {"maps": list(maps.shape), "max_abs": float(np.abs(maps).max()), "extras": sorted(att.extras),
            "bad_layers": checked_layers}


# ---------------------------------------------------------------------------------------------------
# anomaly detectors


def check_detector(spec_or_name: Any, *, options: dict[str, Any] | None = None,
                   bad_values: dict[str, Any] | None = None, size: int = 32, n_images: int = 12, seed: int = 0,
                   threads: int | None = 1) -> dict[str, Any]:
    """Check an anomaly :class:`~cxrtool.anomaly.DetectorSpec` (or registered name); skipped when this
    cxrtool has no anomaly detectors. Pass small ``options`` (few epochs, a small backbone): the
    detector is fitted three times on ``n_images`` phantoms of ``size`` px."""
    try:
        from cxrtool import anomaly as AN
    except ImportError:
        return _skip("cxrtool.anomaly is not available in this cxrtool")
    if not hasattr(AN, "DetectorSpec"):
        return _skip("cxrtool.anomaly has no DetectorSpec")
    import numpy as np

    from cxrtool.imaging import Preprocessing
    from cxrtool.synthetic import make_arrays, to_uint8

    spec, registered = _resolve("anomaly detector", spec_or_name, AN.DetectorSpec)
    _check_spec(spec, "anomaly detector")
    name = spec.name
    merged = _merged(spec, options, "anomaly detector")
    if registered and hasattr(AN, "build_detector"):
        exc = _raises(lambda: AN.build_detector(name, {_UNKNOWN: 1}), f"build_detector({name!r}, unknown option)")
        _ensure(isinstance(exc, UsageError), f"detector {name!r}: an unknown option was not a UsageError")
    pp = Preprocessing(size=size)
    arrays, labels, _ = make_arrays(n_per_class=n_images, size=size, seed=seed, classes=("NORMAL", "LESION"))
    normals = np.stack([to_uint8(a) for a in arrays[labels == 0][:n_images]])
    query = np.stack([to_uint8(a) for a in arrays[labels == 1][:2]] + list(normals[:2]))

    def fitted(opts: dict[str, Any]) -> Any:
        det = spec.build(**opts)
        _ensure(isinstance(det, AN.Detector), f"detector {name!r}: build returned {type(det).__name__}, "
                                              "not a cxrtool.anomaly.Detector")
        det.preprocessing = pp
        report = det.fit(normals.copy(), AN.FitContext(preprocessing=pp, seed=seed, batch_size=8))
        _ensure(report is None or isinstance(report, dict), f"detector {name!r}: fit must return a dict (or None)")
        _json_ok(report or {}, f"detector {name!r}: fit report")
        return det

    with _torch_env(threads):
        bad = _check_option_values(spec, "detector", lambda o: spec.build(**o), bad_values, merged)
        det = fitted(merged)
        scores, maps = det.score(query.copy())
        scores, maps = np.asarray(scores), np.asarray(maps)
        _ensure(scores.shape == (len(query),), f"detector {name!r}: scores have shape {scores.shape}, expected "
                                               f"({len(query)},)")
        _ensure(np.issubdtype(scores.dtype, np.floating) and np.isfinite(scores).all(),
                f"detector {name!r}: scores must be finite floats")
        _ensure(maps.shape == (len(query), size, size) and maps.dtype == np.float32 and np.isfinite(maps).all(),
                f"detector {name!r}: heatmaps must be finite float32 {(len(query), size, size)}, got "
                f"{maps.dtype} {maps.shape}")
        again, _ = fitted(merged).score(query.copy())
        _ensure(_allclose(scores, again), f"detector {name!r}: two fits with the same seed give different scores "
                                          "(seed everything random from FitContext.seed)")
        state, extra = det.state_dict(), det.extra_meta()
        _ensure(isinstance(state, dict), f"detector {name!r}: state_dict must return a dict of tensors")
        import torch

        for key, value in state.items():
            _ensure(isinstance(key, str) and isinstance(value, torch.Tensor),
                    f"detector {name!r}: state_dict entry {key!r} is not a tensor (checkpoints are safetensors)")
        _json_ok(extra, f"detector {name!r}: extra_meta()")
        restored = spec.build(**merged)
        restored.preprocessing = pp
        restored.load_state({k: v.clone() for k, v in state.items()}, json.loads(json.dumps(extra)))
        s2, m2 = restored.score(query.copy())
        _ensure(_allclose(scores, s2) and _allclose(maps, m2),
                f"detector {name!r}: scores differ after state_dict / extra_meta -> load_state")
        _ensure(isinstance(det.describe(), str), f"detector {name!r}: describe() must return a string")
        _ensure(isinstance(det.uses_abnormal_labels(), bool), f"detector {name!r}: uses_abnormal_labels() must be a bool")
    return {"name": name, "scores": [float(s) for s in scores], "bad_values_rejected": bad}


# ---------------------------------------------------------------------------------------------------
# projections


def check_projection(spec_or_name: Any, *, options: dict[str, Any] | None = None,
                     bad_values: dict[str, Any] | None = None, n_points: int = 40, dim: int = 8,
                     seed: int = 0) -> dict[str, Any]:
    """Check an embedding :class:`~cxrtool.embed.ProjectionSpec` (or registered name)."""
    try:
        from cxrtool import embed as EM
    except ImportError:
        return _skip("cxrtool.embed is not available in this cxrtool")
    import numpy as np

    spec, registered = _resolve("projection", spec_or_name, EM.ProjectionSpec)
    _check_spec(spec, "projection")
    name = spec.name
    merged = _merged(spec, options, "projection")
    if registered:
        exc = _raises(lambda: EM.build_projection(name, {_UNKNOWN: 1}), f"build_projection({name!r}, unknown option)")
        _ensure(isinstance(exc, UsageError), f"projection {name!r}: an unknown option was not a UsageError")
    bad = _check_option_values(spec, "projection", lambda o: spec.build(**o).check(n_points, dim), bad_values, merged)
    proj = spec.build(**merged)
    _ensure(isinstance(proj, EM.Projection), f"projection {name!r}: build returned {type(proj).__name__}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(3, dim))
    x = (centres[np.arange(n_points) % 3] + rng.normal(0, 1, size=(n_points, dim))).astype(np.float32)
    proj.check(n_points, dim)
    out = np.asarray(proj.fit_transform(x.copy(), seed=seed))
    _ensure(out.shape == (n_points, 2) and out.dtype == np.float32 and np.isfinite(out).all(),
            f"projection {name!r}: fit_transform must give finite float32 ({n_points}, 2), got {out.dtype} {out.shape}")
    if spec.deterministic:
        again = np.asarray(spec.build(**merged).fit_transform(x.copy(), seed=seed))
        _ensure(_allclose(out, again, rtol=1e-4, atol=1e-5),
                f"projection {name!r}: deterministic = True but the same seed gave different coordinates")
    exc = _raises(lambda: proj.check(1, dim), f"projection {name!r}: check(1 point)")
    _ensure(exc is not None, f"projection {name!r}: check() accepted a single point")
    return {"name": name, "bad_values_rejected": bad}


# ---------------------------------------------------------------------------------------------------
# readers


def reader_functions(plugin: Any) -> list[Callable[[Any, Any], Any]]:
    """The ``read_image`` hook implementations of a plugin module / object (or a registered plugin name)."""
    from cxrtool.hookspecs import PROJECT

    if isinstance(plugin, str):
        from cxrtool.plugins import get_manager

        impls = get_manager().pm.hook.read_image.get_hookimpls()
        return [impl.function for impl in impls if impl.plugin_name == plugin]
    out = []
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        opts = getattr(fn, f"{PROJECT}_impl", None)
        if callable(fn) and isinstance(opts, dict) and (opts.get("specname") or attr) == "read_image":
            out.append(fn)
    return out


def _reader_samples(folder: Path) -> dict[str, Path]:
    """Sample images in the formats cxrtool users have: 8-bit PNG, 16-bit PNG, RGB JPEG, DICOM."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w = 48, 64
    ramp = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    samples = {}
    samples["png8"] = folder / "grey8.png"
    Image.fromarray((ramp * 255).astype(np.uint8), "L").save(samples["png8"])
    samples["png16"] = folder / "grey16.png"
    Image.fromarray((ramp * 4000 + 100).astype(np.uint16)).save(samples["png16"])
    samples["jpeg"] = folder / "colour.jpg"
    Image.fromarray(np.stack([(ramp * 255).astype(np.uint8)] * 3, axis=-1), "RGB").save(samples["jpeg"], quality=95)
    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    except ImportError:  # pragma: no cover - pydicom is a dependency of cxrtool
        return samples
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (ramp * 4095).astype(np.uint16).tobytes()
    samples["dicom"] = folder / "image.dcm"
    ds.save_as(samples["dicom"], enforce_file_format=True)
    return samples


def _foreign_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"missing": folder / "does-not-exist.png", "empty": folder / "empty.png",
             "garbage": folder / "garbage.png", "text": folder / "notes.txt", "directory": folder / "a-folder.png"}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # PNG magic, corrupt body
    files["text"].write_text("not an image\n")
    files["directory"].mkdir(exist_ok=True)
    return files


def check_reader(reader: Any, *, samples: list[str | os.PathLike] | None = None, max_size: int = 16,
                 tmp_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a ``read_image(path, max_size)`` hook implementation (a function, or a plugin module /
    object / registered plugin name whose ``read_image`` implementations are all checked).

    ``samples``: files the reader must decode; by default the kit writes an 8-bit and a 16-bit PNG, a
    JPEG and a DICOM file, and the reader must decode at least one of them.
    """
    import numpy as np

    from cxrtool.errors import ImageReadError

    fns = [reader] if callable(reader) and not isinstance(reader, type) else reader_functions(reader)
    _ensure(fns, f"{reader!r} has no read_image hook implementation")
    tmp = Path(tmp_dir) if tmp_dir else Path(tempfile.mkdtemp(prefix="cxrtool-conformance-"))
    required = [Path(p) for p in samples or []]
    candidates = {str(p): p for p in required} if required else _reader_samples(tmp / "s")
    foreign = _foreign_files(tmp / "f")

    def read(fn: Callable, what: str, path: Path, hint: int | None, label: str) -> Any:
        try:
            return fn(path, hint)
        except ImageReadError as exc:
            _ensure(str(path) in str(exc), f"reader {what}: the error for {label} must name the path: {exc}")
            return exc
        except Exception as exc:
            raise AssertionError(f"reader {what} raised {type(exc).__name__}: {exc} on {label} {path}; readers must "
                                 "return None (not my format) or raise cxrtool.errors.ImageReadError") from exc

    report: dict[str, Any] = {}
    for fn in fns:
        what = getattr(fn, "__qualname__", repr(fn))
        decoded = []
        for label, path in candidates.items():
            full = read(fn, what, path, None, f"the sample file {label}")
            _ensure(not isinstance(full, Exception), f"reader {what}: raised {full} on the valid sample file {path}")
            if full is None:
                _ensure(not required, f"reader {what}: returned None for {path}, which it must decode")
                continue
            _ensure(isinstance(full, np.ndarray) and full.ndim == 2 and full.dtype == np.float32,
                    f"reader {what}: {path} gave {type(full).__name__} "
                    f"{getattr(full, 'dtype', '')} {getattr(full, 'shape', '')}; expected float32 (H, W)")
            _ensure(full.size and np.isfinite(full).all() and full.min() >= 0.0 and full.max() <= 1.0,
                    f"reader {what}: {path} must decode to finite values in [0, 1]")
            _ensure(np.array_equal(full, fn(path, None)), f"reader {what}: two reads of {path} differ")
            hinted = read(fn, what, path, max_size, f"the sample file {label} with max_size={max_size}")
            _ensure(isinstance(hinted, np.ndarray) and hinted.ndim == 2,
                    f"reader {what}: {path} with max_size={max_size} gave {hinted!r:.100}, not an (H, W) array")
            floor = min(max_size, *full.shape)
            _ensure(min(hinted.shape) >= floor, f"reader {what}: max_size={max_size} gave {hinted.shape}; both "
                                                f"sides must stay >= max_size")
            decoded.append(label)
        _ensure(decoded, f"reader {what} decoded none of the sample files ({', '.join(candidates)}); pass "
                         "samples=[...] with files of your format")
        for label, path in foreign.items():
            result = read(fn, what, path, None, f"a {label} file")
            _ensure(result is None or isinstance(result, ImageReadError),
                    f"reader {what}: a {label} file ({path}) gave {type(result).__name__}; return None (not my "
                    "format) or raise ImageReadError")
        report[what] = decoded
    return {"readers": report}


# ---------------------------------------------------------------------------------------------------
# registration


_CHEAP_CODE = """
import json, sys
from cxrtool import registry
from cxrtool.plugins import get_manager
registry.collect_all()
get_manager().pm.hook.read_image.get_hookimpls()
heavy = [m for m in {heavy!r} if m in sys.modules]
info = {{n: i.to_dict() for n, i in get_manager().info.items()}}
print(json.dumps({{"heavy": heavy, "info": info}}))
"""


def _cheap_run(only: list[str] | None, heavy: tuple[str, ...], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("CXRTOOL_PLUGINS_DIR", None)
    env.pop("CXRTOOL_DISABLE_PLUGINS", None)
    if only is None:
        env.pop("CXRTOOL_LOAD_PLUGINS", None)
    else:
        env["CXRTOOL_LOAD_PLUGINS"] = ",".join(only)
    proc = subprocess.run([sys.executable, "-c", _CHEAP_CODE.format(heavy=tuple(heavy))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    _ensure(proc.returncode == 0, f"loading plugins {only or 'all'} failed in a fresh interpreter:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_registration_is_cheap(plugins: list[str] | None = None, *, heavy: tuple[str, ...] = HEAVY_MODULES,
                                timeout: float = 120) -> dict[str, Any]:
    """In a fresh interpreter, load ``plugins`` (entry-point names; None: all) and run every
    ``register_*`` hook: no plugin may fail, and none of ``heavy`` (torch, ...) may be imported.

    Every cxrtool command, ``--help`` included, loads every plugin, so registration must be cheap:
    import heavy libraries inside ``build`` functions or the modules they import.
    """
    data = _cheap_run(plugins, heavy, timeout)
    if plugins is not None:
        missing = sorted(set(plugins) - set(data["info"]))
        _ensure(not missing, f"plugin(s) {', '.join(missing)} not found (installed? entry-point group 'cxrtool')")
    broken = {n: i["errors"] for n, i in data["info"].items() if i["status"] != "ok"}
    _ensure(not broken, f"plugin(s) failed to load or register: {broken}")
    if data["heavy"] and len(data["info"]) > 1:  # find the culprit(s)
        culprits = {n: _cheap_run([n], heavy, timeout)["heavy"] for n in sorted(data["info"])}
        culprits = {n: h for n, h in culprits.items() if h}
        raise AssertionError(f"registering plugin(s) imports heavy modules: {culprits}; import them inside build "
                             "functions instead")
    _ensure(not data["heavy"], f"registering plugin(s) {sorted(data['info'])} imports {data['heavy']}; import heavy "
                               "modules inside build functions instead")
    return {"plugins": sorted(data["info"])}


# ---------------------------------------------------------------------------------------------------
# everything registered


def registered(kind: str, plugin: str | None = None) -> list[str]:
    """Sorted names of the registered things of ``kind`` (only those of ``plugin`` when given)."""
    from cxrtool import registry

    _ensure(kind in KINDS, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return [n for n in registry.all_specs(kind) if plugin is None or registry.provider(kind, n) == plugin]


def registered_params(plugin: str | None = None, kinds: tuple[str, ...] = KINDS) -> list[Any]:
    """``(kind, name)`` pairs for ``pytest.mark.parametrize("kind, name", ...)``, with readable ids."""
    import pytest

    return [pytest.param(kind, name, id=f"{kind.replace(' ', '-')}:{name}")
            for kind in kinds for name in registered(kind, plugin)]


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "model": check_model,
    "augmentation": check_augmentation,
    "explainer": check_explainer,
    "anomaly detector": check_detector,
    "projection": check_projection,
}


def check(kind: str, name: str, **kwargs: Any) -> dict[str, Any]:
    """Run the check for ``kind`` (``model``, ``augmentation``, ``explainer``, ``anomaly detector``,
    ``projection``) on the registered ``name``."""
    _ensure(kind in CHECKS, f"kind {kind!r} is not one of {', '.join(CHECKS)}")
    return CHECKS[kind](name, **kwargs)


def check_all_registered(plugin: str | None = None, *, kwargs: dict[str, dict[str, Any]] | None = None,
                         skip: tuple[str, ...] = (), readers: bool = True) -> dict[str, Any]:
    """Check everything registered (by ``plugin``, or by every plugin) and raise one AssertionError
    listing every failure. ``kwargs``: ``{name: {...}}`` extra arguments for one check (e.g. small
    ``options``); ``skip``: names to leave out. Prefer :func:`registered_params` in a test suite: one
    test per thing reports better."""
    failures, results = [], {}
    for kind in KINDS:
        for name in registered(kind, plugin):
            if name in skip:
                continue
            try:
                results[f"{kind}:{name}"] = check(kind, name, **(kwargs or {}).get(name, {}))
            except AssertionError as exc:
                failures.append(f"{kind} {name!r}: {exc}")
    if readers:
        from cxrtool.plugins import get_manager

        for impl in get_manager().pm.hook.read_image.get_hookimpls():
            if plugin is not None and impl.plugin_name != plugin:
                continue
            try:
                results[f"reader:{impl.plugin_name}.{impl.function.__name__}"] = check_reader(impl.function)
            except AssertionError as exc:
                failures.append(f"reader {impl.plugin_name}.{impl.function.__name__}: {exc}")
    _ensure(not failures, f"{len(failures)} conformance failure(s):\n" + "\n".join(failures))
    return results


def run_cli(capsys: Any, *args: Any) -> tuple[int, str, str]:
    """Run ``cxrtool ARGS...`` in this process; return (exit code, stdout, stderr).

    ``capsys`` is pytest's fixture; arguments may be paths or numbers (they are passed as strings).
    A domain error gives exit code 1 or 2 and one ``error: ...`` line on stderr, as on a terminal.
    """
    from cxrtool.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err
