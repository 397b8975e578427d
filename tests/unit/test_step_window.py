"""The ranks' windows, agreed without processes: what a sync step logs and acts on."""

from __future__ import annotations

import math

import torch

from trainers.step_window import FIELDS, StepWindow, summarize


def row(**values: float) -> list[float]:
    defaults = {"loss": 2.0, "grad_norm": 1.0, "bad_loss": 0.0, "seconds": 4.0, "data_wait": 0.4, "steps": 4}
    defaults.update({"stop": 0.0, "peak_mem_mb": 100.0})
    defaults.update(values)
    return [float(defaults[name]) for name in FIELDS]


def test_two_ranks_are_averaged_and_the_largest_memory_kept():
    summary = summarize([row(loss=2.0, seconds=4.0), row(loss=3.0, seconds=6.0, peak_mem_mb=300.0)])
    assert summary.loss == 2.5 and summary.grad_norm == 1.0
    assert summary.step_time == 1.25  # 5 s per rank on average over 4 steps
    assert summary.data_wait_frac == 0.4 / 5.0
    assert summary.peak_mem_mb == 300.0 and not summary.stop and summary.bad is None


def test_one_rank_asking_to_stop_stops_all():
    assert summarize([row(), row(stop=1.0)]).stop


def test_a_non_finite_loss_names_the_first_rank_that_saw_it():
    assert summarize([row(), row(bad_loss=math.inf), row(bad_loss=math.nan)]).bad == (1, math.inf)


def test_a_nan_between_syncs_is_remembered_on_the_device_though_later_steps_are_finite():
    window = StepWindow(torch.device("cpu"))
    window.add(torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.0))
    window.add(torch.tensor(math.nan, dtype=torch.float64), 0.5)  # DeepSpeed hands a float back
    window.add(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.7))
    assert window.steps == 3 and float(window.loss) == 2.0 and math.isnan(float(window.bad_loss))
    window.open()
    assert window.steps == 0 and float(window.bad_loss) == 0.0
