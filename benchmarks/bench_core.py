"""Core throughput benchmarks: prints figures, asserts nothing.

    uv run python benchmarks/bench_core.py [--data ../shared/data/kermany224/train] [--n 1024]

1. ``cxrtool train`` images/s (the Trainer, same model/data/batch) vs a bare PyTorch loop;
2. ``cxrtool predict`` images/s over a folder (decode + preprocess + batched forward, the CLI's code
   path) vs a bare script (PIL decode, resize, batched forward) and vs forward alone;
3. ``cxrtool --help`` wall time vs ``python -c "import torch"``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bench_train(data: Path, n: int, size: int, epochs: int, augment: str) -> tuple[float, float]:
    """Best epoch of the Trainer vs best epoch of a bare loop (same model, images, batch, optimiser).

    The best epoch, not the mean, is compared so that other load on a shared machine does not decide
    the ratio; the two sides alternate epoch by epoch for the same reason.
    """
    import torch

    from cxrtool.data import decode_all, load_splits
    from cxrtool.imaging import Preprocessing
    from cxrtool.models import build_model
    from cxrtool.train import TrainConfig, Trainer

    tmp = Path(tempfile.mkdtemp())
    ds = load_splits(data)["all"]
    rng = np.random.default_rng(0)
    ds = ds.subset(np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False)))
    manifest = tmp / "subset.csv"
    with open(manifest, "w") as fh:
        fh.write("path,label,patient_id\n")
        for p, lab, pt in zip(ds.paths, ds.labels, ds.patients):
            fh.write(f"{p},{ds.class_names[lab]},{pt}\n")
    os.environ["CXRTOOL_RUNS_DIR"] = str(tmp / "runs")
    pp = Preprocessing(size=size)
    x_all, kept = decode_all(ds, pp)
    x = (torch.from_numpy(x_all).unsqueeze(1).float() / 255 - 0.5) / 0.25
    y = torch.from_numpy(kept.labels)
    torch.manual_seed(0)
    model = build_model("compact", 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    n_train = int(len(x) * 0.9)

    def bare_epoch() -> float:
        model.train()
        perm = torch.randperm(len(x))[:n_train]
        t0 = time.perf_counter()
        for b in range(0, n_train, 64):
            idx = perm[b : b + 64]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return n_train / (time.perf_counter() - t0)

    ours, bare = [], []
    for rep in range(epochs):
        cfg = TrainConfig(data=str(manifest), size=size, epochs=1, patience=0, augment=augment,
                          out=str(tmp / f"run{rep}"), val_fraction=0.1, seed=rep)
        ours.append(Trainer(cfg).run()["train_images_per_s"])
        bare.append(bare_epoch())
    shutil.rmtree(tmp, ignore_errors=True)
    return max(ours), max(bare)


def bench_predict(data: Path, n: int, size: int) -> tuple[float, float, float]:
    import torch
    from PIL import Image

    from cxrtool.checkpoint import Checkpoint, save
    from cxrtool.data import ImageSet, gather_images
    from cxrtool.imaging import Preprocessing
    from cxrtool.infer import predict_set
    from cxrtool.models import build_model

    paths = gather_images([data])[:n]
    torch.manual_seed(0)
    model = build_model("compact", 2).eval()
    tmp = Path(tempfile.mkdtemp())
    pp = Preprocessing(size=size, resize="stretch")
    meta = {"kind": "classifier", "model": {"name": "compact", "options": {}}, "class_names": ["A", "B"],
            "preprocessing": pp.to_dict()}
    save(tmp / "m.safetensors", model.state_dict(), meta)
    ckpt = Checkpoint(tmp / "m.safetensors", meta, model)
    ds = ImageSet(paths, np.full(len(paths), -1), ["A", "B"], paths)
    t0 = time.perf_counter()
    predict_set(ckpt, ds, batch_size=64)
    ours = len(paths) / (time.perf_counter() - t0)

    # bare script: decode with PIL, resize, stack, batched forward
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(paths), 64):
            batch = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float32)
                     for p in paths[b : b + 64]]
            xb = (torch.from_numpy(np.stack(batch)).unsqueeze(1) / 255 - 0.5) / 0.25
            torch.softmax(model(xb), 1)
    bare = len(paths) / (time.perf_counter() - t0)

    # forward alone on tensors already in memory (the ceiling)
    xb = torch.randn(64, 1, size, size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(0, len(paths), 64):
            model(xb)
    fwd = len(paths) / (time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    return ours, bare, fwd


def bench_help(repeats: int = 5) -> tuple[float, float]:
    def wall(cmd: list[str]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    exe = shutil.which("cxrtool") or str(Path(sys.executable).parent / "cxrtool")
    return wall([exe, "--help"]), wall([sys.executable, "-c", "import torch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany224" / "train")
    ap.add_argument("--n", type=int, default=1024, help="images used")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="alternating repeats (best one counts)")
    args = ap.parse_args()
    import torch

    os.environ.setdefault("CXRTOOL_CACHE_DIR", "")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: {args.data} ({args.n} images, {args.size} px), model: compact, batch 64\n")
    help_s, torch_s = bench_help()
    print(f"cxrtool --help        {help_s:6.2f} s   python -c 'import torch' {torch_s:6.2f} s   "
          f"ratio {help_s / torch_s:.2f} (goal <= 0.5)")
    ours, bare, fwd = bench_predict(args.data, args.n, args.size)
    print(f"predict               {ours:6.0f} img/s   bare decode+forward {bare:6.0f} img/s   ratio {ours / bare:.2f} "
          f"(goal >= 0.9); forward alone {fwd:.0f} img/s")
    for augment in ("none", "default"):
        ours, bare = bench_train(args.data, args.n, args.size, args.epochs, augment)
        print(f"train (augment={augment:<7}) {ours:6.0f} img/s   bare loop (no augmentation) {bare:6.0f} img/s   "
              f"ratio {ours / bare:.2f}" + (" (goal >= 0.9)" if augment == "none" else " (augmentation's cost)"))


if __name__ == "__main__":
    main()
