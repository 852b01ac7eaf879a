"""``input-synthesis``: activation maximisation — the input a class, a filter or a unit likes most.

A greyscale input is optimised (Adam, in the preprocessing's normalised space, clamped after each
step so that it stays a valid image: ``[0, 1]`` after denormalisation) to maximise one target:

* a **class** logit — target = a class name of the model (``LESION``), or its index when no layer
  is chosen;
* a **channel** of a layer — ``LAYER:C`` (``stage3:12``): the mean of the channel's activation map;
  with ``--layer LAYER`` a bare ``C`` means the same;
* a **unit** — ``LAYER:C:Y:X``: channel ``C`` at position ``(Y, X)`` of the layer's output.

It starts from seeded noise around the mean grey, or from a given image (``start``). Regularisers
keep the result looking like structure rather than adversarial noise: random ``jitter`` (a roll of up
to that many pixels each step), a Gaussian blur every ``blur_every`` steps, an ``l2`` pull (towards
mean grey from noise, towards the start image from an image) and a ``tv`` (total variation) weight.
With ``octaves > 1`` the optimisation runs coarse to fine: first at ``size / 2**(octaves-1)``,
each octave upsampled as the start of the next, so the large-scale layout is settled before
the detail.

The same seed gives the same images. Importing this module does not import torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrtool.errors import UsageError
from cxrtool.explain import ExplainContext, Explainer, ExplainerSpec
from cxrtool_builtin.explainers.receptive_fields import coerce_options, eval_mode

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULTS: dict[str, Any] = {
    "steps": 256,
    "lr": 0.05,
    "jitter": 4,
    "blur_every": 4,
    "blur_sigma": 0.5,
    "l2": 0.01,
    "tv": 0.1,
    "octaves": 3,
    "noise": 0.05,
    "seed": None,
}


@dataclass(frozen=True)
class Target:
    """One thing to maximise: a class logit (``layer`` None) or a channel / unit of ``layer``."""

    text: str
    kind: str  # "class", "channel" or "unit"
    index: int  # class index or channel
    layer: str | None = None
    unit: tuple[int, int] | None = None

    def to_dict(self, class_names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.text, "kind": self.kind}
        if self.kind == "class":
            out["class"] = class_names[self.index]
            out["class_index"] = self.index
        else:
            out.update(layer=self.layer, channel=self.index)
            if self.unit is not None:
                out["unit"] = list(self.unit)
        return out


def parse_target(target: Any, class_names: list[str], layer: str | None = None) -> Target:
    """A class name / index, ``LAYER:C``, ``LAYER:C:Y:X``, or (with ``layer``) a bare channel ``C``."""
    text = str(target).strip()
    if text in class_names:
        return Target(text, "class", class_names.index(text))
    if ":" in text:
        parts = text.split(":")
        name, nums = parts[0], parts[1:]
        if not name or len(nums) not in (1, 3) or not all(re.fullmatch(r"\d+", p) for p in nums):
            raise UsageError(f"input-synthesis: target {text!r}: expected a class ({', '.join(class_names)}), "
                             "LAYER:CHANNEL (e.g. layer3:12) or LAYER:CHANNEL:Y:X")
        if len(nums) == 1:
            return Target(text, "channel", int(nums[0]), name)
        return Target(text, "unit", int(nums[0]), name, (int(nums[1]), int(nums[2])))
    if re.fullmatch(r"\d+", text):
        if layer:
            return Target(f"{layer}:{text}", "channel", int(text), layer)
        if int(text) < len(class_names):
            return Target(class_names[int(text)], "class", int(text))
    raise UsageError(f"input-synthesis: unknown target {text!r}; the model's classes are "
                     f"{', '.join(class_names)}; for a filter use LAYER:CHANNEL (e.g. layer3:12)")


def _gaussian_kernel(sigma: float, device, dtype):
    import torch

    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum(), radius


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflected borders."""
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    k, r = _gaussian_kernel(sigma, x.device, x.dtype)
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    k = k[len(k) // 2 - r: len(k) // 2 + r + 1]
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of absolute differences of neighbouring pixels, per image: (N,)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dy + dx


class _Objective:
    """Activations of a group of targets that share a layer (or the logits), one per image."""

    def __init__(self, model, targets: list[Target], layer: str | None):
        self.model, self.targets, self.layer = model, targets, layer
        self.module = None if layer is None else model.get_submodule(layer)
        # a single unit sees one place: shifting the image under it would fight the optimisation
        self.jitter = not any(t.unit is not None for t in targets)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(activation per image, logits or None)."""
        import torch

        from cxrtool_builtin.explainers.receptive_fields import _first_tensor

        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        if self.module is None:
            logits = self.model(x)
            idx = torch.as_tensor([t.index for t in self.targets], device=x.device)
            return logits[rows, idx], logits
        captured: list = []

        class _Stop(Exception):
            pass

        def hook(_m, _i, output):
            if not captured:
                captured.append(_first_tensor(output))
                raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        act = captured[0]
        ch = torch.as_tensor([t.index for t in self.targets], device=x.device)
        maps = act[rows, ch]  # (N, h, w)
        out = []
        for i, t in enumerate(self.targets):
            out.append(maps[i].mean() if t.unit is None else maps[i, t.unit[0], t.unit[1]])
        return torch.stack(out), None


def _check_layer_targets(model, targets: list[Target], size: int) -> None:
    """Unknown layers, non-spatial layers, channels or units out of range: usage errors."""
    from cxrtool.models import get_submodule
    from cxrtool_builtin.explainers.receptive_fields import _probe

    layers = sorted({t.layer for t in targets if t.layer is not None})
    if not layers:
        return
    for name in layers:
        get_submodule(model, name)
    info = _probe(model, size)
    for t in targets:
        if t.layer is None:
            continue
        shape = (info.get(t.layer) or {}).get("shape")
        if shape is None or len(shape) < 2:
            raise UsageError(f"input-synthesis: layer {t.layer!r} has no channels to maximise")
        if not 0 <= t.index < shape[1]:
            raise UsageError(f"input-synthesis: target {t.text!r}: layer {t.layer!r} has {shape[1]} channels "
                             f"(0-{shape[1] - 1})")
        if t.unit is not None:
            if len(shape) != 4:
                raise UsageError(f"input-synthesis: target {t.text!r}: layer {t.layer!r} has no spatial output")
            h, w = shape[-2:]
            if not (0 <= t.unit[0] < h and 0 <= t.unit[1] < w):
                raise UsageError(f"input-synthesis: target {t.text!r}: unit outside the layer's {h}x{w} output")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "target"


class InputSynthesisExplainer(Explainer):
    """Activation maximisation of class logits, channels or units, from noise or from an image."""

    name = "input-synthesis"
    kind = "synthesis"

    def __init__(self, **options: Any) -> None:
        opts = coerce_options(self.name, DEFAULTS, options)
        if opts["seed"] is not None:
            try:
                opts["seed"] = int(opts["seed"])
            except (TypeError, ValueError):
                raise UsageError(f"input-synthesis: seed={opts['seed']!r} is not an integer") from None
        checks = [("steps", opts["steps"] >= 1, "at least 1"), ("lr", opts["lr"] > 0, "> 0"),
                  ("jitter", opts["jitter"] >= 0, ">= 0"), ("blur_every", opts["blur_every"] >= 0, ">= 0"),
                  ("blur_sigma", opts["blur_sigma"] >= 0, ">= 0"), ("l2", opts["l2"] >= 0, ">= 0"),
                  ("tv", opts["tv"] >= 0, ">= 0"), ("octaves", 1 <= opts["octaves"] <= 6, "between 1 and 6"),
                  ("noise", opts["noise"] >= 0, ">= 0")]
        for key, ok, what in checks:
            if not ok:
                raise UsageError(f"input-synthesis: option {key} must be {what}, got {opts[key]!r}")
        super().__init__(**opts)

    # -- the optimisation ---------------------------------------------------------------------------
    def _octave_sizes(self, size: int) -> list[int]:
        """Resolutions of the octaves, coarse to fine (the coarsest no smaller than 16 px)."""
        octaves = max(1, min(int(self.options["octaves"]), int(math.log2(max(size // 16, 1))) + 1))
        return [max(8, size // 2 ** (octaves - 1 - k)) for k in range(octaves)]

    def _optimise(self, objective: _Objective, x0: torch.Tensor, anchor: torch.Tensor, lo: float, hi: float,
                  seed: int) -> tuple[torch.Tensor, list[list[float]]]:
        """Coarse to fine: at each octave a change ``delta`` at that octave's resolution is optimised
        and added (upsampled) to the image so far, so a start image keeps its own detail."""
        import torch
        import torch.nn.functional as F

        o = self.options
        size = x0.shape[-1]
        gen = torch.Generator().manual_seed(seed + 1)  # jitter shifts; the start noise used ``seed``
        sizes = self._octave_sizes(size)
        steps_per = [int(o["steps"]) // len(sizes)] * len(sizes)
        steps_per[-1] += int(o["steps"]) - sum(steps_per)
        history: list[list[float]] = []
        base = x0.detach()

        def image(delta):
            up = delta if delta.shape[-1] == size else F.interpolate(delta, size=(size, size), mode="bilinear",
                                                                      align_corners=False)
            return (base + up).clamp(lo, hi)

        for s, n_steps in zip(sizes, steps_per):
            scale = size // s
            delta = torch.zeros((x0.shape[0], 1, s, s), device=x0.device, dtype=x0.dtype, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=float(o["lr"]))
            jitter = int(math.ceil(int(o["jitter"]) / scale)) * scale if o["jitter"] and objective.jitter else 0
            for step in range(n_steps):
                opt.zero_grad(set_to_none=True)
                img = image(delta)
                inp = img
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                    inp = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
                act, _ = objective(inp)
                # the objective's gradient scaled to an RMS of 1 per pixel, so that the regularisers'
                # weights mean the same for a logit of 10 as for a channel mean of 0.1
                (g_obj,) = torch.autograd.grad(act.sum(), img, retain_graph=True)
                rms = g_obj.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
                grad = -g_obj / (rms + 1e-12)
                if o["l2"] or o["tv"]:
                    free = img.detach().requires_grad_(True)
                    reg = float(o["l2"]) * (free - anchor).pow(2).sum() + float(o["tv"]) * total_variation(free).sum()
                    (g_reg,) = torch.autograd.grad(reg, free)
                    grad = grad + g_reg
                img.backward(grad)
                opt.step()
                if o["blur_every"] and o["blur_sigma"] and (step + 1) % int(o["blur_every"]) == 0:
                    with torch.no_grad():
                        delta.copy_(gaussian_blur(delta, float(o["blur_sigma"])))
                if step % 16 == 0:
                    history.append([float(v) for v in act.detach()])
            with torch.no_grad():
                base = image(delta).detach()
        return base, history

    def synthesize(self, targets: list[Any], ctx: ExplainContext, out_dir: Path,
                   start: torch.Tensor | None = None) -> dict[str, Any]:

        with eval_mode(ctx.model):
            return self._synthesize(targets, ctx, Path(out_dir), start)

    def _synthesize(self, targets: list[Any], ctx: ExplainContext, out_dir: Path,
                    start: torch.Tensor | None) -> dict[str, Any]:
        import torch

        pp = ctx.preprocessing
        size = int(pp.size)
        model = ctx.model
        if not targets:  # every class, or the first 8 channels of --layer
            if ctx.layer:
                from cxrtool_builtin.explainers.receptive_fields import _probe

                shape = (_probe(model, size).get(ctx.layer) or {}).get("shape") or (1, 8)
                targets = list(range(min(8, int(shape[1])))) if len(shape) >= 2 else []
            else:
                targets = list(ctx.class_names)
        parsed = [parse_target(t, ctx.class_names, ctx.layer) for t in targets]
        _check_layer_targets(model, parsed, size)
        seed = int(self.options["seed"]) if self.options["seed"] is not None else int(ctx.seed)
        lo, hi = (0.0 - pp.mean) / pp.std, (1.0 - pp.mean) / pp.std
        device = torch.device(ctx.device)

        n = len(parsed)
        if start is not None:
            s0 = torch.as_tensor(start, dtype=torch.float32)
            if s0.ndim == 2:
                s0 = s0[None, None]
            elif s0.ndim == 3:
                s0 = s0[:, None] if s0.shape[0] != 1 else s0[None]
            if s0.ndim != 4 or s0.shape[1] != 1 or tuple(s0.shape[-2:]) != (size, size):
                raise UsageError(f"input-synthesis: start image must be (N, 1, {size}, {size}) in the model's "
                                 f"normalised input space, got shape {list(s0.shape)}")
            start_count = int(s0.shape[0])
            if s0.shape[0] > 1 and n == 1:  # one target from each of several images
                parsed, n = parsed * s0.shape[0], s0.shape[0]
            if s0.shape[0] == 1:
                s0 = s0.expand(n, -1, -1, -1)
            elif s0.shape[0] != n:
                raise UsageError(f"input-synthesis: {s0.shape[0]} start images for {n} targets (give one image, "
                                 "one target, or one image per target)")
            x0 = s0.clamp(lo, hi).to(device).contiguous()
            anchor = x0.clone()
            origin = "image"
        else:
            import torch.nn.functional as F

            # seeded noise around mean grey at the coarsest octave's resolution, upsampled
            gen = torch.Generator().manual_seed(seed)
            s0 = self._octave_sizes(size)[0]
            noise = torch.randn((1, 1, s0, s0), generator=gen) * float(self.options["noise"]) / pp.std
            if s0 != size:
                noise = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
            x0 = noise.clamp(lo, hi).expand(n, -1, -1, -1).contiguous().to(device)
            anchor = torch.zeros_like(x0)  # mean grey
            origin = "noise"

        # one optimisation per group of targets that share a layer (class logits: layer None)
        groups: dict[tuple[str | None, bool], list[int]] = {}
        for i, t in enumerate(parsed):
            groups.setdefault((t.layer, t.unit is not None), []).append(i)
        final = torch.empty_like(x0)
        history_of: dict[int, list[float]] = {}
        for (layer, _unit), idx in groups.items():
            obj = _Objective(model, [parsed[i] for i in idx], layer)
            x, hist = self._optimise(obj, x0[idx], anchor[idx], lo, hi, seed)
            final[idx] = x
            for j, i in enumerate(idx):
                history_of[i] = [h[j] for h in hist]
            if ctx.progress is not None:
                ctx.progress(len(idx))

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        with torch.no_grad():
            start_logits = model(x0)
            final_logits = model(final)
            start_prob, final_prob = start_logits.softmax(1), final_logits.softmax(1)
            for (layer, _unit), idx in groups.items():
                obj = _Objective(model, [parsed[i] for i in idx], layer)
                a0, _ = obj(x0[idx])
                a1, _ = obj(final[idx])
                for j, i in enumerate(idx):
                    t = parsed[i]
                    image01 = (final[i, 0] * pp.std + pp.mean).clamp(0, 1).cpu().numpy().astype(np.float32)
                    stem = f"synth_{i:02d}_{_slug(t.text)}"
                    png, npy = out_dir / f"{stem}.png", out_dir / f"{stem}.npy"
                    _save_png(image01, png)
                    _save_npy(image01, npy)
                    row = t.to_dict(ctx.class_names)
                    if origin == "image":
                        row["start_index"] = i if start_count > 1 else 0
                    row.update(
                        png=str(png), npy=str(npy),
                        start_activation=float(a0[j]), final_activation=float(a1[j]),
                        history=[float(v) for v in history_of[i]],
                        start_prediction=ctx.class_names[int(start_logits[i].argmax())],
                        final_prediction=ctx.class_names[int(final_logits[i].argmax())],
                        final_probabilities={c: float(final_prob[i, k]) for k, c in enumerate(ctx.class_names)},
                    )
                    if t.kind == "class":
                        row["start_probability"] = float(start_prob[i, t.index])
                        row["final_probability"] = float(final_prob[i, t.index])
                    results.append((i, row, image01))
        results.sort(key=lambda r: r[0])
        sheet = out_dir / "synthesis_sheet.png"
        start01 = (x0[:, 0] * pp.std + pp.mean).clamp(0, 1).cpu().numpy()
        _render_sheet([r[1] for r in results], [r[2] for r in results], start01 if origin == "image" else None,
                      sheet, f"input synthesis (seed {seed}, from {origin})")
        return {
            "method": self.name,
            "options": dict(self.options),
            "seed": seed,
            "start": origin,
            "input_size": size,
            "value_range": "PNG and .npy hold the synthesised input in [0, 1] (denormalised), float32 (H, W)",
            "sheet": str(sheet),
            "targets": [r[1] for r in results],
        }


def _save_png(image01: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from cxrtool.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    return path


def _save_npy(array: np.ndarray, path: Path) -> Path:
    from cxrtool.io import atomic_path

    with atomic_path(path) as tmp:
        np.save(tmp, array.astype(np.float32))
    return path


def _render_sheet(rows: list[dict[str, Any]], images: list[np.ndarray], starts: np.ndarray | None,
                  path: Path, title: str) -> Path:
    """One panel per target (with the start image above when it started from one), labelled with
    the target and the activation before -> after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrtool.io import save_figure

    n = max(len(rows), 1)
    cols = min(n, 4)
    blocks = int(math.ceil(n / cols))
    per = 2 if starts is not None else 1
    fig, axes = plt.subplots(blocks * per, cols, figsize=(2.6 * cols, 2.9 * blocks * per + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (row, img) in enumerate(zip(rows, images)):
        b, c = divmod(k, cols)
        if starts is not None:
            ax0 = axes[b * per, c]
            ax0.imshow(starts[k], cmap="gray", vmin=0, vmax=1)
            ax0.set_title(f"start: {row['start_prediction']}\nact {row['start_activation']:.3g}", fontsize=8)
        ax = axes[b * per + per - 1, c]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        label = f"{row['target']} ({row['kind']})"
        extra = f", p={row['final_probability']:.2f}" if "final_probability" in row else ""
        ax.set_title(f"{label}\nact {row['start_activation']:.3g} -> {row['final_activation']:.3g}{extra}",
                     fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def build(**options: Any) -> InputSynthesisExplainer:
    return InputSynthesisExplainer(**options)


SPEC = ExplainerSpec(
    name="input-synthesis",
    build=build,
    description="Activation maximisation: the input a class, filter (LAYER:C) or unit likes most, from noise or an image",
    options=dict(DEFAULTS),
    kind="synthesis",
    reference="Erhan et al. 2009; Simonyan et al. 2014; Yosinski et al. 2015; Olah et al. 2017, "
              "Feature Visualization (Distill)",
)
