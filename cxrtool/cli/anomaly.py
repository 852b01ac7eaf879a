"""``cxrtool anomaly train|score|evaluate`` and ``cxrtool detectors``: anomaly detection trained on
normal chest X-rays only, with thresholds set without abnormal examples (see docs/anomaly.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._common import (
    JsonOpt,
    OverlayOnOpt,
    check_overlay_on,
    err_console,
    fmt,
    out_console,
    print_json,
    progress_bars,
)

anomaly_app = typer.Typer(
    help="Anomaly detectors trained on normal images only: train, score images, evaluate on labelled data.",
    no_args_is_help=True,
)

AnomalyCheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Anomaly checkpoint file or run folder (default: the latest `anomaly train` run)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
BatchOpt = Annotated[int, typer.Option(help="Images per batch when scoring.")]
StrictOpt = Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")]


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _parse_options(items: list[str] | None) -> dict:
    import json

    from cxrtool.errors import UsageError

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@anomaly_app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Normal images: a plain folder, or labelled data (folder per class, CSV, .npz) of which only the normal class is used.")],
    detector: Annotated[str, typer.Option("--detector", "-D", help="Detector; see `cxrtool detectors`.")] = "autoencoder",
    option: Annotated[Optional[list[str]], typer.Option("--option", help="KEY=VALUE detector option (repeatable), e.g. latent=16, epochs=40, backbone=random:resnet18.")] = None,
    backbone_checkpoint: Annotated[Optional[Path], typer.Option(help="Feature detectors: a classifier checkpoint (uses abnormal labels!) or an autoencoder anomaly checkpoint as the backbone.")] = None,
    normal_class: Annotated[Optional[str], typer.Option(help="Which class is normal (default: a class named normal / no finding / healthy).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Which split of --data to train on (default: train, else all).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input size in pixels (default: the backbone checkpoint's, else 128).")] = None,
    resize: Annotated[Optional[str], typer.Option(help="letterbox | crop | stretch (default: letterbox).")] = None,
    equalize: Annotated[Optional[str], typer.Option(help="none | hist | clahe (default: none).")] = None,
    threshold_fraction: Annotated[float, typer.Option(help="Share of normal patients held out to set the threshold (never used to fit).")] = 0.2,
    target_specificity: Annotated[float, typer.Option(help="Share of held-out normal images that must score below the threshold.")] = 0.95,
    batch_size: Annotated[int, typer.Option(help="Images per batch for feature extraction and scoring.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (splits, initialisation, sampling).")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    strict: StrictOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<time>-anomaly-<detector>).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name under runs/.")] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a detector on normal images only; set its threshold on held-out normal patients."""
    from cxrtool.anomaly import AnomalyConfig, get_spec, train_detector
    from cxrtool.errors import UsageError

    spec = get_spec(detector)
    options = _parse_options(option)
    if backbone_checkpoint is not None:
        if not spec.uses_backbone:
            raise UsageError(f"detector {detector!r} takes no backbone; --backbone-checkpoint is for "
                             "feature detectors (padim, patchcore)")
        if "backbone" in options:
            raise UsageError("give --backbone-checkpoint or --option backbone=..., not both")
        options["backbone"] = str(backbone_checkpoint)
    pp_defaults = {"size": 128, "resize": "letterbox", "equalize": "none"}
    backbone = options.get("backbone")
    if spec.uses_backbone and backbone and not str(backbone).startswith("random:"):
        from cxrtool import checkpoint as C

        path = C.resolve(backbone)
        pp_defaults.update({k: v for k, v in (C.read_meta(path).get("preprocessing") or {}).items() if k in pp_defaults})
        options["backbone"] = str(path)
    cfg = AnomalyConfig(
        data=str(data), detector=detector, options=options, normal_class=normal_class, split=split,
        size=size or pp_defaults["size"], resize=resize or pp_defaults["resize"],
        equalize=equalize or pp_defaults["equalize"], threshold_fraction=threshold_fraction,
        target_specificity=target_specificity, batch_size=batch_size, seed=seed, threads=threads, strict=strict,
        out=str(out) if out else None, name=name,
    )

    def log(message: str) -> None:
        if not quiet or json_out:
            err_console.print(message, soft_wrap=True)

    with progress_bars(not quiet) as bars:
        summary = train_detector(cfg, progress=bars, log=log if not quiet else None)
    if json_out:
        print_json(summary)
        return
    op = summary["operating_point"]
    st = summary["threshold_stats"]
    out_console.print(f"[bold]{summary['detector']}[/]: {summary['describe']}", soft_wrap=True)
    out_console.print(
        f"fitted on {summary['n_fit']} normal images in {summary['fit_seconds']:.0f} s; threshold {op['threshold']:.5g} "
        f"from {summary['n_threshold']} held-out normal images: {op['specificity']:.1%} of them score below it "
        f"(target {op['target']['specificity']:.0%}); slice scores median {st['median']:.4g}, q95 {st['q95']:.4g}",
        soft_wrap=True,
    )
    if summary["excluded"]:
        out_console.print("left out (not normal): " + ", ".join(f"{k}: {v}" for k, v in summary["excluded"].items()))
    if not summary["trained_on_normal_only"]:
        out_console.print("[yellow]note:[/] the backbone was trained with abnormal labels; this detector is not "
                          "trained on normal images only")
    out_console.print(f"checkpoint: {summary['checkpoint']}")


def _unique_name(stem: str, used: set[str]) -> str:
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}.png"
    used.add(name)
    return name


def _percentile(meta: dict, score: float) -> float | None:
    import bisect

    ref = meta.get("threshold_scores") or []
    return bisect.bisect_left(ref, score) / len(ref) if ref else None


@anomaly_app.command("score")
def score(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    checkpoint: AnomalyCheckpointOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a CSV (path, score, decision, normal percentile, heatmap).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold on the score (default: the checkpoint's).")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Folder for heatmap overlay PNGs (default: <run>/heatmaps).")] = None,
    no_heatmaps: Annotated[bool, typer.Option("--no-heatmaps", help="Do not write overlays.")] = False,
    overlay_on: OverlayOnOpt = "original",
    batch_size: BatchOpt = 32,
    threads: ThreadsOpt = None,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Anomaly score, normal/abnormal decision and a heatmap overlay for each image."""
    import numpy as np

    from cxrtool.anomaly import load_detector, score_set, write_overlay
    from cxrtool.data import ImageSet, gather_images
    from cxrtool.imaging import overlay_base

    check_overlay_on(overlay_on)
    _threads(threads)
    loaded = load_detector(checkpoint)
    paths = gather_images(images)
    ds = ImageSet(paths, np.full(len(paths), -1), ["image"], paths)
    thr = float(threshold) if threshold is not None else loaded.threshold
    scale = loaded.meta.get("heatmap_scale") or [0.0, 1.0]
    hm_dir = None if no_heatmaps else (heatmaps or loaded.path.parent / "heatmaps")
    written: dict[int, str] = {}
    used: set[str] = set()

    def on_batch(arr, idx, sc, hm) -> None:
        if hm_dir is None:
            return
        for k, i in enumerate(idx):
            decision = "ABNORMAL" if sc[k] >= thr else "normal"
            target = hm_dir / _unique_name(Path(paths[i]).stem, used)
            image, heat, _ = overlay_base(paths[i], arr[k], hm[k], loaded.preprocessing, overlay_on)
            write_overlay(target, image, heat, scale, caption=f"{Path(paths[i]).name}  score {sc[k]:.4g} "
                          f"(threshold {thr:.4g}): {decision}")
            written[i] = str(target)

    with progress_bars(not quiet and len(paths) > 1) as bars:
        res = score_set(loaded, ds, batch_size=batch_size, strict=strict, progress=bars("score", len(ds)),
                        on_batch=on_batch)
    rows = []
    for i, s in zip(res.kept, res.scores):
        rows.append({"path": paths[i], "score": float(s), "threshold": thr,
                     "decision": "abnormal" if s >= thr else "normal",
                     "normal_percentile": _percentile(loaded.meta, float(s)), "heatmap": written.get(int(i))})
    fields = ["path", "score", "threshold", "decision", "normal_percentile", "heatmap"]
    if output:
        from cxrtool.io import write_csv

        write_csv(output, rows, fields)
    if json_out:
        print_json({"checkpoint": str(loaded.path), "detector": loaded.meta["detector"]["name"], "threshold": thr,
                    "trained_on_normal_only": loaded.meta.get("trained_on_normal_only"),
                    "scores": rows, "skipped": [m for _, m in res.failures]})
        return
    if output:
        out_console.print(f"{len(rows)} scores written to {output}" + (f"; overlays in {hm_dir}/" if hm_dir else ""))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} image(s) — {loaded.meta['detector']['name']} — threshold {thr:.4g}")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("decision")
    table.add_column("normal pct", justify="right")
    for r in rows:
        pct = r["normal_percentile"]
        table.add_row(r["path"], f"{r['score']:.4g}", ("[red]abnormal[/]" if r["decision"] == "abnormal" else "normal"),
                      "-" if pct is None else f"{pct:.0%}")
    out_console.print(table)
    if hm_dir:
        out_console.print(f"overlays in {hm_dir}/")


def _lesions_by_path(data: Path) -> dict[str, list] | None:
    """Lesion discs from a labels.csv with lesion_x/lesion_y/lesion_r columns (phantoms)."""
    import csv

    if data.suffix.lower() != ".csv" and not (data.is_dir() and (data / "labels.csv").is_file()):
        return None
    path = data if data.suffix.lower() == ".csv" else data / "labels.csv"
    from cxrtool.synthetic import parse_lesions

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "lesion_x" not in (reader.fieldnames or []):
            return None
        return {str((path.parent / r["path"]).resolve()): parse_lesions(r) for r in reader}


@anomaly_app.command("evaluate")
def evaluate(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled images: folder per class, CSV manifest or .npz.")],
    checkpoint: AnomalyCheckpointOpt = None,
    split: Annotated[Optional[str], typer.Option(help="Which split of --data (default: test, else val, else all).")] = None,
    labels: Annotated[str, typer.Option(help="folder | kermany-subtype | column:NAME (per-class AUROC for each abnormal class).")] = "folder",
    normal_class: Annotated[Optional[str], typer.Option(help="The normal class (default: the checkpoint's, else one named normal).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold (default: the checkpoint's).")] = None,
    examples: Annotated[int, typer.Option(help="Overlays of the N highest-scoring abnormal and normal and the N lowest-scoring abnormal images.")] = 3,
    overlay_on: OverlayOnOpt = "original",
    seed: Annotated[int, typer.Option(help="Seed of the shuffled-label control.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics.json, scores.csv, histogram.png, roc.png, examples/ (default: <run>/eval-<data>-<split>).")] = None,
    batch_size: BatchOpt = 32,
    threads: ThreadsOpt = None,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Image-level AUROC / average precision, sensitivity and specificity at the stored threshold,
    a shuffled-label control, score histograms (PNG) and example overlays."""
    import numpy as np

    from cxrtool import report
    from cxrtool.anomaly import (
        _normal_name,
        image_metrics,
        load_detector,
        plot_score_histogram,
        pointing_game,
        score_set,
        write_overlay,
    )
    from cxrtool.data import iter_batches, load_splits
    from cxrtool.errors import DataError
    from cxrtool.imaging import overlay_base
    from cxrtool.infer import pick_split
    from cxrtool.io import write_csv, write_json

    check_overlay_on(overlay_on)
    _threads(threads)
    loaded = load_detector(checkpoint)
    split_name, ds = pick_split(load_splits(data, labels=labels), split)
    requested = normal_class
    if requested is None:
        stored = loaded.meta.get("normal_class")
        if stored and any(n.lower() == str(stored).lower() for n in ds.class_names):
            requested = stored
    neg_name = _normal_name(ds.class_names, requested, str(data))
    if neg_name is None:
        raise DataError(f"{data}: no normal class among {', '.join(ds.class_names)}; name it with --normal-class")
    if (ds.labels < 0).any():
        raise DataError(f"{int((ds.labels < 0).sum())} image(s) in {data} have no label")
    neg = ds.class_names.index(neg_name)
    thr = float(threshold) if threshold is not None else loaded.threshold
    with progress_bars(not quiet) as bars:
        res = score_set(loaded, ds, batch_size=batch_size, strict=strict, progress=bars("score", len(ds)))
    y = ds.labels[res.kept]
    is_abn = y != neg
    result = image_metrics(is_abn, res.scores, thr, seed=seed)
    result["per_class_auroc"] = {}
    for i, cname in enumerate(ds.class_names):
        if i != neg and (y == i).any():
            sel = (y == i) | (y == neg)
            result["per_class_auroc"][cname] = image_metrics(y[sel] == i, res.scores[sel], None, 0)["auroc"]
    lesions = _lesions_by_path(data)
    if lesions is not None:
        per = [lesions.get(str(Path(ds.paths[i]).resolve()), []) for i in res.kept]
        size = loaded.preprocessing.size
        result["pointing_game"] = pointing_game(res.peaks, per, tolerance=max(1.0, 0.03 * size))
        result["pointing_game"]["note"] = "lesion positions from labels.csv in input pixels (phantoms: same size)"
    result.update({
        "checkpoint": str(loaded.path), "detector": loaded.meta["detector"]["name"],
        "describe": loaded.meta["detector"].get("describe"), "data": str(data), "split": split_name,
        "normal_class": neg_name, "class_counts": {n: int((y == i).sum()) for i, n in enumerate(ds.class_names)},
        "operating_point": loaded.meta.get("operating_point"),
        "trained_on_normal_only": loaded.meta.get("trained_on_normal_only"),
        "skipped": [m for _, m in res.failures],
    })
    out = out or loaded.path.parent / f"eval-{Path(data).stem}-{split_name}"
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"path": ds.paths[i], "label": ds.class_names[yy], "abnormal": bool(a), "score": float(s),
             "decision": "abnormal" if s >= thr else "normal"}
            for i, yy, a, s in zip(res.kept, y, is_abn, res.scores)]
    write_csv(out / "scores.csv", rows, ["path", "label", "abnormal", "score", "decision"])
    plot_score_histogram(out / "histogram.png", normal=res.scores[~is_abn], abnormal=res.scores[is_abn],
                         threshold=thr, reference=np.asarray(loaded.meta.get("threshold_scores") or []),
                         title=f"{result['detector']} on {Path(data).name} [{split_name}]: AUROC {fmt(result['auroc'])}"
                         + ("" if result["trained_on_normal_only"] else "\n(backbone trained with abnormal labels)"),
                         normal_label=f"{neg_name}", abnormal_label="abnormal (" + ", ".join(
                             n for n in ds.class_names if n != neg_name) + ")")
    if result["auroc"] is not None:
        probs = np.stack([-res.scores, res.scores], axis=1)
        op_marker = ({"sensitivity": result["sensitivity"], "specificity": result["specificity"], "threshold": thr}
                     if result.get("sensitivity") is not None and result.get("specificity") is not None else None)
        report.plot_roc(is_abn.astype(int), probs, [neg_name, "abnormal"], out / "roc.png", negative_index=0,
                        operating_point=op_marker, title=f"{result['detector']}: anomaly score ROC")
    # example overlays: most abnormal-looking abnormal and normal images, least abnormal-looking abnormal
    picks: list[tuple[str, int, float]] = []
    if examples > 0:
        order = np.argsort(-res.scores)
        abn_idx = [k for k in order if is_abn[k]]
        nor_idx = [k for k in order if not is_abn[k]]
        picks += [("abnormal-high", k, res.scores[k]) for k in abn_idx[:examples]]
        picks += [("normal-high", k, res.scores[k]) for k in nor_idx[:examples]]
        picks += [("abnormal-low", k, res.scores[k]) for k in abn_idx[::-1][:examples]]
    example_files = []
    if picks:
        sub = ds.subset([int(res.kept[k]) for _, k, _ in picks])
        scale = loaded.meta.get("heatmap_scale") or [0.0, 1.0]
        for arr, idx, _bad in iter_batches(sub, loaded.preprocessing, 16):
            if not len(idx):
                continue
            _, hm = loaded.detector.score(arr)
            for j, i in enumerate(idx):
                tag, k, s = picks[i]
                target = out / "examples" / f"{tag}-{len(example_files) + 1:02d}-{Path(sub.paths[i]).stem}.png"
                image, heat, _ = overlay_base(sub.paths[i], arr[j], hm[j], loaded.preprocessing, overlay_on)
                write_overlay(target, image, heat, scale,
                              caption=f"{ds.class_names[y[k]]}  score {s:.4g} (threshold {thr:.4g})")
                example_files.append(str(target))
    result["outputs"] = {"metrics": str(out / "metrics.json"), "scores": str(out / "scores.csv"),
                         "histogram": str(out / "histogram.png"),
                         "roc": str(out / "roc.png") if result["auroc"] is not None else None,
                         "examples": example_files}
    write_json(out / "metrics.json", result)
    if json_out:
        print_json(result)
        return
    ctrl = result.get("shuffled_label_control") or {}
    from rich.markup import escape

    out_console.print(f"[bold]{result['detector']}[/] on {escape(str(data))} \\[{escape(split_name)}]: "
                      f"{result['n_normal']} normal, {result['n_abnormal']} abnormal images", soft_wrap=True)
    out_console.print(f"AUROC {fmt(result['auroc'])}   average precision {fmt(result['average_precision'])} "
                      f"(prevalence {fmt(result['prevalence'])})   shuffled-label control AUROC "
                      f"{fmt(ctrl.get('auroc_mean'))} ± {fmt(ctrl.get('auroc_std'))}", soft_wrap=True)
    if result["per_class_auroc"] and len(result["per_class_auroc"]) > 1:
        out_console.print("per abnormal class AUROC: " + ", ".join(f"{k} {fmt(v)}" for k, v in result["per_class_auroc"].items()),
                          soft_wrap=True)
    out_console.print(f"at threshold {thr:.5g}: sensitivity {fmt(result.get('sensitivity'))}  specificity "
                      f"{fmt(result.get('specificity'))}  PPV {fmt(result.get('ppv'))}  NPV {fmt(result.get('npv'))}",
                      soft_wrap=True)
    if result.get("pointing_game", {}).get("n"):
        pg = result["pointing_game"]
        out_console.print(f"pointing game: heatmap maximum inside the lesion in {pg['hits']}/{pg['n']} lesion images",
                          soft_wrap=True)
    if not result["trained_on_normal_only"]:
        out_console.print("[yellow]note:[/] this detector's backbone was trained with abnormal labels")
    out_console.print(f"outputs in {out}/ (metrics.json, scores.csv, histogram.png, roc.png, examples/)", soft_wrap=True)


def detectors(json_out: JsonOpt = False) -> None:
    """List the anomaly detectors (from all plugins)."""
    from cxrtool.cli.inventory import _listing

    _listing("anomaly detector", "anomaly detectors (cxrtool anomaly train --detector NAME --option KEY=VALUE)",
             json_out, [
                 ("description", lambda s: s.description),
                 ("options", lambda s: ", ".join(f"{k}={v}" for k, v in s.options.items()) or "-"),
             ])


def register(app: typer.Typer) -> None:
    """Add this command group to the CLI."""
    app.add_typer(anomaly_app, name="anomaly", rich_help_panel="Anomaly detection")
    app.command(rich_help_panel="Inventory")(detectors)
