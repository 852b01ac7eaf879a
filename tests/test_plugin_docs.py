"""The plugin author guide (docs/plugins.md) agrees with the code: every hook of cxrtool.hookspecs is
documented with its exact signature and decorator, examples are valid hook implementations, spec
fields, environment variables, ``cxrtool plugins --json`` fields and the conformance kit are all
documented, and every hook is exercised by some test."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from cxrtool import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
TESTS = ROOT / "tests"
SPEC_ATTR = f"{hookspecs.PROJECT}_spec"


def _hookspecs() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, SPEC_ATTR)}


HOOKS = _hookspecs()


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _sections(text: str, level: int) -> dict[str, str]:
    """``{heading: body}`` for headings of exactly ``level`` ``#`` (body up to the next heading of
    the same or a higher level); fenced code is not mistaken for headings."""
    out: dict[str, str] = {}
    current, lines, fence = None, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6}) (.*)$", line)
        if m and len(m.group(1)) <= level:
            if current is not None:
                out[current] = "\n".join(lines)
            current, lines = (m.group(2).strip(), []) if len(m.group(1)) == level else (None, [])
            continue
        if current is not None:
            lines.append(line)
    if current is not None:
        out[current] = "\n".join(lines)
    return out


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _hook_reference() -> dict[str, str]:
    body = _sections(_text(), 2).get("Hook reference")
    assert body is not None, "docs/plugins.md has no '## Hook reference' section"
    out = {}
    for heading, section in _sections(body, 3).items():
        m = re.fullmatch(r"`(\w+)`", heading)
        assert m, f"hook reference headings are '### `hook_name`', got {heading!r}"
        out[m.group(1)] = section
    return out


class _Expr(str):
    """A default that is not a literal (a constant's name), kept as its source text."""


def _default(node: ast.expr | None):
    if node is None:
        return inspect.Parameter.empty
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _Expr(ast.unparse(node))


def _signature_of(node: ast.FunctionDef) -> inspect.Signature:
    """An inspect.Signature built from a documented ``def`` (names, kinds and defaults)."""
    a = node.args
    params = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = inspect.Parameter.POSITIONAL_ONLY if i < len(a.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(arg.arg, kind, default=_default(default)))
    if a.vararg:
        params.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY, default=_default(default)))
    if a.kwarg:
        params.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def _decorator_options(node: ast.FunctionDef, marker: str) -> dict[str, object] | None:
    for dec in node.decorator_list:
        if isinstance(dec, ast.Name) and dec.id == marker:
            return {}
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) and dec.func.id == marker:
            return {kw.arg: ast.literal_eval(kw.value) for kw in dec.keywords}
    return None


def _spec_options(fn) -> dict[str, object]:
    """The non-default options of a hook spec (``firstresult=True``, ``historic=True``, ...)."""
    defaults = {"firstresult": False, "historic": False, "warn_on_impl": None, "warn_on_impl_args": None}
    return {k: v for k, v in getattr(fn, SPEC_ATTR).items() if defaults.get(k, None) != v}


# -- hooks --------------------------------------------------------------------------------------------------
def test_hookspecs_are_found():
    assert {"register_models", "read_image", "register_commands"} <= set(HOOKS), sorted(HOOKS)


def test_every_hook_is_documented_and_nothing_else():
    documented = _hook_reference()
    missing = sorted(set(HOOKS) - set(documented))
    extra = sorted(set(documented) - set(HOOKS))
    assert not missing, f"hooks without a section in docs/plugins.md '## Hook reference': {missing}"
    assert not extra, f"docs/plugins.md documents hooks that cxrtool.hookspecs does not have: {extra}"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_documented_signature_matches_the_hookspec(hook):
    section = _hook_reference().get(hook)
    assert section is not None, f"hook {hook!r} is not documented"
    blocks = _python_blocks(section)
    assert blocks, f"'### `{hook}`' has no ```python block with the signature"
    tree = ast.parse(blocks[0])
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert defs and defs[0].name == hook, f"the first code block of '### `{hook}`' must define {hook}(...)"
    documented = _signature_of(defs[0])
    actual = inspect.signature(HOOKS[hook])
    assert documented == actual, f"docs/plugins.md shows def {hook}{documented}, cxrtool.hookspecs has def {hook}{actual}"
    options = _decorator_options(defs[0], "hookspec")
    assert options is not None, f"the signature block of {hook!r} must show its @hookspec decorator"
    assert options == _spec_options(HOOKS[hook]), (
        f"docs/plugins.md shows @hookspec{'(' + str(options) + ')' if options else ''} for {hook!r}, the spec has "
        f"{_spec_options(HOOKS[hook]) or 'no options'}"
    )


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_an_example(hook):
    """Some code block outside the signature block implements the hook with @hookimpl."""
    impls = [impl for block in _python_blocks(_text()) for impl in _hookimpls(ast.parse(block))]
    assert hook in {name for name, _ in impls}, f"docs/plugins.md has no @hookimpl example of {hook!r}"


def _hookimpls(tree: ast.Module) -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            options = _decorator_options(node, "hookimpl")
            if options is not None:
                out.append((options.get("specname") or node.name, node))
    return out


def test_code_blocks_are_valid_python_and_examples_are_valid_hookimpls():
    blocks = _python_blocks(_text())
    assert len(blocks) >= len(HOOKS)
    for i, block in enumerate(blocks):
        try:
            tree = ast.parse(block)
        except SyntaxError as exc:
            raise AssertionError(f"python block {i} of docs/plugins.md does not parse: {exc}\n{block}") from None
        for name, node in _hookimpls(tree):
            assert name in HOOKS, f"docs example implements {name!r}, which is not a hook"
            allowed = list(inspect.signature(HOOKS[name]).parameters)
            used = [a.arg for a in node.args.args]
            assert set(used) <= set(allowed), (f"docs example {node.name}{tuple(used)} takes arguments that hook "
                                               f"{name}{tuple(allowed)} does not pass")


# -- specs, environment variables, plugins --json, the kit -------------------------------------------------
def _spec_classes() -> dict[str, type]:
    from cxrtool.augment import AugmentationSpec
    from cxrtool.explain import Attribution, ExplainContext, ExplainerSpec
    from cxrtool.models import ModelSpec

    classes = {c.__name__: c for c in (ModelSpec, AugmentationSpec, ExplainerSpec, ExplainContext, Attribution)}
    try:
        from cxrtool.anomaly import DetectorSpec

        classes["DetectorSpec"] = DetectorSpec
    except ImportError:
        pass
    try:
        from cxrtool.embed import ProjectionSpec

        classes["ProjectionSpec"] = ProjectionSpec
    except ImportError:
        pass
    return classes


@pytest.mark.parametrize("cls", sorted(_spec_classes()))
def test_spec_fields_are_documented(cls):
    fields = [f.name for f in dataclasses.fields(_spec_classes()[cls])]
    sections = _sections(_sections(_text(), 2).get("Spec reference", ""), 3)
    body = sections.get(f"`{cls}`") or next((s for h, s in sections.items() if f"`{cls}`" in s), None)
    assert body is not None, f"docs/plugins.md '## Spec reference' has no section for `{cls}`"
    rows = set(re.findall(r"^\| `(\w+)` \|", body, flags=re.M))
    missing = [f for f in fields if f not in rows]
    assert not missing, f"fields of {cls} missing from its table in docs/plugins.md: {missing}"


def test_environment_variables_are_documented():
    import cxrtool.plugins

    source = inspect.getsource(cxrtool.plugins)
    used = set(re.findall(r"\bCXRTOOL_[A-Z_]+\b", source))
    assert {"CXRTOOL_LOAD_PLUGINS", "CXRTOOL_DISABLE_PLUGINS", "CXRTOOL_PLUGINS_DIR"} <= used
    body = _sections(_text(), 2).get("Environment variables", "")
    rows = set(re.findall(r"^\| `(CXRTOOL_[A-Z_]+)` \|", body, flags=re.M))
    assert used <= rows, f"environment variables read by cxrtool.plugins but not documented: {sorted(used - rows)}"


def test_plugins_json_fields_are_documented():
    from cxrtool.plugins import PluginInfo

    fields = list(PluginInfo(name="x", source="runtime").to_dict())
    body = _sections(_text(), 2).get("`cxrtool plugins --json`")
    assert body is not None, "docs/plugins.md has no '## `cxrtool plugins --json`' section"
    assert "stable" in body
    rows = re.findall(r"^\| `(\w+)` \|", body, flags=re.M)
    assert rows == fields, f"documented fields {rows} != PluginInfo.to_dict() fields {fields} (same order)"


def test_conformance_kit_is_documented():
    from cxrtool import testing

    body = _sections(_text(), 2).get("Testing with `cxrtool.testing`", "")
    rows = set(re.findall(r"^\| `(\w+)\(", body, flags=re.M))
    public = {n for n in testing.__all__ if callable(getattr(testing, n))}
    assert public <= rows, f"cxrtool.testing functions missing from docs/plugins.md: {sorted(public - rows)}"
    for name in re.findall(r"testing\.(\w+)\(", _text()):
        assert name in testing.__all__, f"docs/plugins.md calls testing.{name}, which cxrtool.testing does not export"


def test_documented_kit_signatures_match():
    """The kit's table shows each function's real parameters (names and defaults)."""
    from cxrtool import testing

    body = _sections(_text(), 2).get("Testing with `cxrtool.testing`", "")
    for name, args in re.findall(r"^\| `(\w+)\((.*?)\)` \|", body, flags=re.M):
        tree = ast.parse(f"def {name}({args}): pass")
        documented = _signature_of(tree.body[0]).parameters
        actual = inspect.signature(getattr(testing, name)).parameters
        unknown = [p for p in documented if p not in actual]
        assert not unknown, f"docs/plugins.md shows testing.{name} with parameters it does not have: {unknown}"
        undocumented = [p for p in actual if p not in documented and p != "threads"]
        assert not undocumented, f"docs/plugins.md omits parameters of testing.{name}: {undocumented}"
        for pname, param in documented.items():
            default = actual[pname].default
            if isinstance(param.default, _Expr):
                assert getattr(testing, param.default, None) == default, f"testing.{name}: {pname}={param.default}"
            elif param.default is not inspect.Parameter.empty:
                assert param.default == default, f"testing.{name}: documented {pname}={param.default!r}, " \
                                                 f"actual default {default!r}"


# -- every hook is exercised by a test --------------------------------------------------------------------------
def test_every_hook_is_implemented_in_some_test():
    """A hook nobody tests can break silently: each hook must be implemented (``def hook(``, plugin files
    written by tests included) in a test module other than this one."""
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(TESTS.glob("test_*.py"))
               if p.name != Path(__file__).name}
    untested = []
    for hook in HOOKS:
        pattern = re.compile(rf"\bdef {hook}\(")
        if not any(pattern.search(text) for text in sources.values()):
            untested.append(hook)
    assert not untested, (f"hooks not implemented by any test in tests/test_*.py: {untested}; add a test plugin "
                          "that implements them (see tests/test_plugin_isolation.py)")


# -- the guide's examples work ------------------------------------------------------------------------------------
#: hooks whose documented examples are complete (no module of their own to import) and are run here
RUNNABLE = {"register_augmentations", "register_projections", "read_image"}


def test_doc_examples_pass_the_conformance_kit(tmp_path, monkeypatch):
    """The complete examples of the guide, loaded as plugins-dir plugins, pass cxrtool.testing."""
    import numpy as np

    from cxrtool import registry, testing
    from cxrtool.plugins import get_manager, reset_manager

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    names = []
    for i, block in enumerate(_python_blocks(_text())):
        if {name for name, _ in _hookimpls(ast.parse(block))} & RUNNABLE:
            names.append(f"doc_example_{i}")
            (plugins / f"{names[-1]}.py").write_text(block)
    assert len(names) >= 3
    for var in ("CXRTOOL_LOAD_PLUGINS", "CXRTOOL_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CXRTOOL_PLUGINS_DIR", str(plugins))
    reset_manager()
    try:
        registry.collect_all()
        info = get_manager().info
        checked = []
        for name in names:
            assert info[name].ok, info[name].errors
            for kind, registered in info[name].registers.items():
                for thing in registered:
                    testing.check(kind, thing)
                    checked.append(thing)
            if "read_image" in info[name].hooks:
                raw = tmp_path / "image.raw"
                np.arange(400, dtype="<u2").reshape(20, 20).tofile(raw)
                testing.check_reader(name, samples=[raw], tmp_dir=tmp_path / "reader")
                checked.append("read_image")
        assert {"invert", "first-two", "read_image"} <= set(checked)
    finally:
        reset_manager()
