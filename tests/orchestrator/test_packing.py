"""launch's packing plan: compatible cells share a pack, up to pack.max_cells and the memory budget;
incompatible cells never share one; packs are split to keep every worker slot busy."""

from orchestrator.compose import load_sweep
from orchestrator.resources import PackOptions, pack_request, plan_packs


def specs(*overrides):
    return [c.spec for c in load_sweep(["sweep=smoke", *overrides]).cells]


def test_compatible_cells_share_packs_up_to_max_cells():
    cells = specs("seed=0,1,2,3,4", "data.num_sequences=16,64")  # 10 compatible cells
    packs = plan_packs(cells, PackOptions(max_cells=4, fill_workers=False))
    assert [len(p) for p in packs] == [4, 4, 2]
    assert sorted(i for p in packs for i in p) == list(range(10))


def test_incompatible_cells_are_kept_apart():
    cells = specs("model=l1_d16,l2_d16", "precision=fp32,bf16", "seed=0,1")
    packs = plan_packs(cells, PackOptions(max_cells=8, fill_workers=False))
    assert len(packs) == 4
    for pack in packs:
        first = cells[pack[0]]
        assert all((cells[i].model, cells[i].precision) == (first.model, first.precision) for i in pack)


def test_memory_budget_and_disabled_and_fill_workers():
    cells = specs("seed=0,1,2,3", "data.num_sequences=16")
    assert plan_packs(cells, PackOptions(max_memory_gb=1e-6, fill_workers=False)) == [[0], [1], [2], [3]]
    assert plan_packs(cells, PackOptions(enabled=False)) == [[0], [1], [2], [3]]
    assert len(plan_packs(cells, PackOptions(), slots=1)) == 1
    assert sorted(map(len, plan_packs(cells, PackOptions(), slots=2))) == [2, 2]
    assert len(plan_packs(cells, PackOptions(), slots=64)) == 4  # as many packs as slots allow


def test_pack_request_sums_memory_and_gpu_fractions():
    cpu = pack_request([{"num_cpus": 1.0, "memory": 10}, {"num_cpus": 1.0, "memory": 20}])
    assert cpu == {"num_cpus": 1.0, "memory": 30}
    gpu = pack_request([{"num_cpus": 1.0, "memory": 5, "num_gpus": 0.25}] * 3)
    assert gpu["num_gpus"] == 0.75 and gpu["memory"] == 5


def test_pack_options_stay_out_of_cell_ids():
    base = load_sweep(["sweep=smoke", "seed=0", "data.num_sequences=16"]).cells[0]
    other = load_sweep(["sweep=smoke", "seed=0", "data.num_sequences=16", "pack.max_cells=2",
                        "pack.enabled=false"]).cells[0]
    assert base.cell_id == other.cell_id


def test_cells_too_heavy_to_gain_train_alone():
    """The laptop shapes pack on CPUs; a paper cell (l1_d32, V=2048, S=64, batch 2048: 63 GFLOP a step)
    packs nowhere, a batch-64 one (2 GFLOP) only on GPUs (bench/gpu.py measured 5x there, 0.6x on CPUs)."""
    tiny = specs("model=l1_d16,l2_d16", "seed=0,1")
    assert len(plan_packs(tiny, PackOptions(fill_workers=False))) == 2  # one pack per shape
    paper_data = ("model=l1_d32", "data.vocab_size=2048", "data.seq_len=64", "data.num_sequences=16", "seed=0,1,2")
    paper = specs(*paper_data, "train.batch_size=2048")
    assert paper[0].train_flops_per_step > 16e9
    for on_gpu in (False, True):
        assert plan_packs(paper, PackOptions(fill_workers=False), on_gpu=on_gpu) == [[0], [1], [2]]
    mid = specs(*paper_data, "train.batch_size=64")
    assert plan_packs(mid, PackOptions(fill_workers=False), on_gpu=False) == [[0], [1], [2]]
    assert plan_packs(mid, PackOptions(fill_workers=False), on_gpu=True) == [[0, 1, 2]]
    assert plan_packs(mid, PackOptions(fill_workers=False, cpu_max_cell_gflops=5), on_gpu=False) == [[0, 1, 2]]


def test_dry_run_shows_the_packs_per_device(memsweep_root, capsys):
    from orchestrator.cli import main

    assert main(["launch", "sweep=laptop", "--dry-run"]) == 0
    out = capsys.readouterr().err  # the table goes to stdout, what launch would do to stderr
    assert "packing on CPUs: 12 cells in 2 packs (6, 6), 0 cells alone" in out
    assert main(["launch", "sweep=laptop", "pack.cpu_max_cell_gflops=0.1", "--dry-run"]) == 0
    out = capsys.readouterr().err  # l2_d16 steps cost 0.125 GFLOP: those six train alone on CPUs
    assert "packing on CPUs: 6 cells in 1 packs (6,), 6 cells alone (6 above pack.cpu_max_cell_gflops=0.1)" in out
    assert "packing on GPUs: 12 cells in 2 packs (6, 6), 0 cells alone" in out


def test_bad_runtime_options_are_refused_before_any_write(memsweep_root, capsys):
    from orchestrator.cli import main

    for override in ("pack.cpu_max_cell_gflops=-1", "pack.max_cells=0", "cluster.max_retries=-1"):
        assert main(["launch", "sweep=laptop", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {override}") and "Traceback" not in err
    assert not memsweep_root.exists(), "nothing recorded"


def test_packs_are_split_to_even_out_the_workers_and_submitted_largest_first():
    """The laptop sweep on 2 workers: one pack per shape would leave a worker idle while the l2_d16
    pack (1.7x the work) runs; two packs per shape, largest first, load both workers evenly."""
    from orchestrator.resources import largest_first, makespan, train_flops

    cells = [c.spec for c in load_sweep(["sweep=laptop"]).cells]
    even = sum(map(train_flops, cells)) / 2
    one_per_shape = plan_packs(cells, PackOptions(fill_workers=False))
    assert makespan([sum(train_flops(cells[i]) for i in p) for p in one_per_shape], 2) > 1.2 * even
    packs = plan_packs(cells, PackOptions(), slots=2)
    assert sorted(map(len, packs)) == [3, 3, 3, 3]
    for pack in packs:
        assert len({cells[i].model for i in pack}) == 1
        sizes = [cells[i].data.num_sequences for i in pack]
        assert sizes in ([16, 256, 4096], [64, 1024, 16384]), "halves alternate along the grid"
    assert makespan([sum(train_flops(cells[i]) for i in p) for p in packs], 2) <= 1.1 * even

    class Item:  # what the scheduler orders: cells with an id and a spec
        def __init__(self, i, spec=None):
            self.cell_id, self.spec = f"c{i}", spec or cells[i]

    ordered = largest_first([[Item(i) for i in p] for p in packs])
    assert [p[0].spec.model.name for p in ordered] == ["l2_d16", "l2_d16", "l1_d16", "l1_d16"]
    class Naming:  # cell 3's spec naming cell 0 as its reference (real ones are text cells; the order is alike)
        def __init__(self, spec, reference):
            self.spec, self.reference = spec, reference

        def __getattr__(self, name):
            return getattr(self.spec, name)

    named = Naming(cells[3], Item(0))
    items = [[Item(i, named if i == 3 else None) for i in p] for p in packs]
    first = largest_first(items)
    assert first[0][0].cell_id == "c0", "a reference's pack goes first whatever its size"
