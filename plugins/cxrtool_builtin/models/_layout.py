"""Torch-free facts about the architectures, shared by the specs (``__init__``) and the builders."""

from __future__ import annotations

#: torchvision's configuration "D" (VGG-16): output channels of each conv, "M" = 2x2 max-pool
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_layout(cfg=VGG16_CFG) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Indices in ``features`` (conv, BN, ReLU per conv; one module per pool) of the convs, and of
    the ReLU that ends each stage."""
    convs, stage_ends, i = [], [], 0
    for v in cfg:
        if v == "M":
            stage_ends.append(i - 1)
            i += 1
        else:
            convs.append(i)
            i += 3
    return tuple(convs), tuple(stage_ends)


VGG16_CONVS, VGG16_STAGE_ENDS = vgg_layout()
#: conv and batch-norm indices in ``features``, input to output (the layers holding parameters)
VGG16_PARAM_LAYERS = tuple(j for i in VGG16_CONVS for j in (i, i + 1))
