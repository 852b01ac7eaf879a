"""Checkpoints are data, not code: safetensors weights with the JSON metadata in the file header.

One ``.safetensors`` file carries everything a later command needs: ``kind`` (classifier,
anomaly detector, ...), model name and options, class names in output order, preprocessing,
operating point (decision threshold), training config, metrics and package versions. Reading it
never unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtool.errors import CheckpointError, CxrtoolError
from cxrtool.imaging import Preprocessing

FORMAT = "cxrtool-checkpoint"
FORMAT_VERSION = 1
META_KEY = "cxrtool"


def runs_dir() -> Path:
    return Path(os.environ.get("CXRTOOL_RUNS_DIR", "runs"))


@dataclass
class Checkpoint:
    """A loaded checkpoint: metadata plus the built model (eval mode, CPU)."""

    path: Path
    meta: dict[str, Any]
    model: Any = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def negative_index(self) -> int | None:
        neg = self.meta.get("negative_class")
        return self.class_names.index(neg) if neg in self.class_names else None

    @property
    def threshold(self) -> float | None:
        op = self.meta.get("operating_point") or {}
        return op.get("threshold")


def save(path: str | Path, state_dict: dict, meta: dict[str, Any]) -> Path:
    """Write weights + metadata atomically."""
    from safetensors.torch import save_file

    from cxrtool.io import atomic_path, versions

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **meta,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, default=str)})
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """Only the metadata (fast: reads the header, not the weights)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({type(exc).__name__}: {exc})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without cxrtool metadata; not a cxrtool checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cxrtool checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer cxrtool (format {meta['format_version']}); upgrade cxrtool")
    return meta


def load_tensors(path: str | Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read weights ({type(exc).__name__}: {exc})") from None


def resolve(checkpoint: str | Path | None) -> Path:
    """A checkpoint file from a file, a run folder, or (None) the latest run's best checkpoint."""
    if checkpoint is None:
        latest = runs_dir() / "latest"
        if not latest.is_file():
            raise CheckpointError(
                f"no --checkpoint given and no latest run in {runs_dir()}/ (train one with `cxrtool train`)"
            )
        run = runs_dir() / latest.read_text().strip()
        return resolve(run)
    path = Path(checkpoint)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without a checkpoint (best.safetensors)")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    return path


def load(checkpoint: str | Path | None, kind: str = "classifier") -> Checkpoint:
    """Load a checkpoint of ``kind`` and build its model (eval mode, CPU)."""
    path = resolve(checkpoint)
    meta = read_meta(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind', 'unknown')} checkpoint; this command needs a {kind}")
    tensors = load_tensors(path)
    if kind != "classifier":
        return Checkpoint(path, meta, None, tensors)
    model = build_classifier(meta)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: weights do not match model {meta['model']['name']!r}: {first}") from None
    model.eval()
    return Checkpoint(path, meta, model, tensors)


def build_classifier(meta: dict[str, Any]):
    """Build the (untrained) classifier described by checkpoint metadata."""
    from cxrtool.models import build_model

    model_meta = meta["model"]
    n = len(meta["class_names"])
    try:
        if meta.get("cascade"):
            from cxrtool.cascade import Cascade

            c = meta["cascade"]
            return Cascade(
                build_model(model_meta["name"], 2, model_meta.get("options")),
                build_model(model_meta["name"], len(c["stage2_classes"]), model_meta.get("options")),
                negative_index=meta["class_names"].index(c["negative_class"]),
            )
        return build_model(model_meta["name"], n, model_meta.get("options"))
    except CxrtoolError as exc:
        raise CheckpointError(f"cannot rebuild the checkpoint's model: {exc}") from None


def write_latest(run_dir: Path) -> None:
    """Point ``runs/latest`` at ``run_dir`` (a name under the runs folder, or an absolute path)."""
    from cxrtool.io import write_text

    base = runs_dir()
    target = run_dir.name if run_dir.resolve().parent == base.resolve() else str(run_dir.resolve())
    write_text(base / "latest", target + "\n")
