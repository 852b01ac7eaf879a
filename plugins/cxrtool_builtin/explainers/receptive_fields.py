"""``receptive-fields``: the dataset crops that drive chosen filters of a conv layer most.

For each chosen filter (output channel) of a convolutional layer the explainer streams over a set of
images, keeps a running top-k of (image, spatial position) by activation — one position per image,
the image's spatial maximum, so the k crops come from k different images — and crops the region of
the preprocessed input that the winning unit sees: its receptive field, computed from the layer
geometry (:func:`receptive_field`). One grid PNG per filter, plus a JSON-ready summary.

Receptive fields are computed analytically by propagating ``(size, stride, offset)`` along the
tensors the forward pass actually produces (forward hooks on the leaf modules, in execution order):
convolutions and pooling grow the field, element-wise modules (BN, activations, dropout) keep it.
A residual block is followed along its main path — torchvision's ``out += identity`` adds the
shortcut in place onto the main path's tensor — and where a tensor comes out of a functional op that
no module hook saw (``torch.cat`` in DenseNet, an out-of-place ``out + identity``) the widest field
among the tensors of the same spatial size seen so far is used (the union of the branches).
:func:`empirical_receptive_field` measures the same thing by back-propagating one unit of a
linearised, all-positive copy of the model and taking the support of the input gradient; the tests
check that the two agree. Should a model contain a module whose geometry is unknown, the empirical
measurement is used instead (``"method": "empirical"`` in the result).

Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrtool.errors import DataError, UsageError
from cxrtool.explain import ExplainContext, Explainer, ExplainerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from cxrtool.data import ImageSet

DEFAULTS: dict[str, Any] = {"filters": "0-7", "top_k": 9, "n_top_filters": 8}

#: modules that keep the spatial geometry of their input (checked by the output size as well)
_GLOBAL = "global"
_UNKNOWN = "unknown"


# -- options --------------------------------------------------------------------------------------
def coerce_options(name: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Options merged over ``defaults``, values given as text (``KEY=VALUE`` on a command line)
    converted to the type of the default; unknown keys and unparsable values are usage errors."""
    unknown = set(options) - set(defaults)
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
        raise UsageError(f"explainer {name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    out = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                else:
                    value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(value)
            elif default is None and isinstance(value, str) and value.strip().lower() in ("", "none"):
                value = None
        except (TypeError, ValueError):
            raise UsageError(f"explainer {name!r}: option {key}={value!r} is not a valid "
                             f"{type(default).__name__}") from None
        out[key] = value
    return out


def parse_filters(text: Any, n_channels: int) -> list[int] | None:
    """``"0-7"``, ``"3,5,9"``, ``"0-3,10"``, an int or a list -> channel indices; ``"top"`` -> None.

    Indices must be ``< n_channels`` (a usage error naming the layer's channel count otherwise).
    """
    if isinstance(text, str) and text.strip().lower() in ("top", "auto"):
        return None
    items: list[int] = []
    if isinstance(text, int):
        items = [text]
    elif isinstance(text, (list, tuple)):
        items = [int(v) for v in text]
    else:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise UsageError(f"receptive-fields: filters={text!r}: expected indices and ranges like "
                                 "'0-7' or '3,5,9', or 'top'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise UsageError(f"receptive-fields: filters={text!r}: range {part} runs backwards")
            items.extend(range(lo, hi + 1))
    if not items:
        raise UsageError(f"receptive-fields: filters={text!r} names no filter")
    bad = [i for i in items if not 0 <= i < n_channels]
    if bad:
        raise UsageError(f"receptive-fields: filter {bad[0]} does not exist; the layer has {n_channels} "
                         f"filters (0-{n_channels - 1})")
    return list(dict.fromkeys(items))


# -- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geom:
    """Receptive field of every unit of a spatial tensor, per axis (y, x).

    ``size``: field size in input pixels; ``jump``: input pixels between neighbouring units;
    ``start``: input coordinate of the centre of unit 0 (pixel centres at integer coordinates).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    shape: tuple[int, int]

    def after(self, kernel, stride, padding, dilation, shape) -> _Geom:
        size, jump, start = [], [], []
        for a in range(2):
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            size.append(self.size[a] + (k_eff - 1) * self.jump[a])
            start.append(self.start[a] + ((k_eff - 1) / 2 - padding[a]) * self.jump[a])
            jump.append(self.jump[a] * stride[a])
        return _Geom(tuple(size), tuple(jump), tuple(start), shape)

    def padding(self) -> tuple[int, int]:
        return tuple(int(round((s - 1) / 2 - st)) for s, st in zip(self.size, self.start))


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _module_geometry(module: nn.Module, g_in: _Geom, in_shape, out_shape) -> _Geom | str:
    """Geometry of ``module``'s output from its input's (``_GLOBAL`` / ``_UNKNOWN`` when none)."""
    from torch import nn

    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)):
        kernel = _pair(module.kernel_size)
        stride = _pair(getattr(module, "stride", None) or module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        pad = getattr(module, "padding", 0)
        if pad == "valid":
            padding = (0, 0)
        elif pad == "same":
            padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
        else:
            padding = _pair(pad)
        return g_in.after(kernel, stride, padding, dilation, out_shape)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        left, _right, top, _bottom = module.padding if len(module.padding) == 4 else (module.padding,) * 4
        return g_in.after((1, 1), (1, 1), (top, left), (1, 1), out_shape)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and tuple(out_shape) == (1, 1):
        return _GLOBAL  # (even when its input happens to be 1 x 1 already)
    if tuple(in_shape) == tuple(out_shape):
        return _Geom(g_in.size, g_in.jump, g_in.start, out_shape)  # element-wise: BN, ReLU, dropout ...
    return _UNKNOWN


def _first_tensor(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        for item in obj.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own train / eval flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _param_like(model: nn.Module):
    import torch

    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _input_hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, (tuple, list)):
        return int(input_size[0]), int(input_size[-1])
    return int(input_size), int(input_size)


def _probe(model: nn.Module, input_size) -> dict[str, dict[str, Any]]:
    """One forward pass of a 1-image zero input through ``model`` (eval mode, restored afterwards):
    for every named module (its first call), the output shape and the geometry of its output."""
    import torch

    h, w = _input_hw(input_size)
    device, dtype = _param_like(model)
    geoms: dict[int, _Geom | str] = {}
    keep: list = []  # keep every tensor alive so ids stay unique during the pass
    known: list[_Geom] = []
    info: dict[str, dict[str, Any]] = {}
    names: dict = {}

    def start(on) -> Any:
        info.clear()
        geoms.clear()
        x = torch.zeros(1, _in_channels(model), h, w, device=on, dtype=dtype)
        keep[:] = [x]
        known[:] = [_Geom((1, 1), (1, 1), (0.0, 0.0), (h, w))]
        geoms[id(x)] = known[0]
        return x

    def lookup(t) -> _Geom | str:
        if t is None:
            return _UNKNOWN
        if id(t) in geoms:
            return geoms[id(t)]
        if t.ndim != 4:
            return _GLOBAL
        same = [g for g in known if g.shape == tuple(t.shape[-2:])]
        return max(same, key=lambda g: g.size[0] * g.size[1]) if same else _UNKNOWN

    def hook(module, inputs, output):
        out = _first_tensor(output)
        leaf = not any(True for _ in module.children())
        if out is None:
            geom: _Geom | str = _GLOBAL
        elif leaf:
            t_in = _first_tensor(inputs)
            g_in = lookup(t_in)
            if out.ndim != 4:
                geom = _GLOBAL
            elif not isinstance(g_in, _Geom):
                geom = g_in
            elif t_in is None or t_in.ndim != 4:
                geom = _UNKNOWN
            else:
                geom = _module_geometry(module, g_in, tuple(t_in.shape[-2:]), tuple(out.shape[-2:]))
        else:
            geom = lookup(out) if out.ndim == 4 else _GLOBAL
        if out is not None:
            keep.append(out)
            geoms[id(out)] = geom
            if isinstance(geom, _Geom):
                known.append(geom)
        name = names.get(module)
        if name and name not in info:
            info[name] = {"shape": None if out is None else tuple(out.shape), "geom": geom}

    # (a copy on the meta device would skip the arithmetic, but the first meta forward pass imports
    # torch's meta kernels, which costs far more than a 1-image pass)
    names.update({m: n for n, m in model.named_modules()})
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            model(start(device))
    finally:
        for handle in handles:
            handle.remove()
    return info


def _in_channels(model: nn.Module) -> int:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 1


def conv_layer_names(model: nn.Module, input_size=64) -> list[str]:
    """Named modules whose output is a spatial map with a known receptive field, in forward order."""
    info = _probe(model, input_size)
    return [n for n, i in info.items() if isinstance(i["geom"], _Geom)
            or (i["geom"] == _UNKNOWN and i["shape"] is not None and len(i["shape"]) == 4)]


def _describe_conv_layers(names: list[str], limit: int = 24) -> str:
    shallow = [n for n in names if n.count(".") == 0] + [n for n in names if n.count(".") == 1]
    shown = shallow[:limit] if shallow else names[:limit]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (and {more} nested ones; see `cxrtool layers`)" if more > 0 else "")


def _result(layer: str, geom: _Geom, input_size, shape, method: str) -> dict[str, Any]:
    def scalar(pair):
        return pair[0] if pair[0] == pair[1] else list(pair)

    pad = geom.padding()
    return {
        "layer": layer,
        "size": scalar(geom.size),
        "stride": scalar(geom.jump),
        "padding": scalar(pad),
        "offset": scalar(tuple(float(s) for s in geom.start)),
        "size_yx": list(geom.size),
        "stride_yx": list(geom.jump),
        "padding_yx": list(pad),
        "offset_yx": [float(s) for s in geom.start],
        "input_size": list(_input_hw(input_size)),
        "output_size": [int(s) for s in shape[-2:]],
        "channels": int(shape[1]),
        "method": method,
    }


def receptive_field(model: nn.Module, layer_name: str, input_size=224) -> dict[str, Any]:
    """Receptive field of the units of ``layer_name`` (its output; first call if it runs twice).

    Returns ``size`` (input pixels seen by one unit), ``stride`` (input pixels between neighbouring
    units), ``padding`` (unit ``i`` sees input pixels ``i * stride - padding`` ...
    ``i * stride - padding + size - 1``, before clipping to the image), ``offset`` (input coordinate
    of the centre of unit 0); each an int, or ``[y, x]`` when the two axes differ (the ``*_yx`` keys
    always hold ``[y, x]``). Also ``output_size`` ``[h, w]`` and ``channels`` of the layer at ``input_size``,
    ``method`` (``"analytic"``, or ``"empirical"`` when a module of unknown geometry forced the
    gradient measurement). A non-convolutional layer (no spatial output, or after global pooling)
    is a :class:`~cxrtool.errors.UsageError` that names the convolutional ones.

    Does not change ``model`` (one forward pass of a zero image, hooks removed afterwards).
    """
    from cxrtool.models import get_submodule

    get_submodule(model, layer_name)  # unknown layer: usage error
    info = _probe(model, input_size)
    item = info.get(layer_name)
    if item is None:
        raise UsageError(f"layer {layer_name!r} is not used in the model's forward pass")
    geom = item["geom"]
    shape = item["shape"]
    if isinstance(geom, _Geom):
        return _result(layer_name, geom, input_size, shape, "analytic")
    if geom == _UNKNOWN and shape is not None and len(shape) == 4:
        emp = empirical_receptive_field(model, layer_name, input_size)
        g = _Geom(tuple(emp["size_yx"]), tuple(emp["stride_yx"]), tuple(emp["offset_yx"]), tuple(shape[-2:]))
        return _result(layer_name, g, input_size, shape, "empirical")
    valid = [n for n, i in info.items() if isinstance(i["geom"], _Geom)]
    what = "no spatial output" if shape is None or len(shape) != 4 else "output after global pooling"
    raise UsageError(f"layer {layer_name!r} is not convolutional ({what}, shape {list(shape or [])}); "
                     f"convolutional layers: {_describe_conv_layers(valid)}")


def all_receptive_fields(model: nn.Module, input_size=224) -> dict[str, dict[str, Any]]:
    """:func:`receptive_field` of every named module with a spatial output, from one forward pass,
    in forward order (modules of unknown geometry are left out: ask :func:`receptive_field`)."""
    info = _probe(model, input_size)
    return {n: _result(n, i["geom"], input_size, i["shape"], "analytic")
            for n, i in info.items() if isinstance(i["geom"], _Geom)}


def unit_box(rf: dict[str, Any], y: int, x: int, input_size=None) -> tuple[int, int, int, int]:
    """Input pixels ``(y0, y1, x0, x1)`` (half-open) seen by unit ``(y, x)`` of a :func:`receptive_field`,
    clipped to the image when ``input_size`` is given (default: the size ``rf`` was computed for)."""
    (sy, sx), (jy, jx), (py, px) = rf["size_yx"], rf["stride_yx"], rf["padding_yx"]
    y0, x0 = y * jy - py, x * jx - px
    y1, x1 = y0 + sy, x0 + sx
    h, w = _input_hw(input_size if input_size is not None else rf["input_size"])
    return max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)


# -- empirical receptive field --------------------------------------------------------------------
_ELEMENTWISE = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
                "Hardswish", "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Dropout",
                "Dropout2d", "AlphaDropout")


class _MeanConv:
    """Factory for the channel-collapsed stand-in of a Conv2d (see :func:`_linearised`)."""

    @staticmethod
    def make(conv):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class MeanConv(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                kh, kw = conv.kernel_size
                self.register_buffer("weight", torch.full((1, 1, kh, kw), 1.0 / (kh * kw)))
                self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
                self.padding_mode = conv.padding_mode

            def forward(self, x):
                x = x.mean(1, keepdim=True)
                if self.padding_mode != "zeros" and not isinstance(self.padding, str):
                    ph, pw = self.padding
                    x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
                    return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation)
                return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation)

        return MeanConv()


def _linearised(model: nn.Module, collapse: bool = True) -> nn.Module:
    """A copy of ``model`` that is linear with positive weights: convs average their inputs (weight
    ``1 / fan_in``, no bias), normalisation and activations become identities, max pooling becomes
    average pooling of the same geometry — so every input pixel a unit is wired to gets a positive
    gradient and every other pixel a zero one. With ``collapse`` every conv also averages over its
    input channels and outputs one channel (the support does not depend on the width; this makes the
    measurement hundreds of times cheaper)."""
    import copy

    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    if collapse:  # every weight-bearing module before the layer is replaced: do not copy the weights
        for t in [*model.parameters(), *model.buffers()]:
            placeholder = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(placeholder, requires_grad=False) if isinstance(t, nn.Parameter) else placeholder
    clone = copy.deepcopy(model, memo).float().eval()

    def replace(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = None
            if isinstance(child, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                new = nn.Identity()
            elif type(child).__name__ in _ELEMENTWISE:
                new = nn.Identity()
            elif isinstance(child, nn.MaxPool2d) and _pair(child.dilation) == (1, 1):
                new = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode,
                                   count_include_pad=True)
            elif collapse and isinstance(child, nn.Conv2d):
                new = _MeanConv.make(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                replace(child)

    replace(clone)
    with torch.no_grad():
        for m in clone.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / (m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def empirical_receptive_field(model: nn.Module, layer_name: str, input_size=224,
                              unit: tuple[int, int] | None = None) -> dict[str, Any]:
    """Measure the receptive field of one unit of ``layer_name`` (default the centre unit) as the
    non-zero support of the input gradient of a linearised, all-positive copy of the model (so no
    ReLU or max-pool switch hides part of it) on a constant image.

    Returns ``box`` ``[y0, y1, x0, x1]`` (half-open, clipped to the image), ``size_yx`` (the box's
    extent), ``unit`` ``[y, x]``, ``output_size``, and ``stride_yx`` / ``offset_yx`` estimated from the
    neighbouring unit when there is one (exact only where neither box is clipped).
    """
    import torch

    from cxrtool.models import get_submodule

    get_submodule(model, layer_name)  # unknown layer: usage error
    h, w = _input_hw(input_size)
    in_channels = _in_channels(model)

    class _Stop(Exception):
        pass

    def measure(lin, u: tuple[int, int] | None):
        captured: list = []

        def hook(_m, _i, output):
            if not captured:
                captured.append(_first_tensor(output))
                raise _Stop

        x = torch.ones(1, in_channels, h, w, requires_grad=True)
        handle = lin.get_submodule(layer_name).register_forward_hook(hook)
        try:
            lin(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        out = captured[0] if captured else None
        if out is None or out.ndim != 4:
            raise UsageError(f"layer {layer_name!r} has no spatial output")
        oh, ow = out.shape[-2:]
        u = u if u is not None else (oh // 2, ow // 2)
        out[0, :, u[0], u[1]].sum().backward()
        g = x.grad[0].abs().sum(0)
        ys, xs = torch.nonzero(g > 0, as_tuple=True)
        if len(ys) == 0:
            raise UsageError(f"layer {layer_name!r}: unit {list(u)} does not depend on the input")
        return (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1), u, (int(oh), int(ow))

    try:
        lin = _linearised(model, collapse=True)
        box, u, (oh, ow) = measure(lin, unit)
    except (RuntimeError, ValueError, NotImplementedError):  # a module that needs its channels / weights
        lin = _linearised(model, collapse=False)
        box, u, (oh, ow) = measure(lin, unit)
    y0, y1, x0, x1 = box
    result: dict[str, Any] = {"layer": layer_name, "unit": list(u), "box": [y0, y1, x0, x1],
                              "size_yx": [y1 - y0, x1 - x0], "output_size": [oh, ow]}
    # stride / offset from the next unit along each axis (valid when neither field is clipped)
    stride = [1, 1]
    if u[0] + 1 < oh and u[1] + 1 < ow:
        nb, _, _ = measure(lin, (u[0] + 1, u[1] + 1))
        stride = [nb[0] - y0, nb[2] - x0]
    result["stride_yx"] = stride
    result["offset_yx"] = [(y0 + y1 - 1) / 2 - u[0] * stride[0], (x0 + x1 - 1) / 2 - u[1] * stride[1]]
    return result


# -- top-k search ---------------------------------------------------------------------------------
class _TopK:
    """Running top-k of (activation, image index, y, x) per channel; never more than k + batch rows."""

    def __init__(self, n_channels: int, k: int):
        import torch

        self.k = k
        self.vals = torch.full((n_channels, 0), -math.inf)
        self.img = torch.zeros((n_channels, 0), dtype=torch.long)
        self.pos = torch.zeros((n_channels, 0), dtype=torch.long)

    def update(self, act, image_index):
        """``act``: (N, C, h, w) activations of N images; ``image_index``: (N,) dataset indices."""
        import torch

        n, c = act.shape[:2]
        flat = act.detach().float().cpu().reshape(n, c, -1)
        best, where = flat.max(-1)  # (N, C): each image's spatial maximum per channel
        vals = torch.cat([self.vals, best.t()], 1)
        img = torch.cat([self.img, image_index.view(1, n).expand(c, n)], 1)
        pos = torch.cat([self.pos, where.t()], 1)
        kk = min(self.k, vals.shape[1])
        # stable order: activation descending, ties by dataset index
        order = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :kk]
        self.vals, self.img, self.pos = (t.gather(1, order) for t in (vals, img, pos))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


def _display_name(path: str) -> str:
    if path.startswith("npz://"):
        return path.rsplit("#", 1)[-1]
    return Path(path).name


def _render_grid(crops: list[dict[str, Any]], title: str, path: Path, rf_size: tuple[int, int]) -> Path:
    """Top-k crops in a grid, each on a tile of the full receptive-field size (the part outside the
    image, where the field was clipped, shown as hatched blue), labelled with image name and
    activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrtool.io import save_figure

    n = max(len(crops), 1)
    cols = min(n, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.35 * rows + 0.4), squeeze=False)
    sy, sx = rf_size
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for ax, crop in zip(axes.ravel(), crops):
        fy0, fx0 = crop["field"][0], crop["field"][2]  # unclipped top-left in image coordinates
        y0, y1, x0, x1 = crop["box"]
        ax.set_facecolor("#9ec5e8")
        ax.add_patch(matplotlib.patches.Rectangle((-0.5, -0.5), sx, sy, fill=False, hatch="///",
                                                  edgecolor="#5b8db8", linewidth=0))
        ax.imshow(crop["pixels"], cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                  extent=(x0 - fx0 - 0.5, x1 - fx0 - 0.5, y1 - fy0 - 0.5, y0 - fy0 - 0.5), zorder=2)
        ax.set_xlim(-0.5, sx - 0.5)
        ax.set_ylim(sy - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{crop['name']}\nact {crop['activation']:.3g}", fontsize=7)
    if not crops:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


class ReceptiveFieldExplainer(Explainer):
    """Dataset crops of the receptive fields where chosen filters of a conv layer respond most."""

    name = "receptive-fields"
    kind = "dataset"

    def __init__(self, **options: Any) -> None:
        opts = coerce_options(self.name, DEFAULTS, options)
        if opts["top_k"] < 1:
            raise UsageError(f"receptive-fields: top_k must be at least 1, got {opts['top_k']}")
        if opts["n_top_filters"] < 1:
            raise UsageError(f"receptive-fields: n_top_filters must be at least 1, got {opts['n_top_filters']}")
        super().__init__(**opts)

    def run_dataset(self, ds: ImageSet, ctx: ExplainContext, out_dir: Path) -> dict[str, Any]:
        import torch

        from cxrtool.data import iter_batches
        from cxrtool.imaging import to_tensor
        from cxrtool.models import get_submodule

        layer = ctx.layer or ctx.default_layer
        if not layer:
            raise UsageError("receptive-fields needs a layer (--layer); see `cxrtool layers`")
        model = ctx.model
        module = get_submodule(model, layer)
        size = ctx.preprocessing.size
        rf = receptive_field(model, layer, size)  # usage error for non-conv layers
        if len(ds) == 0:
            raise DataError("receptive-fields: no images to look at")
        n_channels = int(rf["channels"])
        chosen = parse_filters(self.options["filters"], n_channels)
        k = int(self.options["top_k"])
        topk = _TopK(n_channels, k)

        captured: list = []

        class _Stop(Exception):
            pass

        def hook(_m, _i, output):
            if not captured:
                captured.append(_first_tensor(output))
                raise _Stop  # nothing after the layer is needed

        handle = module.register_forward_hook(hook)
        failed: list[dict[str, str]] = []
        n_seen = 0
        try:
            with eval_mode(model), torch.inference_mode():
                for batch, idx, bad in iter_batches(ds, ctx.preprocessing, max(1, int(ctx.batch_size))):
                    failed.extend({"path": ds.paths[i], "error": e} for i, e in bad)
                    if len(idx):
                        captured.clear()
                        try:
                            model(to_tensor(batch, ctx.preprocessing, ctx.device))
                        except _Stop:
                            pass
                        topk.update(captured[0], torch.as_tensor(idx, dtype=torch.long))
                        n_seen += len(idx)
                    if ctx.progress is not None:
                        ctx.progress(len(idx) + len(bad))
        finally:
            handle.remove()
        if n_seen == 0:
            raise DataError(f"receptive-fields: none of the {len(ds)} image(s) could be read "
                            f"(first error: {failed[0]['error'] if failed else 'none'})")

        if chosen is None:  # the most active filters: highest top-1 activation over the data
            n_top = min(int(self.options["n_top_filters"]), n_channels)
            chosen = [int(c) for c in torch.argsort(-topk.vals[:, 0], stable=True)[:n_top]]

        # re-read only the images that made it into some filter's top-k
        needed = sorted({int(i) for c in chosen for i in topk.img[c].tolist()})
        pixels: dict[int, np.ndarray] = {}
        sub = ds.subset(needed)
        for batch, idx, _bad in iter_batches(sub, ctx.preprocessing, max(1, int(ctx.batch_size))):
            for row, j in enumerate(idx):
                pixels[needed[j]] = batch[row]

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        oh, ow = rf["output_size"]
        sy, sx = rf["size_yx"]
        filters_out = []
        for c in chosen:
            crops = []
            for val, img_i, pos in zip(topk.vals[c].tolist(), topk.img[c].tolist(), topk.pos[c].tolist()):
                if not math.isfinite(val) or img_i not in pixels:
                    continue
                uy, ux = divmod(int(pos), ow)
                fy0 = uy * rf["stride_yx"][0] - rf["padding_yx"][0]
                fx0 = ux * rf["stride_yx"][1] - rf["padding_yx"][1]
                y0, y1, x0, x1 = unit_box(rf, uy, ux, size)
                crops.append({
                    "path": ds.paths[img_i],
                    "name": _display_name(ds.paths[img_i]),
                    "x": fx0 + (sx - 1) / 2,
                    "y": fy0 + (sy - 1) / 2,
                    "unit_x": ux,
                    "unit_y": uy,
                    "activation": float(val),
                    "box": [y0, y1, x0, x1],
                    "field": [fy0, fy0 + sy, fx0, fx0 + sx],
                    "pixels": pixels[img_i][y0:y1, x0:x1],
                })
            grid = out_dir / f"rf_{_slug(layer)}_filter{c:04d}.png"
            _render_grid(crops, f"{layer} filter {c} — receptive field {rf['size']} px, top {len(crops)}",
                         grid, (sy, sx))
            filters_out.append({
                "filter": c,
                "layer": layer,
                "rf_size": rf["size"],
                "grid": str(grid),
                "top": [{k2: v for k2, v in cr.items() if k2 not in ("pixels", "name", "field")} for cr in crops],
            })
        return {
            "method": self.name,
            "layer": layer,
            "options": dict(self.options),
            "receptive_field": rf,
            "input_size": size,
            "n_images": n_seen,
            "skipped": failed,
            "filters": filters_out,
            "coordinates": "model-input pixels of the preprocessed image; x, y = centre of the unit's "
                           "receptive field (may lie outside the image near its border); box = "
                           "[y0, y1, x0, x1] half-open, clipped to the image",
        }


def build(**options: Any) -> ReceptiveFieldExplainer:
    return ReceptiveFieldExplainer(**options)


SPEC = ExplainerSpec(
    name="receptive-fields",
    build=build,
    description="Dataset crops (receptive fields) where chosen filters of a conv layer respond most; a grid PNG per filter",
    options=dict(DEFAULTS),
    kind="dataset",
    reference="Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks; "
              "Araujo et al. 2019, Computing Receptive Fields of Convolutional Neural Networks (Distill)",
)
