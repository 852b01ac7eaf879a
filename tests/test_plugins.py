"""The plugin system: built-ins via entry points, env-var selection, isolation of broken plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cxrtool import registry
from cxrtool.errors import UnknownNameError
from cxrtool.hookspecs import hookimpl
from cxrtool.models import ModelSpec
from cxrtool.plugins import PluginWarning, get_manager, reset_manager


@pytest.fixture
def fresh_plugins(monkeypatch):
    for var in ("CXRTOOL_LOAD_PLUGINS", "CXRTOOL_DISABLE_PLUGINS", "CXRTOOL_PLUGINS_DIR"):
        monkeypatch.delenv(var, raising=False)
    reset_manager()
    yield monkeypatch
    reset_manager()


def _spec(name):
    return ModelSpec(name=name, build=lambda num_classes, in_channels=1: None, description="t",
                     embedding_layer="x", explainable_layers=())


def test_builtins_register_through_entry_points(fresh_plugins):
    info = get_manager().info
    assert {"models", "readers", "augmentations"} <= set(info)
    assert info["models"].distribution == "cxrtool" and info["models"].source == "entry point"
    assert "compact" in registry.all_specs("model")
    assert registry.provider("model", "compact") == "models"


def test_unknown_name_lists_valid_ones(fresh_plugins):
    with pytest.raises(UnknownNameError) as exc:
        registry.get("model", "no-such-net")
    assert "compact" in str(exc.value) and "resnet18" in str(exc.value)


def test_disable_and_select_by_env(fresh_plugins):
    fresh_plugins.setenv("CXRTOOL_DISABLE_PLUGINS", "models")
    reset_manager()
    assert "models" not in get_manager().info
    assert "compact" not in registry.all_specs("model")  # the built-in models are gone
    fresh_plugins.delenv("CXRTOOL_DISABLE_PLUGINS")
    fresh_plugins.setenv("CXRTOOL_LOAD_PLUGINS", "readers")
    reset_manager()
    assert set(get_manager().info) == {"readers"}
    fresh_plugins.setenv("CXRTOOL_LOAD_PLUGINS", "")
    reset_manager()
    assert get_manager().info == {}


def test_broken_plugins_are_reported_and_skipped(fresh_plugins, tmp_path):
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "dup_model.py").write_text(textwrap.dedent("""
        from cxrtool.hookspecs import hookimpl
        from cxrtool.models import ModelSpec
        @hookimpl
        def register_models(register):
            register(ModelSpec(name="compact", build=None, description="dup", embedding_layer="", explainable_layers=()))
            register(ModelSpec(name="extra-net", build=None, description="ok", embedding_layer="", explainable_layers=()))
    """))
    (tmp_path / "raises_in_hook.py").write_text(textwrap.dedent("""
        from cxrtool.hookspecs import hookimpl
        @hookimpl
        def register_augmentations(register):
            raise ValueError("broken hook")
    """))
    fresh_plugins.setenv("CXRTOOL_PLUGINS_DIR", str(tmp_path))
    reset_manager()
    with pytest.warns(PluginWarning) as record:
        manager = get_manager()
        models = registry.all_specs("model")
        augs = registry.all_specs("augmentation")
    messages = " | ".join(str(w.message) for w in record)
    assert "raises_on_import" in messages and "boom at import" in messages
    assert "'compact' is already registered" in messages
    assert "broken hook" in messages
    assert models["compact"].description != "dup"  # the built-in keeps its name
    assert "extra-net" in models  # the plugin's other, valid registration survives
    assert "rotate" in augs  # other plugins keep working
    assert not manager.info["raises_on_import"].ok
    assert not manager.info["raises_in_hook"].ok


def test_runtime_registration(fresh_plugins):
    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(_spec("tiny-test-net"))

    get_manager().register(Plugin(), name="tiny", version="9.9")
    assert registry.provider("model", "tiny-test-net") == "tiny"


def test_cli_plugins_json_and_help_without_torch(tmp_path):
    env_code = (
        "import sys; from cxrtool.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120)
    assert "NO_TORCH" in out.stdout, out.stdout[-500:] + out.stderr[-500:]
    out = subprocess.run([sys.executable, "-m", "cxrtool", "plugins", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    by_name = {p["name"]: p for p in data}
    assert by_name["models"]["status"] == "ok" and "compact" in by_name["models"]["registers"]["model"]
    for field in ("name", "source", "distribution", "version", "module", "hooks", "registers", "status", "errors"):
        assert field in by_name["readers"]
