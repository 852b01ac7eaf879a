"""Built-in anomaly detector implementations (import torch; loaded only when a detector is built).

``autoencoder``: reconstruction error of a convolutional autoencoder (:mod:`.autoencoder`);
``denoising``: the same for a denoising U-Net (:mod:`.denoising`);
``padim`` / ``patchcore``: Gaussian / nearest-neighbour models of patch features of a backbone
network (:mod:`.features`). The hook that registers them lives in ``cxrtool_builtin.detectors``.
"""
