"""How `kiln train` decides the state a run ends in: the workers' word first, then Ray Train's return."""

from __future__ import annotations

import pytest

from orchestrator.launch.ray_train import end_state
from trainers.run.state import RunState


@pytest.mark.parametrize(
    "workers_said, fit_failed, step, expected",
    [
        (RunState.SUCCEEDED, False, 300, RunState.SUCCEEDED),
        # Ray lost its control processes after the workers finished: their outcome stands.
        (RunState.SUCCEEDED, True, 300, RunState.SUCCEEDED),
        (RunState.PREEMPTED, True, 120, RunState.PREEMPTED),
        (None, True, 120, RunState.FAILED),
        (None, False, 300, RunState.SUCCEEDED),
        # fit() returned early without a word from the workers (a stop before any step).
        (None, False, 120, RunState.STOPPED),
    ],
)
def test_the_end_state_of_a_run(workers_said, fit_failed, step, expected):
    assert end_state(workers_said, fit_failed, step, max_steps=300) == expected
