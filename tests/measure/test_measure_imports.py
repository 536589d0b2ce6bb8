"""measure/ stays pure: it imports only numeric libraries (numpy, scipy, scikit-learn, pyarrow for the
per-sequence and cells tables, matplotlib for figures) and the standard library."""

import ast
import sys
from pathlib import Path

MEASURE_DIR = Path(__file__).resolve().parents[2] / "measure"
# matplotlib draws the report's figures (measure/figures.py, Agg backend, no display).
ALLOWED = {"numpy", "scipy", "sklearn", "matplotlib", "pyarrow", "measure"} | set(sys.stdlib_module_names)


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_measure_imports_only_numeric_libraries():
    files = sorted(MEASURE_DIR.glob("*.py"))
    assert files, f"no modules found under {MEASURE_DIR}"
    for path in files:
        assert imported_top_level_names(path) <= ALLOWED, path.name


def test_every_measure_module_has_a_docstring():
    for path in sorted(MEASURE_DIR.glob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), path.name
