"""``occlusion``: slide a patch over the image and record the drop in the target's probability.

Two engines give the same map (to float rounding, checked against captum in the tests):

``captum``
    captum's :class:`~captum.attr.Occlusion` on ``softmax(model(x))`` with the windows evaluated in
    batches (``perturbations_per_eval``), never one forward pass per window.
``cone``
    one cached clean forward pass; for each window only the part of every layer's activations that the
    patch can reach (its receptive-field *cone*) is recomputed, for a batch of windows at a time. The
    model is traced with ``torch.fx``; convolutions, pooling, element-wise layers, residual additions
    and channel concatenations are computed on the rectangle they can change (exactly: the
    rectangle's halo comes from the cached clean activations); a global average pool turns the
    rectangle into the pooled vector by adding the rectangle's change to the cached clean mean. Any
    other operation makes the activations whole again ("densify") and runs as usual, so the result is
    exact for any traceable model; it is only fast when that happens late in the network.

``engine=auto`` (default) uses the cone when the model traces, its traced output matches the model, a
spot check of one window against a direct forward pass agrees, its cache of clean activations fits the
memory budget and its convolutions need at most ``MAX_WORK`` of the multiply-adds of full passes;
otherwise captum. The manifest says which engine ran and why the cone stepped aside.

Options are in pixels of the ORIGINAL image (converted with the preprocessing geometry): ``patch``
(default: 1/8 of the shorter side), ``stride`` (default: half the patch), ``fill`` (``zero``: black,
``mean``: the image's mean, ``blur``: the blurred image), ``batch`` (most windows per forward pass;
lowered so a batch stays within the context's memory budget), ``engine``.
"""

from __future__ import annotations

import math
import operator
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrtool.errors import UsageError
from cxrtool.explain import (
    Attribution,
    ExplainContext,
    Explainer,
    activation_bytes,
    batch_for_memory,
    choice_option,
    int_option,
    probability_model,
    reference,
)
from cxrtool.imaging import geometry

FILLS = ("zero", "mean", "blur")
#: engine=auto uses captum when the cone's convolutions cost more than this share of a full forward pass
MAX_WORK = 0.7
ENGINES = ("auto", "cone", "captum")


class ConeUnsupported(Exception):
    """The model's structure cannot be analysed for the cone engine (the reason is the message)."""


# ---------------------------------------------------------------------------------------------------
# window grid (captum's: positions 0, s, 2s, ... until the image is covered, the last window cut off)
def window_grid(h: int, w: int, ph: int, pw: int, sh: int, sw: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of every window, in captum's order (rows of x positions)."""
    ny = int(math.ceil((h - ph) / sh)) + 1 if h > ph else 1
    nx = int(math.ceil((w - pw) / sw)) + 1 if w > pw else 1
    out = []
    for i in range(ny):
        y0 = i * sh
        for j in range(nx):
            x0 = j * sw
            out.append((y0, min(y0 + ph, h), x0, min(x0 + pw, w)))
    return out


def accumulate(diffs: np.ndarray, windows: list[tuple[int, int, int, int]], h: int, w: int) -> np.ndarray:
    """Average the per-window probability drops over the windows covering each pixel."""
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    for d, (y0, y1, x0, x1) in zip(diffs, windows, strict=True):
        total[y0:y1, x0:x1] += d
        count[y0:y1, x0:x1] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# the cone engine
class Region:
    """A batch of B activation maps equal to ``clean`` (1, C, H, W) except in a rectangle of fixed size
    (h, w) whose top-left corner is (``y[b]``, ``x[b]``) for window b, where they equal ``vals[b]``.
    ``y`` and ``x`` are numpy int64 arrays (cheap bookkeeping); ``clean`` is None when no later operation
    needs it."""

    __slots__ = ("clean", "vals", "y", "x")

    def __init__(self, clean: torch.Tensor | None, vals: torch.Tensor, y: np.ndarray, x: np.ndarray):
        self.clean, self.vals, self.y, self.x = clean, vals, y, x

    @property
    def hw(self) -> tuple[int, int]:
        return self.vals.shape[-2], self.vals.shape[-1]

    @property
    def batch(self) -> int:
        return self.vals.shape[0]


class Dense:
    """A plain tensor with one entry per window (after the spatial cone has been collapsed)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.mish, F.softplus, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.neg, operator.neg,
    F.dropout,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "neg", "contiguous", "clone", "float"}
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _is_gap(module: nn.Module) -> bool:
    if not isinstance(module, nn.AdaptiveAvgPool2d):
        return False
    o = module.output_size
    return o == 1 or tuple(o) == (1, 1) if not isinstance(o, int) else o == 1


def _gap_dims(dim) -> bool:
    if dim is None:
        return False
    dims = {dim} if isinstance(dim, int) else set(dim)
    return dims in ({2, 3}, {-2, -1}, {2, -1}, {-2, 3})


class ConeOcclusion:
    """Occlusion by recomputing only each window's receptive-field cone (see the module docstring)."""

    def __init__(self, model: nn.Module):
        import torch.fx as fx

        self.prob = probability_model(model)
        try:
            self.gm = fx.symbolic_trace(self.prob)
        except Exception as exc:  # data-dependent control flow, unsupported Python
            raise ConeUnsupported(f"torch.fx cannot trace the model ({type(exc).__name__}: {exc})") from None
        self.nodes = list(self.gm.graph.nodes)
        self.modules = dict(self.gm.named_modules())
        self.kind = {n: self._classify(n) for n in self.nodes}
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {}
        for n in self.nodes:
            for u in n.users:
                self.last_use[n] = max(self.last_use.get(n, -1), index[u])
        #: nodes whose clean value must be kept (a user gathers around its rectangle or densifies it)
        self.keep = {n for n in self.nodes if any(self.kind[u] != "pointwise" for u in n.users)}
        self.keep |= {n for n in self.nodes if n.op == "output"}
        self.clean: dict[Any, Any] = {}
        self.shapes: dict[Any, torch.Size] = {}
        self._pad_cache: dict[tuple, tuple[torch.Tensor, tuple[int, int]]] = {}
        self.peak_bytes = 0
        #: multiply-accumulates of the convolutions in the last ``run``: done vs a full forward per window
        self.work = [0.0, 0.0]
        self.verified = False  # the traced graph and one window were checked against the model

    # -- structure -------------------------------------------------------------------------------
    def _classify(self, n) -> str:
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, nn.Conv2d):
                ok = m.padding_mode == "zeros" and not isinstance(m.padding, str)
                return "conv" if ok else "other"
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                ok = not m.ceil_mode and not getattr(m, "return_indices", False)
                if isinstance(m, nn.AvgPool2d):
                    ok = ok and m.count_include_pad and m.divisor_override is None
                return "pool" if ok else "other"
            if isinstance(m, nn.BatchNorm2d):
                return "pointwise" if (not m.training and m.track_running_stats and m.running_mean is not None) else "other"
            if isinstance(m, _POINTWISE_MODULES):
                return "pointwise"
            if _is_gap(m):
                return "gap"
            return "other"
        if n.op == "call_function":
            fn = _INPLACE_FUNCTIONS.get(n.target, n.target)
            if fn in _POINTWISE_FUNCTIONS:
                return "pointwise"
            if fn in _BINARY:
                return "binary"
            if fn is torch.cat:
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                return "cat" if dim in (1, -3) else "other"
            if fn is F.adaptive_avg_pool2d:
                o = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
                return "gap" if o in (1, (1, 1), [1, 1]) else "other"
            if fn is torch.mean:
                return "gap" if _gap_dims(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) else "other"
            return "other"
        if n.op == "call_method":
            if n.target in _POINTWISE_METHODS:
                return "pointwise"
            if n.target in ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"):
                return "binary"
            if n.target == "mean":
                return "gap" if _gap_dims(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) else "other"
            return "other"
        return n.op

    # -- plain execution (clean pass and fallback), never in place -------------------------------------
    def _plain(self, n, args, kwargs):
        if n.op == "call_module":
            m = self.modules[n.target]
            if getattr(m, "inplace", False) and args and isinstance(args[0], torch.Tensor):
                args = (args[0].clone(), *args[1:])
            return m(*args, **kwargs)
        if n.op == "call_function":
            fn = _INPLACE_FUNCTIONS.get(n.target, n.target)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if n.op == "call_method":
            name = n.target
            if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        raise ConeUnsupported(f"unexpected graph node {n.op}")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The cached clean pass for one image (1, 1, H, W); returns its probabilities (1, C)."""
        import torch.fx as fx

        env: dict[Any, Any] = {}
        self.clean, self.shapes, self._pad_cache = {}, {}, {}
        out = None
        with torch.inference_mode():
            for i, n in enumerate(self.nodes):
                if n.op == "placeholder":
                    val = x
                elif n.op == "get_attr":
                    val = _fetch_attr(self.gm, n.target)
                elif n.op == "output":
                    out = fx.node.map_arg(n.args[0], lambda a: env[a])
                    break
                else:
                    args = fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                    val = self._plain(n, args, kwargs)
                env[n] = val
                if isinstance(val, torch.Tensor):
                    self.shapes[n] = val.shape
                if n in self.keep:
                    self.clean[n] = val
                for a in n.all_input_nodes:
                    if self.last_use.get(a) == i:
                        env.pop(a, None)
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise ConeUnsupported("the traced model does not return one (N, classes) tensor")
            if not self.verified:
                direct = self.prob(x)
                if not torch.allclose(out, direct, atol=1e-5, rtol=1e-4):
                    raise ConeUnsupported(
                        f"the traced model disagrees with the model (max diff {(out - direct).abs().max():.2e})")
        return out

    # -- region helpers --------------------------------------------------------------------------------
    def _padded(self, clean: torch.Tensor, pad: tuple[int, int], value: float) -> tuple[torch.Tensor, tuple[int, int]]:
        """``clean`` (1, C, H, W) padded by at least ``pad`` (rows, columns) on each side, channels last
        (Hp, Wp, C), and the padding it has. One copy per map and padding value, cached for the image:
        crops are row gathers of contiguous channel vectors."""
        key = (id(clean), value)
        got = self._pad_cache.get(key)
        if got is None or got[1][0] < pad[0] or got[1][1] < pad[1]:
            have = got[1] if got is not None else (0, 0)
            py, px = max(pad[0], have[0]), max(pad[1], have[1])
            padded = F.pad(clean, (px, px, py, py), value=value) if (py or px) else clean
            got = (padded[0].permute(1, 2, 0).contiguous(), (py, px))
            self._pad_cache[key] = got
        return got

    def _crops(self, clean: torch.Tensor, cy: np.ndarray, cx: np.ndarray, ch: int, cw: int,
               pad: tuple[int, int], value: float) -> torch.Tensor:
        """(B, C, ch, cw) crops of the clean map at (cy[b], cx[b]) (may start up to ``pad`` outside)."""
        cl, (py, px) = self._padded(clean, pad, value)
        hp, wp, c = cl.shape
        b = len(cy)
        y0, x0 = cy + py, cx + px
        if (y0 == y0[0]).all() and (x0 == x0[0]).all():
            one = cl[int(y0[0]) : int(y0[0]) + ch, int(x0[0]) : int(x0[0]) + cw]
            return one.unsqueeze(0).expand(b, -1, -1, -1).clone().permute(0, 3, 1, 2)
        idx = (y0[:, None, None] + np.arange(ch)[None, :, None]) * wp + (x0[:, None, None] + np.arange(cw)[None, None, :])
        rows = cl.view(hp * wp, c).index_select(0, torch.from_numpy(idx.reshape(-1)))
        return rows.view(b, ch, cw, c).permute(0, 3, 1, 2)

    def gather(self, r: Region, cy: np.ndarray, cx: np.ndarray, ch: int, cw: int, pad: tuple[int, int] = (0, 0),
               pad_value: float = 0.0) -> torch.Tensor:
        """(B, C, ch, cw): each window's map in the crop at (cy[b], cx[b]); the crop may reach up to ``pad``
        outside the map (padded with ``pad_value``)."""
        h, w = r.hw
        dy, dx = r.y - cy, r.x - cx
        if (h, w) == (ch, cw) and not dy.any() and not dx.any():
            return r.vals
        base = self._crops(r.clean, cy, cx, ch, cw, pad, pad_value)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, key in enumerate(zip(dy.tolist(), dx.tolist(), strict=True)):
            groups.setdefault(key, []).append(k)
        for (a, c), members in groups.items():  # paste the rectangles, one slice per relative offset
            y0, y1, x0, x1 = max(a, 0), min(a + h, ch), max(c, 0), min(c + w, cw)
            if y0 >= y1 or x0 >= x1:
                continue
            src = r.vals[:, :, y0 - a : y1 - a, x0 - c : x1 - c]
            if len(members) == len(cy):
                base[:, :, y0:y1, x0:x1] = src
            else:
                sel = torch.tensor(members)
                base[sel, :, y0:y1, x0:x1] = src[sel]
        return base

    def densify(self, v):
        if isinstance(v, Region):
            _, _, H, W = v.clean.shape
            zero = np.zeros_like(v.y)
            return self.gather(v, zero, zero, H, W)
        if isinstance(v, Dense):
            return v.t
        return v

    @staticmethod
    def _out_range(start: np.ndarray, length: int, k: int, s: int, p: int, d: int, n_out: int):
        """Output rectangle (start per window, common length) a changed input rectangle can reach."""
        lo = -((-(start + p - (k - 1) * d)) // s)
        hi = (start + length - 1 + p) // s
        lo, hi = np.clip(lo, 0, n_out - 1), np.clip(hi, 0, n_out - 1)
        n = max(1, min(int((hi - lo + 1).max()), n_out))
        return np.minimum(lo, n_out - n), n

    def _window_op(self, r: Region, n, k, s, p, d, fn, pad_value: float) -> Region:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
        h, w = r.hw
        hout, wout = self.shapes[n][-2:]
        oy, nh = self._out_range(r.y, h, kh, sh, ph, dh, hout)
        ox, nw = self._out_range(r.x, w, kw, sw, pw, dw, wout)
        crop = self.gather(r, oy * sh - ph, ox * sw - pw, (nh - 1) * sh + (kh - 1) * dh + 1,
                           (nw - 1) * sw + (kw - 1) * dw + 1, (ph, pw), pad_value)
        return Region(self.clean.get(n), fn(crop), oy, ox)

    def _union(self, regions: list[Region]) -> tuple[np.ndarray, np.ndarray, int, int]:
        _, _, H, W = regions[0].clean.shape
        y0 = np.minimum.reduce([r.y for r in regions])
        x0 = np.minimum.reduce([r.x for r in regions])
        y1 = np.maximum.reduce([r.y + r.hw[0] for r in regions])
        x1 = np.maximum.reduce([r.x + r.hw[1] for r in regions])
        h, w = min(int((y1 - y0).max()), H), min(int((x1 - x0).max()), W)
        return np.minimum(y0, H - h), np.minimum(x0, W - w), h, w

    def _exec(self, n, args, kwargs):
        flat = _flatten((args, kwargs))
        if not any(isinstance(a, (Region, Dense)) for a in flat):
            return self.clean[n] if n in self.clean else self._plain(n, args, kwargs)
        kind = self.kind[n]
        clean_out = self.clean.get(n)
        x = args[0] if args else None
        if isinstance(x, Region) and kind in ("conv", "pool", "pointwise", "gap"):
            if kind == "pointwise":
                if n.op == "call_module":
                    m = self.modules[n.target]
                    if type(m) is nn.ReLU:
                        vals = torch.relu(x.vals)  # never in place: x.vals may have other users
                    else:
                        vals = m(x.vals.clone() if getattr(m, "inplace", False) else x.vals)
                else:
                    vals = self._plain(n, (x.vals, *args[1:]), kwargs)
                return Region(clean_out, vals, x.y, x.x)
            if kind == "gap":
                _, _, H, W = x.clean.shape
                h, w = x.hw
                inside = _clean_crop(x.clean, x.y, x.x, h, w)
                delta = (x.vals.double().sum((2, 3)) - inside.double().sum((2, 3))) / (H * W)
                pooled = (x.clean.double().mean((2, 3)) + delta).to(x.vals.dtype)
                shape = self.shapes[n]
                return Dense(pooled.reshape(pooled.shape[0], *shape[1:]))
            m = self.modules[n.target]
            if kind == "conv":
                fn = lambda c: F.conv2d(c, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)  # noqa: E731
                out = self._window_op(x, n, m.kernel_size, m.stride, _pair(m.padding), m.dilation, fn, 0.0)
                per_out = m.weight[0].numel()
                self.work[0] += out.vals.numel() * per_out
                self.work[1] += out.batch * math.prod(self.shapes[n][1:]) * per_out
                return out
            k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
            if isinstance(m, nn.MaxPool2d):
                d = _pair(m.dilation)
                fn = lambda c: F.max_pool2d(c, k, s, 0, d)  # noqa: E731
                return self._window_op(x, n, k, s, p, d, fn, -math.inf)
            fn = lambda c: F.avg_pool2d(c, k, s, 0)  # noqa: E731
            return self._window_op(x, n, k, s, p, (1, 1), fn, 0.0)
        if kind == "binary" and len(args) >= 2:
            a, b = args[0], args[1]
            fn = _INPLACE_FUNCTIONS.get(n.target, n.target) if n.op == "call_function" else None
            if fn is None:
                name = n.target.rstrip("_")
                fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[name]
            if isinstance(a, Region) and isinstance(b, Region) and a.clean.shape == b.clean.shape and not kwargs:
                y, xx, h, w = self._union([a, b])
                return Region(clean_out, fn(self.gather(a, y, xx, h, w), self.gather(b, y, xx, h, w)), y, xx)
            scalar = (int, float)
            if not kwargs and isinstance(a, Region) and isinstance(b, scalar):
                return Region(clean_out, fn(a.vals, b), a.y, a.x)
            if not kwargs and isinstance(b, Region) and isinstance(a, scalar):
                return Region(clean_out, fn(a, b.vals), b.y, b.x)
        if kind == "cat":
            parts = args[0] if args else kwargs.get("tensors")
            if all(isinstance(p, Region) for p in parts) and len({p.clean.shape[-2:] for p in parts}) == 1:
                y, xx, h, w = self._union(list(parts))
                return Region(clean_out, torch.cat([self.gather(p, y, xx, h, w) for p in parts], dim=1), y, xx)
        # anything else: make the activations whole and run the operation as usual
        args = _map(args, self.densify)
        kwargs = _map(kwargs, self.densify)
        out = self._plain(n, args, kwargs)
        if n.op == "call_module" and isinstance(self.modules[n.target], nn.Conv2d) and isinstance(out, torch.Tensor):
            w = out.numel() * self.modules[n.target].weight[0].numel()
            self.work[0] += w
            self.work[1] += w
        return Dense(out)

    def run(self, xin: Region) -> torch.Tensor:
        """Probabilities (B, C) for the windows of ``xin`` (a Region of the input)."""
        import torch.fx as fx

        env: dict[Any, Any] = {}
        live = 0
        self.peak_bytes = 0
        self.work = [0.0, 0.0]
        with torch.inference_mode():
            for i, n in enumerate(self.nodes):
                if n.op == "placeholder":
                    val = xin
                elif n.op == "get_attr":
                    val = _fetch_attr(self.gm, n.target)
                elif n.op == "output":
                    out = fx.node.map_arg(n.args[0], lambda a: env[a])
                    return self.densify(out)
                else:
                    args = fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                    val = self._exec(n, args, kwargs)
                env[n] = val
                live += _nbytes(val)
                self.peak_bytes = max(self.peak_bytes, live)
                for a in n.all_input_nodes:
                    if self.last_use.get(a) == i and a in env:
                        live -= _nbytes(env.pop(a))
        raise ConeUnsupported("the graph has no output")  # pragma: no cover


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _clean_crop(clean: torch.Tensor, y: np.ndarray, x: np.ndarray, h: int, w: int) -> torch.Tensor:
    rows = torch.from_numpy(y[:, None] + np.arange(h))
    cols = torch.from_numpy(x[:, None] + np.arange(w))
    return clean[0][:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)


def _nbytes(v) -> int:
    if isinstance(v, Region):
        return v.vals.numel() * v.vals.element_size()
    if isinstance(v, Dense):
        return v.t.numel() * v.t.element_size()
    return 0


def _flatten(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flatten(x)]
    return [obj]


def _map(obj, fn):
    if isinstance(obj, tuple):
        return tuple(_map(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_map(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def cone_occlusion(engine: ConeOcclusion, x: torch.Tensor, ref: torch.Tensor, target: int,
                   windows: list[tuple[int, int, int, int]], ph: int, pw: int, batch: int, memory_mb: int,
                   check: bool = True, max_work: float | None = None) -> np.ndarray:
    """Probability drops (len(windows),) for one image ``x`` (1, 1, H, W) with reference ``ref``.

    With ``max_work``, raise :class:`ConeUnsupported` after the first batch of windows when the cone's
    convolutions do more than that fraction of a full forward pass per window (the cone saves too little
    to pay for its bookkeeping: large patches, or a model that mixes space early)."""
    H, W = x.shape[-2:]
    p_clean = engine.prepare(x)[0, target].item()
    diffs = np.empty(len(windows), np.float64)
    start, chunk = 0, min(batch, 8)
    while start < len(windows):
        part = windows[start : start + chunk]
        ys = np.array([min(y0, H - ph) for y0, _, _, _ in part], dtype=np.int64)
        xs = np.array([min(x0, W - pw) for _, _, x0, _ in part], dtype=np.int64)
        rows = torch.from_numpy(ys[:, None] + np.arange(ph))
        cols = torch.from_numpy(xs[:, None] + np.arange(pw))
        xc = x[0][:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        rc = ref[0][:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        y0s = torch.tensor([w[0] for w in part])[:, None]
        y1s = torch.tensor([w[1] for w in part])[:, None]
        x0s = torch.tensor([w[2] for w in part])[:, None]
        x1s = torch.tensor([w[3] for w in part])[:, None]
        inside = ((rows >= y0s) & (rows < y1s))[:, :, None] & ((cols >= x0s) & (cols < x1s))[:, None, :]
        vals = torch.where(inside[:, None], rc, xc)
        probs = engine.run(Region(x, vals, ys, xs))
        diffs[start : start + len(part)] = (p_clean - probs[:, target].double()).numpy()
        if check and start == 0 and not engine.verified:  # spot check: the first window against a direct forward pass
            y0, y1, x0, x1 = part[0]
            xo = x.clone()
            xo[..., y0:y1, x0:x1] = ref[..., y0:y1, x0:x1]
            with torch.inference_mode():
                direct = engine.prob(xo)[0, target].item()
            if abs(direct - float(probs[0, target])) > 1e-4:
                raise ConeUnsupported(f"spot check failed (cone {float(probs[0, target]):.6f} vs direct {direct:.6f})")
            engine.verified = True
        if start == 0 and max_work is not None and engine.work[1] > 0 and engine.work[0] > max_work * engine.work[1]:
            raise ConeUnsupported(f"the cone needs {engine.work[0] / engine.work[1]:.0%} of a full forward pass per "
                                  f"window (more than {max_work:.0%})")
        if start == 0:  # size later batches from the memory the first one needed
            per_window = max(engine.peak_bytes / max(len(part), 1), 1) * 3
            chunk = batch_for_memory(per_window, memory_mb, batch)
        start += len(part)
    return diffs


# ---------------------------------------------------------------------------------------------------
class Occlusion(Explainer):
    name = "occlusion"
    kind = "attribution"
    signed = True
    unit = "drop in target probability"

    def __init__(self, patch=None, stride=None, fill="zero", batch=64, engine="auto", **_: Any):
        super().__init__(patch=patch, stride=stride, fill=fill, batch=batch, engine=engine)
        self.patch = int_option("occlusion", "patch", patch, 1, allow_none=True)
        self.stride = int_option("occlusion", "stride", stride, 1, allow_none=True)
        self.fill = choice_option("occlusion", "fill", fill, FILLS)
        self.batch = int_option("occlusion", "batch", batch, 1)
        self.engine = choice_option("occlusion", "engine", engine, ENGINES)
        self._cone: dict[int, tuple[Any, ConeOcclusion | str]] = {}
        self.last_engine: str | None = None
        self.fallback_reason: str | None = None
        self._costly: set[tuple[int, int, int]] = set()  # (model, patch) where the cone does not pay
        self._act_bytes: dict[tuple, int] = {}

    def window(self, shape_in: tuple[int, int], original: tuple[int, int] | None, ctx: ExplainContext):
        """(ph, pw, sh, sw) in model-input pixels and the patch / stride in original pixels."""
        h_in, w_in = shape_in
        oh, ow = original or shape_in
        patch = self.patch if self.patch is not None else max(1, round(min(oh, ow) / 8))
        stride = self.stride if self.stride is not None else max(1, patch // 2)
        if patch > min(oh, ow):
            raise UsageError(f"occlusion patch {patch} px is larger than the image ({ow} x {oh} px)")
        if stride > patch:
            raise UsageError(f"occlusion stride {stride} px is larger than the patch {patch} px (pixels would be skipped)")
        if original is None:
            sy = sx = 1.0
        else:
            g = geometry(original, ctx.preprocessing)
            sy, sx = g["scale_y"], g["scale_x"]
        ph, pw = min(h_in, max(1, round(patch * sy))), min(w_in, max(1, round(patch * sx)))
        sh, sw = max(1, min(ph, round(stride * sy))), max(1, min(pw, round(stride * sx)))
        return (ph, pw, sh, sw), (patch, stride)

    def _engine(self, model) -> ConeOcclusion | None:
        if self.engine == "captum":
            return None
        owner, got = self._cone.get(id(model), (None, None))
        if owner is not model:
            try:
                got = ConeOcclusion(model)
            except ConeUnsupported as exc:
                got = str(exc)
            while len(self._cone) >= 2:  # keep the last models only (randomised copies come and go)
                self._cone.pop(next(iter(self._cone)))
            self._cone[id(model)] = (model, got)
        if isinstance(got, str):
            if self.engine == "cone":
                raise UsageError(f"occlusion engine=cone: {got}; use engine=captum")
            return None
        return got

    def attribute(self, x: torch.Tensor, target: torch.Tensor, ctx: ExplainContext) -> Attribution:
        model = ctx.model
        model.eval()
        (ph, pw, sh, sw), (patch, stride) = self.window(tuple(x.shape[-2:]), ctx.original_shape, ctx)
        ref = reference(x, self.fill, ctx.preprocessing)
        H, W = x.shape[-2:]
        windows = window_grid(H, W, ph, pw, sh, sw)
        maps, engines, seconds = [], [], []
        for i in range(len(x)):
            t0 = time.perf_counter()
            xi, ri, ti = x[i : i + 1], ref[i : i + 1], int(target[i])
            amap, used = None, "captum"
            cone = self._engine(model)
            key = (id(model), ph, pw)
            if cone is not None and self.engine == "auto" and self._cache_mib(model, xi) > ctx.memory_mb:
                self.fallback_reason = (f"the cone's cache of clean activations would need about "
                                        f"{self._cache_mib(model, xi):.0f} MiB (> --memory-mb {ctx.memory_mb})")
                cone = None
            if cone is not None and key not in self._costly:
                try:
                    diffs = cone_occlusion(cone, xi, ri, ti, windows, ph, pw, self.batch, ctx.memory_mb,
                                           max_work=MAX_WORK if self.engine == "auto" else None)
                    amap, used = accumulate(diffs, windows, H, W), "cone"
                except ConeUnsupported as exc:
                    if str(exc).startswith("the cone needs"):  # too little saved for this window size
                        self._costly.add(key)
                    else:  # a structural failure: never again for this model
                        self._cone[id(model)] = (model, str(exc))
                    self.fallback_reason = str(exc)
                    if self.engine == "cone":
                        raise UsageError(f"occlusion engine=cone: {exc}; use engine=captum") from None
            if amap is None:
                amap = self.captum_map(model, xi, ri, ti, ph, pw, sh, sw, ctx.memory_mb)
            maps.append(amap)
            engines.append(used)
            seconds.append(time.perf_counter() - t0)
            if ctx.progress:
                ctx.progress(1)
        self.last_engine = engines[-1] if engines else None
        n_win = len(windows)
        return Attribution(np.stack(maps).astype(np.float32), {
            "engine": engines, "windows": [n_win] * len(x), "seconds": seconds,
            "window_input_px": [[ph, pw, sh, sw]] * len(x), "patch_original_px": [patch] * len(x),
            "stride_original_px": [stride] * len(x),
            **({"cone_skipped": [self.fallback_reason] * len(x)} if "captum" in engines and self.fallback_reason else {}),
        })

    def _cache_mib(self, model, x: torch.Tensor) -> float:
        """What the cone keeps per image: every activation once plus a padded channels-last copy (upper bound)."""
        key = (id(model), tuple(x.shape[-2:]))
        if key not in self._act_bytes:
            self._act_bytes[key] = activation_bytes(model, x)
        return 2 * self._act_bytes[key] / 2**20

    def captum_map(self, model, x, ref, target: int, ph: int, pw: int, sh: int, sw: int, memory_mb: int,
                   perturbations_per_eval: int | None = None) -> np.ndarray:
        """captum's Occlusion on softmax(model(x)) for one image, windows batched to fit ``memory_mb``."""
        from captum.attr import Occlusion as CaptumOcclusion

        prob = probability_model(model)
        if perturbations_per_eval is None:
            key = (id(model), tuple(x.shape[-2:]))
            if key not in self._act_bytes:
                self._act_bytes[key] = activation_bytes(model, x)
            perturbations_per_eval = batch_for_memory(self._act_bytes[key] * 1.5, memory_mb, self.batch)
        ppe = perturbations_per_eval
        with torch.no_grad():
            attr = CaptumOcclusion(prob).attribute(
                x, sliding_window_shapes=(1, ph, pw), strides=(1, sh, sw), baselines=ref, target=target,
                perturbations_per_eval=ppe)
        return attr[0, 0].float().numpy()
