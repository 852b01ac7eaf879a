"""Model zoo contract: every registered model builds, runs on 1-channel input of any size, names
real layers for embeddings / Grad-CAM / freezing, and loads pretrained weights offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
from torch import nn

from cxrtool import registry
from cxrtool.errors import CheckpointError, UsageError
from cxrtool.models import _adapt_state_dict, build_model, freeze, get_spec, layer_names, load_pretrained

BUILTIN = {
    "compact",
    "vgg-small",
    "vgg16-bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet34-gelu",
    "densenet121",
}
NAMES = sorted(registry.all_specs("model"))
SIZE = 64  # every model must work from 64 px; small inputs keep the big ones fast on 2 cores


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _seeded(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes)


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    """(spec, 3-class model built under seed 0); module scope groups the tests by model."""
    return get_spec(request.param), _seeded(request.param, 3)


def _params(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# -- registration ------------------------------------------------------------------------------------


def test_builtin_models_registered():
    assert BUILTIN <= set(NAMES)
    for name in BUILTIN:
        assert registry.provider("model", name) == "models"


@pytest.mark.parametrize(
    "code",
    [
        "import cxrtool_builtin.models",
        "from cxrtool import registry; assert 'compact' in registry.all_specs('model')",
    ],
)
def test_registering_models_does_not_import_torch(code):
    env = {**os.environ, "CXRTOOL_LOAD_PLUGINS": "models"}
    env.pop("CXRTOOL_PLUGINS_DIR", None)
    check = f"import sys; {code}; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_spec_fields(name):
    spec = get_spec(name)
    assert spec.name == name and spec.description and spec.reference
    assert spec.explainable_layers and spec.blocks and spec.head and spec.embedding_layer
    assert spec.default_size >= SIZE
    json.dumps(spec.to_dict())  # `cxrtool models --json`
    if spec.pretrained:  # the enum entry exists (nothing is downloaded)
        import torchvision.models as tvm

        enum_name, member = spec.pretrained.split(".")
        assert getattr(tvm, enum_name)[member].url.startswith("https://")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_a_usage_error(name):
    with pytest.raises(UsageError, match="no_such_option"):
        build_model(name, 2, {"no_such_option": 1})
    with pytest.raises(TypeError):  # build itself accepts only the spec's options
        get_spec(name).build(num_classes=2, in_channels=1, no_such_option=1)


# -- one model at a time -------------------------------------------------------------------------------


def test_forward_shape_and_embedding(built):
    spec, model = built
    model.eval()
    seen = {}
    hook = model.get_submodule(spec.embedding_layer).register_forward_hook(
        lambda m, i, o: seen.setdefault("emb", o.detach().clone())
    )
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 1, SIZE, SIZE))
    finally:
        hook.remove()
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    emb = seen["emb"]
    emb = emb.mean(dim=(2, 3)) if emb.ndim == 4 else emb  # what `cxrtool embed` does
    assert emb.ndim == 2 and emb.shape[0] == 2 and emb.shape[1] >= 8 and torch.isfinite(emb).all()


def test_layers_resolve_in_order(built):
    spec, model = built
    order = layer_names(model)
    for name in (spec.embedding_layer, spec.head, *spec.explainable_layers, *spec.blocks):
        model.get_submodule(name)  # raises AttributeError if missing
        assert name in order
    for seq in (spec.explainable_layers, spec.blocks):
        positions = [order.index(n) for n in seq]
        assert positions == sorted(positions), f"{seq} is not shallow to deep"
    # blocks and head do not overlap, and together they hold every parameter
    groups = [_params(model.get_submodule(n)) for n in (*spec.blocks, spec.head)]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(_params(model))


def test_explainable_layers_pass_gradients(built):
    """Grad-CAM style hooks (forward + full backward) work on every explainable layer."""
    spec, model = built
    model.eval()
    model.requires_grad_(True)
    acts, grads, hooks = {}, {}, []
    for name in spec.explainable_layers:
        layer = model.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda m, i, o, n=name: acts.__setitem__(n, o.detach())))
        hooks.append(layer.register_full_backward_hook(lambda m, gi, go, n=name: grads.__setitem__(n, go[0])))
    try:
        x = torch.randn(1, 1, SIZE, SIZE, requires_grad=True)
        model(x)[0, 1].backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    for name in spec.explainable_layers:
        assert acts[name].ndim == 4 and grads[name].shape == acts[name].shape, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_freeze(built):
    spec, model = built
    try:
        freeze(model, spec, 1)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == _params(model.get_submodule(spec.head)) | _params(model.get_submodule(spec.blocks[-1]))
        freeze(model, spec, 0)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == _params(model.get_submodule(spec.head))
        freeze(model, spec, len(spec.blocks))
        assert all(p.requires_grad for p in model.parameters())
        with pytest.raises(UsageError):
            freeze(model, spec, len(spec.blocks) + 1)
    finally:
        model.requires_grad_(True)


def test_two_classes_and_determinism(built):
    spec, model = built
    again = _seeded(spec.name, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    del again
    two = _seeded(spec.name, 2, seed=1).eval()
    assert not torch.equal(_first_weight(two), _first_weight(model))  # the seed matters
    with torch.no_grad():
        out = two(torch.randn(2, 1, SIZE, SIZE))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def _first_weight(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.ndim == 4)


# -- particular models ---------------------------------------------------------------------------------


def test_resnet34_gelu_has_no_relu():
    model = _seeded("resnet34-gelu", 3)
    kinds = {type(m) for m in model.modules()}
    assert nn.GELU in kinds and nn.ReLU not in kinds


def test_model_options():
    small = build_model("compact", 2, {"width": 8, "dropout": 0.0})
    default = build_model("compact", 2)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in default.parameters())
    net3 = build_model("vgg-small", 2, {"first_pool": False, "dropout": 0.1}).eval()
    with torch.no_grad():
        assert net3(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 2)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("compact", {"width": 0}),
        ("compact", {"width": 2.5}),
        ("compact", {"dropout": 1.0}),
        ("compact", {"dropout": "lots"}),
        ("vgg-small", {"first_pool": "maybe"}),
        ("vgg16-bn", {"hidden": -1}),
    ],
)
def test_bad_option_values_are_usage_errors(name, options):
    with pytest.raises(UsageError, match="model option"):
        build_model(name, 2, options)


def test_options_given_as_text():
    """Options may arrive as command-line text."""
    model = build_model("vgg-small", 2, {"first_pool": "false", "dropout": "0.1"})
    assert isinstance(model.pool1, nn.Identity) and model.block1[3].p == 0.1
    assert build_model("compact", 2, {"width": "8"}).stage1[0].out_channels == 8


def test_compact_handles_non_square_and_large_inputs():
    model = build_model("compact", 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 160)).shape == (1, 3)
        assert model(torch.randn(1, 1, 256, 256)).shape == (1, 3)


# -- pretrained weights --------------------------------------------------------------------------------


def test_load_pretrained_from_local_files(tmp_path):
    """A torchvision (3-channel, 1000-class) ResNet-18 state dict loads into our 1-channel model."""
    import torchvision.models as tvm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = tvm.resnet18(weights=None).state_dict()
    st_path = tmp_path / "resnet18.safetensors"
    save_file(source, str(st_path))
    pt_path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": source}, pt_path)
    spec = get_spec("resnet18")
    for path in (st_path, pt_path):
        model = _seeded("resnet18", 3)
        skipped = load_pretrained(model, spec, str(path))
        assert sorted(skipped) == ["fc.bias", "fc.weight"]
        loaded = model.state_dict()
        assert loaded["conv1.weight"].shape == (64, 1, 7, 7)
        torch.testing.assert_close(loaded["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))
        for key in ("layer4.1.conv2.weight", "layer1.0.bn1.running_mean", "bn1.weight"):
            assert torch.equal(loaded[key], source[key])
        assert loaded["fc.weight"].shape == (3, 512)


def test_load_pretrained_bad_sources(tmp_path):
    model = nn.Identity()
    with pytest.raises(UsageError, match="no published pretrained weights"):
        load_pretrained(model, get_spec("compact"), "imagenet")
    with pytest.raises(UsageError, match="neither"):
        load_pretrained(model, get_spec("resnet18"), str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained(model, get_spec("resnet18"), str(junk))


def test_imagenet_offline_is_a_checkpoint_error(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(nn.Identity(), get_spec("resnet18"), "imagenet")
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "offline" in message
    assert "https://download.pytorch.org/" in message and "--pretrained" in message


def test_vgg16_bn_matches_torchvision_layout():
    """Our VGG16-BN trunk has torchvision's parameter names and shapes (so ImageNet weights fit) and
    the ImageNet classifier is skipped."""
    from torchvision.models.vgg import cfgs, make_layers

    tv_features = make_layers(cfgs["D"], batch_norm=True)
    state = {f"features.{k}": v for k, v in tv_features.state_dict().items()}
    state.update(  # torchvision's 4096-4096-1000 classifier, without allocating it
        {
            "classifier.0.weight": torch.empty(4096, 25088, device="meta"),
            "classifier.3.weight": torch.empty(4096, 4096, device="meta"),
            "classifier.6.weight": torch.empty(1000, 4096, device="meta"),
        }
    )
    model = _seeded("vgg16-bn", 2)
    fitted, skipped = _adapt_state_dict(model, state)
    assert sorted(skipped) == ["classifier.0.weight", "classifier.3.weight", "classifier.6.weight"]
    assert set(fitted) == {k for k in model.state_dict() if k.startswith("features.")}
    assert fitted["features.0.weight"].shape == (64, 1, 3, 3)


def test_densenet_legacy_checkpoint_keys(tmp_path):
    """torchvision's DenseNet checkpoints spell ``denselayer1.norm1`` as ``denselayer1.norm.1``."""
    import re

    source = _seeded("densenet121", 2, seed=1).state_dict()
    legacy = {  # the LuaTorch port has no num_batches_tracked
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in source.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121.pt"
    torch.save(legacy, path)
    model = _seeded("densenet121", 2, seed=2)
    assert load_pretrained(model, get_spec("densenet121"), str(path)) == []
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
