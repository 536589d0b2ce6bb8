"""The `memsweep` command.

    memsweep run [OVERRIDES...]                       one cell in this process (e.g. model=l1_d32 seed=3)
    memsweep launch sweep=NAME [OVERRIDES...] [--dry-run] [--force]
    memsweep status SWEEP [OVERRIDES...]              cells by state, with each failure's error
    memsweep resume SWEEP [--failed] [OVERRIDES...]   run the cells that have not finished
    memsweep ui [OVERRIDES...] [--port N]             serve the tracking store on 127.0.0.1

OVERRIDES use Hydra's grammar over conf/ (`train.lr=1e-3`, `precision=bf16`, `seed=0,1,2` in a sweep).
Bad input stops before any work with a one-line error naming the field; the exit status is 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.compose import ConfigError
from orchestrator.console import console


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.compose import compose_cell

    cell = compose_cell(args.overrides)  # validates before anything is trained or recorded
    from orchestrator.cell import run_cell  # imports torch: only once the config is known good
    from orchestrator.console import cell_summary, training_progress
    from orchestrator.tracking import Tracker

    tracker = Tracker(cell.options.tracking_uri, cell.options.artifact_root)
    tracker.ensure_store()
    console.print(f"cell {cell.cell_id}: {cell.spec.params:,} params, H(X) = {cell.spec.data.entropy_bits:,.0f} bits")
    with training_progress(cell.spec, enabled=not args.quiet) as progress:
        outcome = run_cell(cell, progress=progress, tracker=tracker)
    if outcome.already_finished:
        console.print(f"cell {cell.cell_id} already FINISHED in run {outcome.run_id}; nothing to do")
        return 0
    if outcome.status != "FINISHED":
        console.print(f"[red]cell {cell.cell_id} {outcome.status}: {outcome.error}")
        return 1
    console.print(cell_summary(cell.spec, outcome.metrics, outcome.run_id, cell.cell_id))
    console.print(f"browse: mlflow ui --backend-store-uri {cell.options.tracking_uri}  (or: memsweep ui)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, measure and record one cell in this process")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=l1_d32 data.num_sequences=400")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
