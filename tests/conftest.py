"""Shared test setup: process-wide environment for Ray and MLflow, and a per-test MEMSWEEP_ROOT.

Nothing here starts a service. A session-scoped Ray cluster fixture belongs here too once the
sweep tests need one (STACK.md: one cluster per test session, not per test).
"""

import os

import pytest

# Ray 2.60 turns token authentication on by default and writes a token under the home folder; tests
# run local clusters only. No usage reports either. Subprocesses started by tests inherit both.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture
def memsweep_root(tmp_path, monkeypatch):
    """A fresh MEMSWEEP_ROOT (conf/config.yaml's root_dir) under tmp_path, not yet created; every
    store and checkpoint the test writes lands there, and subprocesses inherit it."""
    root = tmp_path / "root"
    monkeypatch.setenv("MEMSWEEP_ROOT", str(root))
    return root
