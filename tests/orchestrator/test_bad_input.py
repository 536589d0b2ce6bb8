"""Every malformed input is refused before any work, by `run` and by `launch` alike: exit status 2, one
line naming the field, and nothing created under MEMSWEEP_ROOT (no store, no run, no checkpoint).

The commands run in this process (`orchestrator.cli.main`), which is what the console script calls;
tests/orchestrator/test_compose_errors.py runs a few through the installed script as a user does.
"""

import pytest

from orchestrator.cli import main
from tests.orchestrator.test_compose_errors import BAD_INPUT, MORE_BAD_INPUT

# (overrides, what the one-line message must contain: the field, and its value where it has one): the
# inputs compose_cell refuses (test_compose_errors.py), then those refused only since issue 16.
MALFORMED = BAD_INPUT + MORE_BAD_INPUT + [
    (["+model.dropout=0.1"], "model.dropout"),
    (["data.num_sequences=2.5"], "data.num_sequences=2.5"),
    (["data.num_sequences=1e99"], "data.num_sequences="),  # fits no machine: refused, not a MemoryError mid-run
    (["data.num_sequences=1000000000"], "data.num_sequences=1,000,000,000"),  # 256 GB of tokens
    (["data.num_sequences=${oc.env:MEMSWEEP_TEST_UNSET}"], "data.num_sequences"),  # an interpolation that fails
    (["data.num_nonmembers=-4"], "data.num_nonmembers=-4"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio=2"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1"),
    (["train.beta2=1.5"], "train.beta2=1.5"),
    (["train.grad_clip=-1"], "train.grad_clip=-1"),
    (["storage=ftp://x/y"], "storage='ftp://x/y'"),  # no filesystem opens it
    (["storage=${oc.env:MEMSWEEP_TEST_UNSET}"], "storage"),
    (["data=text", "data.corpus_uri=ftp://host/corpus.txt"], "data.corpus_uri='ftp://host/corpus.txt'"),
    (["data=text", "data.tokenizer=wordpiece"], "data.tokenizer='wordpiece'"),
]
LAUNCH_ONLY = [  # sections only a sweep reads
    (["cluster.cpus_per_cell=0"], "cluster.cpus_per_cell=0"),
    (["cluster.max_retries=-1"], "cluster.max_retries=-1"),
    (["pack.max_memory_gb=0"], "pack.max_memory_gb=0"),
    (["cluster.use_gpus=maybe"], "cluster.use_gpus='maybe'"),
    (["cluster.scale_timeout_s=-1"], "cluster.scale_timeout_s=-1"),
    (["cluster.scale_first_wave=0"], "cluster.scale_first_wave=0"),
    (["cluster.max_in_flight=0"], "cluster.max_in_flight=0"),
]


def refused(argv: list[str], field: str, root, capsys) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], err
    assert "Traceback" not in err
    assert not root.exists(), f"{sorted(p.name for p in root.iterdir())} written before the refusal"


def test_there_are_at_least_25_malformed_inputs():
    assert len(MALFORMED) >= 25 and len({tuple(o) for o, _ in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("overrides, field", MALFORMED, ids=[" ".join(o) for o, _ in MALFORMED])
def test_run_refuses_before_any_work(overrides, field, memsweep_root, capsys, monkeypatch):
    monkeypatch.delenv("MEMSWEEP_TEST_UNSET", raising=False)
    refused(["run", "-q", *overrides], field, memsweep_root, capsys)


@pytest.mark.parametrize("overrides, field", MALFORMED + LAUNCH_ONLY,
                         ids=[" ".join(o) for o, _ in MALFORMED + LAUNCH_ONLY])
def test_launch_refuses_before_any_work(overrides, field, memsweep_root, capsys, monkeypatch):
    monkeypatch.delenv("MEMSWEEP_TEST_UNSET", raising=False)
    sweep = "sweep=text_small" if "data=text" in overrides else "sweep=smoke"
    refused(["launch", sweep, *[o for o in overrides if o != "data=text"]], field, memsweep_root, capsys)
