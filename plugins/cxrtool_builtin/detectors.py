"""Built-in anomaly detectors (trained on normal images only): registration without importing torch.

Each spec's ``build`` imports its implementation from ``cxrtool_builtin.anomaly`` when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cxrtool.anomaly import DetectorSpec
from cxrtool.hookspecs import hookimpl


def lazy_detector(module: str, cls: str) -> Callable[..., Any]:
    def build(**options: Any):
        return getattr(importlib.import_module(f"cxrtool_builtin.anomaly.{module}"), cls)(**options)

    build.__qualname__ = build.__name__ = f"build_{cls}"
    return build


FEATURE_OPTIONS = {"backbone": "random:compact", "layers": "auto", "max_grid": 32, "reduce": "max", "sigma": 4.0,
                   "batch_size": 32}


def specs() -> list[DetectorSpec]:
    return [
        DetectorSpec(
            name="autoencoder",
            build=lazy_detector("autoencoder", "AutoencoderDetector"),
            description="Convolutional autoencoder trained to reconstruct normal CXRs; score = reconstruction "
                        "error (mse or ssim), heatmap = per-pixel error",
            options={"latent": 16, "depth": 4, "width": 16, "epochs": 40, "lr": 2e-3, "batch_size": 32,
                     "weight_decay": 1e-5, "loss": "mse", "score": "ssim", "reduce": "top10", "sigma": 2.0,
                     "standardize": False, "noise": 0.0, "noise_grid": 8},
            reference="seed report plan; AE baselines in BMAD (Bao et al. 2024) and MedIAnomaly (Cai et al. 2024)",
        ),
        DetectorSpec(
            name="denoising",
            build=lazy_detector("denoising", "DenoisingDetector"),
            description="Denoising U-Net trained to remove coarse noise from normal CXRs; blob-like "
                        "abnormalities are removed too: score = reconstruction error (ssim or mse), heatmap = per-pixel error",
            options={"depth": 3, "width": 16, "epochs": 20, "lr": 5e-3, "batch_size": 8, "weight_decay": 1e-5,
                     "loss": "mse", "score": "ssim", "reduce": "mean", "sigma": 1.0, "standardize": False,
                     "noise": 0.2, "noise_grid": 16},
            reference="Kascenas et al. 2022, Denoising Autoencoders for Unsupervised Anomaly Detection in Brain MRI "
                      "(MIDL); MedIAnomaly (Cai et al. 2024)",
        ),
        DetectorSpec(
            name="padim",
            build=lazy_detector("features", "PadimDetector"),
            description="PaDiM: a Gaussian of backbone patch features per position; score = max Mahalanobis "
                        "distance. backbone = random:MODEL | autoencoder checkpoint | classifier checkpoint",
            options={**FEATURE_OPTIONS, "dims": 100, "eps": 0.01},
            reference="Defard et al. 2021, PaDiM: a Patch Distribution Modeling Framework (ICPR workshops)",
            uses_backbone=True,
        ),
        DetectorSpec(
            name="patchcore",
            build=lazy_detector("features", "PatchCoreDetector"),
            description="PatchCore: nearest-neighbour distance to a coreset of normal patch features; "
                        "same backbones as padim",
            options={**FEATURE_OPTIONS, "bank": 4096, "max_patches": 60000, "proj_dims": 128},
            reference="Roth et al. 2022, Towards Total Recall in Industrial Anomaly Detection (CVPR)",
            uses_backbone=True,
        ),
    ]


@hookimpl
def register_anomaly_detectors(register):
    for spec in specs():
        register(spec)
