"""cxrtool-example: an example third-party cxrtool plugin.

It adds, through the ``cxrtool`` entry-point group and nothing else:

* model ``mobile-cxr``: a small depthwise-separable CNN (MobileNet-style) for 1-channel images;
* augmentation ``gamma``: a random per-image gamma curve (exposure / processing variation);
* explainer ``gradcam-plus-plus``: Grad-CAM++ (Chattopadhyay et al. 2018) with autograd hooks.

Importing this package (and :mod:`cxrtool_example.plugin`, the entry point) does not import torch;
the implementations in :mod:`~cxrtool_example.mobile`, :mod:`~cxrtool_example.gamma` and
:mod:`~cxrtool_example.gradcampp` are imported when a model / augmentation / explainer is built.
"""

__version__ = "0.1.0"
