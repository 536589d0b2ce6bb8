"""memsweep: train tiny GPTs over a grid of shapes, datasets, precisions and seeds on Ray, record every
cell in MLflow, and measure how many bits each model memorizes (Morris et al., arXiv 2505.24832).

commands:
  memsweep run [OVERRIDES...]                       one cell in this process (e.g. model=l1_d32 seed=3)
  memsweep launch sweep=NAME [OVERRIDES...] [--dry-run] [--force] [--submit]
  memsweep status SWEEP [OVERRIDES...] [--state S] [--cells] [--json]   cells by state, per axis
  memsweep show SWEEP [CELL_ID] [OVERRIDES...]      a cell's resolved config (YAML); no id: the ids
  memsweep resume SWEEP [--failed] [--submit] [OVERRIDES...]   run the cells that have not finished
  memsweep stop SWEEP [OVERRIDES...]                stop a sweep submitted as a Ray Job
  memsweep aggregate SWEEP [--out DIR] [--from PATH] [--no-curves] [--no-plan]   tables and fits
  memsweep report SWEEP [--out DIR] [--from PATH] [--no-curves] [--no-plan]      figures, HTML report
  memsweep ui [OVERRIDES...] [--port N]             serve the local store on 127.0.0.1, or print the server's URL

OVERRIDES use Hydra's grammar over conf/ (`train.lr=1e-3`, `precision=bf16`, `seed=0,1,2` in a sweep).
Bad input stops before any work with a one-line error naming the field; the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from rich.markup import escape

from orchestrator.compose import ConfigError
from orchestrator.console import console, out


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.compose import compose_cell, prepared, split_overrides

    sweeps = split_overrides(args.overrides)[0]
    if sweeps:  # Hydra itself would advise --multirun, which memsweep does not take
        raise ConfigError(f"{sweeps[0]}: several values make a sweep, and `memsweep run` trains one cell; give one "
                          f"value, or run the grid with `memsweep launch sweep=NAME {' '.join(args.overrides)}`")
    cell = prepared([compose_cell(args.overrides)])[0]  # validates before anything is trained or recorded
    from models.precision import check_supported, resolve_device  # imports torch: config is good
    from models.spec import SpecError
    from orchestrator.cell import run_cell
    from orchestrator.console import cell_summary, training_progress
    from orchestrator.resources import check_fits_memory
    from orchestrator.tracking import Tracker

    try:  # a missing device, one without bfloat16, or too little memory is bad input too: refuse before recording
        device = resolve_device(cell.options.device)
        check_supported(cell.spec.precision, device)
        check_fits_memory(cell.spec, cell.options.eval_batch_size, device.type == "cuda", *_device_memory(device))
    except SpecError as err:
        raise ConfigError(str(err)) from None
    tracker = Tracker(cell.options.tracking_uri, cell.options.artifact_root)
    tracker.ensure_store()
    data = cell.spec.data
    console.print(f"cell {cell.cell_id}: {cell.spec.params:,} params, "
                  + (f"H(X) = {data.entropy_bits:,.0f} bits" if not cell.spec.is_text else
                     f"{data.num_sequences:,} sequences of {data.corpus_uri}"))
    reference = None
    if cell.spec.reference is not None:  # trained first, here, unless a sweep of this store has it
        from orchestrator.corpus import reference_cell

        ref_cell = reference_cell(cell)
        console.print(f"reference {ref_cell.cell_id}: {ref_cell.spec.data.num_sequences:,} sequences")
        with training_progress(ref_cell.spec, enabled=not args.quiet) as progress:
            reference = run_cell(ref_cell, progress=progress, tracker=tracker)
    with training_progress(cell.spec, enabled=not args.quiet) as progress:
        outcome = run_cell(cell, progress=progress, tracker=tracker, reference=reference)
    if outcome.already_finished:
        console.print(f"cell {cell.cell_id} already FINISHED in run {outcome.run_id}; nothing to do")
        return 0
    if outcome.status != "FINISHED":
        console.print(f"[red]cell {cell.cell_id} {outcome.status}:[/red] {escape(outcome.error or '')}")
        return 1
    out.print(cell_summary(cell.spec, outcome.metrics, outcome.run_id, cell.cell_id))
    from orchestrator.links import browse_hint, run_url

    console.print(f"browse: {run_url(cell.options.tracking_uri, outcome.run_id) or browse_hint(cell.options.tracking_uri)}")
    return 0


def _device_memory(device) -> tuple[float, str]:
    """(bytes, name) of the memory a `run` cell trains in: its GPU's, or this machine's."""
    from orchestrator.resources import machine_memory_bytes

    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    return machine_memory_bytes(), "this machine"


def _plan_counts(plan) -> str:
    states = [plan.state(c) for c in plan.cells]
    return ", ".join(f"{s.lower()} {states.count(s)}" for s in ("FINISHED", "FAILED", "KILLED", "RUNNING", "PENDING") if states.count(s))


def _run_sweep(plan, cells, force: bool = False) -> int:
    from orchestrator.launch import run_plan

    if not cells:
        console.print(f"sweep {plan.name}: nothing to run ({_plan_counts(plan)})")
        return 0
    console.print(f"sweep {plan.name}: {len(plan.cells)} cells ({_plan_counts(plan)}); submitting {len(cells)}")
    _print_references(plan, cells)
    shown = _print_browse(plan, before=True)
    started = time.monotonic()
    try:
        outcomes = run_plan(plan, cells, force=force)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: running cells were cancelled and marked KILLED; "
                      f"`memsweep resume {plan.name}` runs what did not finish")
        return 130
    failed = [o for o in outcomes if o.status != "FINISHED"]
    console.print(f"sweep {plan.name}: {len(outcomes) - len(failed)} finished, {len(failed)} failed "
                  f"in {time.monotonic() - started:.0f} s"
                  + (f"; `memsweep status {plan.name}` lists them, `memsweep resume {plan.name} --failed` "
                     "retries them" if failed else ""))
    if not shown:
        _print_browse(plan, before=False)
    return 1 if failed else 0


def _sweep_urls(plan) -> tuple[str | None, str]:
    """(the sweep's experiment page on a tracking server or None, where to browse it: that page, the
    server, or how to serve a local store)."""
    from orchestrator.links import browse_hint, experiment_url

    experiment = plan.cells[0].options.experiment if plan.cells else plan.name
    exp_id = plan.tracker.experiment_id(experiment, create=False)
    return experiment_url(plan.tracker.uri, exp_id), browse_hint(_shown_uri(plan.tracker.uri), exp_id)


def _shown_uri(uri: str) -> str:
    from orchestrator.tracking import redact

    return redact(uri)


def _print_browse(plan, before: bool) -> bool:
    """Where to follow the sweep in MLflow. Before a first launch on a server its experiment does not
    exist yet: the server's address is printed, and the experiment's page once the sweep ends. True
    when the experiment's page (or a local store's hint) was printed."""
    from orchestrator.links import is_server

    url, hint = _sweep_urls(plan)
    if before or url is not None:
        console.print(f"MLflow: {hint}", soft_wrap=True)
    return url is not None or not is_server(plan.tracker.uri)


def _submit(plan, command: list[str]) -> int:
    """Send `memsweep <command>` to the cluster as a Ray Job, after the plan was validated here."""
    import shlex

    from orchestrator.scheduler import job_env, submit_job

    cluster = plan.cluster
    if cluster.kind != "ray" or not cluster.dashboard_address:
        raise ConfigError("--submit sends the sweep's driver to a Ray cluster: add cluster=ray "
                          "(and cluster.dashboard_address=http://HOST:8265 or RAY_DASHBOARD_ADDRESS)")
    if plan.tracker.uri.startswith(("sqlite:", "file:")) or "://" not in plan.tracker.uri:
        console.print(f"[yellow]note:[/yellow] the job records into {plan.tracker.uri}, a path on the cluster's "
                      "head node; use tracking=server to follow it from here")
    entrypoint = shlex.join(["memsweep", *command])
    env = job_env(cluster.job_env)
    # `memsweep stop` (the Jobs API's stop) then interrupts the driver as Ctrl-C does, and leaves it time to
    # cancel its cells and mark them KILLED; Ray's default, SIGTERM, exits at once (ray.init's handler).
    stop_as_ctrl_c = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "45"}
    try:
        job_id = submit_job(cluster.dashboard_address, entrypoint, {**env, **stop_as_ctrl_c}, plan.name)
    except Exception as err:  # unreachable dashboard, refused token, ...: nothing was submitted
        raise ConfigError(f"could not submit to the Ray Jobs API at {cluster.dashboard_address}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    fixed = " ".join(shlex.quote(o) for o in plan.overrides if not o.startswith("sweep="))
    out.print(job_id)
    console.print(f"submitted sweep {plan.name} to {cluster.dashboard_address} as Ray Job {job_id}"
                  + (f" (environment: {', '.join(sorted(env))})" if env else ""))
    console.print(f"  follow it:  ray job logs -f {job_id} --address {cluster.dashboard_address}")
    console.print(f"  its cells:  memsweep status {plan.name} {fixed}".rstrip())
    console.print(f"  stop it:    memsweep stop {plan.name} {fixed}".rstrip()
                  + f"  (or: ray job stop {job_id} --address {cluster.dashboard_address}); "
                  f"later `memsweep resume {plan.name} ...` runs what did not finish")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.adaptive import plan_options
    from orchestrator.launch import make_plan

    plan = make_plan(args.overrides, read_only=args.dry_run)  # every cell validated before anything runs
    adaptive = plan_options(plan.cells)  # `sweep.adaptive`, checked too; None: a fixed sweep
    if args.submit and not args.dry_run:
        return _submit(plan, ["launch", *args.overrides, *(["--force"] if args.force else [])])
    todo = plan.cells if args.force else [c for c in plan.cells if plan.state(c) != "FINISHED"]
    _print_new_to_the_record(plan)
    if args.dry_run:
        return _dry_run(plan, todo, args)
    if adaptive:
        return _run_adaptive(plan, adaptive, todo, force=args.force)
    return _run_sweep(plan, todo, force=args.force)


def _run_adaptive(plan, options, first, force: bool = False) -> int:
    """An adaptive sweep's rounds (orchestrator/adaptive.py): `first`, then the cells each round adds,
    every batch run as `_run_sweep` runs a fixed sweep's cells."""
    from orchestrator.adaptive import drive

    return drive(plan, options, lambda cells: _run_sweep(plan, cells, force=force), first=first,
                 say=lambda line: console.print(line, highlight=False))


def _dry_run(plan, todo, args: argparse.Namespace) -> int:
    """Every cell with its cost, then the totals of the cells that would run (at the step cap and at the
    expected steps, an estimate) and how they would be packed; `--format json|csv` for programs (on
    stdout, nothing else there). Nothing is written: no store, no run, no file."""
    import csv

    from orchestrator.console import plan_table
    from orchestrator.cost import cell_rows, flops_text, measured_throughputs, plan_cost

    throughputs = measured_throughputs()
    rows = cell_rows(plan, throughputs)
    cost = plan_cost([c.spec for c in todo], throughputs)
    adaptive = _expected_rounds(plan)
    if args.format == "json":
        # Plain json, not rich's pretty printer: a 100,000-cell document takes it minutes and gigabytes.
        json.dump({"sweep": plan.name, "cells": rows, "to_run": len(todo), "totals": cost.as_dict(),
                   "packing": _packing(plan, todo), "adaptive": adaptive}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["cell_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "request": json.dumps(row["request"], sort_keys=True)} for row in rows)
        return 0
    out.print(plan_table(plan.name, rows))
    console.print(f"would run {len(todo)} of {len(plan.cells)} cells"
                  + ("" if args.force else " (finished cells are skipped; --force reruns them)"))
    _print_references(plan, todo)
    _print_packing(plan, todo)
    for line in cost.lines():
        console.print(line, highlight=False)
    if adaptive:
        precisions = sorted({c.spec.precision for c in plan.cells})
        alpha = ", ".join(f"{p} {adaptive['alpha'][p]:g}" for p in precisions)
        console.print(f"adaptive: these cells are round 1; were every cell to measure its prediction min(alpha x "
                      f"params, H(X)) (alpha: {alpha} bits/param), the rules would add {adaptive['added_cells']:,} "
                      f"cell(s) in {adaptive['expected_rounds'] - 1} more round(s) ({flops_text(adaptive['added_train_flops'])} "
                      f"at the cap): expected total {flops_text(adaptive['expected_total_train_flops'])} at the cap, "
                      f"{flops_text(adaptive['expected_total_expected_train_flops'])} at the expected steps; a shape "
                      f"that measures otherwise gets more rounds, up to sweep.adaptive.max_cells", highlight=False)
    return 0


def _expected_rounds(plan) -> dict | None:
    """An adaptive sweep's expected cost: the rounds its rules would add if every cell measured exactly
    its prediction under the sweep's prior alpha (orchestrator.adaptive.expected_rounds); None for a
    fixed sweep."""
    from orchestrator.adaptive import expected_rounds, plan_options
    from models.spec import SpecError
    from orchestrator.capacity_axis import prior_alpha
    from orchestrator.cost import plan_cost

    options = plan_options(plan.cells)
    if options is None or not plan.cells:
        return None
    try:
        alpha = prior_alpha((plan.cells[0].config.get("sweep") or {}).get("capacity_alpha"))
    except SpecError as err:
        raise ConfigError(str(err)) from None
    rounds = expected_rounds(plan.cells, options, alpha)
    added = plan_cost([c.spec for r in rounds[1:] for c in r], [])
    total = plan_cost([c.spec for r in rounds for c in r], [])
    return {"alpha": alpha, "expected_rounds": len(rounds), "cells_per_round": [len(r) for r in rounds],
            "added_cells": added.cells, "added_train_flops": added.flops,
            "expected_total_train_flops": total.flops, "expected_total_expected_train_flops": total.flops_expected}


def _print_new_to_the_record(plan) -> None:
    """A relaunch says what it adds to the sweep's recorded plan (a first launch says nothing)."""
    from orchestrator.plan import read_plan

    if plan.tracker is None:  # a dry run before the store exists: nothing is recorded, and nothing is created
        return
    recorded = read_plan(plan.tracker, plan.name)
    if recorded is None:
        return
    new = [c for c in plan.cells if c.cell_id not in recorded.rows]
    kept = len(set(recorded.rows) - {c.cell_id for c in plan.cells})
    console.print(f"sweep {plan.name}: {len(new)} of these {len(plan.cells)} cells are new to its recorded plan "
                  f"of {len(recorded.rows)} cells" + (f"; {kept} recorded cells outside this grid stay in it "
                                                      "(status and resume list them)" if kept else ""))


def _packing(plan, cells) -> dict | None:
    """How launch would group `cells` into packs, on CPUs and on GPUs (which it uses is known only once
    it sees the cluster), before it splits packs to fill idle workers: per device, the packs' sizes
    (largest first), the cells that train alone, and how many of those are too heavy to pack. None
    when packing is off."""
    import dataclasses

    from orchestrator.resources import plan_packs, too_heavy_to_pack

    if not plan.pack.enabled:
        return None
    options = dataclasses.replace(plan.pack, fill_workers=False)
    packing = {}
    for on_gpu, device in ((False, "cpu"), (True, "gpu")):
        groups = plan_packs([c.spec for c in cells], options, on_gpu=on_gpu)
        sizes = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
        packing[device] = {"packs": sizes, "alone": len(groups) - len(sizes),
                           "too_heavy": sum(1 for c in cells if too_heavy_to_pack(c.spec, plan.pack, on_gpu)),
                           "max_cell_gflops": getattr(plan.pack, f"{device}_max_cell_gflops")}
    return packing


def _print_packing(plan, cells) -> None:
    """`_packing` for people."""
    packing = _packing(plan, cells)
    if packing is None:
        console.print("packing: off (pack.enabled=false)")
        return
    for device, found in packing.items():
        sizes, heavy, limit = found["packs"], found["too_heavy"], found["max_cell_gflops"]
        packs = f"{sum(sizes)} cells in {len(sizes)} packs {tuple(sizes)}" if sizes else "no packs"
        console.print(f"packing on {device.upper()}s: {packs}, {found['alone']} cells alone"
                      + (f" ({heavy} above pack.{device}_max_cell_gflops={limit:g})" if heavy else ""))


def _print_references(plan, cells) -> None:
    """The reference models `cells` need: which will train first and which a sweep already trained."""
    from orchestrator.corpus import reference_cells
    from orchestrator.launch import pending_references

    needed = reference_cells(cells)
    pending = {c.cell_id for c in (pending_references(plan, cells) if plan.tracker else needed)}  # no store: none trained
    for ref in needed:
        state = "trains first" if ref.cell_id in pending else "FINISHED, reused"
        console.print(f"reference {ref.cell_id} ({ref.spec.data.num_sequences:,} sequences): {state}")


LISTED_BY_DEFAULT = ("FAILED", "KILLED", "RUNNING")  # the rows `status` shows without --cells or --state
MAX_DEFAULT_ROWS = 50


def _states(value: str | None) -> tuple[str, ...] | None:
    """`--state failed,killed` -> ("FAILED", "KILLED"); an unknown state is a one-line error."""
    from orchestrator.console import STATES

    if value is None:
        return None
    wanted = tuple(dict.fromkeys(v.strip().upper() for v in value.split(",") if v.strip()))
    unknown = [v for v in wanted if v not in STATES]
    if unknown or not wanted:
        raise ConfigError(f"--state {value}: choose from {', '.join(STATES)} (comma-separated)")
    return wanted


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.adaptive import recorded_rounds, round_lines
    from orchestrator.console import axis_table, status_document, status_table
    from orchestrator.launch import plan_drift, recorded_plan

    wanted = _states(args.state)
    plan = recorded_plan(args.sweep, args.overrides)
    chosen = [c for c in plan.cells if wanted is None or plan.state(c) in wanted]
    running = _running_progress(plan)
    drift = plan_drift(plan)
    url, hint = _sweep_urls(plan)
    rounds = recorded_rounds(plan.tracker, plan.name)  # an adaptive sweep's; small JSONs
    if args.json:
        from orchestrator.links import run_url

        urls = {"experiment": url, "browse": hint,
                "runs": {r.run_id: run_url(plan.tracker.uri, r.run_id) for r in plan.records.values()}}
        document = status_document(plan, chosen, running, _shown_uri(plan.tracker.uri), urls, drift)
        sys.stdout.write(json.dumps({**document, **({"adaptive_rounds": rounds} if rounds else {})}, indent=2) + "\n")
        return 0
    out.print(axis_table(plan))
    rows = chosen if wanted or args.cells else [c for c in plan.cells if plan.state(c) in LISTED_BY_DEFAULT]
    if rows:
        out.print(status_table(plan, rows[:MAX_DEFAULT_ROWS] if not (wanted or args.cells) else rows, running))
    if len(rows) > MAX_DEFAULT_ROWS and not (wanted or args.cells):
        console.print(f"{MAX_DEFAULT_ROWS} of {len(rows)} failed, killed or running cells listed; "
                      f"`--state failed` (or killed, running) lists them all")
    console.print(f"{len(plan.cells)} cells: {_plan_counts(plan)}"
                  + ("" if wanted or args.cells else " (`--cells` lists every cell, `--state S` those in S)"))
    _print_references(plan, plan.cells)
    for line in (line for document in rounds for line in round_lines(document)):
        console.print(escape(line), highlight=False, soft_wrap=True)
    for line in _fits_lines(plan):
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print(f"MLflow: {hint}", soft_wrap=True)
    if drift:
        console.print(f"[yellow]note:[/yellow] {escape(drift)}", soft_wrap=True)
    return 0


def _fits_lines(plan) -> list[str]:
    """Alpha as the last `memsweep aggregate` logged it on the sweep's launch run, both forms, each with
    its status; nothing before a sweep was aggregated."""
    from orchestrator.tracking import latest_launch_run

    launch = latest_launch_run(plan.tracker, plan.name)
    metrics = launch.metrics if launch is not None else {}
    lines = []
    for name in sorted(k[len("alpha_"):-len("_lower_bound")] for k in metrics
                       if k.startswith("alpha_") and k.endswith("_lower_bound") and "_extrapolated" not in k):
        measured = metrics.get(f"alpha_{name}")
        text = (f"alpha {name} (slope, bits/param, from the last aggregate): measured {measured:.3f}"
                f"{' (a lower bound)' if metrics[f'alpha_{name}_lower_bound'] else ''}")
        extrapolated = metrics.get(f"alpha_{name}_extrapolated")
        if extrapolated is not None:
            bound = "a lower bound; " if metrics.get(f"alpha_{name}_extrapolated_lower_bound") else ""
            text += f", extrapolated {extrapolated:.3f} ({bound}an extrapolation)"
        lines.append(text)
    return lines


def _running_progress(plan) -> dict[str, tuple[int, float]]:
    """cell id -> (latest step, mem_bits there) of each RUNNING cell, from its logged curve."""
    from orchestrator.tracking import read_metric_histories

    running = {plan.records[c.cell_id].run_id: c.cell_id for c in plan.cells if plan.state(c) == "RUNNING"}
    latest: dict[str, tuple[int, float]] = {}
    for run_id, _, step, value, _ in read_metric_histories(plan.tracker, list(running), ("mem_bits",)):
        if run_id not in latest or step >= latest[run_id][0]:
            latest[run_id] = (int(step), float(value))
    return {running[run_id]: point for run_id, point in latest.items()}


def cmd_show(args: argparse.Namespace) -> int:
    """A cell's resolved config as recorded in the sweep's plan (what Hydra's `--cfg job` prints), or,
    without a cell id, the sweep's cell ids one per line (to pipe back into `show`)."""
    from orchestrator.launch import recorded_plan
    from orchestrator.tracking import redact

    if args.cell_id is not None and "=" in args.cell_id:  # `show SWEEP tracking=server`: no id, an override
        args.overrides, args.cell_id = [args.cell_id, *args.overrides], None
    plan = recorded_plan(args.sweep, args.overrides)
    if args.cell_id is None:
        sys.stdout.write("".join(f"{c.cell_id}\n" for c in plan.cells))
        console.print(f"sweep {plan.name}: {len(plan.cells)} cells; `memsweep show {plan.name} CELL_ID` prints "
                      "one's resolved config")
        return 0
    cell = _find_cell(plan, args.cell_id)
    import yaml  # PyYAML comes with Hydra's OmegaConf

    record = plan.records.get(cell.cell_id)
    header = (f"# cell {cell.cell_id} of sweep {plan.name}: {plan.state(cell)}"
              + (f", run {record.run_id}" if record else "") + "\n"
              + f"# grid values: {' '.join(cell.overrides) or '-'}\n")
    sys.stdout.write(header + redact(yaml.safe_dump(cell.config, sort_keys=False, default_flow_style=False)))
    return 0


def _find_cell(plan, wanted: str):
    """The cell whose id is `wanted` or starts with it (when only one does)."""
    exact = [c for c in plan.cells if c.cell_id == wanted]
    found = exact or [c for c in plan.cells if c.cell_id.startswith(wanted)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"cell id {wanted!r}: {len(found)} cells of sweep {plan.name} start with it "
                          f"({found[0].cell_id}, {found[1].cell_id}, ...); give more of it")
    raise ConfigError(f"cell id {wanted!r}: sweep {plan.name} has no such cell ({len(plan.cells)} cells; "
                      f"`memsweep show {plan.name}` lists them)")


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.adaptive import plan_options
    from orchestrator.launch import recorded_plan, stale_cells

    plan = recorded_plan(args.sweep, args.overrides)
    if args.submit:
        return _submit(plan, ["resume", args.sweep, *args.overrides, *(["--failed"] if args.failed else [])])
    wanted = ("FAILED",) if args.failed else ("FAILED", "KILLED", "RUNNING", "PENDING")
    todo = [c for c in plan.cells if plan.state(c) in wanted]
    stale = stale_cells(todo)
    if stale:
        raise ConfigError(f"{len(stale)} recorded cells to resume (first {stale[0].cell_id}) hash to other ids "
                          "under this memsweep, whose cell ids changed: they cannot resume under their recorded "
                          f"ids; `memsweep launch sweep={plan.name} ...` runs them as new cells")
    adaptive = plan_options(plan.cells)
    if adaptive:  # its unfinished cells, then the rounds go on
        return _run_adaptive(plan, adaptive, todo)
    return _run_sweep(plan, todo)


def cmd_ui(args: argparse.Namespace) -> int:
    """A tracking server already serves MLflow's UI: print (and with --open, open) its address. A local
    store is served on `--host` without MLflow's job runner and with one worker (STACK.md: about 500 MB
    instead of 3 GB)."""
    import subprocess

    from orchestrator.compose import compose_config
    from orchestrator.links import is_server, server_url

    cfg = compose_config(args.overrides)
    uri = str(cfg.tracking.uri)
    if is_server(uri):
        url = server_url(uri)
        out.print(url, markup=False, highlight=False)
        console.print(f"the tracking server {url} serves MLflow's UI itself: open that address (nothing to start)")
        if args.open:
            import webbrowser

            webbrowser.open(url)
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port), "--workers", "1"]
    if cfg.tracking.artifact_root:
        command += ["--default-artifact-root", str(cfg.tracking.artifact_root)]
    console.print(f"serving {uri} at http://{args.host}:{args.port} (Ctrl-C stops)")
    if args.open:
        import webbrowser

        webbrowser.open(f"http://{args.host}:{args.port}")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner and its workers
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


LIVE_JOB = ("PENDING", "RUNNING")  # Ray Job states with a driver to stop


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a sweep's running driver when it runs as a Ray Job (by the id its launch run recorded, or
    the Jobs API's list of the sweep's jobs while one starts); a driver in a local process is named,
    with how to stop it there."""
    from orchestrator.compose import sweep_runtime
    from orchestrator.launch import TAG_RAY_JOB, cluster_options, latest_launch_overrides, tracker_for
    from orchestrator.tracking import latest_launch_run

    tracker = tracker_for(args.sweep, args.overrides)
    launched = latest_launch_overrides(tracker, args.sweep) + list(args.overrides)  # never launched: exit 2
    launch = latest_launch_run(tracker, args.sweep)
    dashboard = cluster_options(sweep_runtime(args.sweep, launched)[1]).dashboard_address
    job_id = launch.tags.get(TAG_RAY_JOB) if launch.status == "RUNNING" else None
    jobs = _sweep_jobs(dashboard, args.sweep, job_id)
    live = [job for job, status in jobs.items() if status in LIVE_JOB]
    if live:
        return _stop_jobs(tracker, args.sweep, launch, dashboard, live)
    if launch.status != "RUNNING":
        console.print(f"sweep {args.sweep}: nothing is running (its latest launch, run {launch.run_id}, ended "
                      f"{launch.status})")
        return 0
    if job_id:  # the job ended (killed) and left its launch run RUNNING
        if job_id not in jobs:
            raise ConfigError(f"sweep {args.sweep} runs as Ray Job {job_id}, which the Jobs API at {dashboard} does "
                              "not list: pass cluster.dashboard_address=http://HOST:8265 of its cluster")
        tracker.finish(launch.run_id, "KILLED")
        console.print(f"sweep {args.sweep}: Ray Job {job_id} already ended {jobs[job_id]}; its launch run "
                      f"{launch.run_id} is now marked KILLED; `memsweep resume {args.sweep}` runs what did not finish")
        return 0
    console.print(_local_driver_message(args.sweep, launch), soft_wrap=True)
    return 1


def _sweep_jobs(dashboard: str | None, sweep: str, job_id: str | None) -> dict[str, str]:
    """The sweep's Ray Jobs on `dashboard` (id -> status); none when there is no Jobs API there (a
    local sweep), unless a job id was recorded: then an unreachable API is a one-line error."""
    if not dashboard:
        return {}
    from orchestrator.scheduler import sweep_jobs

    try:
        return sweep_jobs(dashboard, sweep)
    except Exception as err:  # noqa: BLE001 - refused, unreachable or not a Ray dashboard
        if job_id:
            raise ConfigError(f"sweep {sweep} runs as Ray Job {job_id}, but the Jobs API at {dashboard} does not "
                              f"answer ({type(err).__name__}); pass cluster.dashboard_address=http://HOST:8265") from None
        return {}


def _stop_jobs(tracker, sweep: str, launch, dashboard: str, jobs: list[str]) -> int:
    """Stop each job, wait (at most 60 s) until the Jobs API calls it stopped, and mark the launch run
    KILLED if its driver was killed before it could do so itself."""
    from orchestrator.scheduler import job_status, stop_job

    for job in jobs:
        stop_job(dashboard, job)
        console.print(f"stopping Ray Job {job} (sweep {sweep}) at {dashboard}")
    deadline, pending = time.monotonic() + 60, set(jobs)
    while pending and time.monotonic() < deadline:
        pending = {job for job in pending if job_status(dashboard, job) in LIVE_JOB}
        if pending:
            time.sleep(0.5)
    if pending:
        console.print(f"[yellow]Ray Job {', '.join(sorted(pending))} still running 60 s after the stop request")
        return 1
    if launch.status == "RUNNING" and tracker.client.get_run(launch.run_id).info.status == "RUNNING":
        tracker.finish(launch.run_id, "KILLED")
    console.print(f"stopped; `memsweep resume {sweep}` runs the cells that did not finish")
    out.print("\n".join(jobs), markup=False, highlight=False)
    return 0


def _local_driver_message(sweep: str, launch) -> str:
    """Where a RUNNING launch's driver runs when it is not a Ray Job (from the tags it recorded)."""
    import socket

    from orchestrator.launch import TAG_DRIVER_HOST, TAG_DRIVER_PID

    host, pid = launch.tags.get(TAG_DRIVER_HOST), launch.tags.get(TAG_DRIVER_PID)
    where = f"in process {pid} on {host}" if host and pid else "in the `memsweep launch` process that started it"
    if host == socket.gethostname() and pid and not _alive(int(pid)):
        return (f"sweep {sweep}: its latest launch (run {launch.run_id}) ran {where}, which has ended without "
                f"closing the run; nothing to stop: `memsweep resume {sweep}` runs what did not finish")
    return (f"sweep {sweep} is not a Ray Job: its driver runs {where} (run {launch.run_id}); stop it there with "
            f"Ctrl-C (or `kill -INT {pid or 'PID'}` on {host or 'that machine'}); running cells are marked KILLED and "
            f"`memsweep resume {sweep}` later runs what did not finish")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _summary_interval(fit: dict, kind: str) -> str:
    if fit.get("ci_low") is None:
        return "no interval (one shape)"
    if kind == "range":
        return f"range [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}] (under 5 shapes: not a 95% CI)"
    return f"95% [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]"


def _number_or_dash(value, spec: str) -> str:
    """A fits.json number as `spec` formats it; '-' for null (a metric its cells did not log)."""
    return "-" if value is None else format(value, spec)


def _capacity_line(c: dict) -> str | None:
    """One capacity group's line in both forms, or None for a converged measured capacity without an
    extrapolated one (the report has it; nothing to flag here)."""
    extrapolated = c.get("capacity_extrapolated_bits")
    if not c["lower_bound"] and extrapolated is None:
        return None
    measured = f"measured {c['capacity_bits']:,.0f} bits ({c['bits_per_param']:.3f} bits/param"
    if c["lower_bound"]:
        sizes = ", ".join(f"{n:,}" for n in c["lower_bound_num_sequences"])
        measured += f"; a lower bound: {len(c['lower_bound_cells'])} unconverged plateau cell(s) at N = {sizes}"
    measured += ")"
    if extrapolated is None:
        reason = c.get("extrapolated_reason") or "not available"
        return f"capacity {c['label']}: {measured}, extrapolated: none ({reason})"
    interval = ""
    if c.get("capacity_extrapolated_ci_low") is not None:
        interval = f" [{c['capacity_extrapolated_ci_low']:,.0f}, {c['capacity_extrapolated_ci_high']:,.0f}]"
    reached = c.get("fraction_of_asymptote")
    reached = f"; plateau cells reached {reached:.2f} of their asymptotes" if reached is not None else ""
    bound = f"; {c['extrapolated_reason']}" if c.get("extrapolated_lower_bound") else ""
    return (f"capacity {c['label']}: {measured}, extrapolated {extrapolated:,.0f} bits{interval} "
            f"({c['bits_per_param_extrapolated']:.3f} bits/param; an extrapolation{reached}{bound})")


def _aggregate_summary(result) -> None:
    """The fits on the console: capacities in both forms where one is a lower bound or extrapolated
    (and why), both alpha statistics of each (precision, V, S, recipe) group, measured and
    extrapolated, beside the paper's (a range under 5 shapes), and each data kind's MIA law (or why it
    is not identifiable) beside the paper's forms, with its unconverged cells."""
    fits = result.fits
    counts = ", ".join(f"{s.lower()} {n}" for s, n in fits["cells"]["by_status"].items())
    console.print(f"sweep {fits['sweep']}: {fits['cells']['total']} cells ({counts or 'none'})")
    for c in fits["capacity"]:
        line = _capacity_line(c)
        if line is not None:
            console.print(f"  {escape(line)}")
    for key, fit in fits["alpha"].items():
        bound = f"; measured is a lower bound: {', '.join(fit['lower_bound_models'])}" if fit["lower_bound"] else ""
        console.print(f"  alpha {escape(key)} (bits/param, over {fit['n_models']} shape(s){escape(bound)}):")
        kind = fit.get("interval_kind", "ci")
        extrapolated = fit.get("extrapolated") or {}
        for statistic, name in (("slope", "slope through origin"), ("mean_ratio", "mean of capacity/params")):
            value = fit[statistic]
            paper = f"; paper {value['paper']:.3f}" if value["paper"] is not None else ""
            console.print(f"    measured {name} {value['alpha']:.3f}, {_summary_interval(value, kind)}{paper}")
            if extrapolated.get("available"):
                e = extrapolated[statistic]
                bound = (f"; a lower bound: {', '.join(extrapolated['lower_bound_models'])}"
                         if extrapolated.get("lower_bound") else "")
                console.print(f"    extrapolated {name} {e['alpha']:.3f}, "
                              f"{_summary_interval(e, extrapolated.get('interval_kind', kind))} (an extrapolation"
                              f"{escape(bound)})")
        if not extrapolated.get("available"):
            console.print(f"    extrapolated: none ({escape(extrapolated.get('reason') or 'not available')})")
    for g in (fits.get("mia_fade") or {}).get("groups") or []:
        if g["data_share"] is not None:
            auc_knee, auc_largest = (_number_or_dash(g[k], ".2f") for k in ("loss_auc_knee", "loss_auc_largest"))
            console.print(f"  MIA fade {escape(g['label'])}: loss AUC {auc_knee} at N = {g['knee_num_sequences']:,} "
                          f"-> {auc_largest} at N = {g['largest_num_sequences']:,} "
                          f"({_number_or_dash(g['exposures_largest'], ',.0f')} exposures); of the fall in bits per "
                          f"sequence {g['data_share']:.0%} is data outgrowing the model, {g['budget_share']:.0%} the "
                          f"training budget ({escape(g['capacity_used'])} capacity)")
    for kind, laws in fits["mia"].items():
        for attack, law in laws.items():
            text = (f"c1={law['c1']:.3g} c2={law['c2']:.3g} c3={law['c3']:.3g} (RMSE {law['rmse']:.3g})"
                    if law["identifiable"] else f"not identifiable: {law['reason']}")
            published = law.get("published")
            if published:
                text += (f"; paper's forms, RMSE as computed {published['corrected']['rmse']:.3g}, as printed "
                         f"{published['as_printed']['rmse']:.3g}" + (" (x converted to 64-token sequences)"
                                                                     if published["converted"] else ""))
            unconverged = law.get("unconverged_cells") or []
            if unconverged:
                text += f"; {len(unconverged)} of its {law['num_cells']} cells unconverged"
            console.print(f"  MIA law ({kind}, {attack}): {escape(text)}")
    for note in fits.get("notes", []):
        console.print(f"  [yellow]note:[/yellow] {escape(note)}")


def _check_from(args: argparse.Namespace) -> None:
    if args.from_path and args.overrides:
        raise ConfigError(f"--from reads a saved table; overrides ({' '.join(args.overrides)}) have no effect there")


def cmd_aggregate(args: argparse.Namespace) -> int:
    from orchestrator.aggregate import aggregate, aggregate_from

    _check_from(args)
    if args.from_path:
        result = aggregate_from(args.sweep, args.from_path, args.out)
    else:
        result = aggregate(args.sweep, args.overrides, args.out, curves=not args.no_curves, plan=not args.no_plan)
    _aggregate_summary(result)
    for path in (result.cells_path, result.curves_path, result.fits_path):
        if path is not None:
            out.print(str(path))
    if result.logged:
        console.print(f"fits logged to launch run {result.launch_run_id} (artifacts: aggregate/)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import report

    _check_from(args)
    result = report(args.sweep, args.overrides, args.out, from_path=args.from_path,
                    curves=not args.no_curves, plan=not args.no_plan)
    _aggregate_summary(result.aggregate)
    out.print(str(result.html_path))
    if result.logged:
        console.print(f"report logged to launch run {result.aggregate.launch_run_id} (artifacts: report/)")
    return 0


class _Version(argparse.Action):
    """`--version`: the package version and git commit, computed only when asked (it imports MLflow)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from orchestrator.tracking import code_version

        sys.stdout.write(f"memsweep {code_version()}\n")  # on stdout, as argparse's own version action
        parser.exit(0)


OVERRIDES_HELP = "Hydra overrides over conf/, e.g. tracking=server to read another store"
SWEEP_HELP = "the sweep's name (its experiment in the tracking store), e.g. smoke"


def build_parser() -> argparse.ArgumentParser:
    summary, commands = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="memsweep", description=summary, epilog=commands,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--version", action=_Version, help="print memsweep's version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_and_launch(sub)
    _add_sweep_commands(sub)
    _add_analysis(sub)
    ui = sub.add_parser("ui", help="serve a local tracking store's MLflow UI on 127.0.0.1, or print a server's URL")
    ui.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ui.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    ui.add_argument("--open", action="store_true", help="also open the address in a web browser")
    ui.set_defaults(func=cmd_ui)
    return parser


def _add_run_and_launch(sub) -> None:
    run = sub.add_parser("run", help="train, measure and record one cell in this process")
    run.add_argument("overrides", nargs="*", help="Hydra overrides with one value each, e.g. model=l1_d32 "
                                                  "data.num_sequences=400 (several values: use launch)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="run a sweep's grid on Ray (sweep=NAME)")
    launch.add_argument("overrides", nargs="*", help="sweep=NAME plus overrides; sweep syntax (a,b / range()) adds axes")
    launch.add_argument("--dry-run", action="store_true",
                        help="list the cells, their ids, predictions, requests and packs; run nothing")
    launch.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="with --dry-run: a table and totals for people (default), or every cell's "
                             "numbers as JSON (with the totals) or CSV on stdout")
    launch.add_argument("--force", action="store_true", help="rerun cells that already finished")
    launch.add_argument("--submit", action="store_true",
                        help="validate here, then run the sweep's driver on the cluster as a Ray Job (cluster=ray)")
    launch.set_defaults(func=cmd_launch)


def _add_sweep_commands(sub) -> None:
    status = sub.add_parser("status", help="a sweep's cells by state and by axis, with errors and running cells' progress")
    status.add_argument("sweep", help=SWEEP_HELP)
    status.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    status.add_argument("--state", metavar="STATE[,STATE]",
                        help="list only cells in these states (finished, failed, killed, running, pending)")
    status.add_argument("--cells", action="store_true",
                        help="list every cell (default: only failed, killed and running ones)")
    status.add_argument("--json", action="store_true",
                        help="print the status as JSON (schema memsweep.status/1, docs/cli.md) instead of tables")
    status.set_defaults(func=cmd_status)

    show = sub.add_parser("show", help="print a cell's resolved config (YAML) from the sweep's recorded plan")
    show.add_argument("sweep", help=SWEEP_HELP)
    show.add_argument("cell_id", nargs="?", help="the cell's id, or a unique start of it (default: list the ids)")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(func=cmd_show)

    resume = sub.add_parser("resume", help="run the cells of a sweep's recorded plan that have not finished")
    resume.add_argument("sweep", help=SWEEP_HELP)
    resume.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    resume.add_argument("--failed", action="store_true", help="only the cells that FAILED")
    resume.add_argument("--submit", action="store_true", help="run the resumed sweep's driver on the cluster as a Ray Job")
    resume.set_defaults(func=cmd_resume)

    stop = sub.add_parser("stop", help="stop a sweep submitted as a Ray Job (--submit); say where a local one runs")
    stop.add_argument("sweep", help=SWEEP_HELP)
    stop.add_argument("overrides", nargs="*", help="overrides, e.g. cluster.dashboard_address=http://HOST:8265")
    stop.set_defaults(func=cmd_stop)


def _add_analysis(sub) -> None:
    for name, what in (("aggregate", "pull every run of a sweep into Parquet tables and fit capacity, alpha, the MIA law"),
                       ("report", "draw a sweep's figures and write a self-contained HTML report")):
        command = sub.add_parser(name, help=what)
        command.add_argument("sweep", help=SWEEP_HELP)
        command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        command.add_argument("--out", metavar="DIR", help="output folder (default: <root_dir>/aggregate/SWEEP/)")
        command.add_argument("--from", dest="from_path", metavar="PATH",
                             help="read a saved cells.parquet (and curves.parquet beside it) instead of the store")
        command.add_argument("--no-curves", action="store_true", help="skip the step metrics (curves.parquet)")
        command.add_argument("--no-plan", action="store_true",
                             help="do not rebuild the latest launch's grid (no PENDING rows; faster for huge grids)")
        command.set_defaults(func=cmd_aggregate if name == "aggregate" else cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may sit among the overrides (`resume smoke --failed tracking=server`): argparse stops
    # filling a positional list at the first flag, so collect the words it left over.
    args, extra = parser.parse_known_args(argv)
    flags = [word for word in extra if word.startswith("-")]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `memsweep ... | head`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is silent
        return 0
    except ConfigError as err:  # bad input, or a request the cluster can never satisfy
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except Exception as err:  # noqa: BLE001 - Ray, tracking, storage: one line; the traceback in a file
        if args.verbose:
            raise
        console.print(f"[red]error:[/red] {escape(failure_line(err))}; the traceback is in {traceback_file(args)} "
                      "(-v prints it)", highlight=False, soft_wrap=True)
        return 1


def failure_line(err: BaseException) -> str:
    """`Type: first line of the message` of an unexpected failure (Ray's and MLflow's run to pages)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def traceback_file(args: argparse.Namespace) -> str:
    """Write the traceback being handled to a log file of its own; returns its path."""
    import tempfile
    import traceback

    folder = os.path.join(tempfile.gettempdir(), "memsweep-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{getattr(args, 'command', None) or 'memsweep'}-{time.strftime('%Y%m%d-%H%M%S')}"
                                f"-{os.getpid()}.log")
    with open(path, "w") as f:
        f.write(f"memsweep {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


if __name__ == "__main__":
    sys.exit(main())
