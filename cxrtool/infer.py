"""Batched inference shared by ``evaluate``, ``predict`` and ``threshold``: streams images, never
holds a whole dataset decoded in memory, overlaps decoding with the forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxrtool.checkpoint import Checkpoint
from cxrtool.data import ImageSet, checked_batches
from cxrtool.errors import DataError, UsageError


@dataclass
class Predictions:
    probs: np.ndarray  # (N_kept, C)
    kept: np.ndarray  # indices into the input set
    failures: list[tuple[int, str]]


def predict_set(
    ckpt: Checkpoint,
    ds: ImageSet,
    *,
    batch_size: int = 64,
    tta: int = 0,
    seed: int = 0,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Softmax probabilities for every readable image of ``ds``.

    ``tta`` > 0 averages the plain view with ``tta`` augmented views (the checkpoint's training
    augmentations, or the default set), seeded.
    """
    import torch

    from cxrtool.augment import build_pipeline, parse_augment
    from cxrtool.imaging import normalize

    pp = ckpt.preprocessing
    model = ckpt.model
    model.eval()
    augment = None
    if tta:
        if tta < 0:
            raise UsageError("--tta must be >= 0")
        spec = (ckpt.meta.get("train_config") or {}).get("augment") or "default"
        augment = build_pipeline(parse_augment(spec if spec != "none" else "default"))
    gen = torch.Generator().manual_seed(seed)
    probs, kept, failures = [], [], []
    with torch.inference_mode():
        for arr, idx, bad in checked_batches(ds, pp, batch_size, failures, strict=strict):
            if len(idx):
                x = torch.from_numpy(arr).unsqueeze(1).float().div_(255.0)
                p = torch.softmax(model(normalize(x.clone(), pp)), dim=1)
                for _ in range(tta):
                    p += torch.softmax(model(normalize(augment(x.clone(), gen), pp)), dim=1)
                probs.append((p / (1 + tta)).numpy())
                kept.extend(idx)
            if progress:
                progress(len(idx) + len(bad))
    if not kept:
        raise DataError("none of the images could be read")
    return Predictions(np.concatenate(probs), np.asarray(kept, dtype=np.int64), failures)


def pick_split(splits: dict[str, ImageSet], split: str | None) -> tuple[str, ImageSet]:
    """The requested split, else test, else val, else all."""
    if split:
        if split not in splits:
            raise UsageError(f"--split {split!r} not in the data (found: {', '.join(splits)})")
        return split, splits[split]
    for name in ("test", "val", "all"):
        if name in splits:
            return name, splits[name]
    name = next(iter(splits))
    return name, splits[name]
