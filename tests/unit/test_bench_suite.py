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


def test_cpu_of_a_window_is_split_between_training_processes_and_the_rest():
    sampler = common.CpuSampler()
    worker, launcher = "python -u benchmarks/bare_ddp.py spec out", "python -m torch.distributed.run x"
    raylet = "raylet"
    sampler.samples = [
        (9.0, {1: (worker, 0.0)}),
        (10.0, {1: (worker, 1.0), 2: (launcher, 5.0), 3: (raylet, 1.0)}),
        (12.0, {1: (worker, 2.8), 2: (launcher, 5.2), 3: (raylet, 1.1), 4: ("born later", 1.0)}),
        (14.0, {1: (worker, 10.0)}),
    ]
    from benchmarks.throughput import is_worker

    busy = sampler.cores(10.0, 13.0, lambda cmdline: is_worker("bare", cmdline))
    assert busy == pytest.approx({"workers": 0.9, "others": 0.15})
    assert is_worker("kiln", "ray::RayTrainWorker")
    assert not is_worker("kiln_torchrun", f"{launcher} -m orchestrator.torchrun")
    with pytest.raises(ValueError, match="fewer than 2 CPU samples"):
        sampler.cores(12.5, 13.0, lambda cmdline: True)
