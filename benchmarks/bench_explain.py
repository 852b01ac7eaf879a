"""Explainer speed and memory, printed figures (issue 3, "Speed").

Run from the project root (nice it on a shared machine)::

    nice -n 19 uv run python benchmarks/bench_explain.py            # all parts, ResNet-18 at 224 px
    nice -n 19 uv run python benchmarks/bench_explain.py --quick    # smaller grid, fewer repeats

1. Occlusion, seconds per 224 px image with a 1-channel ResNet-18 (random weights, seed 0) on one window
   grid, for
   - ``cxrtool`` = what ``cxrtool explain -m occlusion`` runs (``engine=auto``: the receptive-field cone on
     one cached clean forward pass, windows batched);
   - ``cxrtool engine=captum``: captum Occlusion with ``perturbations_per_eval`` = 64 (batching alone);
   - ``per-window loop``: one forward pass per occluded image (what the seed reports did);
   - ``captum ppe=1``: captum's default ``perturbations_per_eval=1``.
   All four maps must agree to 1e-5 (checked, printed).
2. Integrated Gradients with 50 steps: seconds per image for ``cxrtool`` (captum IG, interpolated inputs in
   batches, no weight gradients) vs 50 separate forward + backward passes (batch 1, the same
   Gauss-Legendre points and weights, input gradients only); maps checked to agree.
3. Peak memory of occlusion on growing inputs (resident memory sampled every 2 ms in a fresh process, minus
   what it held before the run) with the default 1 GiB budget vs an unbounded window batch.

Figures depend on the machine and its load; the script prints the torch thread count and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def _model(size_classes: int = 2):
    import torch

    from cxrtool.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", size_classes).eval()


def _ctx(model, size: int, memory_mb: int = 1024):
    from cxrtool.explain import ExplainContext
    from cxrtool.imaging import Preprocessing

    return ExplainContext(model=model, preprocessing=Preprocessing(size=size), class_names=["a", "b"], memory_mb=memory_mb)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_occlusion(size: int, patch: int, stride: int, repeats: int, batch: int) -> dict:
    import numpy as np
    import torch
    from captum.attr import Occlusion as CaptumOcclusion

    from cxrtool.explain import probability_model, reference
    from cxrtool_builtin.explainers.occlusion import Occlusion, accumulate, window_grid

    model = _model()
    prob = probability_model(model)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    target = 1
    ref = reference(x, "zero", _ctx(model, size).preprocessing)
    windows = window_grid(size, size, patch, patch, stride, stride)
    results = {}

    def ours(engine):
        exp = Occlusion(patch=patch, stride=stride, fill="zero", engine=engine, batch=batch)
        return lambda: exp.attribute(x, torch.tensor([target]), _ctx(model, size)).maps[0]

    def loop():
        diffs = np.empty(len(windows))
        with torch.inference_mode():
            p0 = float(prob(x)[0, target])
            for k, (y0, y1, x0, x1) in enumerate(windows):
                xo = x.clone()
                xo[..., y0:y1, x0:x1] = ref[..., y0:y1, x0:x1]
                diffs[k] = p0 - float(prob(xo)[0, target])
        return accumulate(diffs, windows, size, size)

    def captum1():
        with torch.no_grad():
            return CaptumOcclusion(prob).attribute(x, sliding_window_shapes=(1, patch, patch), strides=(1, stride, stride),
                                                   baselines=ref, target=target, perturbations_per_eval=1)[0, 0].numpy()

    for name, fn, reps in (("cxrtool (engine=auto -> cone)", ours("auto"), repeats),
                           (f"cxrtool engine=captum (ppe<={batch})", ours("captum"), repeats),
                           ("per-window loop (batch 1)", loop, max(1, repeats - 1)),
                           ("captum perturbations_per_eval=1", captum1, 1)):
        secs, amap = _best(fn, reps)
        results[name] = {"seconds": secs, "map": amap}
        print(f"  {name:<38} {secs:8.2f} s/image", flush=True)
    ref_map = results["per-window loop (batch 1)"]["map"]
    loop_s = results["per-window loop (batch 1)"]["seconds"]
    out = {"size": size, "patch": patch, "stride": stride, "windows": len(windows), "variants": {}}
    for name, r in results.items():
        diff = float(np.abs(r["map"] - ref_map).max())
        out["variants"][name] = {"seconds_per_image": r["seconds"], "speedup_vs_loop": loop_s / r["seconds"],
                                 "max_abs_diff_vs_loop": diff}
    print(f"  map scale (max |drop|) {float(np.abs(ref_map).max()):.4g}; all maps agree to "
          f"{max(v['max_abs_diff_vs_loop'] for v in out['variants'].values()):.1e}")
    for name, v in out["variants"].items():
        print(f"  speed-up vs per-window loop: {name:<38} {v['speedup_vs_loop']:5.2f}x")
    return out


def bench_ig(size: int, steps: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from captum.attr._utils.approximation_methods import approximation_parameters

    from cxrtool.explain import build_explainer, reference

    model = _model()
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    target = 1
    ctx = _ctx(model, size)
    exp = build_explainer("integrated-gradients", {"n_steps": steps})
    ibs = exp.batch_size(model, x, ctx.memory_mb)

    def ours():
        return exp.attribute(x, torch.tensor([target]), ctx).maps[0]

    def loop():
        base = reference(x, "black", ctx.preprocessing)
        step_sizes, alphas = approximation_parameters("gausslegendre")
        total = torch.zeros_like(x)
        for a, w in zip(alphas(steps), step_sizes(steps), strict=True):
            xa = (base + a * (x - base)).requires_grad_(True)
            (g,) = torch.autograd.grad(model(xa)[0, target], xa)
            total += w * g
        return ((x - base) * total)[0, 0].detach().numpy()

    s_ours, m_ours = _best(ours, repeats)
    print(f"  cxrtool (internal batch {ibs:>3})          {s_ours:8.2f} s/image", flush=True)
    s_loop, m_loop = _best(loop, repeats)
    print(f"  {steps} separate forward+backward passes {s_loop:8.2f} s/image", flush=True)
    diff = float(np.abs(m_ours - m_loop).max())
    scale = float(np.abs(m_loop).max())
    print(f"  speed-up {s_loop / s_ours:.2f}x; maps agree to {diff:.1e} (map scale {scale:.3g})")
    return {"size": size, "steps": steps, "internal_batch_size": ibs, "seconds_ours": s_ours, "seconds_loop": s_loop,
            "speedup": s_loop / s_ours, "max_abs_diff": diff, "map_scale": scale}


def memory_probe(size: int, memory_mb: int, engine: str) -> None:
    """Child process: one occlusion run, print peak RSS (MiB) as JSON."""
    import threading

    import torch

    from cxrtool_builtin.explainers.occlusion import Occlusion

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = _model()
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(2))
    page = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss() -> float:  # current resident set (MiB)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    before, peak, done = rss(), [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    exp = Occlusion(patch=size // 4, stride=size // 4, engine=engine, batch=16)
    att = exp.attribute(x, torch.tensor([1]), _ctx(model, size, memory_mb))
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    print(json.dumps({"size": size, "engine": att.extras["engine"][0], "memory_mb": memory_mb,
                      "peak_extra_mib": peak[0] - before, "rss_before_mib": before, "seconds": seconds,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_memory(sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        variants = [("cone", 1024), ("captum", 1024)] + ([("captum", 10**6)] if size <= 512 else [])
        for engine, budget in variants:
            cmd = [sys.executable, __file__, "--memory-probe", str(size), str(budget), engine]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"  {size} px {engine}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            label = f"{engine}, budget {'unbounded' if budget >= 10**6 else f'{budget} MiB'}"
            print(f"  {size:>5} px  {label:<28} peak extra RSS {r['peak_extra_mib']:7.0f} MiB "
                  f"(process before: {r['rss_before_mib']:.0f} MiB)  {r['seconds']:.1f} s", flush=True)
            rows.append(r | {"label": label})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="patch 32 / stride 16 grid, one repeat, smaller memory probe")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=None, help="occlusion patch in pixels [default 16, --quick 32]")
    ap.add_argument("--stride", type=int, default=None, help="occlusion stride [default 8, --quick 16]")
    ap.add_argument("--batch", type=int, default=64, help="most windows per forward pass for our engines")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's choice]")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: occlusion,ig,memory")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--memory-probe", nargs=3, metavar=("SIZE", "MEMORY_MB", "ENGINE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(int(args.memory_probe[0]), int(args.memory_probe[1]), args.memory_probe[2])
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())
    patch = args.patch or (32 if args.quick else 16)
    stride = args.stride or (16 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (a busy shared CPU makes every figure pessimistic)")
    res: dict = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if "occlusion" not in skip:
        print(f"\n[1] occlusion, ResNet-18 1 channel, {args.size} px, patch {patch} stride {stride}:")
        res["occlusion"] = bench_occlusion(args.size, patch, stride, repeats, args.batch)
    if "ig" not in skip:
        print(f"\n[2] Integrated Gradients, 50 steps, ResNet-18 1 channel, {args.size} px:")
        res["integrated_gradients"] = bench_ig(args.size, 50, repeats)
    if "memory" not in skip:
        sizes = [224, 512] if args.quick else [224, 512, 1024]
        print("\n[3] peak memory of occlusion (patch = stride = size/4, 16 windows, batch <= 16):")
        res["memory"] = bench_memory(sizes)
    res["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
