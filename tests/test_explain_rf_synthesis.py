"""receptive-fields and input-synthesis explainers: exact receptive fields (analytic vs measured),
top-k search on a planted bright spot, grid PNGs, bad layers; activation maximisation that works,
is seeded and stays a valid image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrtool.data import ImageSet
from cxrtool.errors import UsageError
from cxrtool.explain import ExplainContext
from cxrtool.imaging import Preprocessing
from cxrtool.testing import run_cli
from cxrtool_builtin.explainers import input_synthesis, receptive_fields
from cxrtool_builtin.explainers.receptive_fields import (
    all_receptive_fields,
    empirical_receptive_field,
    receptive_field,
    unit_box,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _agree(model: nn.Module, layer: str, size: int, rf: dict | None = None) -> dict:
    """Analytic receptive field == the measured gradient support (centre unit and its neighbour)."""
    rf = rf or receptive_field(model, layer, size)
    emp = empirical_receptive_field(model, layer, size)
    uy, ux = emp["unit"]
    assert list(unit_box(rf, uy, ux)) == emp["box"], (layer, rf, emp)
    assert emp["size_yx"] == rf["size_yx"] and emp["stride_yx"] == rf["stride_yx"], (layer, rf, emp)
    assert rf["output_size"] == emp["output_size"]
    return rf


# -- receptive fields: geometry ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers, size, stride, padding",
    [
        ([nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)], 5, 1, 2),
        ([nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3, padding=1)], 7, 2, 3),
        ([nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)], 5, 1, 0),  # no padding: unit 0 starts at pixel 0
        ([nn.Conv2d(1, 2, 5, padding=4, dilation=2)], 9, 1, 4),
        ([nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1)], 8, 2, 3),
        ([nn.Conv2d(1, 2, 7, stride=2, padding=3), nn.BatchNorm2d(2), nn.MaxPool2d(3, 2, 1),
          nn.Conv2d(2, 2, 3, padding=1)], 19, 4, 9),
    ],
)
def test_receptive_field_of_small_cnns_is_exact(layers, size, stride, padding):
    model = nn.Sequential(*layers).eval()
    last = str(len(layers) - 1)
    rf = _agree(model, last, 48)
    assert (rf["size"], rf["stride"], rf["padding"], rf["method"]) == (size, stride, padding, "analytic")


class Halve(nn.Module):
    """A module of unknown geometry (functional pooling inside): measured, not computed."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)


def test_unknown_geometry_falls_back_to_the_measured_field():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Halve(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    rf = receptive_field(model, "2", 48)
    assert (rf["size"], rf["stride"], rf["method"]) == (8, 2, "empirical")
    assert unit_box(rf, 12, 12) == (21, 29, 21, 29)


def test_resnet18_receptive_fields_match_the_gradient_support():
    from cxrtool.models import build_model

    model = build_model("resnet18", 2)
    rfs = all_receptive_fields(model, 448)  # one pass for all layers; layer4's centre field fits in 448 px
    assert list(rfs)[:4] == ["conv1", "bn1", "relu", "maxpool"]
    expected = {"layer1": (43, 4), "layer2": (99, 8), "layer3": (211, 16), "layer4": (435, 32)}
    for layer, (size, stride) in expected.items():
        rf = _agree(model, layer, 448, rfs[layer])
        assert (rf["size"], rf["stride"]) == (size, stride), layer
    # inside a residual block: the main path so far (layer1's field + conv1 of layer2.0 at stride 4)
    rf = _agree(model, "layer2.0.conv1", 96)
    assert (rf["size"], rf["stride"]) == (51, 8)
    assert rf["channels"] == 128


def test_receptive_field_is_pure_and_rejects_non_conv_layers():
    from cxrtool.models import build_model

    model = build_model("compact", 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rf = receptive_field(model, "stage2", 64)
    assert rf["size"] == 25 and rf["stride"] == 4 and rf["output_size"] == [16, 16]
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for bad in ("fc", "avgpool", "dropout"):
        with pytest.raises(UsageError, match=r"not convolutional.*stage1, stage2"):
            receptive_field(model, bad, 64)
    with pytest.raises(UsageError, match="no layer"):
        receptive_field(model, "nope", 64)


# -- receptive fields: the dataset search -----------------------------------------------------------
class BlobNet(nn.Module):
    """Filter 0 is a peaked 5x5 bright-blob detector (weights outer([1,2,3,2,1])), filter 1 its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 5, padding=2, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            tent = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0])
            self.conv.weight[0, 0] = torch.outer(tent, tent)
            self.conv.weight[1, 0] = -torch.outer(tent, tent)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


#: (image index, y, x, brightness) of the planted blobs
BLOBS = [(3, 20, 9, 200), (7, 6, 25, 255), (10, 15, 15, 120)]
PP = Preprocessing(size=32, resize="stretch", mean=0.0, std=1.0)  # normalised input = pixel / 255
PP_SYN = Preprocessing(size=32, resize="stretch", mean=0.5, std=0.25)


@pytest.fixture()
def blob_images(tmp_path):
    paths = []
    for i in range(12):
        img = np.full((32, 32), 0, np.uint8)
        for j, y, x, v in BLOBS:
            if j == i:
                img[y - 1 : y + 2, x - 1 : x + 2] = v
        p = tmp_path / "imgs" / f"img{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return ImageSet(paths, np.zeros(12, np.int64), ["A", "B"], [f"p{i}" for i in range(12)])


def _ctx(model, layer=None, **kw) -> ExplainContext:
    return ExplainContext(model=model.eval(), preprocessing=PP, class_names=["A", "B"], layer=layer,
                          default_layer="conv", **kw)


def test_top_k_search_finds_planted_bright_spots_and_writes_grids(blob_images, tmp_path):
    seen = []
    ex = receptive_fields.build(filters="0", top_k=3)
    out = tmp_path / "rf"
    res = ex.run_dataset(blob_images, _ctx(BlobNet(), "relu", batch_size=5, progress=seen.append), out)
    assert sum(seen) == 12 and res["n_images"] == 12 and res["skipped"] == []
    (f,) = res["filters"]
    assert f["filter"] == 0 and f["layer"] == "relu" and f["rf_size"] == 5
    ranked = sorted(BLOBS, key=lambda b: -b[3])
    assert [t["path"].rsplit("/", 1)[-1] for t in f["top"]] == [f"img{b[0]:02d}.png" for b in ranked]
    for t, (_i, y, x, v) in zip(f["top"], ranked):
        assert (t["y"], t["x"]) == (y, x)
        assert t["box"] == [y - 2, y + 3, x - 2, x + 3]
        # the 3x3 blob under the centre of the tent: (2 + 3 + 2) ** 2 = 49 times its value
        assert t["activation"] == pytest.approx(49 * v / 255, rel=1e-5)
    with Image.open(f["grid"]) as grid:
        assert grid.size[0] > 100 and grid.size[1] > 100
    json.dumps(res)  # JSON-ready
    assert sorted(p.name for p in out.iterdir()) == ["rf_relu_filter0000.png"]


def test_top_filters_crop_clipping_and_unreadable_images(blob_images, tmp_path):
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"not a png")
    ds = ImageSet([*blob_images.paths, str(bad)], np.zeros(13, np.int64), ["A", "B"], [f"p{i}" for i in range(13)])
    ex = receptive_fields.build(filters="top", n_top_filters=1, top_k=20)
    res = ex.run_dataset(ds, _ctx(BlobNet(), "conv"), tmp_path / "rf")
    assert [f["filter"] for f in res["filters"]] == [0]  # the bright-blob detector is the most active
    assert len(res["filters"][0]["top"]) == 12  # one position per readable image, never more than exist
    assert res["skipped"] and res["skipped"][0]["path"] == str(bad)
    # a blank image's maximum sits where its 5x5 window overlaps the zero padding least: a corner crop is clipped
    boxes = [t["box"] for t in res["filters"][0]["top"]]
    assert all(0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32 for y0, y1, x0, x1 in boxes)


def test_receptive_fields_usage_errors_write_nothing(blob_images, tmp_path):
    out = tmp_path / "rf"
    for layer, match in (("fc", "not convolutional"), ("pool", "not convolutional"), ("nope", "no layer")):
        with pytest.raises(UsageError, match=match):
            receptive_fields.build().run_dataset(blob_images, _ctx(BlobNet(), layer), out)
    with pytest.raises(UsageError, match="has 2 filters"):
        receptive_fields.build(filters="0-7").run_dataset(blob_images, _ctx(BlobNet(), "conv"), out)
    with pytest.raises(UsageError, match="filters="):
        receptive_fields.build(filters="a-b").run_dataset(blob_images, _ctx(BlobNet(), "conv"), out)
    with pytest.raises(UsageError, match="top_k"):
        receptive_fields.build(top_k="0")
    with pytest.raises(UsageError, match="no option"):
        receptive_fields.build(bogus=1)
    assert not out.exists()
    assert receptive_fields.parse_filters("0-2,5", 8) == [0, 1, 2, 5]
    assert receptive_fields.build(top_k="4").options["top_k"] == 4  # options may come as text


# -- input synthesis --------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0.0, 1.0)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


FAST = {"steps": 48, "lr": 0.1, "octaves": 2}


def _syn_ctx(**kw) -> ExplainContext:
    return ExplainContext(model=TinyNet().eval(), preprocessing=PP_SYN, class_names=["A", "B"],
                          default_layer="features", **kw)


def test_input_synthesis_raises_targets_and_stays_a_valid_image(tmp_path):
    ex = input_synthesis.build(**FAST)
    res = ex.synthesize(["A", "features.2:6", "features.2:5:8:8"], _syn_ctx(seed=1), tmp_path / "a")
    assert [t["kind"] for t in res["targets"]] == ["class", "channel", "unit"]
    assert res["start"] == "noise" and res["seed"] == 1
    for t in res["targets"]:
        start, final = t["start_activation"], t["final_activation"]
        assert final > start + 0.3 and final > 2 * start, t
        img = np.load(t["npy"])
        assert img.dtype == np.float32 and img.shape == (32, 32)
        assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.01
        with Image.open(t["png"]) as im:
            png = np.asarray(im)
        assert png.shape == (32, 32) and np.abs(png / 255.0 - img).max() <= 0.5 / 255 + 1e-6
    cls = res["targets"][0]
    assert cls["final_probability"] > cls["start_probability"]
    assert (tmp_path / "a" / "synthesis_sheet.png").is_file()
    json.dumps(res)


def test_input_synthesis_is_deterministic_with_a_seed(tmp_path):
    def run(seed, name):
        res = input_synthesis.build(**FAST, seed=seed).synthesize(["A"], _syn_ctx(), tmp_path / name)
        return np.load(res["targets"][0]["npy"])

    a, b, c = run(3, "a"), run(3, "b"), run(4, "c")
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_input_synthesis_from_an_image(tmp_path):
    from cxrtool.imaging import normalize
    from cxrtool.synthetic import make_arrays

    images, _labels, _info = make_arrays(n_per_class=1, size=32, seed=0)
    start = normalize(torch.from_numpy(images[:1, None].copy()), PP_SYN)  # (1, 1, 32, 32) normalised phantom
    model = TinyNet().eval()
    with torch.no_grad():
        logit0 = float(model(start)[0, 0])
    ex = input_synthesis.build(**FAST, l2=0.5)
    res = ex.synthesize(["A", "B"], _syn_ctx(), tmp_path / "s", start=start)
    assert res["start"] == "image"
    a = res["targets"][0]
    assert a["start_activation"] == pytest.approx(logit0, abs=1e-5)
    for t in res["targets"]:
        assert t["final_activation"] > t["start_activation"] + 0.2
    # it is still that image, changed: closer to the start than to mean grey
    img = np.load(a["npy"])
    start01 = start[0, 0].numpy() * PP_SYN.std + PP_SYN.mean
    assert np.abs(img - start01).mean() < np.abs(img - 0.5).mean()
    # one target from each of two images
    two = torch.cat([start, start.flip(-1)])
    res = input_synthesis.build(steps=4, octaves=1).synthesize(["A"], _syn_ctx(), tmp_path / "two", start=two)
    assert [(t["target"], t["start_index"]) for t in res["targets"]] == [("A", 0), ("A", 1)]
    with pytest.raises(UsageError, match="2 start images for 3 targets"):
        input_synthesis.build(steps=1).synthesize(["A", "B", "features.0:1"], _syn_ctx(), tmp_path / "three", start=two)


def test_input_synthesis_targets_and_usage_errors(tmp_path):
    parse = input_synthesis.parse_target
    assert parse("B", ["A", "B"]).index == 1
    assert parse("1", ["A", "B"]).kind == "class"
    t = parse("3", ["A", "B"], layer="features.2")
    assert (t.kind, t.layer, t.index) == ("channel", "features.2", 3)
    ctx = _syn_ctx()
    for bad, match in (("C", "unknown target"), ("features.2:99", "has 8 channels"), ("nope:1", "no layer"),
                       ("features.2:1:40:0", "unit outside"), ("fc:1:2", "LAYER:CHANNEL")):
        with pytest.raises(UsageError, match=match):
            input_synthesis.build(steps=1).synthesize([bad], ctx, tmp_path / "x")
    with pytest.raises(UsageError, match="start image"):
        input_synthesis.build(steps=1).synthesize(["A"], ctx, tmp_path / "x", start=torch.zeros(1, 1, 8, 8))
    with pytest.raises(UsageError, match="steps"):
        input_synthesis.build(steps=0)
    assert not (tmp_path / "x").exists()
    # --layer with no targets: its first channels
    res = input_synthesis.build(steps=2, octaves=1).synthesize([], _syn_ctx(layer="features.0"), tmp_path / "d")
    assert [t["target"] for t in res["targets"]] == [f"features.0:{i}" for i in range(8)]


def test_specs_register_without_importing_torch():
    code = ("import sys\n"
            "from cxrtool_builtin.explainers import input_synthesis, receptive_fields\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert receptive_fields.SPEC.kind == 'dataset' and input_synthesis.SPEC.kind == 'synthesis'\n"
            "print(receptive_fields.SPEC.name, input_synthesis.SPEC.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["receptive-fields", "input-synthesis"]


# -- through the command line -----------------------------------------------------------------------
_run = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A tiny untrained compact checkpoint (32 px) and a few phantom images."""
    from cxrtool import checkpoint as C
    from cxrtool.models import get_spec
    from cxrtool.synthetic import write_dataset

    root = tmp_path_factory.mktemp("cli")
    spec = get_spec("compact")
    meta = {"kind": "classifier", "model": {"name": "compact", "options": {"width": 4}},
            "class_names": ["LESION", "NORMAL"], "negative_class": "NORMAL", "cascade": None,
            "preprocessing": Preprocessing(size=32).to_dict(), "embedding_layer": spec.embedding_layer,
            "explainable_layers": list(spec.explainable_layers)}
    torch.manual_seed(0)
    net = C.build_classifier(meta)
    ckpt = C.save(root / "model.safetensors", net.state_dict(), meta)
    data = write_dataset(root / "phantoms", n_per_class=3, size=40, seed=0)
    return ckpt, sorted(data.rglob("*.png"))


def test_cli_receptive_fields(cli_setup, capsys, tmp_path):
    ckpt, images = cli_setup
    out = tmp_path / "ex"
    code, stdout, err = _run(capsys, "explain", *images, "-c", ckpt, "-m", "receptive-fields", "--layer", "stage2",
                             "-O", "filters=0-1", "-O", "top_k=4", "-o", out, "--json", "-q")
    assert code == 0, err
    summary = json.loads(stdout)["runs"]["receptive-fields"]["summary"]
    assert summary["layer"] == "stage2" and summary["receptive_field"]["size"] == 25 and summary["n_images"] == 6
    assert [f["filter"] for f in summary["filters"]] == [0, 1]
    for f in summary["filters"]:
        assert len(f["top"]) == 4 and Path(f["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a layer after global pooling: one line, exit 2, nothing written
    code, _, err = _run(capsys, "explain", *images, "-c", ckpt, "-m", "receptive-fields", "--layer", "avgpool",
                        "-o", tmp_path / "bad", "-q")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "not convolutional" in lines[0], err
    assert not (tmp_path / "bad").exists()


def test_cli_input_synthesis(cli_setup, capsys, tmp_path):
    ckpt, images = cli_setup
    out = tmp_path / "syn"
    code, stdout, err = _run(capsys, "explain", "-c", ckpt, "-m", "input-synthesis", "-t", "LESION", "-t",
                             "stage3:2", "-O", "steps=12", "-O", "octaves=1", "-o", out, "--json", "-q")
    assert code == 0, err
    summary = json.loads(stdout)["runs"]["input-synthesis"]["summary"]
    assert [t["target"] for t in summary["targets"]] == ["LESION", "stage3:2"] and summary["start"] == "noise"
    for t in summary["targets"]:
        with Image.open(t["png"]) as png:
            assert np.load(t["npy"]).shape == (32, 32) and png.size == (32, 32)
    # from an image
    code, stdout, err = _run(capsys, "explain", images[0], "-c", ckpt, "-m", "input-synthesis", "-t", "NORMAL",
                             "-O", "steps=4", "-o", tmp_path / "img", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["runs"]["input-synthesis"]["summary"]["start"] == "image"
