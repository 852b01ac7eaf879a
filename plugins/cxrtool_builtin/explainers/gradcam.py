"""``grad-cam``: captum's LayerGradCam on a conv layer, upsampled to the input size.

The layer is ``--layer`` or the model's last explainable layer (for a cascade: stage 1's). The map
is ``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of the target logit's gradient with respect
to channel ``k`` of the layer's output ``A``; ``relu=false`` keeps the negative part (a signed map).
``interpolate``: ``bilinear`` (default), ``nearest`` or ``bicubic`` upsampling to the input size.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxrtool.errors import UsageError
from cxrtool.explain import Attribution, ExplainContext, Explainer, choice_option, explainable_layers
from cxrtool.models import get_submodule
from cxrtool.options import as_bool

MODES = ("bilinear", "nearest", "bicubic")



class GradCAM(Explainer):
    name = "grad-cam"
    kind = "attribution"
    unit = "Grad-CAM (weighted activation)"

    def __init__(self, relu=True, interpolate="bilinear", **_: Any):
        super().__init__(relu=relu, interpolate=interpolate)
        self.relu = as_bool(relu, "grad-cam: option relu")
        self.interpolate = choice_option(self.name, "interpolate", interpolate, MODES)
        self.signed = not self.relu

    def attribute(self, x: torch.Tensor, target: torch.Tensor, ctx: ExplainContext) -> Attribution:
        from captum.attr import LayerGradCam

        from cxrtool_builtin.explainers.integrated_gradients import frozen_parameters

        model = ctx.model
        model.eval()
        layer = ctx.target_layer
        if not layer:
            raise UsageError("grad-cam needs a layer (--layer); see `cxrtool layers`")
        module = get_submodule(model, layer)
        cam = LayerGradCam(model, module)
        maps, seconds, shapes = [], [], []
        for i in range(len(x)):
            t0 = time.perf_counter()
            with frozen_parameters(model):
                xi = x[i : i + 1].clone().requires_grad_(True)
                try:
                    attr = cam.attribute(xi, target=int(target[i]), relu_attributions=self.relu)
                except AssertionError as exc:  # captum: the layer is used more than once in the forward pass
                    raise UsageError(f"grad-cam: layer {layer!r} cannot be explained ({exc}); choose another") from None
            if attr.ndim != 4:
                valid = ", ".join(explainable_layers(ctx.meta)) or "a convolutional layer"
                raise UsageError(f"grad-cam: layer {layer!r} does not output a feature map (shape "
                                 f"{tuple(attr.shape)}); use one of: {valid}")
            shapes.append(list(attr.shape[-2:]))
            kwargs = {"align_corners": False} if self.interpolate != "nearest" else {}
            up = F.interpolate(attr.detach(), size=tuple(x.shape[-2:]), mode=self.interpolate, **kwargs)
            maps.append(up[0, 0].float().numpy())
            seconds.append(time.perf_counter() - t0)
            if ctx.progress:
                ctx.progress(1)
        return Attribution(np.stack(maps).astype(np.float32),
                           {"layer": [layer] * len(x), "layer_map_shape": shapes, "seconds": seconds})
