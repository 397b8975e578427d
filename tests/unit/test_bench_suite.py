"""`make bench`: every benchmark in the suite keeps the module contract; a rerun replaces only its own section."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import common, suite


@pytest.mark.parametrize("name", suite.SUITE)
def test_every_suite_benchmark_has_a_heading_a_measure_and_a_render(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.HEADING.startswith("## ")
    assert callable(module.measure) and callable(module.render)


def test_rewriting_a_section_leaves_the_others_as_they_were(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkept b\n")
    monkeypatch.setattr(common, "DOCS", docs)
    common.write_docs("## A", "new a\n\n| x |\n|---|")
    common.write_docs("## C", "appended c")
    assert docs.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n| x |\n|---|\n\n## B\n\nkept b\n\n## C\n\nappended c\n"


def test_the_machine_line_names_the_versions_a_row_was_measured_with():
    line = common.machine()
    for part in ("CPUs", "GiB", "Python 3.", "torch ", "Ray ", "transformers ", "DeepSpeed "):
        assert part in line
