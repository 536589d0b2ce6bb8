"""Imports point down (STYLE.md item 1), checked on the source: models/ never imports Ray, Hydra,
OmegaConf or MLflow, and models/spec.py not even torch; in orchestrator/ each third-party system has
one home module, analysis (aggregate, report) and execution (launch, scheduler, cell) stand side by
side without importing each other, and no chain of imports inside it is more than five modules deep
(the CLI, then analysis or execution, then tracking, compose, corpus and resources); the driver plans a
sweep, and aggregates and reports one, without importing torch. No function outside tests is longer
than 80 lines.

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
ANALYSIS, EXECUTION = {"aggregate", "report"}, {"launch", "scheduler", "cell"}
MAX_IMPORT_DEPTH = 5  # modules in the longest chain of imports inside orchestrator/
MAX_FUNCTION_LINES = 80


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


def orchestrator_imports() -> dict[str, set[str]]:
    """Each orchestrator module -> the orchestrator modules it imports, at module level or deferred."""
    graph = {}
    for path in sources("orchestrator"):
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[path.stem] = {node.module.split(".")[1] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                            and node.module.startswith("orchestrator.")}
    return graph


def test_analysis_does_not_import_execution():
    graph = orchestrator_imports()
    for module in ANALYSIS:
        assert not graph[module] & EXECUTION, f"orchestrator/{module}.py imports {sorted(graph[module] & EXECUTION)}"


def test_no_import_chain_inside_orchestrator_is_deeper_than_five():
    graph = orchestrator_imports()

    def chain(module: str, seen: tuple = ()) -> list[str]:
        assert module not in seen, f"import cycle: {' -> '.join((*seen, module))}"
        longest = max((chain(d, (*seen, module)) for d in graph[module]), key=len, default=[])
        return [module, *longest]

    deepest = max((chain(m) for m in graph), key=len)
    assert len(deepest) <= MAX_IMPORT_DEPTH, " -> ".join(deepest)


def test_aggregating_reporting_and_scheduling_load_no_torch():
    code = ("import orchestrator.aggregate, orchestrator.report, orchestrator.scheduler, sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("package", ["orchestrator", "models", "measure", "bench", "docker"])
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for path in sources(package):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
