"""Isolation of plugins loaded from ``CXRTOOL_PLUGINS_DIR``: broken ones (raise on import, register a
duplicate name, raise inside a hook, raise inside ``register_commands``, malformed hook) are named in a
warning and skipped while the command line and the other plugins keep working; a well-behaved one
that implements every hook is picked up; environment variables select and disable plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from cxrtool import registry
from cxrtool.plugins import PluginWarning, get_manager, reset_manager
from cxrtool.testing import run_cli

ENV_VARS = ("CXRTOOL_LOAD_PLUGINS", "CXRTOOL_DISABLE_PLUGINS", "CXRTOOL_PLUGINS_DIR")

BROKEN = {
    "raises_on_import": """
        raise RuntimeError("boom at import")
    """,
    "dup_name": """
        from cxrtool.hookspecs import hookimpl
        from cxrtool.models import ModelSpec

        def _spec(name, description):
            return ModelSpec(name=name, build=None, description=description, embedding_layer="x", explainable_layers=())

        @hookimpl
        def register_models(register):
            register(_spec("compact", "a duplicate of the built-in"))
            register(_spec("iso-extra-net", "a valid registration next to the duplicate"))
    """,
    "raises_in_hook": """
        from cxrtool.hookspecs import hookimpl

        @hookimpl
        def register_explainers(register):
            raise ValueError("broken explainer hook")
    """,
    "raises_in_commands": """
        from cxrtool.hookspecs import hookimpl

        @hookimpl
        def register_commands(app):
            raise RuntimeError("broken command hook")
    """,
    "bad_signature": """
        from cxrtool.hookspecs import hookimpl

        @hookimpl
        def register_models(registrar):  # not an argument of the hook spec
            pass
    """,
}

#: implements every hook of cxrtool.hookspecs (the doc test requires each hook to be exercised by a test)
GOOD = """
    import numpy as np

    from cxrtool.anomaly import DetectorSpec
    from cxrtool.augment import AugmentationSpec
    from cxrtool.embed import ProjectionSpec
    from cxrtool.explain import ExplainerSpec
    from cxrtool.hookspecs import hookimpl
    from cxrtool.models import ModelSpec

    __version__ = "2.5"


    def _invert(**options):
        return lambda batch, generator: 1.0 - batch


    @hookimpl
    def register_models(register):
        register(ModelSpec(name="iso-net", build=None, description="from the plugins dir", embedding_layer="x",
                           explainable_layers=()))


    @hookimpl
    def register_augmentations(register):
        register(AugmentationSpec(name="iso-invert", build=_invert, description="1 - x"))


    @hookimpl
    def register_explainers(register):
        register(ExplainerSpec(name="iso-explainer", build=None, description="from the plugins dir"))


    @hookimpl
    def register_anomaly_detectors(register):
        register(DetectorSpec(name="iso-detector", build=None, description="from the plugins dir"))


    @hookimpl
    def register_projections(register):
        register(ProjectionSpec(name="iso-projection", build=None, description="from the plugins dir"))


    @hookimpl
    def read_image(path, max_size):
        if str(path).endswith(".iso"):  # a text file of rows of numbers in [0, 1]
            return np.loadtxt(path, dtype=np.float32, ndmin=2)
        return None


    @hookimpl
    def register_commands(app):
        @app.command("iso-hello")
        def iso_hello(name: str = "world") -> None:
            print(f"hello {name} from the plugins dir")
"""


def _write(folder, plugins: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in plugins.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(code))
    return folder


@pytest.fixture
def plugin_env(monkeypatch):
    """A clean plugin environment; the manager is reset before and after."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    reset_manager()
    yield monkeypatch
    reset_manager()


@pytest.fixture
def broken_dir(tmp_path):
    return _write(tmp_path / "broken", BROKEN)


@pytest.fixture
def good_dir(tmp_path):
    return _write(tmp_path / "good", {"good_tool": GOOD})


_cli = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


def _subprocess_cli(env_extra: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "cxrtool", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


# -- broken plugins are named in a warning and skipped ---------------------------------------------------
def test_each_broken_plugin_is_named_in_a_warning_and_skipped(plugin_env, broken_dir):
    plugin_env.setenv("CXRTOOL_PLUGINS_DIR", str(broken_dir))
    with pytest.warns(PluginWarning) as record:
        manager = get_manager()
        registry.collect_all()
    messages = [str(w.message) for w in record]
    expected = {
        "raises_on_import": "boom at import",
        "dup_name": "model 'compact' is already registered by plugin 'models'",
        "raises_in_hook": "register_explainers raised ValueError: broken explainer hook",
        "bad_signature": "registrar",
    }
    for plugin, text in expected.items():
        hits = [m for m in messages if m.startswith(f"plugin {plugin!r} skipped") and text in m]
        assert hits, f"no warning naming {plugin!r} with {text!r} in {messages}"
        assert not manager.info[plugin].ok and text in " ".join(manager.info[plugin].errors)
    # what the broken plugins tried does not take effect; everything else keeps working
    models = registry.all_specs("model")
    assert models["compact"].description != "a duplicate of the built-in" and registry.provider("model", "compact") == "models"
    assert "iso-extra-net" in models  # the duplicating plugin's other, valid registration survives
    assert {"grad-cam", "occlusion"} <= set(registry.all_specs("explainer"))
    assert "rotate" in registry.all_specs("augmentation")
    assert all(manager.info[n].ok for n in ("models", "augmentations", "explainers", "readers"))
    assert manager.info["raises_in_commands"].ok  # only fails once the command line is built (next test)


def test_cli_keeps_working_and_reports_broken_plugins(plugin_env, broken_dir, capsys):
    plugin_env.setenv("CXRTOOL_PLUGINS_DIR", str(broken_dir))
    code, out, err = _cli(capsys, "models", "--json")
    assert code == 0, err
    listed = {m["name"]: m["plugin"] for m in json.loads(out)}
    assert listed["compact"] == "models" and listed["iso-extra-net"] == "dup_name"
    code, out, err = _cli(capsys, "plugins", "--json")
    assert code == 0, err
    by_name = {p["name"]: p for p in json.loads(out)}
    for name in ("raises_on_import", "dup_name", "raises_in_hook", "bad_signature"):
        entry = by_name[name]
        assert entry["status"] == "error" and entry["errors"], entry
        assert entry["source"] == "plugins dir" and entry["module"].endswith(f"{name}.py")
    assert "boom at import" in by_name["raises_on_import"]["errors"][0]
    assert by_name["dup_name"]["registers"] == {"model": ["iso-extra-net"]}
    assert by_name["models"]["status"] == "ok"
    code, out, err = _cli(capsys, "plugins")  # the table names the error too
    assert code == 0 and "boom at import" in out


def test_register_commands_failure_is_isolated(broken_dir, good_dir):
    """The command line is built once per process, so this runs in a fresh interpreter."""
    dirs = os.pathsep.join([str(broken_dir), str(good_dir)])
    proc = _subprocess_cli({"CXRTOOL_PLUGINS_DIR": dirs}, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    by_name = {p["name"]: p for p in json.loads(proc.stdout)}
    assert by_name["raises_in_commands"]["status"] == "error"
    assert "register_commands raised RuntimeError: broken command hook" in by_name["raises_in_commands"]["errors"]
    assert "raises_in_commands" in proc.stderr and "broken command hook" in proc.stderr  # the warning
    assert by_name["good_tool"]["status"] == "ok"
    # another plugin's command still works next to the broken one
    proc = _subprocess_cli({"CXRTOOL_PLUGINS_DIR": dirs}, "iso-hello", "--name", "cxr")
    assert proc.returncode == 0, proc.stderr
    assert "hello cxr from the plugins dir" in proc.stdout


# -- a well-behaved plugins-dir plugin: every hook is used ---------------------------------------------
def test_plugins_dir_plugin_with_every_hook(plugin_env, good_dir, tmp_path):
    from cxrtool import hookspecs, testing
    from cxrtool.imaging import read_image

    plugin_env.setenv("CXRTOOL_PLUGINS_DIR", str(good_dir))
    info = get_manager().info["good_tool"]
    registry.collect_all()
    assert info.ok, info.errors
    assert info.source == "plugins dir" and info.version == "2.5"
    spec_names = sorted(n for n in dir(hookspecs) if n.startswith(("register_", "read_")))
    assert sorted(info.hooks) == spec_names  # this test exercises every hook
    assert info.registers == {"model": ["iso-net"], "augmentation": ["iso-invert"], "explainer": ["iso-explainer"],
                              "anomaly detector": ["iso-detector"], "projection": ["iso-projection"]}
    for kind, name in info.registers.items():
        assert registry.provider(kind, name[0]) == "good_tool"
    testing.check_augmentation("iso-invert")
    # read_image: the plugin's reader claims its format; PNGs still go to the built-in readers
    (tmp_path / "img.iso").write_text("0 0.5 1\n1 0.5 0\n")
    assert read_image(tmp_path / "img.iso").tolist() == [[0, 0.5, 1], [1, 0.5, 0]]
    from PIL import Image

    Image.new("L", (4, 3), 255).save(tmp_path / "white.png")
    assert read_image(tmp_path / "white.png").shape == (3, 4)


# -- environment variables ----------------------------------------------------------------------------------
def test_disable_by_name_skips_plugins_dir_files(plugin_env, broken_dir, good_dir, recwarn):
    plugin_env.setenv("CXRTOOL_PLUGINS_DIR", os.pathsep.join([str(broken_dir), str(good_dir)]))
    plugin_env.setenv("CXRTOOL_DISABLE_PLUGINS", "raises_on_import, dup_name,raises_in_hook,bad_signature,good_tool")
    info = get_manager().info
    registry.collect_all()
    assert not {"raises_on_import", "dup_name", "raises_in_hook", "bad_signature", "good_tool"} & set(info)
    assert "raises_in_commands" in info and "models" in info
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_load_plugins_selects_entry_points(plugin_env, capsys):
    plugin_env.setenv("CXRTOOL_LOAD_PLUGINS", "models,augmentations")
    assert set(get_manager().info) == {"models", "augmentations"}
    code, out, err = _cli(capsys, "plugins", "--json")
    assert code == 0, err
    assert [p["name"] for p in json.loads(out)] == ["augmentations", "models"]
    code, out, err = _cli(capsys, "explainers", "--json")
    assert code == 0 and json.loads(out) == [], err


def test_empty_load_plugins_loads_nothing_and_the_cli_still_runs(plugin_env, capsys):
    plugin_env.setenv("CXRTOOL_LOAD_PLUGINS", "")
    code, out, err = _cli(capsys, "models", "--json")
    assert code == 0, err
    assert json.loads(out) == []
    code, out, err = _cli(capsys, "train", "--data", "nowhere", "--model", "compact", "--quiet")
    assert code == 2 and "unknown model 'compact'" in err and "(none registered)" in err


@pytest.mark.skipif("cxrtool-example" not in {d.metadata["Name"] for d in metadata.distributions()},
                    reason="the example plugin (plugins/cxrtool-example) is not installed")
def test_disable_an_installed_third_party_plugin(plugin_env, capsys):
    assert registry.provider("model", "mobile-cxr") == "example"
    plugin_env.setenv("CXRTOOL_DISABLE_PLUGINS", "example")
    reset_manager()
    assert "example" not in get_manager().info
    code, out, err = _cli(capsys, "models", "--json")
    assert code == 0, err
    names = [m["name"] for m in json.loads(out)]
    assert "mobile-cxr" not in names and "compact" in names

