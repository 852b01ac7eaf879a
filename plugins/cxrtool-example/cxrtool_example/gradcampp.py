"""``gradcam-plus-plus``: Grad-CAM++ (Chattopadhyay et al. 2018) on a conv layer, upsampled to the input.

For the chosen layer's activations ``A`` (channels ``k``, positions ``ij``) and ``g = dS/dA`` the
gradient of the target logit ``S``, Grad-CAM++ weighs each channel by its positive gradients,
with a per-position coefficient that stops large, weakly activated regions from dominating::

    alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab * g_kij^3)      (0 where the denominator is 0)
    w_k       = sum_ij alpha_kij * relu(g_kij)
    map_ij    = relu(sum_k w_k A_kij)

(the closed form of the paper's eq. 19 for ``exp(S)``; higher derivatives as powers of ``g``). The
layer is ``--layer`` or the model's last explainable layer. Its output is captured with a forward
hook and ``torch.autograd.grad`` takes the gradient with respect to it only, so the model's
parameters, their ``.grad`` and ``requires_grad`` flags are left untouched, and the hook is removed
even when the forward pass fails. Maps are non-negative (``signed = False``).

Options: ``interpolate`` (``bilinear``, ``nearest`` or ``bicubic`` upsampling), ``batch`` (images per
forward / backward pass).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxrtool.errors import UsageError
from cxrtool.explain import Attribution, ExplainContext, Explainer, choice_option, explainable_layers, int_option
from cxrtool.models import get_submodule

MODES = ("bilinear", "nearest", "bicubic")


def gradcam_plus_plus(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) activations and gradients of the target score -> (N, 1, h, w) non-negative maps."""
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2.0 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(dim=1, keepdim=True))


class GradCAMPlusPlus(Explainer):
    name = "gradcam-plus-plus"
    kind = "attribution"
    signed = False
    unit = "Grad-CAM++ (weighted activation)"

    def __init__(self, interpolate: str = "bilinear", batch: int = 16) -> None:
        super().__init__(interpolate=interpolate, batch=batch)
        self.interpolate = choice_option(self.name, "interpolate", interpolate, MODES)
        self.batch = int_option(self.name, "batch", batch, 1)

    def _layer_output(self, model: torch.nn.Module, module: torch.nn.Module, layer: str,
                      x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the layer's output) of one forward pass, with the graph between them."""
        seen: list[Any] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            with torch.enable_grad():
                logits = model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise UsageError(f"{self.name}: layer {layer!r} ran {len(seen)} times in one forward pass; choose "
                             "a layer that runs exactly once (see `cxrtool layers`)")
        act = seen[0]
        if not isinstance(act, torch.Tensor) or act.ndim != 4:
            shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise UsageError(f"{self.name}: layer {layer!r} does not output a feature map ({shape})")
        if not act.requires_grad:
            raise UsageError(f"{self.name}: no gradient reaches layer {layer!r}")
        return logits, act

    def attribute(self, x: torch.Tensor, target: torch.Tensor, ctx: ExplainContext) -> Attribution:
        model = ctx.model
        model.eval()
        layer = ctx.target_layer
        if not layer:
            raise UsageError(f"{self.name} needs a layer (--layer); see `cxrtool layers`")
        module = get_submodule(model, layer)
        target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        if len(target) != len(x):
            raise UsageError(f"{self.name}: {len(target)} targets for {len(x)} images")
        maps, shapes = [], []
        for s in range(0, len(x), self.batch):
            # the input requires grad so the layer's output is in the graph even if every parameter is frozen
            xb = x[s : s + self.batch].detach().clone().requires_grad_(True)
            tb = target[s : s + self.batch].to(xb.device)
            try:
                logits, act = self._layer_output(model, module, layer, xb)
            except UsageError:
                raise
            except RuntimeError as exc:
                valid = ", ".join(explainable_layers(ctx.meta)) or "a convolutional layer"
                raise UsageError(f"{self.name}: forward pass failed with layer {layer!r} hooked ({exc}); "
                                 f"try one of: {valid}") from None
            if logits.ndim != 2 or int(tb.max()) >= logits.shape[1] or int(tb.min()) < 0:
                raise UsageError(f"{self.name}: target class out of range for a model with output shape "
                                 f"{tuple(logits.shape)}")
            score = logits.gather(1, tb[:, None]).sum()  # images are independent: one backward for the batch
            (grads,) = torch.autograd.grad(score, act)
            cam = gradcam_plus_plus(act.detach().float(), grads.detach().float())
            shapes += [list(cam.shape[-2:])] * len(xb)
            kwargs = {} if self.interpolate == "nearest" else {"align_corners": False}
            up = F.interpolate(cam, size=tuple(x.shape[-2:]), mode=self.interpolate, **kwargs).clamp_(min=0.0)
            maps.append(up[:, 0].cpu().numpy())
            if ctx.progress:
                ctx.progress(len(xb))
        out = np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *x.shape[-2:]), np.float32)
        return Attribution(out, {"layer": [layer] * len(x), "layer_map_shape": shapes})
