"""Anomaly detectors on phantoms: AUROC per lesion pattern, pointing game, fit time, scoring speed.

    uv run python benchmarks/bench_anomaly.py [--size 64] [--n-fit 150] [--n-test 40] [--threads 1] [--only NAME ...]

Every detector is fitted on lesion-free phantoms only and scored on held-out normal phantoms and
phantoms with ``focal`` / ``lobar`` / ``diffuse`` lesions (see cxrtool/synthetic.py). AUROC is normal vs
each lesion pattern; the pointing game counts lesion images whose heatmap maximum lies in a lesion
disc (+2 px). Prints a Markdown table (quoted in docs/anomaly.md); asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

PATTERNS = {"focal": "LESION", "lobar": "BACTERIA", "diffuse": "VIRUS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-fit", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", metavar="DETECTOR", help="run only these detectors (e.g. denoising)")
    args = ap.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    from cxrtool import checkpoint as C
    from cxrtool.anomaly import FitContext, build_detector, pointing_game, score_arrays
    from cxrtool.imaging import Preprocessing
    from cxrtool.synthetic import make_arrays, to_uint8

    torch.set_num_threads(args.threads)
    size = args.size
    n = args.n_fit + args.n_test
    imgs, labels, infos = make_arrays(n_per_class=n, size=size, seed=args.seed,
                                      classes=("NORMAL", *PATTERNS.values()))
    x = to_uint8(imgs)
    normal = np.flatnonzero(labels == 0)
    fit, test_normal = x[normal[: args.n_fit]], x[normal[args.n_fit :]]
    pp = Preprocessing(size=size)
    tmp = Path(tempfile.mkdtemp())

    def fitted(name: str, options: dict):
        det = build_detector(name, options)
        det.preprocessing = pp
        t0 = time.perf_counter()
        det.fit(fit, FitContext(pp, seed=0))
        return det, time.perf_counter() - t0

    ae_phantom = {"score": "ssim", "standardize": True, "reduce": "max", "epochs": 20}
    ae_ckpt = tmp / "ae.safetensors"
    if not args.only or "padim" in args.only:  # padim on the autoencoder's encoder needs it
        ae, _ = fitted("autoencoder", ae_phantom)
        C.save(ae_ckpt, ae.state_dict(), {
            "kind": "anomaly", "detector": {"name": "autoencoder", "options": ae.options},
            "model": {"name": "anomaly:autoencoder"}, "preprocessing": pp.to_dict(),
            "operating_point": {"threshold": 0}, "detector_meta": ae.extra_meta(), "uses_abnormal_labels": False})
    runs = [
        ("autoencoder (defaults: ssim, top10)", "autoencoder", {"epochs": 20}),
        ("autoencoder (ssim, standardize, max)", "autoencoder", ae_phantom),
        ("autoencoder (mse, mean: classic)", "autoencoder", {"epochs": 20, "score": "mse", "reduce": "mean"}),
        ("denoising U-Net (defaults: ssim, mean)", "denoising", {}),
        ("denoising U-Net (mse, max: focal)", "denoising", {"score": "mse", "reduce": "max"}),
        ("padim, random:compact", "padim", {}),
        ("patchcore, random:compact", "patchcore", {"bank": 2048}),
        ("padim, autoencoder encoder", "padim", {"backbone": str(ae_ckpt)}),
    ]
    runs = [r for r in runs if not args.only or r[1] in args.only]
    print(f"phantoms {size} px: fit on {len(fit)} normal, test {len(test_normal)} normal + {args.n_test} per pattern; "
          f"{args.threads} thread(s)\n")
    head = "| detector | " + " | ".join(f"AUROC {p}" for p in PATTERNS) + " | pointing game focal | fit s | score img/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, name, options in runs:
        det, fit_s = fitted(name, options)
        t0 = time.perf_counter()
        s_norm, _ = score_arrays(det, test_normal)
        per, pg = [], None
        n_scored = len(test_normal)
        for pattern in PATTERNS:
            ci = 1 + list(PATTERNS).index(pattern)
            idx = np.flatnonzero(labels == ci)[: args.n_test]
            s, maps = score_arrays(det, x[idx])
            n_scored += len(idx)
            y = np.r_[np.zeros(len(s_norm)), np.ones(len(s))]
            per.append(roc_auc_score(y, np.r_[s_norm, s]))
            if pattern == "focal":
                flat = maps.reshape(len(maps), -1).argmax(1)
                peaks = np.stack([flat // size, flat % size], axis=1)
                pg = pointing_game(peaks, [infos[i]["lesions"] for i in idx], tolerance=2)
        speed = n_scored / (time.perf_counter() - t0)
        print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in per)
              + f" | {pg['hits']}/{pg['n']} | {fit_s:.1f} | {speed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
