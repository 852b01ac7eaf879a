"""The conformance kit (``cxrtool.testing``) run over every built-in plugin: each registered model,
augmentation, explainer, anomaly detector, projection and reader honours the plugin contract.

Third-party plugins (the example in ``plugins/cxrtool-example``) run the same kit in their own tests;
here only what the built-in distribution registers is checked. Inputs are tiny: 64 px for models
(the smallest size every model supports), 32 px elsewhere, one torch thread.
"""

from __future__ import annotations

import pytest

from cxrtool import registry, testing
from cxrtool.plugins import get_manager

#: the built-in plugins (entry points of the ``cxrtool`` distribution)
BUILTIN = {"models", "augmentations", "explainers", "detectors", "projections", "readers"}

#: small options keeping the detectors fast (they are fitted three times each)
DETECTOR_OPTIONS = {
    "autoencoder": {"epochs": 1, "depth": 2, "width": 4, "latent": 4, "batch_size": 8},
    "denoising": {"epochs": 1, "depth": 2, "width": 4, "batch_size": 8},
    "padim": {"backbone": "random:compact", "max_grid": 8, "dims": 8, "batch_size": 8},
    "patchcore": {"backbone": "random:compact", "max_grid": 8, "bank": 64, "max_patches": 2000, "proj_dims": 16,
                  "batch_size": 8},
}
#: small options for the slow explainers (defaults are tuned for 224 px images)
EXPLAINER_OPTIONS = {
    "integrated-gradients": {"n_steps": 8},
    "receptive-fields": {"filters": "0-1", "top_k": 2},
    "input-synthesis": {"steps": 8},
}
PROJECTION_OPTIONS = {"tsne": {"perplexity": 5.0, "max_iter": 250, "pca_dims": 0}}
#: known contract violations of built-ins: name -> what is wrong (xfail until fixed; keep this empty)
KNOWN_ISSUES: dict[str, str] = {}


def _builtin(kind: str) -> list[str]:
    return [n for n in testing.registered(kind) if registry.provider(kind, n) in BUILTIN]


def _params(kind: str) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_ISSUES[n], strict=False)) if n in KNOWN_ISSUES
            else n for n in _builtin(kind)]


def _options(table: dict, name: str, kind: str) -> dict:
    spec = registry.get(kind, name)
    return {k: v for k, v in table.get(name, {}).items() if k in spec.options}


def test_every_builtin_plugin_is_covered():
    """The lists below are not empty (a renamed entry point would silently skip everything)."""
    info = get_manager().info
    assert BUILTIN <= set(info), f"built-in plugins missing: {BUILTIN - set(info)}"
    assert all(info[n].ok for n in BUILTIN), {n: info[n].errors for n in BUILTIN if not info[n].ok}
    for kind in ("model", "augmentation", "explainer"):
        assert _builtin(kind), kind


@pytest.mark.parametrize("name", _params("model"))
def test_model(name):
    testing.check_model(name, size=64, batch=2)


@pytest.mark.parametrize("name", _params("augmentation"))
def test_augmentation(name):
    testing.check_augmentation(name)


@pytest.mark.parametrize("name", _params("explainer"))
def test_explainer(name, tmp_path):
    testing.check_explainer(name, options=_options(EXPLAINER_OPTIONS, name, "explainer"), tmp_dir=tmp_path)


@pytest.mark.parametrize("name", _params("explainer"))
def test_explainer_on_a_zoo_model(name, tmp_path):
    """Also on a real (small) model of the zoo with its own layer names."""
    if registry.get("explainer", name).kind != "attribution":
        pytest.skip("dataset / synthesis methods: covered on the tiny model")
    testing.check_explainer(name, model_factory="compact", size=32, batch=1,
                            options=_options(EXPLAINER_OPTIONS, name, "explainer"), tmp_dir=tmp_path)


@pytest.mark.parametrize("name", _params("anomaly detector"))
def test_anomaly_detector(name):
    testing.check_detector(name, options=_options(DETECTOR_OPTIONS, name, "anomaly detector"), size=32, n_images=10)


@pytest.mark.parametrize("name", _params("projection"))
def test_projection(name):
    testing.check_projection(name, options=_options(PROJECTION_OPTIONS, name, "projection"), n_points=30)


@pytest.mark.parametrize("impl", [i.function for i in get_manager().pm.hook.read_image.get_hookimpls()
                                  if i.plugin_name in BUILTIN], ids=lambda f: f.__name__)
def test_reader(impl, tmp_path):
    testing.check_reader(impl, tmp_dir=tmp_path)


def test_builtin_registration_is_cheap():
    testing.check_registration_is_cheap(sorted(BUILTIN))
