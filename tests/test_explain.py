"""Explainers: exact values on tiny fixed-weight models, the receptive-field-cone occlusion against captum,
a contract every registered attribution method passes, the CLI end to end and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxrtool import registry
from cxrtool.errors import UsageError
from cxrtool.explain import ExplainContext, build_explainer, explainable_layers, reference
from cxrtool.imaging import Preprocessing
from cxrtool.testing import run_cli
from cxrtool_builtin.explainers.occlusion import ConeOcclusion, ConeUnsupported, Occlusion, accumulate, window_grid

pytestmark = pytest.mark.usefixtures("torch_one_thread")


run = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


def ctx_for(model, size, classes=("a", "b"), **kw) -> ExplainContext:
    return ExplainContext(model=model.eval(), preprocessing=Preprocessing(size=size), class_names=list(classes), **kw)


# -- tiny fixed-weight models ------------------------------------------------------------------------------
class OnePixel(nn.Module):
    """logit_1 = a * x[py, px], logit_0 = 0: only one pixel matters."""

    def __init__(self, py: int, px: int, a: float = 1.5):
        super().__init__()
        self.py, self.px, self.a = py, px, a

    def forward(self, x):
        v = self.a * x[:, 0, self.py, self.px]
        return torch.stack([torch.zeros_like(v), v], dim=1)


class TinyCNN(nn.Module):
    """conv-BN-ReLU, max-pool, a strided conv with a residual 1x1 shortcut, a channel concat, GAP, linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
        self.short = nn.Conv2d(4, 6, 1, stride=2)
        self.conv3 = nn.Conv2d(6, 2, 5, padding=4, dilation=2)
        self.avg = nn.AvgPool2d(2, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        torch.manual_seed(0)
        for p in self.parameters():
            nn.init.normal_(p, 0, 0.5)
        self.bn1.running_mean.normal_(0, 0.2)
        self.bn1.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.conv2(y)) + self.short(y)
        y = torch.cat([y, self.conv3(y)], dim=1)
        y = self.avg(y)
        return self.fc(torch.flatten(self.gap(y), 1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it (the cone engine must step aside)."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN(2)

    def forward(self, x):
        if x.sum() > 0:
            return self.net(x)
        return -self.net(x)


def occlusion_map(model, x, size, engine, **opts):
    exp = Occlusion(engine=engine, **opts)
    return exp.attribute(x, torch.tensor([1] * len(x)), ctx_for(model, size, ("a", "b", "c"))), exp


# -- occlusion ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["cone", "captum"])
def test_occlusion_of_a_known_pixel(engine):
    size, (py, px) = 16, (5, 9)
    model = OnePixel(py, px)
    x = torch.full((1, 1, size, size), 0.8)
    att, _ = occlusion_map(model, x, size, engine, patch=1, stride=1, fill="zero")
    black = (0 - 0.5) / 0.25
    expected = torch.sigmoid(torch.tensor(1.5 * 0.8)) - torch.sigmoid(torch.tensor(1.5 * black))
    amap = att.maps[0]
    assert amap.dtype == np.float32 and amap.shape == (size, size)
    assert amap[py, px] == pytest.approx(float(expected), abs=1e-6)
    amap[py, px] = 0
    assert np.abs(amap).max() < 1e-7
    # a 3 px patch at stride 1: each pixel averages the windows covering it; 9 windows see the pixel
    att, _ = occlusion_map(model, x, size, engine, patch=3, stride=1, fill="zero")
    counts = np.zeros((size, size))
    hits = np.zeros((size, size))
    for y0 in range(size - 2):
        for x0 in range(size - 2):
            counts[y0:y0 + 3, x0:x0 + 3] += 1
            if y0 <= py < y0 + 3 and x0 <= px < x0 + 3:
                hits[y0:y0 + 3, x0:x0 + 3] += 1
    np.testing.assert_allclose(att.maps[0], hits / counts * float(expected), atol=1e-6)


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
@pytest.mark.parametrize("patch,stride", [(6, 3), (5, 4), (7, 7), (32, 1)])
def test_cone_matches_captum_on_a_tiny_cnn(fill, patch, stride):
    size = 32 if patch < 32 else 33
    model = TinyCNN().eval()
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(patch + stride))
    if patch == 32:
        patch, stride = 30, 7  # windows cut off at the border, stride > half the patch
    cone, exp = occlusion_map(model, x, size, "cone", patch=patch, stride=stride, fill=fill, batch=16)
    ref, _ = occlusion_map(model, x, size, "captum", patch=patch, stride=stride, fill=fill)
    assert cone.extras["engine"] == ["cone", "cone"]
    assert np.abs(ref.maps).max() > 1e-3
    np.testing.assert_allclose(cone.maps, ref.maps, atol=1e-5)


def test_cone_matches_captum_on_resnet18():
    from cxrtool.models import build_model

    torch.manual_seed(1)
    model = build_model("resnet18", 2).eval()
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    cone, _ = occlusion_map(model, x, 64, "cone", patch=16, stride=8, fill="blur")
    ref, _ = occlusion_map(model, x, 64, "captum", patch=16, stride=8, fill="blur")
    assert cone.extras["engine"] == ["cone"]
    np.testing.assert_allclose(cone.maps, ref.maps, atol=1e-5)


def test_cone_steps_aside_for_untraceable_models():
    model = Branchy().eval()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ConeUnsupported):
        ConeOcclusion(model)
    auto, _ = occlusion_map(model, x, 16, "auto", patch=4, stride=4)
    assert auto.extras["engine"] == ["captum"]
    with pytest.raises(UsageError, match="engine=captum"):
        occlusion_map(model, x, 16, "cone", patch=4, stride=4)


def test_cone_densifies_unknown_ops_and_stays_exact():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(2)

        def forward(self, x):
            return self.net(torch.flip(x, dims=(3,)) * 0.5 + x)

    model = Flip().eval()
    x = torch.randn(1, 1, 24, 24)
    cone, _ = occlusion_map(model, x, 24, "cone", patch=6, stride=3)
    ref, _ = occlusion_map(model, x, 24, "captum", patch=6, stride=3)
    np.testing.assert_allclose(cone.maps, ref.maps, atol=1e-5)


def test_window_grid_covers_the_image_like_captum():
    wins = window_grid(10, 7, 4, 3, 4, 2)
    assert wins[0] == (0, 4, 0, 3) and wins[-1] == (8, 10, 4, 7)  # the last row of windows is cut off
    cover = np.zeros((10, 7))
    for y0, y1, x0, x1 in wins:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert accumulate(np.ones(len(wins)), wins, 10, 7).min() == pytest.approx(1.0)


def test_occlusion_options_are_in_original_pixels():
    exp = Occlusion(patch=100, stride=50)
    ctx = ctx_for(TinyCNN(), 64)
    # a 400 x 800 image letterboxed to 64 px: 0.08 input px per original px
    (ph, pw, sh, sw), _ = exp.window((64, 64), (400, 800), ctx)
    assert (ph, pw, sh, sw) == (8, 8, 4, 4)
    with pytest.raises(UsageError, match="larger than the image"):
        Occlusion(patch=500).window((64, 64), (400, 800), ctx)
    with pytest.raises(UsageError, match="stride"):
        Occlusion(patch=10, stride=20).window((64, 64), None, ctx)
    with pytest.raises(UsageError, match="fill"):
        Occlusion(fill="grey")


def test_occlusion_memory_budget_bounds_the_batch():
    from cxrtool.explain import activation_bytes, batch_for_memory

    model = TinyCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    per = activation_bytes(model, x)
    assert per > 64 * 64 * 4
    assert batch_for_memory(per, 0, 64) == 1
    assert batch_for_memory(per, 1024, 64) == 64
    small, _ = occlusion_map(model, x, 64, "captum", patch=8, stride=8)
    # a tiny budget still works (one window per forward pass) and gives the same map
    exp = Occlusion(patch=8, stride=8, engine="captum")
    ctx = ctx_for(model, 64, ("a", "b", "c"), memory_mb=0)
    tiny = exp.attribute(x, torch.tensor([1]), ctx)
    np.testing.assert_allclose(tiny.maps, small.maps, atol=1e-6)
    # engine=auto keeps the cone's cache of clean activations within the budget too
    auto = Occlusion(patch=8, stride=8).attribute(x, torch.tensor([1]), ctx)
    assert auto.extras["engine"] == ["captum"] and "memory-mb" in auto.extras["cone_skipped"][0]
    np.testing.assert_allclose(auto.maps, small.maps, atol=1e-6)


# -- integrated gradients ----------------------------------------------------------------------------------
def test_integrated_gradients_exact_on_a_linear_model():
    size = 8
    lin = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.linspace(-1, 1, 2 * size * size).reshape(2, -1))
        lin[1].bias.zero_()
    x = torch.randn(1, 1, size, size)
    exp = build_explainer("integrated-gradients", {"n_steps": 8, "baseline": "black"})
    att = exp.attribute(x, torch.tensor([1]), ctx_for(lin, size))
    base = reference(x, "black", Preprocessing(size=size))
    expected = ((x - base) * lin[1].weight[1].reshape(1, 1, size, size))[0, 0].detach().numpy()
    np.testing.assert_allclose(att.maps[0], expected, atol=1e-5)
    assert att.extras["delta"][0] < 1e-4


@pytest.mark.parametrize("baseline", ["black", "mean", "blur"])
def test_integrated_gradients_completeness_within_reported_delta(baseline):
    model = TinyCNN(2).eval()
    x = torch.randn(1, 1, 24, 24)
    exp = build_explainer("integrated-gradients", {"n_steps": 32, "baseline": baseline, "internal_batch_size": 8})
    att = exp.attribute(x, torch.tensor([1]), ctx_for(model, 24))
    total, diff, delta = float(att.maps[0].astype(np.float64).sum()), att.extras["output_difference"][0], att.extras["delta"][0]
    assert abs(total - diff) <= delta + 1e-4
    assert delta < 0.05 * max(abs(diff), 1e-3) + 1e-3


def test_smoothgrad_is_seeded():
    model = TinyCNN(2).eval()
    x = torch.randn(1, 1, 16, 16)
    exp = build_explainer("integrated-gradients", {"n_steps": 8, "smoothgrad": 3})
    a = exp.attribute(x, torch.tensor([0]), ctx_for(model, 16, seed=1)).maps
    b = exp.attribute(x, torch.tensor([0]), ctx_for(model, 16, seed=1)).maps
    c = exp.attribute(x, torch.tensor([0]), ctx_for(model, 16, seed=2)).maps
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# -- grad-cam -------------------------------------------------------------------------------------------------
def test_gradcam_exact_on_a_fixed_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Conv2d(1, 1, 1, bias=False)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(1, 2, bias=False)
            with torch.no_grad():
                self.feat.weight.fill_(2.0)
                self.fc.weight.copy_(torch.tensor([[-1.0], [3.0]]))

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.feat(x)), 1))

    size = 8
    x = torch.randn(1, 1, size, size)
    ctx = ctx_for(Net(), size, layer="feat")
    att = build_explainer("grad-cam", {"interpolate": "nearest"}).attribute(x, torch.tensor([1]), ctx)
    # d logit_1 / d A = 3 / 64 everywhere, so the map is ReLU(3/64 * 2 x)
    np.testing.assert_allclose(att.maps[0], np.maximum(3 / 64 * 2 * x[0, 0].numpy(), 0), atol=1e-6)
    signed = build_explainer("grad-cam", {"relu": False, "interpolate": "nearest"})
    assert signed.signed
    np.testing.assert_allclose(signed.attribute(x, torch.tensor([0]), ctx).maps[0], -1 / 64 * 2 * x[0, 0].numpy(),
                               atol=1e-6)


def test_gradcam_rejects_a_layer_without_a_feature_map():
    ctx = ctx_for(TinyCNN(2), 16, layer="fc")
    with pytest.raises(UsageError, match="feature map"):
        build_explainer("grad-cam", {}).attribute(torch.randn(1, 1, 16, 16), torch.tensor([0]), ctx)


# -- the contract every registered attribution method passes ---------------------------------------------------
ATTRIBUTION = sorted(n for n, s in registry.all_specs("explainer").items() if s.kind == "attribution")
CONTRACT_OPTIONS = {"integrated-gradients": {"n_steps": 8}, "occlusion": {"patch": 8, "stride": 4}}


@pytest.mark.parametrize("name", ATTRIBUTION)
def test_attribution_contract(name):
    from cxrtool.models import build_model

    torch.manual_seed(0)
    model = build_model("compact", 2, {"width": 4}).eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    ctx = ctx_for(model, 32, layer=None, default_layer="stage4", seed=3)
    exp = build_explainer(name, CONTRACT_OPTIONS.get(name, {}))
    a = exp.attribute(x, target, ctx)
    b = build_explainer(name, CONTRACT_OPTIONS.get(name, {})).attribute(x, target, ctx)
    assert isinstance(a.maps, np.ndarray) and a.maps.dtype == np.float32 and a.maps.shape == (2, 32, 32)
    assert np.isfinite(a.maps).all()
    np.testing.assert_array_equal(a.maps, b.maps)  # deterministic with a seed
    for key, values in a.extras.items():
        assert len(values) == 2, key
    json.dumps(a.extras)  # manifest-ready
    assert isinstance(getattr(exp, "signed", True), bool) and getattr(exp, "unit", "")


def test_builtin_explainers_registered_without_torch():
    names = set(registry.all_specs("explainer"))
    assert {"occlusion", "integrated-gradients", "grad-cam"} <= names
    env = {**os.environ, "CXRTOOL_LOAD_PLUGINS": "explainers"}
    env.pop("CXRTOOL_PLUGINS_DIR", None)
    code = ("import sys; from cxrtool import registry; specs = registry.all_specs('explainer'); "
            "assert 'occlusion' in specs, specs; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UsageError, match="patch"):
        build_explainer("occlusion", {"size": 3})


# -- CLI --------------------------------------------------------------------------------------------------------
def make_checkpoint(path: Path, *, size: int = 32, classes=("LESION", "NORMAL"), cascade: bool = False,
                    model: str = "compact", options=None, seed: int = 0) -> Path:
    from cxrtool import checkpoint as C
    from cxrtool.models import get_spec

    spec = get_spec(model)
    options = {"width": 4} if options is None and model == "compact" else (options or {})
    meta = {
        "kind": "classifier", "model": {"name": model, "options": options}, "class_names": list(classes),
        "negative_class": "NORMAL",
        "cascade": {"negative_class": "NORMAL", "stage2_classes": [c for c in classes if c != "NORMAL"]} if cascade else None,
        "preprocessing": Preprocessing(size=size).to_dict(), "embedding_layer": spec.embedding_layer,
        "explainable_layers": list(spec.explainable_layers),
    }
    torch.manual_seed(seed)
    net = C.build_classifier(meta)
    for m in net.modules():  # a head that does not give 0.5 everywhere
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 1.0)
    return C.save(path, net.state_dict(), meta)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from cxrtool.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), n_per_class=3, size=40, seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


def test_explain_writes_overlays_maps_manifests_and_a_contact_sheet(ckpt, phantoms, capsys, tmp_path):
    images = sorted((phantoms / "LESION").glob("*.png"))[:2]
    out = tmp_path / "ex"
    code, stdout, err = run(capsys, "explain", *images, "-c", ckpt, "-m", "occlusion,grad-cam", "-m",
                            "integrated-gradients", "-O", "n_steps=8", "-O", "occlusion.patch=10", "-o", out,
                            "--scale", "shared", "--json", "-q")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["methods"] == ["occlusion", "grad-cam", "integrated-gradients"] and len(res["images"]) == 2
    assert Path(res["contact_sheet"]).stat().st_size > 0 and (out / "manifest.json").is_file()
    vmax = {}
    for entry in res["images"]:
        for m in res["methods"]:
            o = entry["outputs"][m]
            amap = np.load(o["map"])
            assert amap.dtype == np.float32 and amap.shape == (32, 32)
            assert Path(o["overlay"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            man = json.loads(Path(o["manifest"]).read_text())
            for key in ("checkpoint", "method", "options", "seed", "target", "probability", "timings", "versions"):
                assert key in man, key
            assert man["map"]["min"] == pytest.approx(float(amap.min()))
            assert man["overlay"]["scale"] == "shared"
            vmax.setdefault(m, set()).add(man["overlay"]["vmax"])
    assert all(len(v) == 1 for v in vmax.values())  # one common scale per method
    occ = json.loads((out / f"{images[0].stem}.occlusion.json").read_text())
    assert occ["options"]["patch"] == 10 and occ["extras"]["patch_original_px"] == 10
    assert occ["extras"]["window_input_px"] == [8, 8, 4, 4]  # 40 px phantom -> 32 px input
    ig = json.loads((out / f"{images[0].stem}.integrated-gradients.json").read_text())
    assert ig["options"]["n_steps"] == 8 and "delta" in ig["extras"]
    assert not list(out.glob(".*part*"))


def test_overlays_are_drawn_on_the_original_image_unless_asked_otherwise(ckpt, phantoms, capsys, tmp_path):
    from PIL import Image

    src = np.asarray(Image.open(sorted((phantoms / "LESION").glob("*.png"))[0]))
    tall = tmp_path / "tall.png"
    Image.fromarray(np.repeat(src, 2, axis=0)[:, 5:35]).save(tall)  # 80 x 30: letterboxed into 32 x 32
    for where, shape in (("original", [80, 30]), ("input", [32, 32])):
        code, stdout, err = run(capsys, "explain", tall, "-c", ckpt, "-m", "grad-cam", "-o", tmp_path / where, "-q",
                                "--overlay-on", where)
        assert code == 0, err
        man = json.loads((tmp_path / where / "tall.grad-cam.json").read_text())
        assert man["overlay"]["drawn_on"] == where and man["overlay"]["shape"] == shape
        assert man["map"]["shape"] == [32, 32]  # the .npy map stays at model-input resolution
    code, _, err = run(capsys, "explain", tall, "-c", ckpt, "-m", "grad-cam", "--overlay-on", "both")
    assert code == 2 and "--overlay-on must be original or input" in err


def test_explain_target_layer_evaluate_and_table(ckpt, phantoms, capsys, tmp_path):
    image = sorted((phantoms / "NORMAL").glob("*.png"))[0]
    code, stdout, err = run(capsys, "explain", image, "-c", ckpt, "-m", "grad-cam", "--target", "lesion",
                            "--layer", "stage3", "--evaluate", "--steps", "8", "-o", tmp_path / "e", "-q")
    assert code == 0, err
    assert "grad-cam" in stdout and "deletion" in stdout
    man = json.loads((tmp_path / "e" / f"{image.stem}.grad-cam.json").read_text())
    assert man["target"] == "LESION" and man["layer"] == "stage3" and man["extras"]["layer_map_shape"] == [4, 4]
    ev = man["evaluation"]
    assert 0 <= ev["deletion_auc"] <= 1 and 0 <= ev["insertion_auc"] <= 1
    assert ev["randomisation"]["layers"] == ["fc", "stage5"]
    assert "random_map" in ev
    assert not (tmp_path / "e" / "contact-sheet.png").exists()  # one image, one method


@pytest.mark.parametrize("args,message,code", [
    (["-m", "nope"], "unknown explainer 'nope'; valid explainers: grad-cam", 2),
    ([], "give --method NAME; valid methods:", 2),
    (["-m", "grad-cam", "--target", "pneumonia"], "the model has no class 'pneumonia'; valid classes: LESION, NORMAL", 2),
    (["-m", "grad-cam", "--layer", "stage9"], "unknown layer 'stage9'; explainable layers: stage1, stage2", 2),
    (["-m", "occlusion", "-O", "patch=41"], "occlusion patch 41 px is larger than the image (40 x 40 px)", 2),
    (["-m", "occlusion", "-O", "fill=grey"], "fill='grey' must be one of zero, mean, blur", 2),
    (["-m", "occlusion", "-O", "steps=3"], "no selected method has this option", 2),
    (["-m", "grad-cam", "BROKEN"], "not an image cxrtool can read", 1),
])
def test_bad_input_one_line_error_nothing_written(args, message, code, ckpt, phantoms, capsys, tmp_path):
    image = sorted((phantoms / "LESION").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    args = [str(broken) if a == "BROKEN" else a for a in args]
    out = tmp_path / "out"
    got, _, err = run(capsys, "explain", image, *args, "-c", ckpt, "-o", out, "-q")
    assert got == code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_explainers_and_layers_commands(ckpt, capsys):
    code, out, err = run(capsys, "explainers", "--json")
    assert code == 0, err
    listed = {e["name"]: e for e in json.loads(out)}
    assert listed["occlusion"]["options"]["fill"] == "zero" and listed["occlusion"]["plugin"] == "explainers"
    code, out, err = run(capsys, "explainers")
    assert code == 0 and "grad-cam" in out and "occlusion" in out
    code, out, err = run(capsys, "layers", ckpt, "--json")
    assert code == 0, err
    layers = {r["name"]: r for r in json.loads(out)["layers"]}
    assert layers["stage5"]["explainable"] and layers["stage5"]["output_shape"] == [64, 1, 1]
    assert layers["fc"]["output_shape"] == [2] and not layers["fc"]["feature_map"]
    code, out, err = run(capsys, "layers", "--model", "resnet18", "--size", "64")
    assert code == 0 and "layer4" in out


def test_cascade_layers_are_prefixed_and_explainable(tmp_path, phantoms, capsys):
    ck = make_checkpoint(tmp_path / "cascade.safetensors", classes=("BACTERIA", "NORMAL", "VIRUS"), cascade=True)
    from cxrtool import checkpoint as C

    meta = C.read_meta(ck)
    assert explainable_layers(meta)[0] == "stage1.stage1" and explainable_layers(meta)[-1] == "stage2.stage5"
    image = sorted((phantoms / "LESION").glob("*.png"))[0]
    code, out, err = run(capsys, "explain", image, "-c", ck, "-m", "grad-cam,occlusion", "-o", tmp_path / "c",
                         "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["layer"] == "stage1.stage5"
    occ = json.loads(Path(res["images"][0]["outputs"]["occlusion"]["manifest"]).read_text())
    assert occ["extras"]["engine"] == "cone"


def test_explain_eval_pointing_game_on_phantoms(ckpt, phantoms, capsys, tmp_path):
    code, out, err = run(capsys, "explain-eval", "--data", phantoms / "labels.csv", "-c", ckpt, "-m", "grad-cam",
                         "-m", "occlusion", "-O", "patch=10", "--limit", "3", "--lesions-only", "--steps", "8",
                         "-o", tmp_path / "ee", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["n_images"] == 3 and set(res["methods"]) == {"grad-cam", "occlusion"}
    for m in res["methods"].values():
        assert m["pointing_game"]["n"] == 3 and 0 <= m["pointing_game"]["mean"] <= 1
        assert m["randomisation_spearman"]["n"] >= 2
    assert 0 < res["random_map"]["pointing_chance"]["mean"] < 0.5
    assert (tmp_path / "ee" / "explain-eval.json").is_file()


# -- real images --------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_explain_real_nih_sample(shared_data, tmp_path, capsys):
    images = sorted((shared_data / "samples").glob("nih-*.png"))
    assert images, "no NIH samples"
    ck = make_checkpoint(tmp_path / "m.safetensors", size=64)
    code, out, err = run(capsys, "explain", *images, "-c", ck, "-m", "occlusion,grad-cam", "-O", "patch=128",
                         "-o", tmp_path / "nih", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    occ = json.loads(Path(res["images"][0]["outputs"]["occlusion"]["manifest"]).read_text())
    assert occ["original_shape"] == [512, 512]
    assert occ["extras"]["window_input_px"] == [16, 16, 8, 8]  # 128 of 512 original px -> 16 of 64
    assert occ["extras"]["engine"] == "cone"
    assert Path(res["contact_sheet"]).is_file()


@pytest.mark.realdata
def test_explain_real_fullres_kermany_letterboxed(shared_data, tmp_path, capsys):
    found = sorted((shared_data / "kermany-fullres").rglob("*.jpeg"))
    assert found, "no full-resolution Kermany images"
    ck = make_checkpoint(tmp_path / "m.safetensors", size=64)
    code, out, err = run(capsys, "explain", found[0], "-c", ck, "-m", "occlusion", "-O", "patch=200",
                         "-o", tmp_path / "k", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    man = json.loads(Path(res["images"][0]["outputs"]["occlusion"]["manifest"]).read_text())
    h, w = man["original_shape"]
    scale = 64 / max(h, w)
    assert man["extras"]["window_input_px"][0] == max(1, round(200 * scale))
