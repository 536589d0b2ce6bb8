"""Golden numbers: refactoring must not move a single bit of what memsweep reports.

Three fixed computations are compared with the values kept in tests/golden/numbers.json:
- the smoke sweep (four l1_d16 cells trained on Ray, packed) read back through `memsweep aggregate`:
  every deterministic final metric, every curve point, every column of every per-sequence artifact,
  and fits.json;
- one text cell and its reference trained by `memsweep run`: its metrics and per-sequence table;
- the sweep fits of a planted table (three shapes, two precisions, seeds, an MIA transition, an
  unconverged cell and text rows), which exercises every branch of fits.json.

Both paths go through the command line and the files it writes, so the test holds whatever the code
inside looks like. Float values are compared exactly on each machine kind values were recorded on (the same torch, CPU
capability and CPU model; every cell trains on one thread): the file keeps one set per kind, recorded
from the same commit. Elsewhere CPU kernels may round differently and the comparison falls back to a
relative FALLBACK_REL_TOL against the first kind's values, reported in the failure message.

A change that is meant to move numbers (a new recipe, a corrected definition) updates the file on
purpose: `MEMSWEEP_UPDATE_GOLDEN=1 python -m pytest tests/report/test_golden_numbers.py`, and the
commit says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.report.conftest import sweep_env

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "numbers.json"
UPDATE = os.environ.get("MEMSWEEP_UPDATE_GOLDEN") == "1"
TIMING = {"wall_s", "tokens_per_s"}  # measured, not computed: never golden
# Another CPU model rounds some kernels differently, and training amplifies a last-bit difference over
# hundreds of steps: on a machine kind with no values of its own, numbers are compared to this.
FALLBACK_REL_TOL = 1e-3
TEXT_CELL = ["data=text", "data.seq_len=40", "data.num_sequences=16", "data.num_nonmembers=64",
             "data.num_test=64", "train.max_steps=200", "train.eval_interval=100",
             "train.checkpoint_interval=100", "device=cpu"]


def machine() -> str:
    return f"torch {torch.__version__} cpu {torch.backends.cpu.get_cpu_capability()} {_cpu_model()}"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def check(name: str, measured: dict) -> None:
    """Compare `measured` with the golden entry `name` (or record it, for this machine kind, when
    updating). Each entry keeps the values recorded on each machine kind: compared exactly where this
    machine's kind has values, else with the first kind's at a relative FALLBACK_REL_TOL."""
    golden = load_golden()
    if UPDATE:  # values that moved on purpose make the other kinds' sets stale: they are dropped
        kinds = golden.get(name, {})
        same = kinds.get(machine()) == json.loads(json.dumps(measured))
        golden[name] = {**(kinds if same else {}), machine(): measured}
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden, f"{GOLDEN} has no entry {name!r}: record it with MEMSWEEP_UPDATE_GOLDEN=1"
    kinds = golden[name]
    exact = machine() in kinds
    recorded_on = machine() if exact else next(iter(kinds))
    differences = list(_differences(kinds[recorded_on], json.loads(json.dumps(measured)), name, exact))
    assert not differences, (
        f"{len(differences)} numbers differ from the golden values "
        f"({'exact comparison' if exact else f'recorded on {recorded_on}, compared at rel {FALLBACK_REL_TOL:g}'}; "
        f"record this machine kind's with MEMSWEEP_UPDATE_GOLDEN=1 on the commit that recorded the others):\n"
        + "\n".join(differences[:30]))


def _differences(golden, measured, where: str, exact: bool):
    if isinstance(golden, dict) and isinstance(measured, dict):
        for key in sorted(set(golden) | set(measured)):
            if key not in measured:
                yield f"{where}.{key}: missing (golden {str(golden[key])[:80]})"
            elif key not in golden:
                yield f"{where}.{key}: new (measured {str(measured[key])[:80]})"
            elif not (not exact and key == "sha256"):  # hashes of floats hold only on the same machine
                yield from _differences(golden[key], measured[key], f"{where}.{key}", exact)
    elif isinstance(golden, list) and isinstance(measured, list):
        if len(golden) != len(measured):
            yield f"{where}: {len(measured)} items, golden {len(golden)}"
        for i, (g, m) in enumerate(zip(golden, measured)):
            yield from _differences(g, m, f"{where}[{i}]", exact)
    elif isinstance(golden, float) and isinstance(measured, (int, float)) and not exact:
        if not math.isclose(golden, measured, rel_tol=FALLBACK_REL_TOL, abs_tol=1e-9):
            yield f"{where}: {measured!r} != golden {golden!r}"
    elif golden != measured:
        yield f"{where}: {measured!r} != golden {golden!r}"


def column_digest(table) -> dict:
    """Per column: its type, a hash of its exact values, and their sum (readable when a hash differs)."""
    digest = {}
    for name in table.column_names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        if values.dtype == object:
            raw = "\x1f".join(map(str, values)).encode()
            digest[name] = {"type": str(table.schema.field(name).type), "sha256": hashlib.sha256(raw).hexdigest()}
            continue
        values = np.ascontiguousarray(values)
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        digest[name] = {"type": str(table.schema.field(name).type),
                        "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
                        "sum": float(np.sum(finite, dtype=np.float64)), "rows": int(values.size)}
    return digest


def cell_numbers(client: MlflowClient, run) -> dict:
    with_artifact = client.download_artifacts(run.info.run_id, "per_sequence.parquet")
    return {
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k not in TIMING},
        "per_sequence": column_digest(pq.read_table(with_artifact)),
    }


def test_smoke_sweep_numbers_are_golden(smoke_root, tmp_path):
    out = tmp_path / "aggregate"
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "aggregate", "smoke", "--out", str(out)],
                          cwd=tmp_path, env=sweep_env(smoke_root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = pq.read_table(out / "cells.parquet").to_pylist()
    curves = pq.read_table(out / "curves.parquet").to_pylist()
    fits = json.loads((out / "fits.json").read_text())
    fits.pop("launch_run_id")  # a new id per launch
    client = MlflowClient(f"sqlite:///{smoke_root}/mlflow.db")
    measured = {"cells": {}, "fits": fits}
    for row in cells:
        entry = cell_numbers(client, client.get_run(row["run_id"]))
        entry["curves"] = [[c["key"], c["step"], c["value"]] for c in curves if c["cell_id"] == row["cell_id"]]
        measured["cells"][row["cell_id"]] = entry
    check("smoke", measured)


def test_text_cell_numbers_are_golden(tmp_path):
    root = tmp_path / "runs"
    # One thread, as a Ray worker with one CPU has: a parallel reduction rounds by the number of threads,
    # so the default (one per core) would tie the exact values to the core count of the recording machine.
    env = {**sweep_env(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "-q", *TEXT_CELL], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    measured = {}
    for experiment in ("adhoc", "memsweep-references"):
        exp = client.get_experiment_by_name(experiment)
        for run in client.search_runs([exp.experiment_id]):
            measured[f"{experiment}/{run.data.tags['memsweep.cell_id']}"] = cell_numbers(client, run)
    assert len(measured) == 2, sorted(measured)
    check("text", measured)


def test_planted_fits_are_golden():
    from tests.report.planted import planted_fits

    check("planted_fits", planted_fits())
