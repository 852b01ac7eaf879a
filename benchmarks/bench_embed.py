"""Embedding extraction throughput: ``cxrtool embed extract``'s code path vs a bare batched forward pass.

    uv run python benchmarks/bench_embed.py [--data ../shared/data/kermany224/train] [--n 512]
        [--model compact] [--size 128] [--batch-size 64] [--checkpoint CKPT] [--repeats 3]

Prints figures, asserts nothing. Same model, same images, same batch size:

1. **bare forward**: the images decoded and preprocessed beforehand (not timed), then a plain
   ``model(x)`` over batches under ``torch.inference_mode`` — the full network, no hook;
2. **embed, in memory**: the extraction core (:class:`cxrtool.embed.LayerTap`: hook on the
   embedding layer, forward stopped there, pooling, copy out) on the same pre-decoded tensors
   (like for like with 1.);
3. **bare decode + forward**: a plain script reading the files batch by batch (the same decoder and
   preprocessing, one thread) and running ``model(x)``;
4. **extract, from files**: :func:`cxrtool.embed.extract` over the image files — decoding in threads,
   overlapped with the forward pass (like for like with 3.).

The goal (issue 4) is extraction >= 0.9x a bare forward pass: 2. vs 1. and 4. vs 3. are the
like-for-like ratios; 4. vs 1. is also printed (it charges extraction with JPEG decoding that 1.
does not do). The arms run interleaved ``--repeats`` times; the median and the best run of each are
printed (on a shared machine the best run is the closer estimate of the uncontended speed). Without
``--data`` (or when it is absent) phantoms are generated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kermany224" / "train"


def make_checkpoint(model_name: str, size: int, path: Path) -> Path:
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.imaging import Preprocessing
    from cxrtool.models import build_model, get_spec

    torch.manual_seed(0)
    model = build_model(model_name, 2)
    meta = {"kind": "classifier", "model": {"name": model_name, "options": {}}, "class_names": ["NORMAL", "PNEUMONIA"],
            "negative_class": "NORMAL", "preprocessing": Preprocessing(size=size).to_dict(),
            "embedding_layer": get_spec(model_name).embedding_layer}
    return C.save(path, model.state_dict(), meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--model", default="compact")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--checkpoint", type=Path, help="Use this checkpoint instead of a random --model.")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("CXRTOOL_CACHE_DIR", "")

    import torch

    from cxrtool import checkpoint as C
    from cxrtool.data import decode_all, load_splits
    from cxrtool.embed import LayerTap, extract, file_sha256, resolve_layer
    from cxrtool.imaging import load, to_tensor

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    data = args.data
    if not data.exists():
        from cxrtool.synthetic import write_dataset

        print(f"{data} not found: using phantoms")
        data = write_dataset(tmp / "phantoms", n_per_class=max(1, args.n // 2), size=256, seed=0)
    splits = load_splits(data)
    ds = splits.get("train") or splits.get("all") or next(iter(splits.values()))
    rng = np.random.default_rng(0)
    ds = ds.subset(np.sort(rng.choice(len(ds), size=min(args.n, len(ds)), replace=False)))
    ckpt_path = args.checkpoint or make_checkpoint(args.model, args.size, tmp / "model.safetensors")
    ckpt = C.load(ckpt_path)
    model, pp = ckpt.model, ckpt.preprocessing
    sha = file_sha256(ckpt.path)
    arrays, kept = decode_all(ds, pp, cache_dir=None)
    n = len(kept)
    layer = resolve_layer(ckpt, None)
    print(f"{n} images from {data}, model {ckpt.meta['model']['name']} at {pp.size} px, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}, layer {ckpt.meta.get('embedding_layer')}")

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, args.batch_size):
                model(to_tensor(arrays[s: s + args.batch_size], pp))
        return n / (time.perf_counter() - t0)

    def bare_files() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, args.batch_size):
                batch = np.stack([load(p, pp) for p in kept.paths[s: s + args.batch_size]])
                model(to_tensor(batch, pp))
        return n / (time.perf_counter() - t0)

    def tap_memory() -> float:
        t0 = time.perf_counter()
        with LayerTap(model, layer) as tap, torch.inference_mode():
            vectors = np.concatenate([tap(to_tensor(arrays[s: s + args.batch_size], pp))
                                      for s in range(0, n, args.batch_size)])
        assert len(vectors) == n
        return n / (time.perf_counter() - t0)

    def ours() -> float:
        t0 = time.perf_counter()
        emb = extract(ckpt, kept, batch_size=args.batch_size, sha256=sha)
        assert len(emb) == n
        return n / (time.perf_counter() - t0)

    with torch.inference_mode():  # warm-up
        model(to_tensor(arrays[: args.batch_size], pp))
    arms = {"bare forward": bare, "embed, in memory": tap_memory,
            "bare decode + forward": bare_files, "extract, from files": ours}
    runs: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeats):
        for k, fn in arms.items():
            runs[k].append(fn())
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " img/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: max(v) for k, v in runs.items()}
    print()
    print(f"{'img/s':26}{'median':>10}{'best':>10}")
    for k in runs:
        print(f"{k:26}{med[k]:10.1f}{best[k]:10.1f}")
    print()
    print(f"{'ratio':50}{'median':>8}{'best':>8}")
    for ours_k, base_k in (("embed, in memory", "bare forward"), ("extract, from files", "bare decode + forward"),
                           ("extract, from files", "bare forward")):
        print(f"{ours_k + ' / ' + base_k:50}{med[ours_k] / med[base_k]:7.2f}x{best[ours_k] / best[base_k]:7.2f}x")


if __name__ == "__main__":
    main()
