"""``integrated-gradients``: captum's IntegratedGradients, with an optional SmoothGrad noise tunnel.

Attributions are computed for the target's logit (``output=logit``, default) or its softmax
probability (``output=probability``) along the straight path from a baseline (``black``: pixel
value 0, ``mean``: the image's mean intensity, ``blur``: the image blurred with a Gaussian of 1/20 of
the input size) to the image, with ``n_steps`` points of captum's ``method``
(``gausslegendre``, ``riemann_trapezoid``, ...). The interpolated inputs go through the model in
batches of ``internal_batch_size`` (default: as many as fit the memory budget, at most ``n_steps``).
The convergence delta ``sum(attributions) - (F(x) - F(baseline))`` is reported per image; with
``smoothgrad=K`` the map is the mean over K noisy copies (noise ``noise`` x the input's range; seeded
with the context's seed) and the reported delta is the largest over the copies.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cxrtool.explain import (
    Attribution,
    ExplainContext,
    Explainer,
    activation_bytes,
    batch_for_memory,
    choice_option,
    float_option,
    int_option,
    probability_model,
    reference,
)

BASELINES = ("black", "zero", "mean", "blur")
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
OUTPUTS = ("logit", "probability")


class frozen_parameters:
    """Context manager: parameters do not require gradients inside (no weight gradients are computed)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class IntegratedGradients(Explainer):
    name = "integrated-gradients"
    kind = "attribution"
    signed = True
    display_percentile = 99.5  # pixel-level maps are heavy-tailed: render up to the 99.5th percentile

    def __init__(self, baseline="black", n_steps=50, method="gausslegendre", internal_batch_size=None,
                 output="logit", smoothgrad=0, noise=0.1, **_: Any):
        super().__init__(baseline=baseline, n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                         output=output, smoothgrad=smoothgrad, noise=noise)
        m = self.name
        self.baseline = choice_option(m, "baseline", baseline, BASELINES)
        self.n_steps = int_option(m, "n_steps", n_steps, 2)
        self.method = choice_option(m, "method", method, METHODS)
        self.internal_batch_size = int_option(m, "internal_batch_size", internal_batch_size, 1, allow_none=True)
        self.output = choice_option(m, "output", output, OUTPUTS)
        self.smoothgrad = int_option(m, "smoothgrad", smoothgrad, 0)
        self.noise = float_option(m, "noise", noise, 0.0, 10.0)
        self.unit = f"attribution (target {self.output} units)"

    def batch_size(self, model, x: torch.Tensor, memory_mb: int) -> int:
        if self.internal_batch_size:
            return self.internal_batch_size
        # a forward pass with gradients keeps about every activation once more for the backward pass
        return batch_for_memory(activation_bytes(model, x) * 3, memory_mb, self.n_steps)

    def attribute(self, x: torch.Tensor, target: torch.Tensor, ctx: ExplainContext) -> Attribution:
        from captum.attr import IntegratedGradients as CaptumIG
        from captum.attr import NoiseTunnel

        model = ctx.model
        model.eval()
        forward = model if self.output == "logit" else probability_model(model)
        ibs = self.batch_size(model, x, ctx.memory_mb)
        maps, deltas, diffs, seconds = [], [], [], []
        for i in range(len(x)):
            t0 = time.perf_counter()
            xi, ti = x[i : i + 1], int(target[i])
            base = reference(xi, self.baseline, ctx.preprocessing)
            ig = CaptumIG(forward)
            with frozen_parameters(model), torch.random.fork_rng():
                torch.manual_seed(ctx.seed)
                if self.smoothgrad > 0:
                    stdev = float(self.noise * (xi.max() - xi.min()).clamp(min=1e-6))
                    attr, delta = NoiseTunnel(ig).attribute(
                        xi, nt_type="smoothgrad", nt_samples=self.smoothgrad, stdevs=stdev, baselines=base,
                        target=ti, n_steps=self.n_steps, method=self.method, internal_batch_size=ibs,
                        return_convergence_delta=True)
                else:
                    attr, delta = ig.attribute(xi, baselines=base, target=ti, n_steps=self.n_steps, method=self.method,
                                               internal_batch_size=ibs, return_convergence_delta=True)
            with torch.inference_mode():
                out = forward(torch.cat([xi, base]))[:, ti]
            maps.append(attr[0, 0].detach().float().numpy())
            deltas.append(float(delta.detach().abs().max()))
            diffs.append(float(out[0] - out[1]))
            seconds.append(time.perf_counter() - t0)
            if ctx.progress:
                ctx.progress(1)
        return Attribution(np.stack(maps).astype(np.float32), {
            "delta": deltas, "output_difference": diffs, "attribution_sum": [float(m.sum()) for m in maps],
            "internal_batch_size": [ibs] * len(x), "seconds": seconds,
        })
