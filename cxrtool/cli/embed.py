"""``cxrtool embed``: embeddings of a checkpoint's layer, kNN on them, 2-D projections, similar cases.

Every sub-command takes ``--data``: images (folder per class, CSV manifest, MedMNIST .npz), embedded
on the fly with ``--checkpoint``/``--layer``, or an embeddings ``.npz`` written by ``embed extract``,
so a large set is embedded once and reused by ``knn``, ``project`` and ``similar``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cxrtool.cli._common import CheckpointOpt, JsonOpt, err_console, fmt, out_console, print_json, progress_bars

embed_app = typer.Typer(
    name="embed",
    help="Embeddings: extract them, kNN-classify on them, project them to 2-D, find similar cases.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

DataOpt = Annotated[Path, typer.Option(
    "--data", "-d", help="Images (folder per class, CSV manifest, MedMNIST .npz) or an embeddings .npz from `embed extract`.")]
LayerOpt = Annotated[Optional[str], typer.Option(
    help="Layer whose output (average-pooled if spatial) is the embedding (default: the checkpoint's embedding layer).")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    help="Labels: folder, kermany-subtype or column:NAME (default: as in training; stored embeddings: as stored).")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="Number of neighbours.")]
MetricOpt = Annotated[str, typer.Option(help="Distance: cosine or euclidean.")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]
StrictOpt = Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: next to the embeddings).")]


# ------------------------------------------------------------------------------------- sources


class _Models:
    """The checkpoint and layer, loaded once and only when something has to be embedded.

    Stored embeddings pin them: images embedded later in the same command (a ``--query`` of images,
    the ``similar`` query) use the stored embeddings' checkpoint and layer unless told otherwise, and
    a checkpoint or layer that contradicts them is a usage error (the vectors would not be comparable).
    """

    def __init__(self, checkpoint: Path | None, layer: str | None, batch_size: int, strict: bool, bars) -> None:
        self.checkpoint, self.layer, self.batch_size, self.strict, self.bars = checkpoint, layer, batch_size, strict, bars
        self._ckpt = None
        self._sha: str | None = None
        self._pinned = None  # the first stored embeddings seen

    def ckpt(self):
        if self._ckpt is None:
            from cxrtool import checkpoint as C
            from cxrtool.embed import file_sha256
            from cxrtool.errors import UsageError

            source = self.checkpoint
            if source is None and self._pinned is not None and self._pinned.checkpoint:
                source = Path(self._pinned.checkpoint)
                if not source.is_file():
                    raise UsageError(f"the embeddings were made with {source}, which no longer exists; "
                                     "pass --checkpoint")
            self._ckpt = C.load(source)
            self._sha = file_sha256(self._ckpt.path)
            pinned = self._pinned
            if pinned is not None and pinned.checkpoint_sha256 and self._sha != pinned.checkpoint_sha256:
                raise UsageError(f"{self._ckpt.path} is not the checkpoint the stored embeddings were made with "
                                 f"({pinned.checkpoint}, or it changed since); re-run `embed extract`")
        return self._ckpt

    @property
    def sha(self) -> str:
        self.ckpt()
        return self._sha or ""

    def resolved_layer(self) -> str | None:
        """``--layer``, else the layer of the stored embeddings, else None (the checkpoint's default)."""
        return self.layer or (self._pinned.layer if self._pinned is not None else None)

    def check_stored(self, emb, path: Path) -> None:
        """Options that contradict stored embeddings are a usage error; the first stored set pins the rest."""
        from cxrtool.errors import UsageError

        if self.layer and self.layer not in (emb.layer, emb.layer.removeprefix("stage1.")):
            raise UsageError(f"{path} holds embeddings of layer {emb.layer!r}, not {self.layer!r}; "
                             f"re-run `cxrtool embed extract --layer {self.layer}`")
        if self._pinned is not None and self._pinned.layer != emb.layer:
            raise UsageError(f"{path} holds embeddings of layer {emb.layer!r}, the other set of {self._pinned.layer!r}")
        loaded = self.checkpoint is not None or self._ckpt is not None
        if emb.checkpoint_sha256 and loaded and self.sha != emb.checkpoint_sha256:
            raise UsageError(f"{path} was made with another checkpoint ({emb.checkpoint}) than {self.ckpt().path}")
        if (self._pinned is not None and emb.checkpoint_sha256 and self._pinned.checkpoint_sha256
                and emb.checkpoint_sha256 != self._pinned.checkpoint_sha256):
            raise UsageError(f"{path} was made with another checkpoint ({emb.checkpoint}) than the other set "
                             f"({self._pinned.checkpoint})")
        if self._pinned is None:
            self._pinned = emb


class _Source:
    """``--data`` (or ``--query``): stored embeddings or images embedded on demand, split by split."""

    def __init__(self, path: Path, models: _Models, labels: str | None) -> None:
        from cxrtool.embed import Embeddings, is_embeddings_file, relabel

        self.path, self.models, self.labels = path, models, labels
        self.stored = None
        self._sets = None
        if is_embeddings_file(path):
            emb = Embeddings.load(path)
            models.check_stored(emb, path)
            self.stored = relabel(emb, labels)

    def _image_sets(self):
        if self._sets is None:
            from cxrtool.data import load_splits

            ckpt = self.models.ckpt()
            labels = self.labels or (ckpt.meta.get("train_config") or {}).get("labels") or "folder"
            if labels.startswith("column:") and self.path.suffix.lower() != ".csv":
                labels = "kermany-subtype" if "subtype" in labels else "folder"
            self._sets = load_splits(self.path, labels=labels)
        return self._sets

    def counts(self) -> dict[str, int]:
        if self.stored is not None:
            return self.stored.split_counts()
        return {name: len(ds) for name, ds in self._image_sets().items()}

    def get(self, splits: list[str] | None):
        """Embeddings of ``splits`` (None: all)."""
        from cxrtool.embed import Embeddings, extract, resolve_layer
        from cxrtool.errors import DataError, UsageError

        if self.stored is not None:
            emb = self.stored.select(splits)
        else:
            sets = self._image_sets()
            names = splits or list(sets)
            for s in names:
                if s not in sets:
                    raise UsageError(f"split {s!r} not in {self.path} (found: {', '.join(sets)})")
            ckpt = self.models.ckpt()
            layer = resolve_layer(ckpt, self.models.resolved_layer())  # before any decoding
            for s in names:
                if len(sets[s]) == 0:
                    raise DataError(f"split {s!r} of {self.path} has no images")
            parts = [extract(ckpt, sets[s], layer=layer, split=s, batch_size=self.models.batch_size,
                             strict=self.models.strict, sha256=self.models.sha,
                             progress=self.models.bars(f"embed {s}", len(sets[s]))) for s in names]
            emb = Embeddings.concat(parts)
        if len(emb) == 0:
            raise DataError(f"no embeddings in {self.path}" + (f" (split {', '.join(splits)})" if splits else ""))
        return emb

    def base(self) -> Path:
        """Where outputs go by default."""
        if self.stored is not None:
            return self.path.parent
        return self.models.ckpt().path.parent / f"embed-{self.path.stem}"


def _options_summary(emb) -> dict[str, Any]:
    return {"layer": emb.layer, "checkpoint": emb.checkpoint, "model": emb.model, "dim": emb.dim}


# --------------------------------------------------------------------------------------- extract


@embed_app.command()
def extract(
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    layer: LayerOpt = None,
    labels: LabelsOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split(s) of --data to embed (repeatable) (default: all).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="An .npz file, or a folder for embeddings.npz (default: <run>/embed-<data>/embeddings.npz).")] = None,
    batch_size: BatchOpt = 64,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Embed every image: a float32 matrix with paths, labels, patient ids and splits (.npz + CSV index)."""
    from cxrtool.errors import UsageError

    if out is not None and out.suffix and out.suffix.lower() != ".npz":
        raise UsageError(f"--out must be an .npz file or a folder, got {out}")
    with progress_bars(not quiet) as bars:
        models = _Models(checkpoint, layer, batch_size, strict, bars)
        src = _Source(data, models, labels)
        if src.stored is not None:
            raise UsageError(f"{data} already holds embeddings; extract needs images")
        emb = src.get(split)
    target = out if out is not None and out.suffix else (out or src.base()) / "embeddings.npz"
    npz, index = emb.save(target)
    result = {"embeddings": str(npz), "index": str(index), "n": len(emb), **_options_summary(emb),
              "splits": emb.split_counts(), "classes": emb.counts(), "data": str(data)}
    if json_out:
        print_json(result)
        return
    out_console.print(f"{len(emb)} embeddings of layer {emb.layer} ({emb.dim} values each) from {emb.checkpoint}")
    out_console.print("splits: " + ", ".join(f"{k} {v}" for k, v in result["splits"].items())
                      + "   classes: " + ", ".join(f"{k} {v}" for k, v in result["classes"].items()))
    out_console.print(f"written: {npz} and {index}")


# ------------------------------------------------------------------------------------------- knn


@embed_app.command()
def knn(
    data: DataOpt,
    query: Annotated[Optional[Path], typer.Option(help="A second set to score (images or embeddings .npz) (default: the test split of --data).")] = None,
    checkpoint: CheckpointOpt = None,
    layer: LayerOpt = None,
    labels: LabelsOpt = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split of --data to fit on (default: train if present, else all).")] = None,
    query_split: Annotated[Optional[str], typer.Option(help="Split of the query set to score (default: test if present).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Cross-validate on the fit set with N folds grouped by patient (default when there is nothing to score: 5).")] = None,
    k: KOpt = 7,
    metric: MetricOpt = "cosine",
    seed: Annotated[int, typer.Option(help="Seed of the cross-validation folds.")] = 0,
    out: OutDirOpt = None,
    batch_size: BatchOpt = 64,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """k-nearest-neighbour classification on embeddings: fit on one set, score on another (or patient-grouped CV)."""
    from cxrtool import embed as E
    from cxrtool import report
    from cxrtool.errors import UsageError
    from cxrtool.io import write_csv, write_json

    E._check_knn(k, metric)
    if folds is not None and (query is not None or query_split):
        raise UsageError("--folds cross-validates on the fit set; it cannot be combined with --query/--query-split")
    with progress_bars(not quiet) as bars:
        models = _Models(checkpoint, layer, batch_size, strict, bars)
        src = _Source(data, models, labels)
        avail = src.counts()
        ref_split = split or ("train" if "train" in avail and len(avail) > 1 else None)
        q_src, q_split = None, None
        if folds is None:
            if query is not None:
                q_src = _Source(query, models, labels)
                q_split = query_split or ("test" if "test" in q_src.counts() else None)
            elif query_split or ("test" in avail and ref_split not in (None, "test")):
                q_src, q_split = src, query_split or "test"
                if ref_split in (None, q_split):
                    raise UsageError("the fit and scored rows are the same; pick --split and --query-split, or --folds")
        ref = src.get([ref_split] if ref_split else None)
        if q_src is None:
            result = E.knn_cross_validate(ref, k=k, metric=metric, folds=folds or 5, seed=seed)
            scored = ref
        else:
            scored = q_src.get([q_split] if q_split else None).with_classes(ref.class_names)
            result = E.knn_score(ref, scored, k=k, metric=metric)
    votes, predicted = result.pop("votes"), result.pop("predicted")
    names = ref.class_names
    result.update({"data": str(data), "fit_split": ref_split or "all", "query": str(query or data),
                   "query_split": (q_split or "all") if q_src is not None else None, **_options_summary(ref)})
    out = out or src.base() / f"knn-k{k}-{metric}-{'-'.join(names).lower()}"
    cm = result["confusion_matrix"]
    rows = [{"path": p, "patient_id": pt, "split": s, "label": names[y], "predicted": names[d],
             **{f"votes_{n}": float(v[j]) for j, n in enumerate(names)}}
            for p, pt, s, y, d, v in zip(scored.paths, scored.patients, scored.splits, scored.labels, predicted, votes, strict=True)]
    outputs = {"metrics": out / "metrics.json", "predictions": out / "predictions.csv",
               "confusion_csv": out / "confusion.csv", "confusion_png": out / "confusion.png"}
    result["outputs"] = {key: str(p) for key, p in outputs.items()}
    write_csv(outputs["predictions"], rows)
    report.write_confusion_csv(cm, names, outputs["confusion_csv"])
    how = f"{result['folds']}-fold CV by {result['grouped_by']}" if result["mode"] == "cross-validation" else \
        f"fit {result['fit_split']} ({result['n_reference']}), score {result['query_split']}"
    report.plot_confusion_matrix(cm, names, outputs["confusion_png"], title=f"kNN k={k} {metric}, {how}")
    write_json(outputs["metrics"], result)
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    out_console.print(f"kNN (k={k}, {metric}) — {how}: {result['n']} images scored")
    table = Table()
    for col in ("class", "recall", "precision", "n"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, pc in result["per_class"].items():
        table.add_row(cls, fmt(pc["recall"]), fmt(pc["precision"]), str(pc["support"]))
    out_console.print(table)
    extra = f"   fold accuracy sd {fmt(result['fold_accuracy_sd'])}" if "fold_accuracy_sd" in result else ""
    out_console.print(f"accuracy {fmt(result['accuracy'])}   balanced accuracy {fmt(result['balanced_accuracy'])}{extra}")
    if result.get("shared_patients"):
        err_console.print(f"[yellow]note:[/] {result['shared_patients']} patient(s) are on both sides")
    out_console.print(f"outputs in {out}/ (metrics.json, predictions.csv, confusion.csv, confusion.png)")


# --------------------------------------------------------------------------------------- project


@embed_app.command()
def project(
    data: DataOpt,
    query: Annotated[Optional[Path], typer.Option(help="A second set drawn with --data (images or embeddings .npz).")] = None,
    checkpoint: CheckpointOpt = None,
    layer: LayerOpt = None,
    labels: LabelsOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split(s) of --data to draw (repeatable) (default: all).")] = None,
    query_split: Annotated[Optional[list[str]], typer.Option(help="Split(s) of --query to draw (default: all).")] = None,
    method: Annotated[str, typer.Option(help="Projection plugin (see `cxrtool embed projections`).")] = "tsne",
    perplexity: Annotated[Optional[float], typer.Option(help="t-SNE perplexity (must be smaller than the number of points).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Projection option KEY=VALUE (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the projection.")] = 0,
    out: OutDirOpt = None,
    batch_size: BatchOpt = 64,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """2-D projection (t-SNE, PCA, ...): scatter PNG by class (and by split when there are several) + coordinates CSV."""
    from cxrtool.embed import Embeddings, build_projection, parse_options
    from cxrtool.io import write_csv, write_json

    options: dict[str, Any] = parse_options(option)
    if perplexity is not None:
        options["perplexity"] = perplexity
    proj = build_projection(method, options)
    with progress_bars(not quiet) as bars:
        models = _Models(checkpoint, layer, batch_size, strict, bars)
        src = _Source(data, models, labels)
        q_src = _Source(query, models, labels) if query is not None else None

        def estimate(s: _Source, chosen):
            c = s.counts()
            return sum(c.get(x, 0) for x in chosen) if chosen else sum(c.values())

        n_est = estimate(src, split) + (estimate(q_src, query_split) if q_src else 0)
        proj.check(n_est, 2)  # fail before embedding when the options cannot work
        emb = src.get(split)
        sets = list(emb.splits)
        if q_src is not None:
            qe = q_src.get(query_split)
            qsets = list(qe.splits)
            if set(qsets) & set(sets):
                qsets = [f"query:{s}" for s in qsets]
            emb, sets = Embeddings.concat([emb, qe]), sets + qsets
        proj.check(len(emb), emb.dim)
        coords = proj.fit_transform(emb.vectors, seed=seed)
    out = out or src.base() / f"project-{method}"
    names = emb.class_names
    label_of = [names[y] if y >= 0 else "unlabelled" for y in emb.labels]
    order = list(names) + (["unlabelled"] if "unlabelled" in label_of else [])
    rank = {"train": 0, "val": 1, "all": 2, "test": 3}  # held-out sets drawn last, on top
    set_order = sorted(dict.fromkeys(sets), key=lambda s: (rank.get(s.removeprefix("query:"), 2), s.startswith("query:")))
    opts = dict(proj.options)
    title = f"{method} of {emb.layer} embeddings ({emb.model or 'model'}), n={len(emb)}\n" + \
        ", ".join(f"{k}={v}" for k, v in opts.items()) + f", seed={seed}"
    rows = [{"path": p, "label": lab, "split": s, "patient_id": pt, "x": float(x), "y": float(y)}
            for p, lab, s, pt, (x, y) in zip(emb.paths, label_of, sets, emb.patients, coords, strict=True)]
    outputs = {"coordinates": out / "coordinates.csv", "by_class_png": out / "by-class.png"}
    if len(set_order) > 1:
        outputs["by_split_png"] = out / "by-split.png"
    outputs["summary"] = out / "projection.json"
    from cxrtool.embed import plot_projection

    write_csv(outputs["coordinates"], rows, ["path", "label", "split", "patient_id", "x", "y"])
    markers = ["o", "^", "s", "D", "v", "P"]
    set_marker = {s: markers[i % len(markers)] for i, s in enumerate(set_order)}
    if len(set_order) > 1:
        # by class, one marker per split: both sets on one map
        _plot_class_and_split(coords, label_of, order, sets, set_order, set_marker, outputs["by_class_png"], title)
        palette = ["0.55", "crimson", "C0", "C2", "C4", "C1"]
        plot_projection(coords, sets, set_order, outputs["by_split_png"], title=title, legend_title="set",
                        markers=[set_marker[s] for s in set_order], colors=palette[: len(set_order)],
                        emphasise_later=True)
    else:
        plot_projection(coords, label_of, order, outputs["by_class_png"], title=title, legend_title="class")
    result = {"method": method, "options": opts, "seed": seed, "n": len(emb), "sets": {s: sets.count(s) for s in set_order},
              "classes": {c: label_of.count(c) for c in order}, "data": str(data),
              "query": str(query) if query else None, **_options_summary(emb),
              "outputs": {k: str(v) for k, v in outputs.items()}}
    write_json(outputs["summary"], result)
    if json_out:
        print_json(result)
        return
    out_console.print(f"{method}: {len(emb)} points ({', '.join(f'{k} {v}' for k, v in result['sets'].items())})")
    out_console.print(f"outputs in {out}/ ({', '.join(Path(v).name for v in result['outputs'].values())})")


def _plot_class_and_split(coords, label_of, order, sets, set_order, set_marker, path, title) -> None:
    """Colour by class, marker by set (a legend entry per class x set)."""
    import numpy as np

    from cxrtool.embed import _pyplot
    from cxrtool.io import save_figure

    plt = _pyplot()
    n = len(coords)
    size = 16 if n < 500 else 8 if n < 3000 else 5
    fig, ax = plt.subplots(figsize=(7.6, 6.6))
    lab, st = np.array(label_of), np.array(sets)
    for j, s in enumerate(set_order):
        for i, c in enumerate(order):
            m = (lab == c) & (st == s)
            if m.any():
                ax.scatter(coords[m, 0], coords[m, 1], s=size * (1.0 if j == 0 else 1.6), marker=set_marker[s],
                           color=f"C{i % 10}", alpha=0.5 if j == 0 else 0.85, linewidths=0,
                           edgecolors="black", label=f"{c} · {s} (n={int(m.sum())})", rasterized=n > 2000)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    leg = ax.legend(title="class · set", fontsize=8.5, markerscale=max(1.0, 30 / size) ** 0.5, framealpha=0.9)
    leg.get_title().set_fontsize(9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------------------- similar


@embed_app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="The query image.")],
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    layer: LayerOpt = None,
    labels: LabelsOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split(s) of --data to search (repeatable) (default: all).")] = None,
    k: KOpt = 8,
    metric: MetricOpt = "cosine",
    other_patients: Annotated[bool, typer.Option(help="Leave out images of the query's own patient (Kermany names / patient ids).")] = False,
    thumb_size: Annotated[int, typer.Option(help="Thumbnail size in pixels.")] = 160,
    out: OutDirOpt = None,
    batch_size: BatchOpt = 64,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The most similar images of an embedded set to a query image: CSV + thumbnail grid (a "show me similar cases")."""
    import numpy as np

    from cxrtool import embed as E
    from cxrtool.data import ImageSet, kermany_patient
    from cxrtool.imaging import read_image
    from cxrtool.io import write_csv, write_json

    E._check_knn(k, metric)
    if not 16 <= thumb_size <= 1024:
        from cxrtool.errors import UsageError

        raise UsageError(f"--thumb-size must be between 16 and 1024, got {thumb_size}")
    read_image(image)  # an unreadable query fails here, before anything is embedded or written
    with progress_bars(not quiet) as bars:
        models = _Models(checkpoint, layer, batch_size, strict, bars)
        src = _Source(data, models, labels)
        emb = src.get(split)
        ckpt = models.ckpt()
        q = E.extract(ckpt, ImageSet([str(image)], np.array([-1]), emb.class_names, [str(image)]),
                      layer=emb.layer, split="query", strict=True, sha256=models.sha)
    qpath = image.resolve()
    same = np.array([not p.startswith("npz://") and Path(p).resolve() == qpath for p in emb.paths])
    full = src.stored if src.stored is not None else emb  # the query may sit in a split not searched
    in_full = [i for i, p in enumerate(full.paths) if not p.startswith("npz://") and Path(p).resolve() == qpath]
    q_label = next((full.class_names[full.labels[i]] for i in in_full if full.labels[i] >= 0), None)
    q_patient = next((full.patients[i] for i in in_full), None) or kermany_patient(str(image))
    exclude = same.copy()
    if other_patients and q_patient:
        exclude |= np.array([pt == q_patient for pt in emb.patients])
    idx, dist = E.nearest(emb, q.vectors[0], k=k, metric=metric, exclude=exclude)
    names = emb.class_names
    neighbours = [{"rank": r + 1, "path": emb.paths[i], "label": names[emb.labels[i]] if emb.labels[i] >= 0 else "",
                   "patient_id": emb.patients[i], "split": emb.splits[i], "distance": float(d)}
                  for r, (i, d) in enumerate(zip(idx, dist, strict=True))]
    votes: dict[str, int] = {}
    for n in neighbours:
        if n["label"]:
            votes[n["label"]] = votes.get(n["label"], 0) + 1
    out = out or src.base() / f"similar-{image.stem}"
    outputs = {"csv": out / "similar.csv", "grid_png": out / "similar.png", "summary": out / "similar.json"}
    resize = (emb.preprocessing or {}).get("resize", "letterbox")
    tiles = [(E.read_thumbnail(n["path"], thumb_size, resize),
              f"#{n['rank']} {n['label'] or '?'}  d={n['distance']:.3g}\n{_short(_name(n['path']))}") for n in neighbours]
    query_img = E.read_thumbnail(str(image), thumb_size, resize)
    qcap = f"QUERY{(' · ' + q_label) if q_label else ''}\n{_short(image.name)}"
    result = {"query": str(image), "query_label": q_label, "query_patient": q_patient, "k": k, "metric": metric,
              "excluded": int(exclude.sum()), "neighbour_votes": votes, "neighbours": neighbours, "data": str(data),
              **_options_summary(emb), "outputs": {key: str(v) for key, v in outputs.items()}}
    write_csv(outputs["csv"], [{"query": str(image), **n} for n in neighbours],
              ["query", "rank", "path", "label", "patient_id", "split", "distance"])
    E.plot_similar(query_img, qcap, tiles, outputs["grid_png"],
                   title=f"{k} most similar ({metric} distance, layer {emb.layer}) among {len(emb)} images")
    write_json(outputs["summary"], result)
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    out_console.print(f"most similar to {image} ({metric} distance, layer {emb.layer}):", soft_wrap=True)
    table = Table()
    for col in ("rank", "image", "label", "distance"):
        table.add_column(col, overflow="fold", justify="right" if col in ("rank", "distance") else "left")
    for n in neighbours:
        table.add_row(str(n["rank"]), n["path"], n["label"], f"{n['distance']:.4f}")
    out_console.print(table)
    out_console.print(f"outputs in {out}/ (similar.csv, similar.png)")


def _name(path: str) -> str:
    """A short name for a caption: the file name, or ``split/index`` of an ``npz://`` reference."""
    return path.rpartition("#")[2] if path.startswith("npz://") else Path(path).name


def _short(name: str, n: int = 26) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ---------------------------------------------------------------------------------- inventory


@embed_app.command()
def projections(json_out: JsonOpt = False) -> None:
    """List the projection plugins usable with `embed project --method`."""
    from cxrtool import registry

    specs = registry.all_specs("projection")
    if json_out:
        print_json([{**s.to_dict(), "plugin": registry.provider("projection", n)} for n, s in specs.items()])
        return
    from rich.table import Table

    table = Table(title="projections (embed project --method NAME --option KEY=VALUE)")
    for col in ("name", "description", "options", "plugin"):
        table.add_column(col, overflow="fold")
    for name, spec in specs.items():
        table.add_row(name, spec.description, ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-",
                      registry.provider("projection", name))
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``embed`` command group to the CLI."""
    app.add_typer(embed_app, name="embed", rich_help_panel="Analysis")
