"""What a cell costs and what it asks Ray for: pure arithmetic, no torch and no Ray.

The memory estimate sizes each task's request, so small cells share a GPU through fractional `num_gpus`
(1/k of a GPU, so exactly k of them pack onto one) and Ray's resource accounting, not throttling code,
sets concurrency. The estimate is deliberately generous (activations at fp32 with gradients, the
scoring batch's logits, a CUDA context per worker process).
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass

from models.spec import Cell, CellSpec, SpecError

GiB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # each worker process holds its own CUDA context
PROCESS_BYTES = 400 * 1024**2  # a worker with torch imported


@dataclass(frozen=True)
class ClusterOptions:
    """Where cells run (conf/cluster/)."""

    kind: str = "local"  # "local": an embedded Ray started for the sweep; "ray": join `address`
    address: str | None = None
    num_cpus: int | None = None  # for an embedded cluster; None: every core
    num_gpus: int | None = None
    cpus_per_cell: float = 1.0
    gpu_memory_gb: float = 80.0  # memory of one GPU, for the fractional requests
    max_cells_per_gpu: int = 16
    max_retries: int = 3  # retries of a cell whose worker or node died (not of a cell that raised)
    use_gpus: bool | str = "auto"  # true: cells request GPUs; false: CPUs; auto: GPUs if a live node has one
    dashboard_address: str | None = None  # the Ray Jobs API (http://HOST:8265) for `launch --submit`
    job_env: str = ""  # comma-separated names of variables `--submit` copies into the Job's environment
    scale_timeout_s: float = 600.0  # how long a launch waits for an autoscaling cluster to offer its first wave
    scale_first_wave: int = 16  # tasks whose resources the driver asks the autoscaler for before submitting
    max_in_flight: int | None = None  # tasks submitted at a time; None: 4x what the cluster runs at once, >= 16

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ray"):
            raise SpecError(f"cluster.kind={self.kind!r} must be 'local' or 'ray'")
        if self.kind == "ray" and not self.address:
            raise SpecError("cluster.address is required with cluster=ray (or set RAY_ADDRESS)")
        if self.use_gpus not in (True, False, "auto"):
            raise SpecError(f"cluster.use_gpus={self.use_gpus!r} must be true, false or auto")
        if not self.scale_timeout_s >= 0:
            raise SpecError(f"cluster.scale_timeout_s={self.scale_timeout_s} must be >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise SpecError(f"cluster.max_in_flight={self.max_in_flight} must be >= 1 (or null)")
        if self.scale_first_wave < 1:
            raise SpecError(f"cluster.scale_first_wave={self.scale_first_wave} must be >= 1")
        if not self.cpus_per_cell > 0:
            raise SpecError(f"cluster.cpus_per_cell={self.cpus_per_cell} must be positive")
        if not self.gpu_memory_gb > 0:
            raise SpecError(f"cluster.gpu_memory_gb={self.gpu_memory_gb} must be positive")
        if self.max_cells_per_gpu < 1:
            raise SpecError(f"cluster.max_cells_per_gpu={self.max_cells_per_gpu} must be >= 1")
        if self.max_retries < 0:
            raise SpecError(f"cluster.max_retries={self.max_retries} must be >= 0")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SpecError(f"cluster.{name}={value} must be >= 0")

    @property
    def declares_gpus(self) -> bool:
        """Whether cells would request GPUs on the GPUs this config declares (`num_gpus`), as the
        driver decides before it sees a cluster (launch's memory check, the dry run)."""
        return self.use_gpus is not False and bool(self.num_gpus)


def estimate_memory_bytes(spec: CellSpec, eval_batch_size: int = 1024) -> int:
    """Peak memory of training and scoring one cell on its device, excluding the process itself."""
    return int(sum(_memory_sizes(spec, eval_batch_size)))


def memory_terms(spec: CellSpec, eval_batch_size: int = 1024) -> dict[str, int]:
    """`estimate_memory_bytes`'s terms, each keyed by the setting that sizes it (for messages)."""
    m, d, t = spec.model, spec.data, spec.train
    names = (f"model={m.name} ({spec.params:,} params)", f"train.batch_size={t.batch_size:,}",
             f"eval_batch_size={eval_batch_size:,}", f"data.num_sequences={d.num_sequences:,}")
    return dict(zip(names, _memory_sizes(spec, eval_batch_size)))


def _memory_sizes(spec: CellSpec, eval_batch_size: int) -> tuple[int, int, int, int]:
    """The terms' bytes: the model's state, a training batch's activations, an evaluation batch's
    logits, the data."""
    m, d, t = spec.model, spec.data, spec.train
    per_param = 20 if spec.precision == "bf16" else 16  # weights, grads, two Adam moments (+ master)
    # Saved activations per token: ~16 d floats per layer plus attention scores, then the logits.
    per_token = m.n_layer * (16 * m.n_embd + 2 * m.n_head * d.seq_len) + 3 * d.vocab_size
    return (spec.params * per_param, t.batch_size * d.seq_len * per_token * 4,
            min(eval_batch_size, d.num_sequences) * d.seq_len * d.vocab_size * 4 * 2,
            (d.num_sequences + d.num_nonmembers) * d.seq_len * 8)


def train_flops(spec: CellSpec) -> float:
    """FLOPs of a full-length run: every step to the cap (for branches, the trunk to its last horizon
    and every branch; TrainSpec.steps_at_cap). An early stop spends less."""
    return spec.train_flops_per_step * spec.train.steps_at_cap


def gpu_fraction(spec: CellSpec, cluster: ClusterOptions, eval_batch_size: int = 1024) -> float:
    """1/k of a GPU, with k the number of such cells that fit in one GPU's memory (capped)."""
    need = estimate_memory_bytes(spec, eval_batch_size) + CUDA_CONTEXT_BYTES
    fit = int(cluster.gpu_memory_gb * GiB // need)
    k = max(1, min(cluster.max_cells_per_gpu, fit))
    return round(1.0 / k, 4)


def request_for(spec: CellSpec, cluster: ClusterOptions, on_gpu: bool, eval_batch_size: int = 1024) -> dict:
    """The Ray resources of one cell's task."""
    request = {
        "num_cpus": cluster.cpus_per_cell,
        "memory": estimate_memory_bytes(spec, eval_batch_size) + PROCESS_BYTES,
    }
    if on_gpu:
        request["num_gpus"] = gpu_fraction(spec, cluster, eval_batch_size)
        request["memory"] = PROCESS_BYTES  # the cell's own memory is on the GPU
    return request


def machine_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_memory(spec: CellSpec, eval_batch_size: int, on_gpu: bool, have_bytes: float, where: str) -> None:
    """Refuse, naming the setting that weighs most, a cell whose memory estimate exceeds what its
    device has (`where` has `have_bytes`): before anything runs, not as a MemoryError mid-run."""
    terms = memory_terms(spec, eval_batch_size)
    need = sum(terms.values()) + (CUDA_CONTEXT_BYTES if on_gpu else PROCESS_BYTES)
    if need > have_bytes:
        raise SpecError(f"{max(terms, key=terms.get)}: the cell needs about {human_bytes(need)} of memory, "
                        f"more than {where}'s {human_bytes(have_bytes)}")


def human_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    if n >= 1024 ** len(units):
        return f"{float(n):.1e} B"
    exponent = min(len(units) - 1, int(math.log(max(n, 1), 1024)))
    return f"{n / 1024 ** exponent:.1f} {units[exponent]}"


@dataclass(frozen=True)
class PackOptions:
    """How `launch` groups compatible cells into packs trained as one model (conf/config.yaml `pack`)."""

    enabled: bool = True
    max_cells: int = 8  # cells per pack at most
    max_memory_gb: float = 16.0  # a pack's summed memory estimate at most
    fill_workers: bool = True  # split the largest packs until the workers' loads are even (plan_packs)
    # Packing pays only while a cell's step leaves the device idle (launch and Python overheads); a
    # heavier cell trains alone. Measured crossovers (bench/gpu.py `crossover`, bench notes in README):
    # on 2 CPU cores a pack of 8 is 1.1-1.2x faster at 0.07-0.13 GFLOP per cell step, even at 0.22 and
    # 0.6-0.8x at 0.5-1.4; on an H200 2.7-5x up to 28 GFLOP, about 1x from 33.
    cpu_max_cell_gflops: float = 0.2  # a cell's training GFLOP per step, at most, to pack on CPUs
    gpu_max_cell_gflops: float = 16.0  # ... to pack on GPUs

    def __post_init__(self) -> None:
        if self.max_cells < 1:
            raise SpecError(f"pack.max_cells={self.max_cells} must be >= 1")
        if not self.max_memory_gb > 0:
            raise SpecError(f"pack.max_memory_gb={self.max_memory_gb} must be positive")
        for name in ("cpu_max_cell_gflops", "gpu_max_cell_gflops"):
            if not getattr(self, name) >= 0:
                raise SpecError(f"pack.{name}={getattr(self, name)} must be >= 0")


def plan_packs(specs: list[CellSpec], options: PackOptions, slots: int = 1, eval_batch_size: int = 1024,
               on_gpu: bool = False) -> list[list[int]]:
    """Indices of `specs` grouped into packs: compatible cells (models.spec.pack_key) together, at most
    `max_cells` and `max_memory_gb` per pack; cells heavier than the device's `*_max_cell_gflops` train
    alone; with `fill_workers`, the packs with the most work are split until, handed out largest first
    to `slots` workers, they keep every worker busy to within 10% of an even share. Order is kept within
    and across packs (the scheduler submits them with `largest_first`). Pure: no torch, no Ray."""
    from models.spec import pack_key

    if not options.enabled:
        return [[i] for i in range(len(specs))]
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        key = None if too_heavy_to_pack(spec, options, on_gpu) else pack_key(spec)  # None: trains alone
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    packs = []
    budget = options.max_memory_gb * GiB
    for members in groups.values():
        current, used = [], 0
        for i in members:
            need = estimate_memory_bytes(specs[i], eval_batch_size)
            if current and (len(current) >= options.max_cells or used + need > budget):
                packs.append(current)
                current, used = [], 0
            current.append(i)
            used += need
        packs.append(current)
    if not options.fill_workers:
        return packs
    # A pack runs on one worker: split the pack with the most work while the packs, handed out largest
    # first, would still leave a worker idle for long (e.g. one pack per shape, one shape 1.6x the other).
    work = lambda pack: sum(train_flops(specs[i]) for i in pack)
    even = sum(train_flops(s) for s in specs) / max(1, slots)
    while makespan([work(p) for p in packs], slots) > BALANCE_SLACK * even:
        splittable = [j for j in range(len(packs)) if len(packs[j]) > 1]
        if not splittable:
            break
        largest = max(splittable, key=lambda j: work(packs[j]))
        pack = packs.pop(largest)
        # Alternate cells between the halves: neighbours in a grid differ least (the small datasets,
        # which converge first, would otherwise all land in one half).
        packs[largest:largest] = [pack[0::2], pack[1::2]]
    return packs


def too_heavy_to_pack(spec: CellSpec, options: PackOptions, on_gpu: bool) -> bool:
    """A cell whose training step costs more than the device's `*_max_cell_gflops` trains alone."""
    limit = options.gpu_max_cell_gflops if on_gpu else options.cpu_max_cell_gflops
    return spec.train_flops_per_step > limit * 1e9


BALANCE_SLACK = 1.1  # plan_packs splits packs until the workers' loads are within 10% of even


def makespan(works: list[float], slots: int) -> float:
    """When the last of `slots` workers finishes if each takes the largest job left as it frees up."""
    loads = [0.0] * max(1, slots)
    for w in sorted(works, reverse=True):
        heapq.heapreplace(loads, loads[0] + w)
    return max(loads)


def largest_first(packs: list[list[Cell]]) -> list[list[Cell]]:
    """Packs of cells in submission order: those holding a reference cell (one that others name) first,
    so their tasks exist when dependents are submitted, then by work (FLOPs of a full-length run),
    largest first, so that the last to start are the shortest."""
    references = {c.spec.reference.cell_id for p in packs for c in p if c.spec.reference is not None}
    return sorted(packs, key=lambda p: (not any(c.cell_id in references for c in p),
                                        -sum(train_flops(c.spec) for c in p)))


def pack_request(requests: list[dict]) -> dict:
    """One pack's Ray request: the cells' memory summed, one cell's CPUs, their GPU fractions summed."""
    request = {"num_cpus": requests[0]["num_cpus"], "memory": sum(r["memory"] for r in requests)}
    if "num_gpus" in requests[0]:
        request["num_gpus"] = min(1.0, round(sum(r["num_gpus"] for r in requests), 4))
        request["memory"] = requests[0]["memory"]
    return request
