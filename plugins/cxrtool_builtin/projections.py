"""Built-in 2-D projections of embeddings: ``tsne`` and ``pca`` (and ``umap`` when umap-learn is installed).

Importing this module is cheap: scikit-learn (and umap) are imported when a projection runs. Every
projection takes float32 ``(N, D)`` and returns float32 ``(N, 2)``; a fixed seed gives the same
coordinates on the same machine.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from cxrtool.embed import Projection, ProjectionSpec
from cxrtool.errors import DataError, UsageError
from cxrtool.hookspecs import hookimpl


def _number(proj: str, key: str, value: Any, lo: float, *, integer: bool = False, lo_open: bool = False) -> float:
    """``value`` as a number >= ``lo`` (> with ``lo_open``); anything else is a one-line UsageError."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer:
            if number != int(number):
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{proj} option {key} must be {kind}, got {value!r}") from None
    if not np.isfinite(number) or number < lo or (lo_open and number == lo):
        raise UsageError(f"{proj} option {key} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    return number


def _choice(proj: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{proj} option {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _pad2(x: np.ndarray) -> np.ndarray:
    """At least two columns (a 1-D embedding is drawn on a line)."""
    return x if x.shape[1] >= 2 else np.hstack([x, np.zeros((len(x), 2 - x.shape[1]), x.dtype)])


class PCA2(Projection):
    name = "pca"

    def __init__(self, **options: Any) -> None:
        whiten = options.get("whiten", False)
        if not isinstance(whiten, bool):
            raise UsageError(f"pca option whiten must be true or false, got {whiten!r}")
        super().__init__(**options)

    def fit_transform(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        from sklearn.decomposition import PCA

        x = _pad2(np.asarray(x, dtype=np.float64))
        out = PCA(n_components=2, svd_solver="full", whiten=bool(self.options["whiten"])).fit_transform(x)
        # fix the sign of each axis (largest loading positive) so runs on other BLAS builds agree
        signs = np.sign(out[np.argmax(np.abs(out), axis=0), range(2)])
        return (out * np.where(signs == 0, 1, signs)).astype(np.float32)


class TSNE2(Projection):
    name = "tsne"

    def __init__(self, **options: Any) -> None:
        o = dict(options)
        o["perplexity"] = _number("tsne", "perplexity", o.get("perplexity", 30.0), 0, lo_open=True)
        o["max_iter"] = _number("tsne", "max_iter", o.get("max_iter", 1000), 250, integer=True)
        o["pca_dims"] = _number("tsne", "pca_dims", o.get("pca_dims", 50), 0, integer=True)
        o["metric"] = _choice("tsne", "metric", o.get("metric", "euclidean"), ("euclidean", "cosine"))
        o["init"] = _choice("tsne", "init", o.get("init", "pca"), ("pca", "random"))
        super().__init__(**o)

    def check(self, n_points: int, dim: int) -> None:
        super().check(n_points, dim)
        perplexity = self.options["perplexity"]
        if perplexity >= n_points:
            raise UsageError(f"t-SNE perplexity {perplexity:g} must be smaller than the number of points ({n_points}); "
                             f"pass a smaller --perplexity (5-50 is usual)")

    def fit_transform(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        x = _pad2(np.asarray(x, dtype=np.float64))
        pca_dims = int(self.options["pca_dims"])
        if pca_dims and x.shape[1] > pca_dims and len(x) > pca_dims:
            x = PCA(n_components=pca_dims, svd_solver="full").fit_transform(x)  # standard denoising step
        tsne = TSNE(n_components=2, perplexity=float(self.options["perplexity"]), max_iter=int(self.options["max_iter"]),
                    metric=self.options["metric"], init=self.options["init"], learning_rate="auto", random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)


class UMAP2(Projection):
    name = "umap"

    def __init__(self, **options: Any) -> None:
        o = dict(options)
        o["n_neighbors"] = _number("umap", "n_neighbors", o.get("n_neighbors", 15), 2, integer=True)
        o["min_dist"] = _number("umap", "min_dist", o.get("min_dist", 0.1), 0)
        o["metric"] = _choice("umap", "metric", o.get("metric", "euclidean"), ("euclidean", "cosine"))
        super().__init__(**o)

    def check(self, n_points: int, dim: int) -> None:
        super().check(n_points, dim)
        if int(self.options["n_neighbors"]) >= n_points:
            raise UsageError(f"UMAP n_neighbors {self.options['n_neighbors']} must be smaller than the number of "
                             f"points ({n_points})")

    def fit_transform(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=int(self.options["n_neighbors"]),
                            min_dist=float(self.options["min_dist"]), metric=self.options["metric"], random_state=seed)
        out = reducer.fit_transform(np.asarray(x, dtype=np.float32))
        if not np.isfinite(out).all():
            raise DataError("UMAP produced non-finite coordinates")
        return np.asarray(out, dtype=np.float32)


def _build(cls):
    def build(**options: Any) -> Projection:
        return cls(**options)

    build.__name__ = build.__qualname__ = f"build_{cls.name}"
    return build


def specs() -> list[ProjectionSpec]:
    out = [
        ProjectionSpec(
            name="tsne",
            build=_build(TSNE2),
            description="t-SNE (Barnes-Hut, seeded; init=pca is stable across seeds, init=random varies with --seed); PCA to pca_dims first",
            options={"perplexity": 30.0, "max_iter": 1000, "pca_dims": 50, "metric": "euclidean", "init": "pca"},
            reference="van der Maaten & Hinton 2008, Visualizing Data using t-SNE (scikit-learn)",
        ),
        ProjectionSpec(
            name="pca",
            build=_build(PCA2),
            description="First two principal components (linear, exact, fast)",
            options={"whiten": False},
            reference="scikit-learn PCA",
        ),
    ]
    if importlib.util.find_spec("umap") is not None:
        out.append(ProjectionSpec(
            name="umap",
            build=_build(UMAP2),
            description="UMAP (umap-learn, optional), seeded",
            options={"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean"},
            deterministic=True,
            reference="McInnes et al. 2018, UMAP (umap-learn)",
        ))
    return out


@hookimpl
def register_projections(register):
    for spec in specs():
        register(spec)
