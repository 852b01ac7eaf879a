"""The training loop: data -> cached uint8 tensors -> batches -> model; checkpoints, metrics, resume.

One run writes a folder (``runs/<name>/``) with ``best.safetensors`` and ``last.safetensors``
(see :mod:`cxrtool.checkpoint`), ``train_state.pt`` (optimiser / schedule / RNG state for
``--resume``, read with ``weights_only=True``), ``metrics.csv``, ``curves.png``, ``split.csv``,
``config.json`` (the resolved config), ``versions.json`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from cxrtool.errors import DataError, TrainingError, UsageError
from cxrtool.imaging import Preprocessing

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "plateau", "step", "inverse-time", "constant")
BALANCE = ("none", "weights", "oversample", "undersample")
MONITORS = ("val_auroc", "val_accuracy", "val_balanced_accuracy", "val_loss")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` and in the checkpoint."""

    data: str = ""
    val_data: str | None = None
    labels: str = "folder"
    model: str = "compact"
    model_options: dict[str, Any] = field(default_factory=dict)
    cascade: bool = False
    pretrained: str | None = None
    freeze: int = -1  # -1: train everything; N >= 0: only the head and the last N blocks
    size: int = 128
    resize: str = "letterbox"
    equalize: str = "none"
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 5
    gamma: float = 0.1
    decay_rate: float = 0.5
    monitor: str = "val_auroc"
    patience: int = 6
    val_fraction: float = 0.15
    balance: str = "weights"
    augment: str = "default"
    label_smoothing: float = 0.0
    negative_class: str | None = None
    target_sensitivity: float | None = None
    target_specificity: float | None = None
    seed: int = 0
    threads: int | None = None
    strict: bool = False
    out: str | None = None
    name: str | None = None

    def validate(self) -> TrainConfig:
        for value, allowed, opt in (
            (self.optimizer, OPTIMIZERS, "--optimizer"),
            (self.schedule, SCHEDULES, "--schedule"),
            (self.balance, BALANCE, "--balance"),
            (self.monitor, MONITORS, "--monitor"),
        ):
            if value not in allowed:
                raise UsageError(f"{opt} must be one of {', '.join(allowed)}, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--epochs and --batch-size must be >= 1")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.target_sensitivity is not None and self.target_specificity is not None:
            raise UsageError("give --target-sensitivity or --target-specificity, not both")
        self.preprocessing()  # validates size / resize / equalize
        return self

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.size, resize=self.resize, equalize=self.equalize)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config; keys are TrainConfig fields (dashes allowed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    data = data.get("train", data)
    out, names = {}, {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise UsageError(f"--config {path}: unknown setting {key!r}")
        out[k] = value
    return out


# -- helpers --------------------------------------------------------------------------------------
def _negative_class(names: list[str], requested: str | None) -> str | None:
    if requested:
        if requested not in names:
            raise UsageError(f"--negative-class {requested!r} is not a class ({', '.join(names)})")
        return requested
    for n in names:
        if n.lower() in ("normal", "no finding", "healthy", "negative"):
            return n
    return None


def make_optimizer(cfg: TrainConfig, params):
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """A per-step LambdaLR for cosine / step / inverse-time / constant, or ReduceLROnPlateau."""
    import torch

    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if cfg.monitor == "val_loss" else "max", factor=cfg.gamma if cfg.gamma < 1 else 0.1,
            patience=max(1, cfg.patience // 3),
        )
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule == "cosine" else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        epoch = step / steps_per_epoch
        if cfg.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.gamma ** int(epoch // cfg.step_size)
        if cfg.schedule == "inverse-time":
            return 1.0 / (1.0 + cfg.decay_rate * epoch)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def predict_arrays(model, images: np.ndarray, pp: Preprocessing, batch_size: int = 128) -> np.ndarray:
    """Softmax probabilities (N, C) for uint8 images (N, H, W)."""
    import torch

    from cxrtool.imaging import to_tensor

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            out.append(torch.softmax(model(to_tensor(images[s : s + batch_size], pp)), dim=1).numpy())
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def _epoch_indices(labels: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    if balance in ("oversample", "undersample"):
        classes, counts = np.unique(labels, return_counts=True)
        per = counts.max() if balance == "oversample" else counts.min()
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), size=per, replace=balance == "oversample" and cnt < per)
             for c, cnt in zip(classes, counts)]
        )
        return rng.permutation(idx)
    return rng.permutation(n)


@dataclass
class Prepared:
    train_x: np.ndarray
    train: Any  # ImageSet
    val_x: np.ndarray
    val: Any
    class_names: list[str]
    split_note: str = ""


def prepare_data(cfg: TrainConfig, progress: Callable[[str, int], Callable[[int], None]] | None = None) -> Prepared:
    """Load, split (patient-aware) and decode the training and validation images once."""
    from cxrtool.data import check_classes, decode_all, load_splits, patient_split

    splits = load_splits(cfg.data, labels=cfg.labels)
    train = splits.get("train") or splits.get("all")
    if train is None:
        raise DataError(f"--data {cfg.data}: no 'train' split (found {', '.join(splits)})")
    val = splits.get("val")
    if cfg.val_data:
        vs = load_splits(cfg.val_data, labels=cfg.labels)
        val = vs.get("val") or vs.get("all") or next(iter(vs.values()))
    if len(train) == 0:
        raise DataError(f"--data {cfg.data}: no training images")
    check_classes(train)
    note = "validation set given"
    if val is None or len(val) == 0:
        keep, held = patient_split(train, cfg.val_fraction, cfg.seed)
        train, val = train.subset(keep), train.subset(held)
        unit = "patients" if train.has_patient_ids else "images (no patient ids found)"
        note = f"patient-aware stratified split: {cfg.val_fraction:.0%} of {unit} held out for validation (seed {cfg.seed})"
    names = sorted(set(train.class_names) | set(val.class_names), key=lambda n: (train.class_names + [n]).index(n))
    train, val = train.with_classes(names), val.with_classes(names)
    check_classes(train)
    pp = cfg.preprocessing()
    tx, train = decode_all(train, pp, strict=cfg.strict, progress=progress("decode train", len(train)) if progress else None)
    vx, val = decode_all(val, pp, strict=cfg.strict, progress=progress("decode val", len(val)) if progress else None)
    check_classes(train)
    return Prepared(tx, train, vx, val, names, note)


def _run_dir(cfg: TrainConfig) -> Path:
    from cxrtool.checkpoint import runs_dir

    if cfg.out:
        return Path(cfg.out)
    base = runs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{stamp}-{cfg.model}{'-cascade' if cfg.cascade else ''}"
    path, k = base / name, 1
    while path.exists():
        k += 1
        path = base / f"{name}-{k}"
    return path


class Trainer:
    """Runs one training job; the CLI gives it callbacks for progress and per-epoch reports."""

    def __init__(self, cfg: TrainConfig, on_epoch: Callable[[dict], None] | None = None, progress=None) -> None:
        self.cfg = cfg.validate()
        self.on_epoch = on_epoch
        self.progress = progress  # progress(description, total) -> advance(n)

    def run(self, resume_dir: Path | None = None) -> dict[str, Any]:
        import torch

        from cxrtool import checkpoint as ckpt
        from cxrtool import metrics as M
        from cxrtool.augment import build_pipeline, parse_augment
        from cxrtool.data import write_split_csv
        from cxrtool.imaging import normalize
        from cxrtool.io import versions, write_csv, write_json
        from cxrtool.models import freeze, get_spec, load_pretrained

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np_rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)

        spec = get_spec(cfg.model)
        augment = build_pipeline(parse_augment(cfg.augment))
        data = prepare_data(cfg, self.progress)
        names = data.class_names
        neg_name = _negative_class(names, cfg.negative_class)
        neg = names.index(neg_name) if neg_name else None
        if cfg.cascade:
            if neg is None or len(names) < 3:
                raise UsageError("--cascade needs a negative (normal) class and at least two abnormal classes")
        pp = cfg.preprocessing()

        run_dir = resume_dir or _run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_base = {
            "kind": "classifier",
            "model": {"name": cfg.model, "options": dict(cfg.model_options)},
            "class_names": names,
            "negative_class": neg_name,
            "cascade": {"negative_class": neg_name, "stage2_classes": [n for n in names if n != neg_name]} if cfg.cascade else None,
            "preprocessing": pp.to_dict(),
            "train_config": cfg.to_dict(),
            "embedding_layer": spec.embedding_layer,
            "explainable_layers": list(spec.explainable_layers),
        }
        model = ckpt.build_classifier(meta_base)
        if cfg.pretrained:
            stages = [model.stage1, model.stage2] if cfg.cascade else [model]
            for m in stages:
                load_pretrained(m, spec, cfg.pretrained)
        if cfg.freeze >= 0:
            for m in [model.stage1, model.stage2] if cfg.cascade else [model]:
                freeze(m, spec, cfg.freeze)

        steps = math.ceil(len(_epoch_indices(data.train.labels, cfg.balance, np.random.default_rng(0))) / cfg.batch_size)
        optimizer = make_optimizer(cfg, model.parameters())
        schedule = make_schedule(cfg, optimizer, steps)
        counts = np.bincount(data.train.labels, minlength=len(names)).astype(np.float64)
        weight = None
        if cfg.balance == "weights":
            weight = torch.tensor(counts.sum() / (len(names) * np.maximum(counts, 1)), dtype=torch.float32)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

        history: list[dict] = []
        best_value, best_epoch, start_epoch = None, 0, 1
        state_path = run_dir / "train_state.pt"
        if resume_dir is not None:
            if not state_path.is_file() or not (run_dir / "last.safetensors").is_file():
                raise TrainingError(f"--resume {run_dir}: no train_state.pt / last.safetensors to resume from")
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt.load_tensors(run_dir / "last.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            gen.set_state(state["generator"])
            np_rng.bit_generator.state = json.loads(state["np_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = json.loads(state["history"])
            best_value, best_epoch, start_epoch = state["best_value"], state["best_epoch"], state["epoch"] + 1
            if best_value is not None and not isinstance(best_value, float):
                best_value = float(best_value)
        else:
            write_json(run_dir / "config.json", cfg.to_dict())
            write_json(run_dir / "versions.json", versions())
            write_split_csv(run_dir / "split.csv", {"train": data.train, "val": data.val})

        train_y = torch.from_numpy(data.train.labels)
        higher = cfg.monitor != "val_loss"
        stale = start_epoch - 1 - best_epoch if best_epoch else 0
        t_start = time.perf_counter()
        images_seen, train_loop_seconds = 0, 0.0
        stopped_early = False
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            order = _epoch_indices(data.train.labels, cfg.balance, np_rng)
            advance = self.progress(f"epoch {epoch}/{cfg.epochs}", len(order)) if self.progress else None
            total_loss, n_seen, t0 = 0.0, 0, time.perf_counter()
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                if len(idx) < 2 and len(order) > 1:  # BatchNorm cannot train on a batch of one
                    continue
                x = torch.from_numpy(data.train_x[idx]).unsqueeze(1).float().div_(255.0)
                if augment is not None:
                    x = augment(x, gen)
                x = normalize(x, pp)
                y = train_y[idx]
                if cfg.cascade:
                    loss = model.training_loss(x, y, weight)
                else:
                    loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {epoch}; stopped. "
                        + (f"Last good checkpoint: {run_dir / 'last.safetensors'} (epoch {epoch - 1})"
                           if epoch > 1 else "No checkpoint was written; try a lower --lr")
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if cfg.schedule != "plateau":
                    schedule.step()
                total_loss += loss.item() * len(idx)
                n_seen += len(idx)
                if advance:
                    advance(len(idx))
            train_time = time.perf_counter() - t0
            images_seen += n_seen
            train_loop_seconds += train_time

            probs = predict_arrays(model, data.val_x, pp)
            val_y = data.val.labels
            m = M.classification_metrics(val_y, probs, names, negative_index=neg)
            eps = 1e-7
            val_loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(val_y)), val_y], eps, 1.0))))
            row = {
                "epoch": epoch,
                "train_loss": total_loss / max(1, n_seen),
                "val_loss": val_loss,
                "val_accuracy": m["accuracy"],
                "val_balanced_accuracy": m["balanced_accuracy"],
                "val_auroc": m["auroc"],
                "lr": optimizer.param_groups[0]["lr"],
                "train_images_per_s": n_seen / train_time if train_time > 0 else None,
                "seconds": time.perf_counter() - t0,
            }
            value = row[cfg.monitor]
            if value is None:
                value = row["val_accuracy"] if cfg.monitor == "val_auroc" else row["val_loss"]
            if cfg.schedule == "plateau":
                schedule.step(value)
            improved = best_value is None or (value > best_value if higher else value < best_value)
            row["best"] = bool(improved)
            history.append(row)
            meta = {**meta_base, "epoch": epoch, "metrics": {k: v for k, v in row.items() if k != "best"}}
            ckpt.save(run_dir / "last.safetensors", model.state_dict(), meta)
            if improved:
                best_value, best_epoch, stale = value, epoch, 0
                ckpt.save(run_dir / "best.safetensors", model.state_dict(), {**meta, "val_metrics": m})
            else:
                stale += 1
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "np_rng": json.dumps(np_rng.bit_generator.state),
                    "history": json.dumps(history),
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "epoch": epoch,
                },
                state_path,
            )
            write_csv(run_dir / "metrics.csv", history)
            if self.on_epoch:
                self.on_epoch(row)
            if cfg.patience and stale >= cfg.patience:
                stopped_early = True
                break
        train_seconds = time.perf_counter() - t_start

        # -- the best model: operating point on validation data and final report ---------------
        best = ckpt.load(run_dir / "best.safetensors")
        probs = predict_arrays(best.model, data.val_x, pp)
        operating_point = None
        if neg is not None and (cfg.target_sensitivity or cfg.target_specificity):
            operating_point = M.choose_threshold(
                data.val.labels != neg, M.abnormal_score(probs, neg),
                target_sensitivity=cfg.target_sensitivity, target_specificity=cfg.target_specificity,
            )
            operating_point["chosen_on"] = "validation split"
        val_metrics = M.classification_metrics(
            data.val.labels, probs, names, negative_index=neg,
            threshold=operating_point["threshold"] if operating_point else None,
        )
        final_meta = {**best.meta, "operating_point": operating_point, "val_metrics": val_metrics}
        final_meta.pop("format", None), final_meta.pop("format_version", None), final_meta.pop("created", None)
        final_meta.pop("versions", None)
        ckpt.save(run_dir / "best.safetensors", best.state, final_meta)

        from cxrtool import report

        report.plot_training_curves(history, run_dir / "curves.png")
        summary = {
            "run_dir": str(run_dir),
            "best_checkpoint": str(run_dir / "best.safetensors"),
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "monitor": cfg.monitor,
            "best_value": best_value,
            "class_names": names,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "train_counts": data.train.counts(),
            "val_counts": data.val.counts(),
            "split": data.split_note,
            "operating_point": operating_point,
            "val_metrics": val_metrics,
            "train_seconds": train_seconds,  # wall time of all epochs, validation and checkpoints included
            "train_images_per_s": images_seen / train_loop_seconds if train_loop_seconds > 0 else None,
        }
        write_json(run_dir / "summary.json", summary)
        ckpt.write_latest(run_dir)
        return summary
