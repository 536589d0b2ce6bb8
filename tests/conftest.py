"""Shared test setup: process-wide environment for Ray and MLflow, a per-test MEMSWEEP_ROOT, and one
finished smoke sweep per session (`smoke_root`, about 40 s: a local Ray, four tiny cells, an MLflow
SQLite store), read by the report tests and tests/orchestrator/test_mlflow_runs.py.
"""

import os
import subprocess
import sys
from pathlib import Path

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


SMOKE_CELLS = 4


def sweep_env(runs: Path) -> dict[str, str]:
    return {**os.environ, "MEMSWEEP_ROOT": str(runs), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """<root>/runs holds a finished smoke sweep: mlflow.db, mlartifacts/, checkpoints/."""
    root = tmp_path_factory.mktemp("smoke")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "launch", "sweep=smoke"], cwd=root,
        env=sweep_env(root / "runs"), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"smoke launch failed:\n{done.stdout}\n{done.stderr}"
    return root / "runs"
