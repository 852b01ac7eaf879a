"""Feature-based detectors: ``padim`` (a Gaussian per patch position) and ``patchcore`` (nearest
neighbours in a coreset of normal patch features), on the feature maps of a backbone network.

Backbones (option ``backbone``), since ImageNet weights may not be available offline:

``random:MODEL``
    a randomly initialised registered model (e.g. ``random:resnet18``); its batch-norm statistics
    are re-estimated on the normal training images (no labels). Uses no abnormal label.
``PATH`` to an ``anomaly`` checkpoint of the ``autoencoder`` detector
    the autoencoder's encoder, itself trained on normal images only. Uses no abnormal label.
``PATH`` to a classifier checkpoint (``cxrtool train``)
    its convolutional trunk. The classifier was trained WITH abnormal labels (e.g. PNEUMONIA), so
    the detector is then not "trained on normal images only": the checkpoint records
    ``uses_abnormal_labels: true`` and the CLI warns.

The feature maps of ``layers`` (default: three from the middle of the network) are brought to the
resolution of the first one (at most ``max_grid`` x ``max_grid``) and concatenated per position.
The backbone's weights are copied into the detector's checkpoint, which is self-contained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.anomaly import Detector, FitContext
from cxrtool.errors import CheckpointError, UsageError
from cxrtool_builtin.anomaly._ops import blur, check_reduce, float_opt, int_opt, reduce_maps, to_unit


class _Stop(Exception):
    pass


def _default_layers(explainable: list[str]) -> list[str]:
    """Drop the deepest layer (too coarse and too specific), keep the three before it."""
    if len(explainable) <= 2:
        return list(explainable)
    return list(explainable[:-1])[-3:]


class Backbone:
    """A frozen feature network with named layers, built from a ``backbone`` option or a checkpoint."""

    def __init__(self, module: nn.Module, layers: list[str], info: dict[str, Any]) -> None:
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.layers = list(layers)
        self.info = info
        names = {n for n, _ in module.named_modules()}
        missing = [n for n in self.layers if n not in names]
        if missing:
            raise UsageError(f"backbone has no layer(s) {', '.join(missing)}; some of its layers: "
                             f"{', '.join(list(self.info.get('explainable_layers') or [])[:8]) or '-'}")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_option(cls, spec: str, layers: str, seed: int, auto: int = 3) -> Backbone:
        from cxrtool.models import build_model, get_spec

        if spec.startswith("random:"):
            name = spec.split(":", 1)[1]
            mspec = get_spec(name)
            torch.manual_seed(seed)
            module = build_model(name, 2)
            expl = list(mspec.explainable_layers)
            info = {"kind": "random", "model": name, "options": {}, "num_classes": 2, "source": spec,
                    "explainable_layers": expl, "uses_abnormal_labels": False, "bn_calibrated": False}
            return cls(module, _parse_layers(layers, expl, auto), info)
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"backbone {spec!r} is neither 'random:MODEL' nor an existing checkpoint")
        return cls.from_checkpoint(path, layers, auto)

    @classmethod
    def from_checkpoint(cls, path: Path, layers: str, auto: int = 3) -> Backbone:
        from cxrtool import checkpoint as C

        meta = C.read_meta(C.resolve(path))
        kind = meta.get("kind")
        if kind == "classifier":
            ck = C.load(path)
            module, num_classes = ck.model, len(ck.class_names)
            prefix = ""
            if meta.get("cascade"):  # the normal-vs-abnormal stage
                module, num_classes, prefix = ck.model.stage1, 2, "stage1 of a cascade: "
            expl = list(meta.get("explainable_layers") or [])
            pp = ck.preprocessing
            info = {"kind": "classifier", "model": meta["model"]["name"], "options": meta["model"].get("options") or {},
                    "num_classes": num_classes, "source": str(ck.path), "explainable_layers": expl,
                    "class_names": ck.class_names, "mean": pp.mean, "std": pp.std,
                    "uses_abnormal_labels": len(ck.class_names) > 1,
                    "note": prefix + f"classifier trained with labels {', '.join(ck.class_names)}"}
            return cls(module, _parse_layers(layers, expl, auto), info)
        if kind == "anomaly":
            from cxrtool.anomaly import load_detector

            loaded = load_detector(path)
            model = getattr(loaded.detector, "model", None)
            name = loaded.meta["detector"]["name"]
            if name != "autoencoder" or model is None:
                raise CheckpointError(f"{path} is a {name!r} anomaly checkpoint; of the anomaly detectors only an "
                                      "'autoencoder' checkpoint can serve as a backbone")
            expl = [f"encoder.{i}" for i in range(model.depth)]
            pp = loaded.preprocessing
            info = {"kind": "autoencoder", "model": "autoencoder", "options": loaded.meta["detector"]["options"],
                    "size": model.size, "source": str(loaded.path), "explainable_layers": expl,
                    "mean": pp.mean, "std": pp.std,
                    "uses_abnormal_labels": bool(loaded.meta.get("uses_abnormal_labels")),
                    "note": "encoder of an autoencoder trained on normal images only"}
            return cls(model, _parse_layers(layers, expl, auto), info)
        raise CheckpointError(f"{path} is a {kind} checkpoint; a backbone must be a classifier or an autoencoder")

    @classmethod
    def from_state(cls, info: dict[str, Any], state: dict[str, torch.Tensor]) -> Backbone:
        from cxrtool.models import build_model

        if info["kind"] == "autoencoder":
            from cxrtool_builtin.anomaly.autoencoder import ConvAE

            o = info["options"]
            module = ConvAE(int(info["size"]), int(o["depth"]), int(o["width"]), int(o["latent"]))
        else:
            module = build_model(info["model"], int(info["num_classes"]), info.get("options") or {})
        own = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        module.load_state_dict(own, strict=True)
        return cls(module, info["layers"], info)

    # -- use -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"backbone.{k}": v for k, v in self.module.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        return {**self.info, "layers": self.layers}

    def normalise(self, x01: torch.Tensor, pp) -> torch.Tensor:
        mean = self.info.get("mean", pp.mean)
        std = self.info.get("std", pp.std)
        return (x01 - mean) / std

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of ``layers`` for a normalised batch (the forward pass stops after the last)."""
        out: dict[str, torch.Tensor] = {}
        last = self.layers[-1]
        handles = []

        def hook(name):
            def fn(_module, _inp, output):
                out[name] = output
                if len(out) == len(self.layers) and name == last:
                    raise _Stop

            return fn

        modules = dict(self.module.named_modules())
        for name in self.layers:
            handles.append(modules[name].register_forward_hook(hook(name)))
        try:
            self.module(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise UsageError(f"backbone layer(s) {', '.join(missing)} produced no output")
        return [out[n] for n in self.layers]

    def calibrate_batchnorm(self, images: np.ndarray, pp, batch_size: int, advance) -> None:
        """Re-estimate BN running statistics on (normal) images: a random network then produces
        features of sensible scale. Uses no labels."""
        bns = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
        self.module.train()
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                batch = images[s : s + batch_size]
                if len(batch) < 2:
                    continue
                try:
                    self.features(self.normalise(to_unit(batch), pp))
                finally:
                    advance(len(batch))
        self.module.eval()
        self.info["bn_calibrated"] = True


def _parse_layers(layers: str, explainable: list[str], auto: int = 3) -> list[str]:
    if layers in ("", "auto", None):
        chosen = _default_layers(explainable)[-auto:]
        if not chosen:
            raise UsageError("the backbone declares no explainable layers; give detector option layers=a,b,c")
        return chosen
    return [s.strip() for s in str(layers).split(",") if s.strip()]


class FeatureDetector(Detector):
    """Shared parts of PaDiM and PatchCore: backbone, patch embedding, map -> score."""

    name = "features"
    local_pool = 1  # PatchCore aggregates 3x3 neighbourhoods
    auto_layers = 3

    def __init__(self, backbone="random:compact", layers="auto", max_grid=32, reduce="max", sigma=4.0,
                 batch_size=32, **options: Any) -> None:
        super().__init__(backbone=backbone, layers=layers, max_grid=max_grid, reduce=reduce, sigma=sigma,
                         batch_size=batch_size, **options)
        self.backbone_spec = str(backbone)
        self.layers_opt = str(layers)
        self.max_grid = int_opt("max_grid", max_grid, 1)
        self.reduce = check_reduce(reduce)
        self.sigma = float_opt("sigma", sigma, -1e-12)  # blur in pixels at 224 px (PaDiM: 4)
        self.batch_size = int_opt("batch_size", batch_size, 1)
        self.backbone: Backbone | None = None
        self.grid: int | None = None

    def uses_abnormal_labels(self) -> bool:
        return bool(self.backbone and self.backbone.info.get("uses_abnormal_labels"))

    def _backbone_text(self) -> str:
        if not self.backbone:
            return self.backbone_spec
        i = self.backbone.info
        what = {"random": f"randomly initialised {i['model']} (BN statistics from normal images)",
                "classifier": f"{i['model']} classifier trunk ({i.get('note')}) from {i['source']}",
                "autoencoder": f"autoencoder encoder (normal images only) from {i['source']}"}[i["kind"]]
        return f"{what}, layers {', '.join(self.backbone.layers)}"

    def _prepare_backbone(self, images: np.ndarray, ctx: FitContext) -> None:
        self.backbone = Backbone.from_option(self.backbone_spec, self.layers_opt, ctx.seed, self.auto_layers)
        if self.backbone.info["kind"] == "random":
            self.backbone.calibrate_batchnorm(images, self.preprocessing, self.batch_size,
                                              ctx.bar("BN statistics", len(images)))
        if self.backbone.info.get("uses_abnormal_labels"):
            import warnings

            from cxrtool.anomaly import AnomalyWarning

            warnings.warn(
                f"backbone {self.backbone.info['source']} is a classifier trained with abnormal labels "
                f"({', '.join(self.backbone.info.get('class_names') or [])}): this detector is NOT trained on normal "
                "images only (recorded in the checkpoint as uses_abnormal_labels)",
                AnomalyWarning, stacklevel=2,
            )

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) -> patch features (N, C, g, g)."""
        x = self.backbone.normalise(to_unit(images), self.preprocessing)
        with torch.inference_mode():
            feats = self.backbone.features(x)
            h, w = feats[0].shape[-2:]
            g = min(h, self.max_grid)
            parts = []
            for f in feats:
                if self.local_pool > 1:
                    f = F.avg_pool2d(f, self.local_pool, stride=1, padding=self.local_pool // 2)
                if f.shape[-2:] != (g, g):
                    if f.shape[-1] > g:
                        f = F.adaptive_avg_pool2d(f, g)
                    else:
                        f = F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False)
                parts.append(f)
            return torch.cat(parts, dim=1).float()

    def to_heatmaps(self, patch_scores: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, g, g) patch scores -> (image scores, (N, size, size) maps)."""
        m = F.interpolate(patch_scores[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
        m = blur(m, self.sigma * size / 224.0)[:, 0]
        return reduce_maps(m, self.reduce), m.numpy().astype(np.float32)

    def _common_meta(self) -> dict[str, Any]:
        return {"backbone": self.backbone.meta(), "grid": self.grid}

    def _restore_backbone(self, state, extra) -> None:
        self.backbone = Backbone.from_state(extra["backbone"], state)
        self.grid = extra.get("grid")

    def describe(self) -> str:
        return f"{self.name} on {self._backbone_text()}"


class PadimDetector(FeatureDetector):
    """PaDiM (Defard et al. 2021): a multivariate Gaussian of the patch embedding at every position;
    the anomaly map is the Mahalanobis distance, the image score its maximum (``reduce``)."""

    name = "padim"

    def __init__(self, dims=100, eps=0.01, **options: Any) -> None:
        super().__init__(**options)
        self.options.update(dims=dims, eps=eps)
        self.dims = int_opt("dims", dims, 1)
        self.eps = float_opt("eps", eps, 0.0)
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.cov_inv: torch.Tensor | None = None
        self.n_features = 0

    def _select(self, emb: torch.Tensor) -> torch.Tensor:
        n, _, g, _ = emb.shape
        return emb[:, self.channels].permute(0, 2, 3, 1).reshape(n, g * g, -1)

    def fit(self, images: np.ndarray, ctx: FitContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._prepare_backbone(images, ctx)
        advance = ctx.bar("PaDiM features", len(images))
        total = sq = None
        n = 0
        for s in range(0, len(images), self.batch_size):
            emb = self.embed(images[s : s + self.batch_size])
            if self.channels is None:
                c = self.n_features = emb.shape[1]
                gen = torch.Generator().manual_seed(ctx.seed)
                self.channels = torch.sort(torch.randperm(c, generator=gen)[: min(self.dims, c)]).values
                self.grid = emb.shape[-1]
            x = self._select(emb).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            outer = torch.einsum("npd,npe->pde", x, x)
            sq = outer if sq is None else sq + outer
            n += len(x)
            advance(len(x))
        mean = total / n
        cov = (sq - n * mean[:, :, None] * mean[:, None, :]) / max(1, n - 1)
        d = cov.shape[-1]
        scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # per position
        cov = cov + (self.eps * scale)[:, None, None] * torch.eye(d, dtype=cov.dtype)
        self.mean = mean.float()
        self.cov_inv = torch.linalg.inv(cov).float()
        ctx.say(f"PaDiM: {n} normal images, {self.grid}x{self.grid} positions, {d} of {self.n_features} "
                f"feature dims, {time.perf_counter() - t0:.1f} s")
        return {"n_images": n, "grid": self.grid, "dims": d, "features": self.n_features, "backbone": self._backbone_text(),
                "seconds": time.perf_counter() - t0}

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = images.shape[-1]
        scores, maps = [], []
        for s in range(0, len(images), self.batch_size):
            x = self._select(self.embed(images[s : s + self.batch_size]))
            delta = x - self.mean
            m2 = torch.einsum("npd,pde,npe->np", delta, self.cov_inv, delta).clamp_min(0).sqrt()
            g = self.grid
            sc, hm = self.to_heatmaps(m2.view(-1, g, g), size)
            scores.append(sc)
            maps.append(hm)
        return np.concatenate(scores), np.concatenate(maps)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "cov_inv": self.cov_inv, "channels": self.channels, **self.backbone.state_dict()}

    def extra_meta(self) -> dict[str, Any]:
        return self._common_meta()

    def load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self._restore_backbone(state, extra)
        self.mean, self.cov_inv, self.channels = state["mean"], state["cov_inv"], state["channels"].long()


class PatchCoreDetector(FeatureDetector):
    """PatchCore (Roth et al. 2022): locally aggregated patch features of normal images, reduced to
    a greedy k-centre coreset of ``bank`` patches; a patch's anomaly is its distance to the nearest
    memory patch, the image score the largest (``reduce``)."""

    name = "patchcore"
    local_pool = 3
    auto_layers = 2  # the two deeper of the default three (PatchCore: layer2 + layer3 of a ResNet)

    def __init__(self, bank=4096, max_patches=60000, proj_dims=128, **options: Any) -> None:
        super().__init__(**options)
        self.options.update(bank=bank, max_patches=max_patches, proj_dims=proj_dims)
        self.bank_size = int_opt("bank", bank, 1)
        self.max_patches = int_opt("max_patches", max_patches, 1)
        self.proj_dims = int_opt("proj_dims", proj_dims, 1)
        self.memory: torch.Tensor | None = None

    def fit(self, images: np.ndarray, ctx: FitContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._prepare_backbone(images, ctx)
        gen = torch.Generator().manual_seed(ctx.seed)
        advance = ctx.bar("PatchCore features", len(images))
        pool = []
        per_image = None
        for s in range(0, len(images), self.batch_size):
            emb = self.embed(images[s : s + self.batch_size])
            n, c, g, _ = emb.shape
            self.grid = g
            patches = emb.permute(0, 2, 3, 1).reshape(n, g * g, c)
            if per_image is None:
                per_image = max(1, min(g * g, self.max_patches // max(1, len(images))))
            for p in patches:
                pick = torch.randperm(g * g, generator=gen)[:per_image] if per_image < g * g else slice(None)
                pool.append(p[pick])
            advance(n)
        pool_t = torch.cat(pool)
        memory = self._coreset(pool_t, min(self.bank_size, len(pool_t)), gen, ctx)
        self.memory = memory.contiguous()
        ctx.say(f"PatchCore: {len(pool_t)} normal patches -> coreset of {len(self.memory)}, "
                f"{time.perf_counter() - t0:.1f} s")
        return {"n_images": len(images), "grid": self.grid, "pool": len(pool_t), "bank": len(self.memory),
                "dims": int(self.memory.shape[1]), "backbone": self._backbone_text(),
                "seconds": time.perf_counter() - t0}

    def _coreset(self, pool: torch.Tensor, k: int, gen: torch.Generator, ctx: FitContext) -> torch.Tensor:
        """Greedy k-centre selection (on a random projection when the features are wide)."""
        if k >= len(pool):
            return pool
        feats = pool
        if pool.shape[1] > self.proj_dims:
            proj = torch.randn(pool.shape[1], self.proj_dims, generator=gen) / self.proj_dims**0.5
            feats = pool @ proj
        advance = ctx.bar("coreset", k)
        chosen = [int(torch.randint(len(feats), (1,), generator=gen))]
        sq = (feats * feats).sum(1)

        def dist(i: int) -> torch.Tensor:
            return (sq - 2 * feats @ feats[i] + sq[i]).clamp_min(0)

        mind = dist(chosen[0])
        for _ in range(1, k):
            i = int(torch.argmax(mind))
            chosen.append(i)
            mind = torch.minimum(mind, dist(i))
            advance(1)
        return pool[torch.tensor(chosen)]

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = images.shape[-1]
        scores, maps = [], []
        msq = (self.memory * self.memory).sum(1)
        for s in range(0, len(images), self.batch_size):
            emb = self.embed(images[s : s + self.batch_size])
            n, c, g, _ = emb.shape
            q = emb.permute(0, 2, 3, 1).reshape(-1, c)
            d = []
            for k in range(0, len(q), 4096):
                qq = q[k : k + 4096]
                d2 = (qq * qq).sum(1, keepdim=True) - 2 * qq @ self.memory.T + msq
                d.append(d2.min(1).values.clamp_min(0).sqrt())
            sc, hm = self.to_heatmaps(torch.cat(d).view(n, g, g), size)
            scores.append(sc)
            maps.append(hm)
        return np.concatenate(scores), np.concatenate(maps)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, **self.backbone.state_dict()}

    def extra_meta(self) -> dict[str, Any]:
        return self._common_meta()

    def load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self._restore_backbone(state, extra)
        self.memory = state["memory"]
