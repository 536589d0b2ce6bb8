"""Bad input stops before any work: a one-line error naming the field, exit status 2, and nothing
recorded (no tracking store is created under MEMSWEEP_ROOT)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.precision import PrecisionUnsupported, check_supported
from orchestrator import cli
from orchestrator.compose import ConfigError, compose_cell

# (overrides, what the message must contain: the field and its value)
BAD_INPUT = [
    (["model=l9_d9"], "model=l9_d9"),
    (["model.n_head=3"], "model.n_head=3"),
    (["data.num_sequences=0"], "data.num_sequences=0"),
    (["train.batch_size=-1"], "train.batch_size=-1"),
    (["precision=fp16"], "precision=fp16"),
]
MORE_BAD_INPUT = [
    (["model.n_layer=0"], "model.n_layer=0"),
    (["data.vocab_size=1"], "data.vocab_size=1"),
    (["data.num_nonmembers=2.5"], "data.num_nonmembers=2.5"),
    (["train.lr=abc"], "train.lr='abc'"),
    (["train.schedule=linear"], "train.schedule='linear'"),
    (["+train.momentum=0.9"], "train.momentum"),
    (["train.momentum=0.9"], "train.momentum"),
    (["seed=-1"], "seed=-1"),
    (["eval_batch_size=0"], "eval_batch_size=0"),
    (["data=text", "data.reference.seed=-1"], "data.reference.seed=-1"),
    (["data=text", "data.reference.num_sequences=1.5"], "data.reference.num_sequences=1.5"),
    (["data=text", "+data.reference.depth=3"], "data.reference.depth"),
]


def memsweep_script() -> str:
    """The installed console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "memsweep"
    found = str(beside) if beside.exists() else shutil.which("memsweep")
    assert found, "the memsweep console script is not installed (pip install -e .)"
    return found


@pytest.mark.parametrize("overrides, field", BAD_INPUT + MORE_BAD_INPUT)
def test_compose_cell_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        compose_cell(overrides)
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def assert_refused_before_work(result: subprocess.CompletedProcess, field: str, root: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and field in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (root / "mlflow.db").exists()
    assert not root.exists(), f"{sorted(p.name for p in root.iterdir())} written before the refusal"


@pytest.mark.parametrize("overrides, field", BAD_INPUT)
def test_cli_refuses_bad_input_in_one_line(overrides, field, memsweep_root, tmp_path):
    result = subprocess.run([memsweep_script(), "run", *overrides], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert_refused_before_work(result, field, memsweep_root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_refuses_a_missing_cuda_device_before_recording(memsweep_root, tmp_path):
    result = subprocess.run([memsweep_script(), "run", "precision=bf16", "device=cuda"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert_refused_before_work(result, "device='cuda'", memsweep_root)
    assert "no CUDA device" in result.stderr


def pretend_an_old_gpu(monkeypatch):
    """A GPU without bfloat16 (a V100). Simulated: this test machine has no GPU, and refusing bf16 is
    exactly the case that cannot run on one that has it. Only torch.cuda's answers are replaced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_bf16_is_refused_on_a_gpu_without_it(precision, monkeypatch):
    """Simulated old GPU (see pretend_an_old_gpu): the refusal names the precision and the device."""
    pretend_an_old_gpu(monkeypatch)
    with pytest.raises(PrecisionUnsupported, match=rf"precision='{precision}'.*V100"):
        check_supported(precision, torch.device("cuda"))
    check_supported("fp32", torch.device("cuda"))  # fp32 needs nothing
    check_supported(precision, torch.device("cpu"))  # slow on a CPU but legal


def test_bf16_is_accepted_on_a_gpu_with_it(monkeypatch):
    """Simulated: a GPU that reports bfloat16 support."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    check_supported("bf16", torch.device("cuda"))


def test_cli_refuses_bf16_on_a_gpu_without_it_before_recording(monkeypatch, memsweep_root, capsys):
    """`memsweep run precision=bf16 device=cuda` on a simulated old GPU (see pretend_an_old_gpu), in
    this process: exit status 2, one line naming the precision, no store."""
    pretend_an_old_gpu(monkeypatch)
    assert cli.main(["run", "precision=bf16", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "precision='bf16'" in err and "V100" in err, err
    assert not memsweep_root.exists()
