"""Time `memsweep aggregate` on a tracking store holding N synthetic cell runs.

    python -m bench.aggregate_bench --runs 10000 [--root DIR] [--build client --processes 4] [--report]

Builds a local SQLite MLflow store (MLflow creates and migrates it) with N FINISHED cell runs shaped
like real ones: the whole flattened config of a smoke cell as params (the model, data size, precision
and seed varied), the cell tags, every final metric of orchestrator/cell.py, and step curves
(`mem_bits` at 4 evaluations plus the final point, `train_loss_bits_per_token` at 4). The numbers
follow planted laws (capacity = alpha * params, the published MIA law) so the fits have work to do.

`--build sql` (default) inserts the rows in one transaction through MLflow's own table definitions
(seconds); `--build client` makes them the way cells do, with MlflowClient.create_run, one log_batch
and set_terminated per run, in `--processes` processes (minutes). Then times `aggregate` without and
with curves (and `report` with `--report`) and prints, and writes, JSON with the figures and the
machine. The experiment is named `smoke` so `aggregate("smoke")` with MEMSWEEP_ROOT=<root> finds it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

SWEEP = "smoke"
V, S = 2048, 64  # the paper's synthetic data: 704 bits per sequence
SHAPES = [(layers, width) for layers in (1, 2, 4, 8) for width in (32, 64, 128, 256)]
SIZES = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
PRECISIONS = ("fp32", "bf16")
PLANTED_ALPHA = {"fp32": 3.8, "bf16": 3.5}
EVAL_STEPS = (250, 500, 750, 1000)


def params_of(layers: int, width: int, vocab: int = V, seq_len: int = S) -> int:
    return vocab * width + seq_len * width + layers * (12 * width * width + 13 * width) + 2 * width + width


def synthetic_cells(n: int, template: dict[str, str], seed: int = 0) -> list[dict]:
    """N cells (seed-major over shapes x sizes x precisions): params, tags, metrics and curves."""
    rng = np.random.default_rng(seed)
    cells = []
    per_seed = len(SHAPES) * len(SIZES) * len(PRECISIONS)
    now = int(time.time() * 1000)
    for i in range(n):
        cell_seed, rest = divmod(i, per_seed)
        (layers, width), rest = SHAPES[rest // (len(SIZES) * len(PRECISIONS))], rest % (len(SIZES) * len(PRECISIONS))
        size, precision = SIZES[rest // len(PRECISIONS)], PRECISIONS[rest % len(PRECISIONS)]
        name = f"l{layers}_d{width}"
        cell_id = f"{name}-v{V}-s{S}-n{size}-{precision}-seed{cell_seed}-{uuid.uuid5(uuid.NAMESPACE_OID, str(i)).hex[:10]}"
        params = dict(template)
        params.update({"model.name": name, "model.n_layer": str(layers), "model.n_head": "4",
                       "model.n_embd": str(width), "data.vocab_size": str(V), "data.seq_len": str(S),
                       "data.num_sequences": str(size), "precision.name": precision, "seed": str(cell_seed),
                       "train.max_steps": "1000"})
        tags = {"memsweep.kind": "cell", "cell_id": cell_id, "sweep": SWEEP, "code_version": "0.1.0+bench",
                "precision": precision, "mlflow.runName": cell_id.rsplit("-", 1)[0]}
        cells.append(planted_run(params, tags, (layers, width, V, S), size, precision, now + i, rng))
    return cells


def planted_run(params: dict[str, str], tags: dict[str, str], shape: tuple[int, int, int, int], size: int,
                precision: str, start_ms: int, rng) -> dict:
    """One FINISHED cell run as `build_sql` inserts it: its params and tags as given, and every final
    metric and the step curves following the planted laws for its (layers, width, V, S), N and precision."""
    layers, width, vocab, seq_len = shape
    p = params_of(layers, width, vocab, seq_len)
    entropy = size * seq_len * math.log2(vocab)
    cap = PLANTED_ALPHA[precision] * p
    mem = (entropy**-4 + cap**-4) ** -0.25 * (1 + 0.01 * rng.standard_normal())  # a smooth min
    x = size / p
    f1 = float(np.clip(0.5 * (1 + 1.34 / (1 + np.exp(33.14 * (x - 0.0337)))) + 0.01 * rng.standard_normal(), 0.5, 1))
    metrics = {
        "params": p, "params_paper": p - width, "entropy_bits": entropy, "mem_bits": mem,
        "mem_bits_unclipped": mem, "mem_fraction": mem / entropy, "bits_per_param": mem / p,
        "predicted_mem_bits": min(cap, entropy), "sequences_per_param": x,
        "train_nll_bits_per_token": (entropy - mem) / (size * seq_len), "test_nll_bits_per_token": 11.0 + 0.05 * rng.random(),
        "loss_auc": min(1.0, f1 + 0.02), "loss_tpr_at_1pct_fpr": max(0.0, 2 * f1 - 1),
        "loss_tpr_at_0p1pct_fpr": max(0.0, 2 * f1 - 1.2), "loss_f1": f1, "steps": 1000.0,
        "converged": float(rng.random() < 0.9), "resumed_from_step": 0.0, "wall_s": 100 * rng.random(),
        "tokens_per_s": 1e5,
    }
    curves = [("mem_bits", mem * frac, step) for frac, step in zip((0.5, 0.8, 0.95, 1.0), EVAL_STEPS)]
    curves += [("train_loss_bits_per_token", 11.0 * (1 - frac), step) for frac, step in zip((0.3, 0.6, 0.8, 0.9), EVAL_STEPS)]
    return {"run_id": uuid.uuid4().hex, "name": tags["mlflow.runName"], "start": start_ms, "params": params,
            "tags": tags, "metrics": metrics, "curves": curves}


def build_sql(store, exp_id: str, artifact_location: str, cells: list[dict]) -> None:
    """Insert every run in one transaction through MLflow's own SQLAlchemy tables."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

    runs, tags, params, metrics, latest = [], [], [], [], []
    for c in cells:
        rid, end = c["run_id"], c["start"] + 60_000
        runs.append({"run_uuid": rid, "name": c["name"], "source_type": "UNKNOWN", "source_name": "",
                     "entry_point_name": "", "user_id": "bench", "status": "FINISHED", "start_time": c["start"],
                     "end_time": end, "source_version": "", "lifecycle_stage": "active",
                     "artifact_uri": f"{artifact_location}/{rid}/artifacts", "experiment_id": int(exp_id)})
        tags += [{"key": k, "value": v, "run_uuid": rid} for k, v in c["tags"].items()]
        params += [{"key": k, "value": v, "run_uuid": rid} for k, v in c["params"].items()]
        final_step = 1000
        points = [(k, v, s, end - 1000) for k, v, s in c["curves"]] + [(k, v, final_step, end) for k, v in c["metrics"].items()]
        metrics += [{"key": k, "value": v, "timestamp": t, "run_uuid": rid, "step": s, "is_nan": False}
                    for k, v, s, t in points]
        newest = {}
        for k, v, s, t in points:
            if k not in newest or (s, t) >= (newest[k][1], newest[k][2]):
                newest[k] = (v, s, t)
        latest += [{"key": k, "value": v, "timestamp": t, "step": s, "is_nan": False, "run_uuid": rid}
                   for k, (v, s, t) in newest.items()]
    with store.engine.begin() as conn:
        for table, rows in ((SqlRun, runs), (SqlTag, tags), (SqlParam, params), (SqlMetric, metrics),
                            (SqlLatestMetric, latest)):
            conn.execute(table.__table__.insert(), rows)


def _client_worker(job) -> int:
    uri, exp_id, cells = job
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for c in cells:
        run = client.create_run(exp_id, run_name=c["name"], tags={k: v for k, v in c["tags"].items()
                                                                   if k != "mlflow.runName"})
        rid, now = run.info.run_id, int(time.time() * 1000)
        points = [Metric(k, v, now, s) for k, v, s in c["curves"]] + [Metric(k, v, now + 1, 1000) for k, v in c["metrics"].items()]
        client.log_batch(rid, metrics=points, params=[Param(k, v) for k, v in c["params"].items()],
                         tags=[RunTag("cell_wall_s", "1.0")])
        client.set_terminated(rid, "FINISHED")
    return len(cells)


def build_client(uri: str, exp_id: str, cells: list[dict], processes: int) -> None:
    from multiprocessing import Pool

    chunks = [cells[i::processes] for i in range(processes)]
    with Pool(processes) as pool:
        pool.map(_client_worker, [(uri, exp_id, chunk) for chunk in chunks])


def machine() -> dict:
    import mlflow
    import pyarrow

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "load_avg": load,
            "python": platform.python_version(), "mlflow": mlflow.__version__, "pyarrow": pyarrow.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--root", help="store folder (default: a new temporary folder)")
    parser.add_argument("--build", choices=("sql", "client"), default="sql")
    parser.add_argument("--processes", type=int, default=4, help="processes for --build client")
    parser.add_argument("--report", action="store_true", help="also time `report` (figures and HTML)")
    parser.add_argument("--json", help="write the results here (default: <root>/aggregate_bench.json)")
    args = parser.parse_args(argv)

    root = Path(args.root or tempfile.mkdtemp(prefix="memsweep-bench-")).resolve()
    os.environ["MEMSWEEP_ROOT"] = str(root)  # conf/config.yaml's root_dir: the store is <root>/mlflow.db
    from models.spec import flatten
    from orchestrator.aggregate import aggregate
    from orchestrator.compose import compose_cell
    from orchestrator.tracking import Tracker

    template = {k: str(v) for k, v in flatten(compose_cell([f"sweep={SWEEP}"]).config).items()}
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, str(root / "mlartifacts"))
    tracker.ensure_store()  # MLflow creates and migrates the schema, once
    exp_id = tracker.experiment_id(SWEEP)
    results = {"runs": args.runs, "store": uri, "machine": machine()}

    started = time.perf_counter()
    cells = synthetic_cells(args.runs, template)
    if args.build == "sql":
        store = tracker.client._tracking_client.store
        build_sql(store, exp_id, tracker.client.get_experiment(exp_id).artifact_location, cells)
    else:
        build_client(uri, exp_id, cells, args.processes)
    results["build"] = {"method": args.build, "seconds": time.perf_counter() - started,
                        "processes": args.processes if args.build == "client" else 1,
                        "metric_points_per_run": len(cells[0]["curves"]) + len(cells[0]["metrics"]),
                        "params_per_run": len(cells[0]["params"]), "tags_per_run": len(cells[0]["tags"])}
    print(f"built {args.runs} runs ({args.build}) in {results['build']['seconds']:.1f} s", flush=True)

    # Rebuilding the latest launch's grid (PENDING rows) composes every cell with Hydra, like `status`;
    # these synthetic runs have no launch, so time that separately, per cell.
    from orchestrator.compose import load_sweep

    t0 = time.perf_counter()
    planned = load_sweep([f"sweep={SWEEP}", "seed=range(0,5)"]).cells
    results["plan_compose_s_per_cell"] = (time.perf_counter() - t0) / len(planned)

    out = root / "aggregate"
    for label, with_curves in (("without_curves", False), ("with_curves", True)):
        t0 = time.perf_counter()
        result = aggregate(SWEEP, [], out / label, curves=with_curves)
        seconds = time.perf_counter() - t0
        results[label] = {"seconds": seconds, "rows": result.cells.num_rows,
                          "columns": result.cells.num_columns, "stages_s": result.timings_s,
                          "curve_points": result.curves.num_rows if result.curves is not None else 0,
                          "cells_parquet_bytes": result.cells_path.stat().st_size,
                          "alpha": {p: round(f["alpha"], 4) for p, f in result.fits["alpha"].items()},
                          "planted_alpha": PLANTED_ALPHA}
        print(f"aggregate {label.replace('_', ' ')}: {seconds:.1f} s for {result.cells.num_rows} rows "
              f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings_s.items())})", flush=True)
    if args.report:
        from orchestrator.report import report

        t0 = time.perf_counter()
        drawn = report(SWEEP, [], out / "with_report")
        results["report"] = {"seconds": time.perf_counter() - t0, "html_bytes": drawn.html_path.stat().st_size}
        print(f"report (aggregate with curves + figures + HTML): {results['report']['seconds']:.1f} s", flush=True)

    path = Path(args.json) if args.json else root / "aggregate_bench.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"written: {path}")
    return results


if __name__ == "__main__":
    main()
