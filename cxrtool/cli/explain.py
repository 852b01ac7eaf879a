"""``cxrtool explain``, ``explainers``, ``layers`` and ``explain-eval``: what the model looks at, and whether
the explanation is any good."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cxrtool.cli._common import (
    CheckpointOpt,
    JsonOpt,
    OverlayOnOpt,
    check_overlay_on,
    fmt,
    out_console,
    print_json,
    progress_bars,
)

MethodOpt = Annotated[Optional[list[str]], typer.Option(
    "--method", "-m", help="Explainer(s), repeatable or comma-separated; see `cxrtool explainers`.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--option", "-O", help="KEY=VALUE method option (repeatable); METHOD.KEY=VALUE for one method only.")]
LayerOpt = Annotated[Optional[str], typer.Option(
    "--layer", "-l", help="Layer for layer-based methods \\(default: the model's last explainable layer); see `cxrtool layers`.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the random parts (noise, random baselines, randomisation).")]
MemoryOpt = Annotated[int, typer.Option(help="Memory budget (MiB) for one batch of perturbed inputs; batches shrink to fit.")]
#: a contact sheet shows at most this many images (one row each)
CONTACT_SHEET_ROWS = 48

ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads for torch \\(default: torch's choice).")]


# -- shared helpers -----------------------------------------------------------------------------------------
def _methods(method: list[str] | None) -> list[str]:
    from cxrtool import registry
    from cxrtool.errors import UsageError

    names = [m.strip() for item in (method or []) for m in item.split(",") if m.strip()]
    valid = list(registry.all_specs("explainer"))
    if not names:
        raise UsageError(f"give --method NAME; valid methods: {', '.join(valid)}")
    for n in names:
        registry.get("explainer", n)  # unknown: UnknownNameError listing the valid ones
    return list(dict.fromkeys(names))


def _options(methods: list[str], option: list[str] | None) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` / ``METHOD.KEY=VALUE`` items -> options per method (unknown keys: one-line error)."""
    from cxrtool import registry
    from cxrtool.errors import UsageError
    from cxrtool.explain import parse_option_value

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in option or []:
        if "=" not in item:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        key, value = item.split("=", 1)
        key, parsed = key.strip(), parse_option_value(value.strip())
        scoped = next((m for m in methods if key.startswith(m + ".")), None)
        if scoped:
            out[scoped][key[len(scoped) + 1:]] = parsed
            continue
        takers = [m for m in methods if key in registry.get("explainer", m).options]
        if not takers:
            valid = "; ".join(f"{m}: {', '.join(registry.get('explainer', m).options) or '(none)'}" for m in methods)
            raise UsageError(f"--option {key}: no selected method has this option (options: {valid})")
        for m in takers:
            out[m][key] = parsed
    return out


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _class_or_raw(names: list[str], target: str) -> str:
    """A class name as the model spells it, or the target as given (``LAYER:C`` for synthesis methods)."""
    from cxrtool.errors import UsageError
    from cxrtool.explain import resolve_target

    try:
        return names[resolve_target(names, target)]
    except UsageError:
        return target


def _unique_stems(paths: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n + 1}")
    return out


def _load_images(paths: list[str], pp) -> tuple[Any, list[tuple[int, int]]]:
    """All images decoded and preprocessed up front (an unreadable one fails before anything is written)."""
    import numpy as np

    from cxrtool import imaging

    arrays, shapes = [], []
    for p in paths:
        shapes.append(tuple(imaging.read_image(p).shape))
        arrays.append(imaging.load(p, pp))
    return np.stack(arrays), shapes


class _Cleanup:
    """Remove what a failing dataset / synthesis method wrote into ``out_dir`` (nothing half-written)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.existed = out_dir.exists()
        self.before = set(out_dir.rglob("*")) if self.existed else set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        import shutil

        if not self.existed:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        else:
            for p in sorted(set(self.out_dir.rglob("*")) - self.before, reverse=True):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        return False


def _save_npy(path: Path, arr) -> Path:
    import numpy as np

    from cxrtool.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(arr, dtype=np.float32))
    return path


# -- explain ----------------------------------------------------------------------------------------------------
def explain(
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files and/or folders (searched recursively).")] = None,
    method: MethodOpt = None,
    checkpoint: CheckpointOpt = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", "-t", help="Class to explain \\(default: the predicted class); synthesis methods take several.")] = None,
    layer: LayerOpt = None,
    option: OptionOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder \\(default: <run>/explain).")] = None,
    scale: Annotated[str, typer.Option(help="image: each map scaled to its own max |value| | shared: one scale per method over all images.")] = "image",
    overlay_on: OverlayOnOpt = "original",
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Also score each map: deletion / insertion AUC vs a random map, model-randomisation rank correlation.")] = False,
    steps: Annotated[int, typer.Option(help="Points on the deletion / insertion curves (--evaluate).")] = 32,
    seed: SeedOpt = 0,
    memory_mb: MemoryOpt = 1024,
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Explain predictions: an overlay PNG, the raw map (.npy) and a manifest per image and method."""
    import time
    from dataclasses import replace

    import numpy as np

    from cxrtool import checkpoint as C
    from cxrtool import registry
    from cxrtool.errors import UsageError
    from cxrtool.explain import build_explainer, make_context, resolve_target
    from cxrtool.io import versions

    if scale not in ("image", "shared"):
        raise UsageError(f"--scale must be image or shared, got {scale!r}")
    if steps < 2:
        raise UsageError("--steps must be at least 2")
    check_overlay_on(overlay_on)
    _threads(threads)
    methods = _methods(method)
    opts = _options(methods, option)
    explainers = {m: build_explainer(m, opts[m]) for m in methods}
    kinds = {m: registry.get("explainer", m).kind for m in methods}
    ckpt = C.load(checkpoint)
    ctx = make_context(ckpt, layer=layer, seed=seed, memory_mb=memory_mb)
    names = ckpt.class_names
    attribution = [m for m in methods if kinds[m] == "attribution"]
    targets = [resolve_target(names, t) for t in (target or [])] if attribution else []
    if attribution and len(targets) > 1:
        raise UsageError("attribution methods explain one --target class (give it once)")
    synthesis_targets = [_class_or_raw(names, t) for t in (target or [])]
    out = Path(out) if out else ckpt.path.parent / "explain"
    common = {"checkpoint": str(ckpt.path), "model": ckpt.meta.get("model"), "class_names": names, "seed": seed,
              "layer": ctx.target_layer, "versions": versions()}
    result: dict[str, Any] = {**common, "out": str(out), "methods": methods, "scale": scale, "images": []}

    paths: list[str] = []
    if images:
        from cxrtool.data import gather_images

        paths = gather_images(images)
    if any(kinds[m] in ("attribution", "dataset") for m in methods) and not paths:
        raise UsageError("give the image(s) to explain")

    if attribution:
        result.update(_explain_attribution(ckpt, ctx, paths, {m: explainers[m] for m in attribution}, targets, out,
                                           scale, evaluate, steps, quiet, overlay_on))
    for m in methods:
        if kinds[m] == "dataset":
            from cxrtool.data import ImageSet

            ds = ImageSet(paths, np.full(len(paths), -1, dtype=np.int64), names, paths)
            t0 = time.perf_counter()
            with progress_bars(not quiet) as bars, _Cleanup(out / m):
                summary = explainers[m].run_dataset(ds, replace(ctx, progress=bars(m, len(ds))), out / m)
            result.setdefault("runs", {})[m] = {"summary": summary, "seconds": time.perf_counter() - t0, "out": str(out / m)}
        elif kinds[m] == "synthesis":
            start = None
            if paths:
                from cxrtool.imaging import to_tensor

                arr, _ = _load_images(paths, ckpt.preprocessing)
                start = to_tensor(arr, ckpt.preprocessing)
            t0 = time.perf_counter()
            with progress_bars(not quiet) as bars, _Cleanup(out / m):
                summary = explainers[m].synthesize(synthesis_targets, replace(
                    ctx, progress=bars(m, max(1, len(synthesis_targets)))), out / m, start)
            result.setdefault("runs", {})[m] = {"summary": summary, "seconds": time.perf_counter() - t0, "out": str(out / m)}
    from cxrtool.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    result["manifest"] = str(out / "manifest.json")
    write_json(out / "manifest.json", result)
    if json_out:
        print_json(result)
        return
    _render_result(result)


def _explain_attribution(ckpt, ctx, paths, explainers, targets, out: Path, scale: str, evaluate: bool, steps: int,
                         quiet: bool, overlay_on: str = "original") -> dict[str, Any]:
    import time
    from dataclasses import replace

    import numpy as np
    import torch

    from cxrtool import metrics as M
    from cxrtool.explain import map_scale, predict_probs, render_contact_sheet, render_overlay, scale_note
    from cxrtool.imaging import geometry, overlay_base, to_tensor
    from cxrtool.io import versions, write_json

    pp = ckpt.preprocessing
    names = ckpt.class_names
    arr, shapes = _load_images(paths, pp)
    x = to_tensor(arr, pp)
    probs = predict_probs(ckpt.model, x).numpy()
    predicted = M.decide(probs, ckpt.negative_index, ckpt.threshold)
    tgt = np.full(len(paths), targets[0]) if targets else predicted
    methods = list(explainers)
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    extras: dict[str, list[dict]] = {m: [] for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    evals: dict[str, list[dict | None]] = {m: [] for m in methods}
    with progress_bars(not quiet and len(paths) * len(methods) > 1) as bars:
        for m, explainer in explainers.items():
            advance = bars(m, len(paths))
            for i in range(len(paths)):
                c = replace(ctx, original_shape=shapes[i], progress=None)
                xi, ti = x[i : i + 1], torch.tensor([int(tgt[i])])
                t0 = time.perf_counter()
                att = explainer.attribute(xi, ti, c)
                seconds[m].append(time.perf_counter() - t0)
                amap = np.asarray(att.maps[0], dtype=np.float32)
                if amap.shape != tuple(xi.shape[-2:]) or not np.isfinite(amap).all():
                    from cxrtool.errors import PluginError

                    raise PluginError(f"explainer {m!r} returned a map of shape {amap.shape} (expected "
                                      f"{tuple(xi.shape[-2:])}, finite values)")
                maps[m].append(amap)
                extras[m].append({k: v[0] for k, v in att.extras.items() if isinstance(v, list) and v})
                ev = None
                if evaluate:
                    from cxrtool.explain_eval import evaluate_map, random_baseline

                    ev = evaluate_map(explainer, c, xi, ti, amap, steps=steps)
                    ev.pop("curves", None)
                    rnd = random_baseline(c, xi, int(tgt[i]), steps=steps, seed=ctx.seed + i)
                    ev["random_map"] = {"deletion_auc": rnd["deletion_auc"], "insertion_auc": rnd["insertion_auc"]}
                evals[m].append(ev)
                advance(1)

    # -- render and write (everything computed: nothing half-written on a failure above)
    stems = _unique_stems(paths)
    scales = {}
    for m, explainer in explainers.items():
        signed = bool(getattr(explainer, "signed", True))
        pct = float(getattr(explainer, "display_percentile", 100.0))
        sc = {"mode": scale, "signed": signed, "unit": getattr(explainer, "unit", "attribution"), "percentile": pct,
              "n_images": len(paths)}
        if scale == "shared":
            sc["vmin"], sc["vmax"] = map_scale(maps[m], signed, pct)
        scales[m] = sc
    rows_out = []
    sheet_rows = []
    for i, p in enumerate(paths):
        pred, t = int(predicted[i]), int(tgt[i])
        label = f"pred {names[pred]} {probs[i, pred]:.2f}" + (f"; map for {names[t]}" if t != pred else "")
        entry = {"image": p, "original_shape": list(shapes[i]), "predicted": names[pred],
                 "probability": float(probs[i, pred]), "target": names[t], "target_probability": float(probs[i, t]),
                 "probabilities": {n: float(probs[i, k]) for k, n in enumerate(names)}, "outputs": {}}
        sheet_rows.append({"name": Path(p).name, "image": arr[i], "label": label, "maps": {}})
        for m, explainer in explainers.items():
            amap = maps[m][i]
            sc = scales[m]
            vmin, vmax = (sc["vmin"], sc["vmax"]) if scale == "shared" else map_scale([amap], sc["signed"], sc["percentile"])
            note = scale_note(scale, len(paths), sc["percentile"])
            base = out / f"{stems[i]}.{m}"
            t0 = time.perf_counter()
            npy = _save_npy(base.with_name(base.name + ".npy"), amap)
            title = f"{_short(Path(p).name)} — {m}"
            sub = (f"predicted {names[pred]} (p={probs[i, pred]:.3f}); map for {names[t]}"
                   + (f" (p={probs[i, t]:.3f})" if t != pred else ""))
            image, shown, drawn_on = overlay_base(p, arr[i], amap, ckpt.preprocessing, overlay_on)
            png = render_overlay(base.with_name(base.name + ".png"), image, shown, title=title, subtitle=sub,
                                 vmin=vmin, vmax=vmax, signed=sc["signed"], unit=sc["unit"], scale_note=note)
            render_s = time.perf_counter() - t0
            manifest = {
                "image": p, "checkpoint": str(ckpt.path), "model": ckpt.meta.get("model"), "method": m,
                "options": dict(explainer.options), "layer": ctx.target_layer, "seed": ctx.seed,
                "target": names[t], "target_index": t, "target_probability": float(probs[i, t]),
                "predicted": names[pred], "probability": float(probs[i, pred]),
                "probabilities": entry["probabilities"], "original_shape": list(shapes[i]),
                "geometry": geometry(shapes[i], ckpt.preprocessing), "preprocessing": ckpt.preprocessing.to_dict(),
                "map": {"file": str(npy), "shape": list(amap.shape), "dtype": "float32",
                        "resolution": "model input (preprocessed image) pixels", "min": float(amap.min()),
                        "max": float(amap.max()), "signed": sc["signed"], "unit": sc["unit"]},
                "overlay": {"file": str(png), "drawn_on": drawn_on, "shape": list(image.shape), "scale": scale,
                            "scale_note": note, "vmin": vmin, "vmax": vmax},
                "extras": extras[m][i],
                "timings": {"attribute_s": seconds[m][i], "render_s": render_s},
                "versions": versions(), "checkpoint_versions": ckpt.meta.get("versions"),
            }
            if evals[m][i] is not None:
                manifest["evaluation"] = evals[m][i]
            js = write_json(base.with_name(base.name + ".json"), manifest)
            entry["outputs"][m] = {"overlay": str(png), "map": str(npy), "manifest": str(js),
                                   "seconds": seconds[m][i], **({"evaluation": evals[m][i]} if evals[m][i] else {})}
            sheet_rows[-1]["maps"][m] = amap
        rows_out.append(entry)
    res: dict[str, Any] = {"images": rows_out, "scales": scales,
                           "seconds_per_image": {m: float(np.mean(seconds[m])) for m in methods}}
    if len(paths) > 1 or len(methods) > 1:
        shown = sheet_rows[:CONTACT_SHEET_ROWS]
        more = f" (the first {len(shown)} of {len(paths)})" if len(shown) < len(paths) else ""
        sheet = render_contact_sheet(out / "contact-sheet.png", shown, methods, scales,
                                     title=f"{ckpt.path} — {len(paths)} image(s){more}")
        res["contact_sheet"] = str(sheet)
    if evaluate:
        from cxrtool.explain_eval import summarise

        res["evaluation"] = {m: {
            "deletion_auc": summarise([e["deletion_auc"] for e in evals[m]]),
            "insertion_auc": summarise([e["insertion_auc"] for e in evals[m]]),
            "random_deletion_auc": summarise([e["random_map"]["deletion_auc"] for e in evals[m]]),
            "random_insertion_auc": summarise([e["random_map"]["insertion_auc"] for e in evals[m]]),
            "randomisation_spearman": summarise([e["randomisation"]["spearman"] for e in evals[m]]),
        } for m in methods}
    return res


def _short(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _render_result(result: dict) -> None:
    from rich.table import Table

    if result["images"]:
        methods = [m for m in result["methods"] if any(m in r["outputs"] for r in result["images"])]
        table = Table(title=f"{len(result['images'])} image(s) explained — {result['checkpoint']}")
        table.add_column("image", overflow="fold")
        table.add_column("predicted")
        table.add_column("target")
        for m in methods:
            table.add_column(f"{m} s", justify="right")
        for r in result["images"]:
            table.add_row(Path(r["image"]).name, f"{r['predicted']} {r['probability']:.3f}", r["target"],
                          *[f"{r['outputs'][m]['seconds']:.2f}" for m in methods])
        out_console.print(table)
        ev = result.get("evaluation")
        if ev:
            t = Table(title="explanation quality (mean over images)")
            for col in ("method", "deletion AUC ↓", "random", "insertion AUC ↑", "random", "randomisation ρ"):
                t.add_column(col, justify="right" if col != "method" else "left")
            for m, e in ev.items():
                t.add_row(m, fmt(e["deletion_auc"]["mean"]), fmt(e["random_deletion_auc"]["mean"]),
                          fmt(e["insertion_auc"]["mean"]), fmt(e["random_insertion_auc"]["mean"]),
                          fmt(e["randomisation_spearman"]["mean"]))
            out_console.print(t)
    for m, run in (result.get("runs") or {}).items():
        out_console.print(f"{m}: outputs in {run['out']}/ ({run['seconds']:.1f} s)")
    if result["images"]:
        extra = f", contact sheet {result['contact_sheet']}" if result.get("contact_sheet") else ""
        out_console.print(f"outputs in {result['out']}/ (overlay .png, map .npy, manifest .json per image and "
                          f"method{extra})", soft_wrap=True)


# -- explainers ------------------------------------------------------------------------------------------------
def explainers(json_out: JsonOpt = False) -> None:
    """List the explanation methods (from all plugins) with a one-line summary and their options."""
    from cxrtool import registry

    specs = registry.all_specs("explainer")
    if json_out:
        print_json([{**s.to_dict(), "plugin": registry.provider("explainer", n)} for n, s in specs.items()])
        return
    from rich.table import Table

    table = Table(title="explainers (cxrtool explain IMAGES --method NAME [-O KEY=VALUE ...])")
    for col in ("name", "kind", "description", "options"):
        table.add_column(col, overflow="fold", style="bold" if col == "name" else None)
    for name, s in specs.items():
        table.add_row(name, s.kind, s.description, ", ".join(f"{k}={v}" for k, v in s.options.items()) or "-")
    out_console.print(table)


# -- layers -----------------------------------------------------------------------------------------------------
def layers(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint file or run folder \\(default: the latest run's best).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="List an architecture's layers instead of a checkpoint's.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input size for the output shapes \\(default: the checkpoint's, else 224).")] = None,
    all_layers: Annotated[bool, typer.Option("--all", help="Also list element-wise layers (BN, activations, dropout).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the addressable layer names of a model (for --layer), with type and output shape."""
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.explain import explainable_layers

    if model:
        from cxrtool.models import build_model, get_spec

        spec = get_spec(model)
        net = build_model(model, 2).eval()
        meta = {"model": {"name": model}, "explainable_layers": list(spec.explainable_layers)}
        size = size or spec.default_size
        source = f"model {model}"
    else:
        ckpt = C.load(checkpoint)
        net, meta = ckpt.model, ckpt.meta
        size = size or ckpt.preprocessing.size
        source = str(ckpt.path)
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_m, _i, out) -> None:
            if isinstance(out, torch.Tensor) and name not in shapes:
                shapes[name] = list(out.shape[1:])

        return hook

    hooks = [mod.register_forward_hook(record(name)) for name, mod in net.named_modules() if name]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 1, size, size))
    finally:
        for h in hooks:
            h.remove()
    expl = set(explainable_layers(meta))
    elementwise = (torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.GELU, torch.nn.Dropout, torch.nn.Dropout2d,
                   torch.nn.Identity)
    rows = []
    for name, mod in net.named_modules():
        if not name or (not all_layers and isinstance(mod, elementwise) and name not in expl):
            continue
        shape = shapes.get(name)
        rows.append({"name": name, "type": type(mod).__name__, "output_shape": shape,
                     "feature_map": bool(shape and len(shape) == 3), "explainable": name in expl,
                     "parameters": int(sum(p.numel() for p in mod.parameters()))})
    if json_out:
        print_json({"source": source, "input_size": size, "layers": rows})
        return
    from rich.table import Table

    table = Table(title=f"layers of {source} at {size} px ([bold]bold[/]: explainable; * feature map, usable by grad-cam)")
    for col in ("name", "type", "output", "params"):
        table.add_column(col, justify="right" if col == "params" else "left", overflow="fold")
    for r in rows:
        name = f"[bold]{r['name']}[/]" if r["explainable"] else r["name"]
        shape = "x".join(map(str, r["output_shape"])) if r["output_shape"] else "-"
        table.add_row(name, r["type"], shape + (" *" if r["feature_map"] else ""), f"{r['parameters']:,}")
    out_console.print(table)


# -- explain-eval -------------------------------------------------------------------------------------------------
def explain_eval(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled images: folder per class, CSV manifest (with lesion_x/lesion_y/lesion_r columns for the pointing game) or .npz.")],
    method: MethodOpt = None,
    checkpoint: CheckpointOpt = None,
    split: Annotated[Optional[str], typer.Option(help="Which split of --data \\(default: test, else val, else all).")] = None,
    limit: Annotated[int, typer.Option(help="Evaluate on at most N images (a seeded random choice).")] = 30,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Class to explain \\(default: each image's predicted class).")] = None,
    layer: LayerOpt = None,
    option: OptionOpt = None,
    steps: Annotated[int, typer.Option(help="Points on the deletion / insertion curves.")] = 32,
    randomise: Annotated[bool, typer.Option("--randomise/--no-randomise", help="Run the model-randomisation check (explains every image twice).")] = True,
    tolerance: Annotated[float, typer.Option(help="Pointing game: pixels of slack around a lesion disc.")] = 0.0,
    lesions_only: Annotated[bool, typer.Option(help="Only images with a known lesion (pointing game on all of them).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for explain-eval.json \\(default: <run>/explain-eval).")] = None,
    seed: SeedOpt = 0,
    memory_mb: MemoryOpt = 1024,
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Score explanation methods on a dataset: deletion / insertion AUC vs a random map, model-randomisation
    rank correlation and (synthetic lesions) the pointing game."""
    import csv

    import numpy as np

    from cxrtool import checkpoint as C
    from cxrtool.data import load_splits
    from cxrtool.errors import DataError, UsageError
    from cxrtool.explain import build_explainer, make_context, resolve_target
    from cxrtool.explain_eval import evaluate_images, lesions_to_input
    from cxrtool.imaging import to_tensor
    from cxrtool.infer import pick_split
    from cxrtool.io import versions, write_json
    from cxrtool.synthetic import parse_lesions

    if steps < 2 or limit < 1:
        raise UsageError("--steps must be >= 2 and --limit >= 1")
    _threads(threads)
    methods = _methods(method)
    bad = [m for m in methods if _kind(m) != "attribution"]
    if bad:
        raise UsageError(f"explain-eval scores attribution maps; {', '.join(bad)} make none")
    opts = _options(methods, option)
    explainers_ = {m: build_explainer(m, opts[m]) for m in methods}
    ckpt = C.load(checkpoint)
    ctx = make_context(ckpt, layer=layer, seed=seed, memory_mb=memory_mb)
    t_index = resolve_target(ckpt.class_names, target)
    split_name, ds = pick_split(load_splits(data), split)
    lesion_of: dict[str, list] = {}
    if Path(data).suffix.lower() == ".csv":
        with open(data, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                if "lesion_x" in row:
                    lesion_of[str(Path(data).parent / row["path"])] = parse_lesions(row)
    idx = np.arange(len(ds))
    if lesions_only:
        idx = np.array([i for i in idx if lesion_of.get(ds.paths[i])], dtype=np.int64)
        if not len(idx):
            raise DataError(f"{data}: no image with a lesion (lesion_x/lesion_y/lesion_r columns)")
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    paths = [ds.paths[i] for i in idx]
    arr, shapes = _load_images(paths, ckpt.preprocessing)
    items = []
    for k, p in enumerate(paths):
        les = lesion_of.get(p)
        items.append({"path": p, "x": to_tensor(arr[k], ckpt.preprocessing), "shape": shapes[k],
                      "lesions": lesions_to_input(les, shapes[k], ckpt.preprocessing) if les else None})
    with progress_bars(not quiet) as bars:
        res = evaluate_images(items, explainers_, ctx, target=t_index, steps=steps, randomise=randomise,
                              tolerance=tolerance, negative_index=ckpt.negative_index, threshold=ckpt.threshold,
                              progress=bars("explain-eval", len(items)))
    out = Path(out) if out else ckpt.path.parent / "explain-eval"
    res.update({"checkpoint": str(ckpt.path), "data": str(data), "split": split_name, "seed": seed,
                "layer": ctx.target_layer, "target": target, "versions": versions()})
    write_json(out / "explain-eval.json", res)
    res["outputs"] = {"json": str(out / "explain-eval.json")}
    if json_out:
        print_json(res)
        return
    from rich.table import Table

    def ms(s):
        return "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    t = Table(title=f"explanation quality — {data} \\[{split_name}], {res['n_images']} images, {ckpt.path}")
    for col in ("method", "deletion AUC ↓", "insertion AUC ↑", "randomisation ρ", "|ρ|", "pointing game", "s/image"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, s in res["methods"].items():
        t.add_row(m, ms(s["deletion_auc"]), ms(s["insertion_auc"]), ms(s["randomisation_spearman"]),
                  ms(s["randomisation_spearman_abs"]), ms(s["pointing_game"]), fmt(s["seconds_per_image"]["mean"], 2))
    r = res["random_map"]
    t.add_row("random map", ms(r["deletion_auc"]), ms(r["insertion_auc"]), "-", "-",
              ms(r["pointing_chance"]) + " (chance)" if r["pointing_chance"]["n"] else "-", "-")
    out_console.print(t)
    if len(res["by_target"]) > 1:
        t = Table(title="deletion / insertion AUC by explained class (random map in the last column)")
        for col in ("class", "n", *res["methods"], "random map"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for cls, b in res["by_target"].items():
            cells = [f"{ms(v['deletion_auc'])} / {ms(v['insertion_auc'])}" for v in b["methods"].values()]
            rm = b["random_map"]
            t.add_row(cls, str(b["n_images"]), *cells, f"{ms(rm['deletion_auc'])} / {ms(rm['insertion_auc'])}")
        out_console.print(t)
    out_console.print(f"details in {out / 'explain-eval.json'}")


def _kind(name: str) -> str:
    from cxrtool import registry

    return registry.get("explainer", name).kind


def register(app: typer.Typer) -> None:
    """Add this command group to the CLI."""
    app.command(rich_help_panel="Explain")(explain)
    app.command(rich_help_panel="Explain")(explainers)
    app.command(rich_help_panel="Explain")(layers)
    app.command("explain-eval", rich_help_panel="Explain")(explain_eval)
