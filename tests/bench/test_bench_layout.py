"""The benchmark scripts share bench/common.py, never each other's entry module: importing
bench/__main__.py as a library is what made the import cycle (bench.__main__ -> bench.sweep_bench ->
bench.__main__). Each script opens with the command that runs it."""

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = {"__main__": "python -m bench", "gpu": "python -m bench.gpu", "sweep_bench": "python -m bench.sweep_bench",
           "laptop_sweep": "python -m bench.laptop_sweep", "aggregate_bench": "python -m bench.aggregate_bench",
           "convergence": "python -m bench.convergence", "capacity_probe": "python -m bench.capacity_probe",
           "scale": "python -m bench.scale"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_bench_module_imports_the_entry_module():
    modules = sorted(BENCH.glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        assert "bench.__main__" not in imported_modules(path), path.name


def test_every_script_gives_its_command():
    for name, command in SCRIPTS.items():
        docstring = ast.get_docstring(ast.parse((BENCH / f"{name}.py").read_text()))
        assert command in docstring, name
