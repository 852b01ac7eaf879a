"""Shared pytest fixtures.

Real-data tests carry ``@pytest.mark.realdata`` and use the ``shared_data`` fixture, which skips
with the reason when ``../shared/data`` is absent. With ``CXRTOOL_REQUIRE_REALDATA=1`` (set by
``.ci/run``) such a skip is turned into a failure, so CI always runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: the real chest X-rays, ``../shared/data`` relative to the project root (see its README.md)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _required() -> bool:
    return os.environ.get("CXRTOOL_REQUIRE_REALDATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the real data folder; skips the test (with the reason) when it is absent."""
    if not SHARED_DATA.is_dir():
        reason = f"real data folder not found: {SHARED_DATA} (the real-data tests need ../shared/data)"
        if _required():
            pytest.fail(reason + "; CXRTOOL_REQUIRE_REALDATA is set, so this is a failure")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped real-data test fails when real data is required (CI)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _required() and item.get_closest_marker("realdata") is not None:
        report.outcome = "failed"
        report.longrepr = f"real-data test skipped although CXRTOOL_REQUIRE_REALDATA is set: {report.longrepr}"


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Runs, the image cache and downloads go to the test's tmp folder, never the user's."""
    monkeypatch.setenv("CXRTOOL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CXRTOOL_CACHE_DIR", "")
    monkeypatch.setenv("CXRTOOL_DATA_DIR", str(tmp_path / "data-cache"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``):
    tiny models gain nothing from more, and on a busy 2-core machine two OpenMP threads spin-wait on
    each other (seen: 5 s instead of 0.04 s for a DenseNet forward)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
