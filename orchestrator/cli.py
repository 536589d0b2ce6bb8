"""The `memsweep` command.

    memsweep run [OVERRIDES...]                       one cell in this process (e.g. model=l1_d32 seed=3)
    memsweep launch sweep=NAME [OVERRIDES...] [--dry-run] [--force] [--submit]
    memsweep status SWEEP [OVERRIDES...]              cells by state, with each failure's error
    memsweep resume SWEEP [--failed] [--submit] [OVERRIDES...]   run the cells that have not finished
    memsweep ui [OVERRIDES...] [--port N]             serve the tracking store on 127.0.0.1

OVERRIDES use Hydra's grammar over conf/ (`train.lr=1e-3`, `precision=bf16`, `seed=0,1,2` in a sweep).
Bad input stops before any work with a one-line error naming the field; the exit status is 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rich.markup import escape

from orchestrator.compose import ConfigError
from orchestrator.console import console, out


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.compose import compose_cell, prepared

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
    console.print(f"browse: mlflow ui --backend-store-uri {cell.options.tracking_uri}  (or: memsweep ui)")
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
    return 1 if failed else 0


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
    try:
        job_id = submit_job(cluster.dashboard_address, entrypoint, env, plan.name)
    except Exception as err:  # unreachable dashboard, refused token, ...: nothing was submitted
        raise ConfigError(f"could not submit to the Ray Jobs API at {cluster.dashboard_address}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    fixed = " ".join(shlex.quote(o) for o in plan.overrides if not o.startswith("sweep="))
    out.print(job_id)
    console.print(f"submitted sweep {plan.name} to {cluster.dashboard_address} as Ray Job {job_id}"
                  + (f" (environment: {', '.join(sorted(env))})" if env else ""))
    console.print(f"  follow it:  ray job logs -f {job_id} --address {cluster.dashboard_address}")
    console.print(f"  its cells:  memsweep status {plan.name} {fixed}".rstrip())
    console.print(f"  stop it:    ray job stop {job_id} --address {cluster.dashboard_address}; "
                  f"later `memsweep resume {plan.name} ...` runs what did not finish")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launch import make_plan

    plan = make_plan(args.overrides)  # every cell composed and validated before anything runs
    if args.submit and not args.dry_run:
        return _submit(plan, ["launch", *args.overrides, *(["--force"] if args.force else [])])
    todo = plan.cells if args.force else [c for c in plan.cells if plan.state(c) != "FINISHED"]
    _print_new_to_the_record(plan)
    if args.dry_run:
        from measure.memorization import PAPER_ALPHA_BITS_PER_PARAM, predicted_mem_bits
        from orchestrator.console import plan_table
        from orchestrator.resources import request_for

        on_gpu = plan.cluster.use_gpus and bool(plan.cluster.num_gpus)
        requests = {c.cell_id: request_for(c.spec, plan.cluster, on_gpu, c.options.eval_batch_size) for c in plan.cells}
        predictions = {c.cell_id: predicted_mem_bits(PAPER_ALPHA_BITS_PER_PARAM[c.spec.precision], c.spec.params,
                                                     c.spec.data.entropy_bits)
                       for c in plan.cells if not c.spec.is_text}  # a text corpus's H(X) is unknown
        out.print(plan_table(plan, requests, predictions))
        console.print(f"would run {len(todo)} of {len(plan.cells)} cells"
                      + ("" if args.force else " (finished cells are skipped; --force reruns them)"))
        _print_references(plan, todo)
        _print_packing(plan, todo)
        return 0
    return _run_sweep(plan, todo, force=args.force)


def _print_new_to_the_record(plan) -> None:
    """A relaunch says what it adds to the sweep's recorded plan (a first launch says nothing)."""
    from orchestrator.plan import read_plan

    recorded = read_plan(plan.tracker, plan.name)
    if recorded is None:
        return
    new = [c for c in plan.cells if c.cell_id not in recorded.rows]
    kept = len(set(recorded.rows) - {c.cell_id for c in plan.cells})
    console.print(f"sweep {plan.name}: {len(new)} of these {len(plan.cells)} cells are new to its recorded plan "
                  f"of {len(recorded.rows)} cells" + (f"; {kept} recorded cells outside this grid stay in it "
                                                      "(status and resume list them)" if kept else ""))


def _print_packing(plan, cells) -> None:
    """How launch would group `cells` into packs, on CPUs and on GPUs (which it uses is known only once
    it sees the cluster), before it splits packs to fill idle workers."""
    import dataclasses

    from orchestrator.resources import plan_packs, too_heavy_to_pack

    if not plan.pack.enabled:
        console.print("packing: off (pack.enabled=false)")
        return
    options = dataclasses.replace(plan.pack, fill_workers=False)
    for on_gpu, device in ((False, "cpu"), (True, "gpu")):
        limit = getattr(plan.pack, f"{device}_max_cell_gflops")
        groups = plan_packs([c.spec for c in cells], options, on_gpu=on_gpu)
        sizes = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
        heavy = sum(1 for c in cells if too_heavy_to_pack(c.spec, plan.pack, on_gpu))
        packs = f"{sum(sizes)} cells in {len(sizes)} packs {tuple(sizes)}" if sizes else "no packs"
        console.print(f"packing on {device.upper()}s: {packs}, {len(groups) - len(sizes)} cells alone"
                      + (f" ({heavy} above pack.{device}_max_cell_gflops={limit:g})" if heavy else ""))


def _print_references(plan, cells) -> None:
    """The reference models `cells` need: which will train first and which a sweep already trained."""
    from orchestrator.corpus import reference_cells
    from orchestrator.launch import pending_references

    needed = reference_cells(cells)
    pending = {c.cell_id for c in pending_references(plan, cells)}
    for ref in needed:
        state = "trains first" if ref.cell_id in pending else "FINISHED, reused"
        console.print(f"reference {ref.cell_id} ({ref.spec.data.num_sequences:,} sequences): {state}")


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.console import status_table
    from orchestrator.launch import plan_drift, recorded_plan

    plan = recorded_plan(args.sweep, args.overrides)
    out.print(status_table(plan))
    console.print(f"{len(plan.cells)} cells: {_plan_counts(plan)}")
    _print_references(plan, plan.cells)
    drift = plan_drift(plan)
    if drift:
        console.print(f"[yellow]note:[/yellow] {escape(drift)}", soft_wrap=True)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
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
    return _run_sweep(plan, todo)


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from orchestrator.compose import compose_config

    cfg = compose_config(args.overrides)
    command = ["mlflow", "ui", "--backend-store-uri", str(cfg.tracking.uri), "--host", args.host,
               "--port", str(args.port)]
    if cfg.tracking.artifact_root:
        command += ["--default-artifact-root", str(cfg.tracking.artifact_root)]
    console.print(f"serving {cfg.tracking.uri} at http://{args.host}:{args.port} (Ctrl-C stops)")
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _aggregate_summary(result) -> None:
    """The fits on the console: lower-bound capacities and why, both alpha statistics beside the
    paper's, and each data kind's MIA law (or why it is not identifiable) beside the paper's forms."""
    fits = result.fits
    counts = ", ".join(f"{s.lower()} {n}" for s, n in fits["cells"]["by_status"].items())
    console.print(f"sweep {fits['sweep']}: {fits['cells']['total']} cells ({counts or 'none'})")
    for c in fits["capacity"]:
        if c["lower_bound"]:
            sizes = ", ".join(f"{n:,}" for n in c["lower_bound_num_sequences"])
            console.print(f"  capacity {escape(c['label'])}: {c['capacity_bits']:,.0f} bits "
                          f"({c['bits_per_param']:.3f} bits/param) is a lower bound: "
                          f"{len(c['lower_bound_cells'])} unconverged plateau cell(s) at N = {sizes}")
    for precision, fit in fits["alpha"].items():
        bound = f"; a lower bound: {', '.join(fit['lower_bound_models'])}" if fit["lower_bound"] else ""
        console.print(f"  alpha {precision} (bits/param, over {fit['n_models']} shape(s){escape(bound)}):")
        for statistic, name in (("slope", "slope through origin"), ("mean_ratio", "mean of capacity/params")):
            value = fit[statistic]
            interval = (f"95% [{value['ci_low']:.3f}, {value['ci_high']:.3f}]" if value["ci_low"] is not None
                        else "no interval (one shape)")
            paper = f"; paper {value['paper']:.3f}" if value["paper"] is not None else ""
            console.print(f"    {name} {value['alpha']:.3f}, {interval}{paper}")
    for kind, laws in fits["mia"].items():
        for attack, law in laws.items():
            text = (f"c1={law['c1']:.3g} c2={law['c2']:.3g} c3={law['c3']:.3g} (RMSE {law['rmse']:.3g})"
                    if law["identifiable"] else f"not identifiable: {law['reason']}")
            published = law.get("published")
            if published:
                text += (f"; paper's forms, RMSE as computed {published['corrected']['rmse']:.3g}, as printed "
                         f"{published['as_printed']['rmse']:.3g}" + (" (x converted to 64-token sequences)"
                                                                     if published["converted"] else ""))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, measure and record one cell in this process")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=l1_d32 data.num_sequences=400")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="run a sweep's grid on Ray (sweep=NAME)")
    launch.add_argument("overrides", nargs="*", help="sweep=NAME plus overrides; sweep syntax (a,b / range()) adds axes")
    launch.add_argument("--dry-run", action="store_true",
                        help="list the cells, their ids, predictions, requests and packs; run nothing")
    launch.add_argument("--force", action="store_true", help="rerun cells that already finished")
    launch.add_argument("--submit", action="store_true",
                        help="validate here, then run the sweep's driver on the cluster as a Ray Job (cluster=ray)")
    launch.set_defaults(func=cmd_launch)

    status = sub.add_parser("status", help="the cells of a sweep by state, with errors")
    status.add_argument("sweep")
    status.add_argument("overrides", nargs="*", help="e.g. tracking=server to read another store")
    status.set_defaults(func=cmd_status)

    resume = sub.add_parser("resume", help="run the cells of a sweep's latest launch that have not finished")
    resume.add_argument("sweep")
    resume.add_argument("overrides", nargs="*")
    resume.add_argument("--failed", action="store_true", help="only the cells that FAILED")
    resume.add_argument("--submit", action="store_true", help="run the resumed sweep's driver on the cluster as a Ray Job")
    resume.set_defaults(func=cmd_resume)

    for name, what in (("aggregate", "pull every run of a sweep into Parquet tables and fit capacity, alpha, the MIA law"),
                       ("report", "draw a sweep's figures and write a self-contained HTML report")):
        command = sub.add_parser(name, help=what)
        command.add_argument("sweep")
        command.add_argument("overrides", nargs="*", help="e.g. tracking=server to read another store")
        command.add_argument("--out", metavar="DIR", help="output folder (default: <root_dir>/aggregate/SWEEP/)")
        command.add_argument("--from", dest="from_path", metavar="PATH",
                             help="read a saved cells.parquet (and curves.parquet beside it) instead of the store")
        command.add_argument("--no-curves", action="store_true", help="skip the step metrics (curves.parquet)")
        command.add_argument("--no-plan", action="store_true",
                             help="do not rebuild the latest launch's grid (no PENDING rows; faster for huge grids)")
        command.set_defaults(func=cmd_aggregate if name == "aggregate" else cmd_report)

    ui = sub.add_parser("ui", help="serve the tracking store's dashboard (MLflow) on 127.0.0.1")
    ui.add_argument("overrides", nargs="*")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


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
    except ConfigError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
