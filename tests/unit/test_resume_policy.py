"""Whether a run may be resumed, as a table of facts and the next step `prepare_resume` takes."""

from __future__ import annotations

import pytest

from orchestrator.run.resume_policy import ResumeAction, ResumeFacts, decide_resume
from trainers.run.state import RunState

ASK_DRIVER, ASK_CHECKPOINTS = ResumeAction.ASK_DRIVER, ResumeAction.ASK_CHECKPOINTS
ALIVE, FINISHED, RESUME = ResumeAction.REFUSE_DRIVER_ALIVE, ResumeAction.REFUSE_FINISHED, ResumeAction.RESUME


def facts(state, force=False, alive=None, asked=False, newest=None, max_steps=100) -> ResumeFacts:
    return ResumeFacts(RunState(state), force, max_steps, alive, asked, newest)


@pytest.mark.parametrize(
    ("known", "expected"),
    [
        (facts("RUNNING"), ASK_DRIVER),  # a RUNNING record: is its driver still there?
        (facts("RUNNING", alive=True), ALIVE),  # refused before any checkpoint is listed
        (facts("RUNNING", alive=False), ASK_CHECKPOINTS),
        (facts("RUNNING", alive=False, asked=True, newest=40), RESUME),
        (facts("RUNNING", alive=False, asked=True, newest=100), RESUME),  # RUNNING is resumable even at the end
        (facts("RUNNING", force=True), ASK_CHECKPOINTS),  # --force: the driver is not asked
        (facts("RUNNING", force=True, asked=True), RESUME),
        (facts("FAILED"), ASK_CHECKPOINTS),  # only a RUNNING run's driver is asked
        (facts("FAILED", asked=True, newest=None), RESUME),  # no checkpoint: it starts over
        (facts("PREEMPTED", asked=True, newest=60), RESUME),
        (facts("STOPPED", asked=True, newest=100), RESUME),
        (facts("PRUNED", asked=True, newest=50), RESUME),
        (facts("SUCCEEDED", asked=True, newest=100), FINISHED),  # raise train.max_steps to go on
        (facts("SUCCEEDED", asked=True, newest=100, max_steps=200), RESUME),  # ...as here
        (facts("SUCCEEDED", asked=True, newest=None), RESUME),  # its checkpoints were cleaned up
        (facts("SUCCEEDED", asked=True, newest=80), RESUME),  # the record says more than storage holds
        (facts("PENDING", asked=True, newest=None), RESUME),  # a submitted run that never launched
        (facts("PENDING", asked=True, newest=100), FINISHED),
    ],
)
def test_what_prepare_resume_does_next(known, expected):
    assert decide_resume(known) == expected


def test_the_decision_walks_from_the_driver_to_the_checkpoints_to_an_answer():
    """As prepare_resume drives it: each ask answered, until a verdict."""
    known, steps = facts("RUNNING"), []
    while (action := decide_resume(known)) not in (RESUME, ALIVE, FINISHED):
        steps.append(action)
        if action == ASK_DRIVER:
            known = ResumeFacts(known.state, known.force, known.max_steps, driver_alive=False)
        else:
            known = ResumeFacts(known.state, known.force, known.max_steps, False, True, 30)
    assert steps == [ASK_DRIVER, ASK_CHECKPOINTS] and action == RESUME


def saved_run(root: str, run_id: str, state: str, **fields) -> None:
    """A registered run with a saved config (20 steps), as the driver leaves one."""
    from orchestrator.config import compose_config, finalize, to_yaml
    from orchestrator.run.registry import RunRecord, RunRegistry

    yaml = to_yaml(finalize(compose_config(["train.max_steps=20", f"run.id={run_id}", f"storage.root={root}"])))
    RunRegistry(root).create(RunRecord(run_id=run_id, state=state, max_steps=20, **fields), yaml)


def test_prepare_resume_refuses_a_run_whose_driver_runs_here_and_resumes_it_with_force(tmp_path):
    import os

    from orchestrator.config import UsageError
    from orchestrator.run.lifecycle import prepare_resume
    from orchestrator.run.liveness import DriverIdentity

    saved_run(str(tmp_path), "live", "RUNNING", driver=DriverIdentity.here("kiln train").liveness_json())
    with pytest.raises(UsageError, match=rf"run live is running: .*pid {os.getpid()} on this host.*--force"):
        prepare_resume(str(tmp_path), "live", [])
    assert prepare_resume(str(tmp_path), "live", [], force=True)[1].run_id == "live"


def test_prepare_resume_refuses_a_finished_run_unless_max_steps_is_raised(tmp_path):
    from data_pipeline import storage
    from orchestrator.config import UsageError
    from orchestrator.run.lifecycle import prepare_resume
    from orchestrator.run.registry import RunRegistry
    from trainers.checkpoint.store import MANIFEST

    root = str(tmp_path)
    saved_run(root, "done", "SUCCEEDED", step=20)
    storage.write_atomic(storage.join(RunRegistry(root).run_url("done"), "checkpoints", "step_000020", MANIFEST), "{}")
    with pytest.raises(UsageError, match=r"run done is SUCCEEDED at step 20/20; .*train.max_steps=N \(N > 20\)"):
        prepare_resume(root, "done", [])
    assert prepare_resume(root, "done", ["train.max_steps=30"])[2].train.max_steps == 30
