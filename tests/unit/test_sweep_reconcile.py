"""The sweep's decisions about its trials as tables: how a trial's entry ends, the PRUNED relabel, ASHA's STOP."""

from __future__ import annotations

import pytest

from orchestrator.sweep.reconcile import (
    AshaStep,
    RelabelAction,
    TrialEnd,
    decide_asha,
    decide_relabel,
    reconcile_trial_end,
)
from orchestrator.sweep.record import NOT_STARTED


@pytest.mark.parametrize(
    ("entry_state", "entry_error", "result_state", "result_error", "run_exists", "expected"),
    [
        # The sweep was stopped before the trial's run began: it stays NOT_STARTED, quietly, for a resume.
        (NOT_STARTED, None, NOT_STARTED, None, False, TrialEnd(NOT_STARTED, None, announce=False)),
        (NOT_STARTED, "old", NOT_STARTED, None, False, TrialEnd(NOT_STARTED, "old", announce=False)),
        # ...but a run that exists says how it ended (it began before the stop).
        ("PREEMPTED", None, NOT_STARTED, None, True, TrialEnd("PREEMPTED", None)),
        # A trial whose run never said it failed (it could not start, its driver died) is FAILED.
        (NOT_STARTED, None, "FAILED", "ValueError: bad lr", False, TrialEnd("FAILED", "ValueError: bad lr")),
        ("RUNNING", None, "FAILED", "driver died", True, TrialEnd("FAILED", "driver died")),
        # The run's own end state wins over Tune's word.
        ("SUCCEEDED", None, "SUCCEEDED", None, True, TrialEnd("SUCCEEDED", None)),
        ("PRUNED", None, "PRUNED", None, True, TrialEnd("PRUNED", None)),
        (
            "FAILED",
            "rank 1 died",
            "FAILED",
            "RunFailed: run x failed",
            True,
            TrialEnd("FAILED", "RunFailed: run x failed"),
        ),
        ("PREEMPTED", None, "FAILED", None, True, TrialEnd("PREEMPTED", None)),
        ("FAILED", "rank 1 died", "FAILED", None, True, TrialEnd("FAILED", "rank 1 died")),  # the error is kept
        ("RUNNING", None, "RUNNING", None, True, TrialEnd("RUNNING", None)),  # Tune gave up on it without a word
    ],
)
def test_how_a_trials_entry_ends(entry_state, entry_error, result_state, result_error, run_exists, expected):
    assert reconcile_trial_end(entry_state, entry_error, result_state, result_error, run_exists) == expected


@pytest.mark.parametrize(
    ("run_state", "pruned", "expected"),
    [
        ("PREEMPTED", None, RelabelAction.ASK_EVENTS),  # only a PREEMPTED run's events are read
        ("PREEMPTED", True, RelabelAction.RELABEL_PRUNED),  # ASHA asked it to stop since the trial began
        ("PREEMPTED", False, RelabelAction.KEEP),  # `kiln stop`, SIGTERM or an older pruning
        ("SUCCEEDED", None, RelabelAction.KEEP),
        ("FAILED", None, RelabelAction.KEEP),
        ("STOPPED", True, RelabelAction.KEEP),  # stopped without a checkpoint: not a clean prune
    ],
)
def test_a_preempted_trial_that_asha_stopped_is_relabelled_pruned(run_state, pruned, expected):
    assert decide_relabel(run_state, pruned) == expected


@pytest.mark.parametrize(
    ("stop", "done", "asked_before", "expected"),
    [
        (False, False, False, AshaStep.PASS_ON),  # CONTINUE (or PAUSE) stands
        (False, False, True, AshaStep.PASS_ON),
        (True, False, False, AshaStep.PRUNE),  # STOP becomes a stop request, and Tune is told CONTINUE
        (True, False, True, AshaStep.CONTINUE),  # asked once: wait for the run to commit and stop
        (True, True, False, AshaStep.PASS_ON),  # the trial's last result: nothing to prune
        (True, True, True, AshaStep.PASS_ON),
    ],
)
def test_ashas_stop_becomes_a_stop_request_once_and_the_trial_continues_until_its_run_stops(
    stop, done, asked_before, expected
):
    assert decide_asha(stop, done, asked_before) == expected
