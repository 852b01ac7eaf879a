"""Tests of the example plugin: cxrtool's conformance kit on everything it registers, what is
particular to each method, and the command line end to end (train -> explain) with it installed."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from cxrtool import registry, testing
from cxrtool.errors import UsageError
from cxrtool.plugins import get_manager
from cxrtool.testing import run_cli

PLUGIN = "example"  # the entry-point name in pyproject.toml


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    """Runs and caches go to the test's folder; one torch thread (busy CI machines)."""
    monkeypatch.setenv("CXRTOOL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CXRTOOL_CACHE_DIR", "")


# -- installed and registered ------------------------------------------------------------------------
def test_installed_and_listed():
    import cxrtool_example

    from cxrtool import registry

    registry.collect_all()  # what `cxrtool plugins` does before listing
    info = get_manager().info[PLUGIN].to_dict()
    assert info["status"] == "ok", info["errors"]
    assert info["distribution"] == "cxrtool-example"
    assert info["version"] == metadata.version("cxrtool-example") == cxrtool_example.__version__
    assert info["source"] == "entry point" and info["module"] == "cxrtool_example.plugin"
    assert info["hooks"] == ["register_augmentations", "register_explainers", "register_models"]
    assert info["registers"] == {"augmentation": ["gamma"], "explainer": ["gradcam-plus-plus"], "model": ["mobile-cxr"]}


def test_registration_imports_no_torch():
    testing.check_registration_is_cheap([PLUGIN])


# -- the conformance kit over everything the plugin registers ----------------------------------------
@pytest.mark.parametrize("kind, name", testing.registered_params(plugin=PLUGIN))
def test_conformance(kind, name, tmp_path):
    kwargs = {"explainer": {"tmp_dir": tmp_path}}.get(kind, {})
    testing.check(kind, name, **kwargs)


def test_registered_params_cover_the_plugin():
    assert [p.values for p in testing.registered_params(plugin=PLUGIN)] == [
        ("model", "mobile-cxr"), ("augmentation", "gamma"), ("explainer", "gradcam-plus-plus")]


def test_model_conformance_with_options_and_bad_values():
    out = testing.check_model("mobile-cxr", options={"width": 4, "dropout": 0.0}, num_classes=2, size=32,
                              bad_values={"width": 0, "dropout": 1.5})
    assert out["logits"] == [2, 2] and out["embedding_dim"] == 64


def test_augmentation_rejects_bad_values():
    testing.check_augmentation("gamma", bad_values={"low": 0.0, "high": 100.0, "p": 1.5})
    with pytest.raises(UsageError, match="greater than"):
        registry.get("augmentation", "gamma").build(low=2.0, high=1.0)


def test_explainer_on_the_plugins_own_model(tmp_path):
    out = testing.check_explainer("gradcam-plus-plus", model_factory="mobile-cxr", size=64, batch=2,
                                  bad_values={"interpolate": "cubic-spline", "batch": 0}, tmp_dir=tmp_path)
    assert out["maps"] == [2, 64, 64]
    for layer in ("stage1", "stage3"):  # any explainable layer, not only the default
        testing.check_explainer("gradcam-plus-plus", model_factory="mobile-cxr", layer=layer, size=64, batch=1)


# -- what is particular to each method ----------------------------------------------------------------
def test_gamma_is_a_power_curve():
    import torch

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    square = registry.get("augmentation", "gamma").build(low=2.0, high=2.0, p=1.0)
    assert torch.allclose(square(x, torch.Generator().manual_seed(1)), x**2)
    never = registry.get("augmentation", "gamma").build(p=0.0)
    assert torch.equal(never(x, torch.Generator()), x)


def test_gradcam_plus_plus_matches_the_closed_form():
    """Conv -> ReLU -> global average pool -> linear: the gradient of logit c with respect to the
    feature map is v_ck / Z everywhere (Z = h * w), so alpha_kij = 1 / (2 + S_k v_ck / Z) with S_k the
    channel's sum, w_k = relu(v_ck) / (2 + S_k v_ck / Z), map = relu(sum_k w_k A_k)."""
    import torch
    from torch import nn

    from cxrtool.explain import ExplainContext
    from cxrtool.imaging import Preprocessing

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(6, 3))
    model.eval()
    x = torch.randn(2, 1, 12, 12)
    target = torch.tensor([2, 0])
    ctx = ExplainContext(model=model, preprocessing=Preprocessing(size=12), class_names=["a", "b", "c"],
                         default_layer="features")
    maps = registry.get("explainer", "gradcam-plus-plus").build(interpolate="nearest").attribute(x, target, ctx).maps

    with torch.no_grad():
        a = model.features(x)  # (N, K, 12, 12): the layer keeps the input size, no upsampling
    z = a.shape[-2] * a.shape[-1]
    for i in range(len(x)):
        v = model.fc.weight[target[i]].detach()
        s = a[i].sum(dim=(1, 2))
        w = torch.relu(v) / (2 + s * v / z)
        expected = torch.relu((w[:, None, None] * a[i]).sum(0))
        assert torch.allclose(torch.from_numpy(maps[i]), expected, rtol=1e-4, atol=1e-7)
    assert maps.max() > 0


def test_gradcam_plus_plus_errors_are_usage_errors():
    import torch

    from cxrtool.explain import ExplainContext
    from cxrtool.imaging import Preprocessing

    model = testing.tiny_model(2)
    explainer = registry.get("explainer", "gradcam-plus-plus").build(**registry.get("explainer", "gradcam-plus-plus").options)
    x = torch.randn(1, 1, 16, 16)
    base = {"model": model, "preprocessing": Preprocessing(size=16), "class_names": ["a", "b"]}
    with pytest.raises(UsageError, match="needs a layer"):
        explainer.attribute(x, torch.tensor([0]), ExplainContext(**base))
    with pytest.raises(UsageError, match="feature map"):
        explainer.attribute(x, torch.tensor([0]), ExplainContext(**base, layer="fc"))
    with pytest.raises(UsageError, match="out of range"):
        explainer.attribute(x, torch.tensor([5]), ExplainContext(**base, layer="block2"))


# -- end to end: the command line with the plugin installed ---------------------------------------------
_cli = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


@pytest.mark.slow
def test_cli_lists_train_and_explain(tmp_path, capsys):
    from cxrtool.synthetic import write_dataset

    code, out, err = _cli(capsys, "plugins", "--json")
    assert code == 0, err
    mine = {p["name"]: p for p in json.loads(out)}[PLUGIN]
    assert mine["version"] == "0.1.0" and mine["status"] == "ok"
    code, out, err = _cli(capsys, "models", "--json")
    assert code == 0, err
    assert {m["name"]: m["plugin"] for m in json.loads(out)}["mobile-cxr"] == PLUGIN

    write_dataset(tmp_path / "ph", n_per_class=12, size=32, seed=0)
    code, out, err = _cli(capsys, "train", "--data", tmp_path / "ph", "--model", "mobile-cxr", "--model-option",
                          "width=4", "--augment", "gamma:low=0.8;high=1.25,affine", "--size", "32", "--epochs", "1",
                          "--batch-size", "8", "--threads", "1", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "mobile-cxr"

    image = sorted((tmp_path / "ph").rglob("*.png"))[0]
    code, out, err = _cli(capsys, "explain", image, "--checkpoint", tmp_path / "run", "--method", "gradcam-plus-plus",
                          "--layer", "stage3", "--out", tmp_path / "explain", "--quiet", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    produced = result["images"][0]["outputs"]["gradcam-plus-plus"]
    for key in ("overlay", "map", "manifest"):
        assert (tmp_path / "explain" / produced[key].split("/")[-1]).is_file(), key
    manifest = json.loads((tmp_path / "explain" / produced["manifest"].split("/")[-1]).read_text())
    assert manifest["layer"] == "stage3" and manifest["map"]["shape"] == [32, 32] and not manifest["map"]["signed"]
