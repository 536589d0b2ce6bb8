"""The documentation stands with the code: docs/science.md defines every number memsweep reports (its
metric tables are generated from measure/metrics.py's declarations and must equal them), the README
links it, and nothing a user reads points outside the repository."""

from pathlib import Path

from measure.metrics import CELL_METRICS, MARKERS, markdown_table, with_tables

REPO = Path(__file__).resolve().parents[1]
SCIENCE = REPO / "docs" / "science.md"


def test_the_science_page_holds_the_declared_metric_tables():
    text = SCIENCE.read_text()
    assert all(marker in text for marker in MARKERS), f"{SCIENCE} lost its markers {MARKERS}"
    assert with_tables(text) == text, ("docs/science.md's metric tables differ from measure/metrics.py: "
                                       "run `python -m measure.metrics --write docs/science.md`")
    for metric in CELL_METRICS:
        assert f"`{metric.name}`" in markdown_table()


def test_the_readme_links_the_definitions_and_nothing_points_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "docs/science.md" in readme
    for path in (REPO / "README.md", SCIENCE, REPO / "bench" / "README.md", REPO / "docker" / "README.md"):
        assert "../shared" not in path.read_text() and "SCIENCE.md" not in path.read_text(), path.name
