"""Imports point down (STYLE.md item 1), checked on the source: models/ never imports Ray, Hydra,
OmegaConf or MLflow, and models/spec.py not even torch; in orchestrator/ each third-party system has
one home module; and the driver plans a sweep without importing torch.

measure/ (no torch, Ray, Hydra, OmegaConf or MLflow: numeric libraries only) is checked by
tests/measure/test_measure_imports.py; this file checks that that test is still there."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"ray", "hydra", "omegaconf", "mlflow"}
# In orchestrator/, the only module allowed to import each system (STYLE.md: one home per system).
HOMES = {"hydra": "compose.py", "omegaconf": "compose.py", "mlflow": "tracking.py", "ray": "scheduler.py"}


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level names of the absolute imports in a file. With `module_level_only`, imports inside
    function and class bodies (deferred until called) are left out; those under module-level
    `if`/`try` still count, since they run at import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if module_level_only:
        deferred = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [n for top in tree.body if not isinstance(top, deferred) for n in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return files


def test_measure_is_covered_by_its_own_import_test():
    path = REPO / "tests" / "measure" / "test_measure_imports.py"
    assert path.exists(), "the AST test of measure/'s imports has gone: restore it or fold it here"
    spec = importlib.util.spec_from_file_location("measure_imports_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.ALLOWED & (ORCHESTRATION | {"torch"}), "its allow-list lets a heavy system in"
    assert any(name.startswith("test_") for name in vars(module))


@pytest.mark.parametrize("path", sources("models"), ids=lambda p: p.name)
def test_models_import_no_orchestration_system(path):
    assert not imports(path) & ORCHESTRATION, path.name


def test_models_spec_imports_no_torch():
    assert "torch" not in imports(REPO / "models" / "spec.py")


@pytest.mark.parametrize("path", sources("orchestrator"), ids=lambda p: p.name)
def test_each_system_is_imported_only_in_its_home_module(path):
    wrong = {name for name in imports(path) & set(HOMES) if HOMES[name] != path.name}
    assert not wrong, f"orchestrator/{path.name} imports {sorted(wrong)}: each has one home module"


@pytest.mark.parametrize("name", ["compose.py", "cli.py"])
def test_driver_modules_do_not_import_torch_at_module_level(name):
    assert "torch" not in imports(REPO / "orchestrator" / name, module_level_only=True)


def test_importing_the_driver_does_not_load_torch():
    """Transitively too (through models/spec.py): checked in a fresh interpreter."""
    code = "import orchestrator.compose, orchestrator.cli, sys; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
