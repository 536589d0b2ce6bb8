"""What the benchmarks share: the tiny cell they time, the clock, the things measured (a bare PyTorch
loop, memsweep's `train()`, cells one after another or as one pack), the comparisons built from
them, and the machine description and results file every script writes.

Used by `python -m bench` (bench/__main__.py), `python -m bench.gpu`, `python -m bench.sweep_bench`,
`python -m bench.laptop_sweep`, `python -m bench.convergence` and `python -m bench.capacity_probe`; it
runs nothing itself. It imports torch, numpy, PyYAML and this repository's models/ and measure/ only
(what a bare GPU image holds): the shipped shapes and recipes are read from conf/ without Hydra.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from measure.memorization import summarize_synthetic
from models.data import BatchOrder, synthetic_members
from models.gpt import GPT
from models.packed import train_packed
from models.scoring import nll_bits
from models.spec import CellSpec, DataSpec, ModelSpec, TrainSpec
from models.train import train

CPU = torch.device("cpu")
NO_EVAL = 10**9  # an eval_interval no run reaches: the benchmarks time training alone
RESULTS = Path(__file__).resolve().parent / "results"  # where every script writes by default
CONF = Path(__file__).resolve().parent.parent / "conf"  # the shipped Hydra configs, read here as YAML
# Where the CPU recipe plateaus on the laptop shapes (issue 14: 2.4-2.8): the prior capacity that
# sizes their datasets past capacity in the convergence study and the capacity probe.
CPU_PLATEAU_BITS_PER_PARAM = 2.7


def tiny_cell(num_sequences: int, seed: int, steps: int, batch_size: int = 64) -> CellSpec:
    """The l1_d16 cell of conf/ (V=64, S=32, the cpu recipe) without evaluations."""
    return CellSpec(ModelSpec("l1_d16", 1, 2, 16), DataSpec(64, 32, num_sequences, 256),
                    TrainSpec(max_steps=steps, batch_size=batch_size, lr=1e-2, eval_interval=NO_EVAL,
                              checkpoint_interval=NO_EVAL), "fp32", seed)


def no_eval(model) -> dict:
    """The evaluation hook of a timed run: no scoring, a placeholder for the curve."""
    return {"mem_bits": 0.0}


def with_steps(spec: CellSpec, steps: int) -> CellSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, max_steps=steps))


# -- the clock --------------------------------------------------------------------------------------
def timed(fn, device: torch.device = CPU) -> float:
    """Seconds `fn` takes; on a GPU from an idle device until its last kernel has finished."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the things measured ---------------------------------------------------------------------------
def bare_loop(spec: CellSpec, members: np.ndarray, device: torch.device = CPU) -> None:
    """The baseline a user would write: model, AdamW, clip, the same batches; nothing else."""
    hp = spec.train
    torch.manual_seed(spec.seed)
    model = GPT.from_spec(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), foreach=True)
    order, data = BatchOrder(spec.data, spec.seed, hp.batch_size), torch.as_tensor(members, device=device)
    for step in range(hp.max_steps):
        targets = data[torch.as_tensor(order.indices(step), device=device)]  # (B, S) token ids
        loss = F.cross_entropy(model(model.inputs_for(targets)).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def memsweep_train(spec: CellSpec, members: np.ndarray, device: torch.device = CPU):
    return train(spec, members, device=device, evaluate=no_eval)


def sequential(specs, members, device: torch.device = CPU) -> list:
    """The cells trained one after another: a list of TrainResults."""
    return [train(spec, m, device=device, evaluate=no_eval) for spec, m in zip(specs, members)]


def packed(specs, members, device: torch.device = CPU, exact: bool | None = None) -> list:
    """The same cells trained as one pack: a list of TrainResults, in the order of `specs`."""
    return train_packed(specs, members, device=device, evaluates=[no_eval] * len(specs), exact=exact)


# -- comparisons: ratios of two things timed back to back -------------------------------------------
def ratio_stats(values: list[float]) -> dict:
    """How every figure is reported: median, min and max of its repeats, and the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def train_vs_bare(spec: CellSpec, repeats: int, device: torch.device = CPU) -> dict:
    """Throughput of train() over the bare loop's on `spec`, after a warm-up."""
    members = synthetic_members(spec.data, spec.seed)
    bare_loop(with_steps(spec, 3), members, device)
    ratios = []
    for _ in range(repeats):
        bare = timed(lambda: bare_loop(spec, members, device), device)
        ours = timed(lambda: memsweep_train(spec, members, device), device)
        ratios.append(bare / ours)  # throughput of ours over the bare loop's
    return {"target": ">= 0.95", "steps": spec.train.max_steps, **ratio_stats(ratios)}


def packed_vs_sequential(specs: list[CellSpec], repeats: int, device: torch.device = CPU,
                         exact: bool | None = None) -> dict:
    """Time of `specs` trained one after another over the same cells as one pack, after a warm-up;
    "results" holds the last repeat's TrainResults of both ways (to compare them)."""
    members = [synthetic_members(s.data, s.seed) for s in specs]
    packed(specs[:2], members[:2], device, exact)  # warm-up: kernels, allocator
    sequential(specs[:1], members[:1], device)
    ratios, seq_s, pack_s, last = [], [], [], {}
    for _ in range(repeats):
        seq = timed(lambda: last.update(sequential=sequential(specs, members, device)), device)
        pack = timed(lambda: last.update(packed=packed(specs, members, device, exact)), device)
        ratios.append(seq / pack)
        seq_s.append(seq)
        pack_s.append(pack)
    return {"steps": specs[0].train.max_steps, "sequential_s": seq_s, "packed_s": pack_s,
            "members": members, "results": last, **ratio_stats(ratios)}


def score_vs_train(spec: CellSpec, repeats: int, device: torch.device = CPU) -> dict:
    """Scoring tokens/s (nll_bits over the members) over training tokens/s, after a warm-up."""
    members = synthetic_members(spec.data, spec.seed)
    model = GPT.from_spec(spec).to(device)
    memsweep_train(with_steps(spec, 2), members, device)
    nll_bits(model, members[:1024], 1024)
    tokens_train = spec.train.max_steps * spec.train.batch_size * spec.data.seq_len
    tokens_score = len(members) * spec.data.seq_len
    ratios = []
    for _ in range(repeats):
        t_train = timed(lambda: memsweep_train(spec, members, device), device)
        t_score = timed(lambda: nll_bits(model, members, 1024), device)
        ratios.append((tokens_score / t_score) / (tokens_train / t_train))
    return {"steps": spec.train.max_steps, **ratio_stats(ratios)}


# -- the machine and the results file ---------------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on: CPU model and cores, torch's threads, versions, the GPU."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": gpu}


def write_results(results: dict, out: str | Path, prefix: str = "") -> Path:
    """`<out>/<prefix><UTC timestamp>.json`, announced on stdout."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path


def results_path(out: str | Path, prefix: str = "") -> Path:
    """`<out>/<prefix><UTC timestamp>.json` (the folder made), for a script that rewrites one results
    file after each stage (`save_results`) instead of writing once at the end (`write_results`)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{prefix}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"


def save_results(results: dict, path: Path) -> None:
    """Write `results` to `path` whole: a reader (or a run cut short) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


# -- the shipped shapes and recipes, without Hydra ---------------------------------------------------
def conf_values(group: str, name: str) -> dict:
    """The values of conf/<group>/<name>.yaml, with those of the files its `defaults` list names
    (of the same group, `_self_` last as written) underneath, as Hydra composes a flat group."""
    raw = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
    values = {}
    for entry in raw.pop("defaults", ["_self_"]):
        values.update(raw if entry == "_self_" else conf_values(group, entry))
    return values


def model_spec(name: str) -> ModelSpec:
    """A shipped shape (conf/model/<name>.yaml)."""
    return ModelSpec(**conf_values("model", name))


def train_recipe(name: str) -> TrainSpec:
    """A shipped recipe (conf/train/<name>.yaml): `cpu` or `paper`."""
    return TrainSpec(**conf_values("train", name))


def mem_bits_evaluator(data: DataSpec, members: np.ndarray, batch_size: int = 1024):
    """The evaluation hook that measures what training is for: the members' mem_bits (docs/science.md),
    summed over the training set."""
    return lambda model: {"mem_bits": summarize_synthetic(nll_bits(model, members, batch_size), data.seq_len,
                                                          data.vocab_size).mem_bits}


def past_capacity(params: int, data: DataSpec, bits_per_param: float, times: float) -> int:
    """N, the number of sequences of `data`'s kind holding `times` the capacity bits_per_param * params:
    times * bits_per_param * params / (S log2 V)."""
    return max(1, round(times * bits_per_param * params / data.sequence_bits))
