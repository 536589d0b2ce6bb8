"""Issue 19's measurements on a lent GPU in one call of at most 9 minutes, prepared on the CPU.

    python3 -m bench.gpu_session OUTDIR                        # on a GPU machine
    python -m bench.gpu_session OUTDIR --device cpu --quick    # the same code on toy sizes (a check)

Two stages, each a process of its own under a timeout (one that hangs or runs long cannot take the other's
time; both write their results file after every section or run, so a stage cut short keeps what it
measured):

- gpu: `python -m bench.gpu` sections peaks, lone_cell, profile, paper_shapes, crossover and compiled,
  in that order: the step before issue 19 against today's, where a bf16 step's time goes, the packing
  crossover with today's step, and lone cells compiled (last: compiling takes the longest);
- capacity: `python -m bench.capacity_probe`, the paper's l1_d32 row in fp32 and bf16 on the branches
  schedule: per cell the measured mem_bits (its last annealed branch) and whether the annealed rule
  converged, and the asymptote its branches from asymptote_from extrapolate to (with its interval and
  the measured fraction of it), or why it is not extrapolable (then the measured value is a lower bound).

Everything lands in OUTDIR (each stage's log and JSON, and summary.txt); the summary, printed last, holds
the figures issue 19's targets are about, and the capacity stage's measured and extrapolated bits per
parameter. A stage that fails, hangs or writes nothing leaves the other's results and the summary (its
lines say how it ended; a results file the summary cannot read gets a line saying so). Imports the
standard library only; the stages import torch, numpy, PyYAML, scipy and this repository (what the GPU
image holds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (stage, its command after `python -m`, its budget on a GPU (--quick keeps the stage's own), seconds
# it may take): bench.gpu starts no section after 200 s and is stopped at 290; the probe gives each of its
# two runs 115 s (its step and evaluation timed first, then the horizons that fit) and is stopped at 245
# (2 x 115 s and the imports). Both stages together stay under 9 minutes (535 s), so that the session fits
# a 10-minute call with room to spare. At bench.gpu's ~7 ms a step for l1_d32 fp32 (before issue 19) a
# run reaches horizons to 8,000 steps, 3 branches from asymptote_from (2,000): the asymptote then reads
# "not extrapolable"; 4 (horizons to 16,000, 22,200 steps) need about 4.5 ms a step or less.
STAGES = (
    ("gpu", ["bench.gpu", "--only", "peaks", "lone_cell", "profile", "paper_shapes", "crossover", "compiled"],
     ["--budget-s", "200"], 290),
    ("capacity", ["bench.capacity_probe", "--runs", "paper_l1_d32_fp32", "paper_l1_d32_bf16"],
     ["--budget-s", "115"], 245),
)
SESSION_LIMIT_S = 540  # the whole call: 9 minutes


def run_stage(name: str, command: list[str], timeout_s: float, out: Path, extra: list[str]) -> dict:
    """Run one stage with its output in OUTDIR/<name>.log; how it ended and how long it took."""
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", *command, "--out", str(out), *extra], cwd=ROOT,
                                  check=False, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            ended = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            ended = f"stopped at its {timeout_s:.0f} s timeout"
    return {"stage": name, "ended": ended, "wall_s": time.perf_counter() - started}


def latest(out: Path, pattern: str) -> dict:
    """The newest results file matching `pattern` in OUTDIR, read ({} when there is none; {"unreadable":
    why} when it cannot be read)."""
    files = sorted(out.glob(pattern))
    if not files:
        return {}
    try:
        return json.loads(files[-1].read_text())
    except (OSError, ValueError) as error:
        return {"unreadable": f"{files[-1].name}: {error}"}


def capacity_line(run: dict, cell: dict) -> str:
    """One capacity cell: measured bits/param (its last branch) and whether the annealed rule converged,
    the extrapolated asymptote with its interval and the measured fraction of it (or why there is none,
    the measured value then a lower bound), the paper's value."""
    if cell["converged"]:
        verdict = f"converged at T={cell['converged_horizon']:,}"
    else:
        verdict = f"unconverged at the cap T={cell['last_horizon']:,}"
    if cell["asymptote_extrapolable"]:
        asymptote = (f"extrapolated {cell['bits_per_param_asymptote']:.3f} "
                     f"[{cell['bits_per_param_asymptote_ci_low']:.3f}, {cell['bits_per_param_asymptote_ci_high']:.3f}] "
                     f"bits/param from {cell['asymptote_branches']} branches, measured "
                     f"{cell['fraction_of_asymptote']:.1%} of it")
    else:
        plan = run.get("asymptote_plan") or {}
        needed = (f"; 4 branches from {plan['asymptote_from']:,} need {plan['needed_steps']:,} steps, "
                  f"~{plan['needed_s']:.0f} s" if "needed_steps" in plan else "")
        asymptote = (f"extrapolated: not extrapolable ({cell['asymptote_reason']}), measured is a lower bound"
                     f"{needed}")
    return (f"capacity {run['name']} N={cell['num_sequences']}: measured {cell['bits_per_param']:.3f} bits/param "
            f"(paper count {cell['bits_per_param_paper_count']:.3f}), {verdict}, "
            f"{len(cell['branches'])} branches, {cell['steps_trained']:,} steps; {asymptote}; "
            f"the paper: {run['paper_bits_per_param']}")


def summary_lines(gpu: dict, capacity: dict) -> list[str]:
    """The figures issue 19's targets are about and the capacity cells, one line each; a results file
    that cannot be summarised gets a line saying why instead (the other's lines stay)."""
    lines = []
    for name, results, summarise in (("gpu", gpu, gpu_lines), ("capacity", capacity, capacity_lines)):
        if not results:
            lines.append(f"{name} results: none written")
        elif "unreadable" in results:
            lines.append(f"{name} results unreadable: {results['unreadable']}")
        else:
            try:
                lines += summarise(results)
            except SUMMARY_ERRORS as error:
                lines.append(f"{name} results not summarised: {type(error).__name__}: {error}")
    return lines


SUMMARY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def capacity_lines(capacity: dict) -> list[str]:
    """A line per cell of every run the probe finished (one it could not format says so)."""
    lines = []
    for run in capacity.get("runs", []):
        for cell in run.get("cells", []):
            try:
                lines.append(capacity_line(run, cell))
            except SUMMARY_ERRORS as error:
                lines.append(f"capacity {run.get('name')}: not summarised ({type(error).__name__}: {error})")
    return lines


def gpu_lines(gpu: dict) -> list[str]:
    """bench.gpu's figures, one line each."""
    sections, lines = gpu.get("sections", {}), []
    lone = [(label, {**row, **sections.get("compiled", {}).get("cells", {}).get(label, {})})
            for label, row in sections.get("lone_cell", {}).get("cells", {}).items()]
    for label, row in lone:  # target: paper_l1_d32 at >= 2x the steps/s before issue 19
        lines.append(f"lone {label}: " + ", ".join(
            f"{n} {f['ms_per_step']:.2f} ms ({f.get('speedup', float('nan')):.2f}x)" if "ms_per_step" in f
            else f"{n} failed" for n, f in row.items()))
    for shape, row in sections.get("paper_shapes", {}).get("shapes", {}).items():
        bf16, fp32 = row["bf16"], row["fp32"]
        lines.append(f"{shape}: bf16 mfu {bf16['after']['mfu'] or 0:.3f} (before {bf16['before']['mfu'] or 0:.3f}), "
                     f"bf16/fp32 {row['bf16_over_fp32']:.2f}, after/before fp32 {fp32['after_over_before']:.2f} "
                     f"bf16 {bf16['after_over_before']:.2f}")
    for label, run in sections.get("profile", {}).get("runs", {}).items():
        lines.append(f"profile {label}: {run['ms_per_step']:.2f} ms/step, busy {run['busy_over_wall']:.0%}, "
                     f"waits {run['host_wait_ms_per_step']:.2f} ms; "
                     + ", ".join(f"{c} {v:.0%}" for c, v in list(run["share"].items())[:5]))
    for row in sections.get("crossover", {}).get("rows", []):
        lines.append(f"crossover {row['shape']} V={row['vocab_size']} batch {row['batch_size']}: "
                     f"{row['cell_gflops_per_step']:.2f} GFLOP/step, pack8/one-by-one {row['ratio']:.2f}")
    for name, section in sections.items():
        if "error" in section or "skipped" in section:
            lines.append(f"section {name}: {section.get('error') or section.get('skipped')}")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for every log and results file")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a check of the session, not a measurement")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--device", args.device] + (["--quick"] if args.quick else [])
    stages = []
    for name, command, budget, timeout_s in STAGES:
        try:
            stages.append(run_stage(name, command + ([] if args.quick else budget), timeout_s, out, extra))
        except OSError as error:  # the stage could not start (its log, the interpreter): the next one still runs
            stages.append({"stage": name, "ended": f"did not start ({error})", "wall_s": 0.0})
        print(f"{name}: {stages[-1]['ended']} after {stages[-1]['wall_s']:.0f} s", flush=True)
    lines = [f"{s['stage']}: {s['ended']}, {s['wall_s']:.0f} s" for s in stages]
    lines += summary_lines(latest(out, "gpu-*.json"), latest(out, "capacity_probe-*.json"))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
