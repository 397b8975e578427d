"""A submitted run's decisions as tables: what it is when its Ray job has ended, whether `kiln resume --address`
may go on, and what `kiln submit` does after each try (a fake clock: plain floats; fakes for Ray's Jobs API)."""

from __future__ import annotations

import pytest

from orchestrator.config import UsageError
from orchestrator.run.registry import RunRecord, RunRegistry, UnknownRun
from orchestrator.run.submitted import (
    AGENT_RETRY_S,
    AGENT_WAIT_S,
    STOP_NOW_WAIT_S,
    DriverJobCheck,
    JobVerdict,
    StopWait,
    SubmitAction,
    SubmitDecision,
    SubmitTry,
    decide_driver_job,
    decide_stop_wait,
    decide_submission,
    judge_submitted_run,
    log_tail,
)

NO_AGENT_REPLY = (
    "the Ray Jobs API at http://head:8265: Request failed with status code 500: "
    "No available agent to submit job, please try again later.."
)


@pytest.mark.parametrize(
    ("recorded", "job_ended", "heard", "expected"),
    [
        ("PENDING", True, False, JobVerdict.NEVER_STARTED),  # `/bin/sh: 1: kiln: not found`
        ("FAILED", True, False, JobVerdict.NEVER_STARTED),  # a resubmission whose job never ran Kiln either
        ("PREEMPTED", True, False, JobVerdict.NEVER_STARTED),
        ("RUNNING", True, True, JobVerdict.DRIVER_LOST),  # launched, then its driver was killed
        ("PENDING", True, True, JobVerdict.DRIVER_LOST),
        ("FAILED", True, True, JobVerdict.AS_RECORDED),  # the driver said how it ended (`kiln start` refused)
        ("SUCCEEDED", True, True, JobVerdict.AS_RECORDED),
        ("PREEMPTED", True, True, JobVerdict.AS_RECORDED),
        ("RUNNING", False, True, JobVerdict.AS_RECORDED),  # the job goes on (or Ray cannot be asked)
        ("PENDING", False, False, JobVerdict.AS_RECORDED),  # not started yet: it may still
    ],
)
def test_what_a_submitted_run_is_once_its_job_has_ended(recorded, job_ended, heard, expected):
    assert judge_submitted_run(recorded, job_ended, heard) == expected


def test_a_jobs_log_tail_is_its_last_non_empty_lines():
    log = "\n".join(f"line {i}" for i in range(30)) + "\n\n/bin/sh: 1: kiln: not found\n\n"
    assert log_tail(log, lines=3) == ["line 28", "line 29", "/bin/sh: 1: kiln: not found"]
    assert log_tail("") == []


@pytest.mark.parametrize(
    ("recorded", "submitted", "job_status", "expected"),
    [
        ("RUNNING", True, None, DriverJobCheck.ASK_JOB),
        ("RUNNING", True, "FAILED", DriverJobCheck.DRIVER_GONE),
        ("RUNNING", True, "STOPPED", DriverJobCheck.DRIVER_GONE),
        ("RUNNING", True, "SUCCEEDED", DriverJobCheck.DRIVER_GONE),
        ("RUNNING", True, "NOT_FOUND", DriverJobCheck.DRIVER_GONE),  # a replaced head forgot the job
        ("RUNNING", True, "UNREACHABLE", DriverJobCheck.UNREACHABLE),
        ("RUNNING", True, "RUNNING", DriverJobCheck.STILL_RUNNING),
        ("RUNNING", True, "PENDING", DriverJobCheck.STILL_RUNNING),
        ("RUNNING", False, None, DriverJobCheck.NOT_NEEDED),  # `kiln train`'s run: its pid or heartbeat decides
        ("PREEMPTED", True, None, DriverJobCheck.NOT_NEEDED),
        ("PENDING", True, None, DriverJobCheck.NOT_NEEDED),
    ],
)
def test_whether_a_submitted_runs_driver_job_has_ended(recorded, submitted, job_status, expected):
    assert decide_driver_job(recorded, submitted, job_status) == expected


RETRY = SubmitDecision(SubmitAction.RETRY, AGENT_RETRY_S)


@pytest.mark.parametrize(
    ("tried", "expected"),
    [
        (SubmitTry(None, 0.0, True), SubmitDecision(SubmitAction.ACCEPTED)),
        (SubmitTry(NO_AGENT_REPLY, 10.0, True), RETRY),  # a head that started seconds ago: wait for its agent
        (SubmitTry(NO_AGENT_REPLY, AGENT_WAIT_S - AGENT_RETRY_S, True), RETRY),  # the last wait that fits
        (SubmitTry(NO_AGENT_REPLY, AGENT_WAIT_S - 1.0, True), SubmitDecision(SubmitAction.ASK_JOB)),  # bound
        (SubmitTry(NO_AGENT_REPLY, 61.0, False), SubmitDecision(SubmitAction.ASK_JOB)),
        (SubmitTry("Request failed with status code 400: bad runtime_env", 0.1, True), SubmitDecision("ASK_JOB")),
        (SubmitTry("", 0.1, True), SubmitDecision(SubmitAction.ASK_JOB)),  # Ctrl-C: never retried
        (SubmitTry(NO_AGENT_REPLY, 70.0, True, "NOT_FOUND"), SubmitDecision(SubmitAction.FORGET_RUN)),
        (SubmitTry(NO_AGENT_REPLY, 70.0, False, "NOT_FOUND"), SubmitDecision(SubmitAction.RECORD_REFUSAL)),
        (SubmitTry("500: boom", 0.1, True, "UNREACHABLE"), SubmitDecision(SubmitAction.RECORD_REFUSAL)),
        (SubmitTry("500: boom", 0.1, True, "PENDING"), SubmitDecision(SubmitAction.ACCEPTED)),  # taken after all
        (SubmitTry("read timed out", 0.1, False, "RUNNING"), SubmitDecision(SubmitAction.ACCEPTED)),
    ],
)
def test_what_kiln_submit_does_after_each_try(tried, expected):
    assert decide_submission(tried) == expected


class FakeJobsAPI:
    """Ray's Jobs API as `kiln submit` sees it: refusals for the first `refusals` tries, and a fake clock."""

    def __init__(self, refusals: int, reply: str = NO_AGENT_REPLY, seconds_per_try: float = 10.0):
        self.refusals, self.reply, self.seconds_per_try = refusals, reply, seconds_per_try
        self.now, self.tries, self.jobs = 1000.0, 0, set()

    def submit_job(self, address, job_id, command, metadata, working_dir) -> str:
        self.tries += 1
        self.now += self.seconds_per_try  # Ray waits up to 10 s for an agent before it answers
        if self.tries <= self.refusals:
            raise UsageError(self.reply)
        self.jobs.add(job_id)
        return job_id

    def job_view(self, address, job_id):
        from orchestrator.cluster.jobs import JobView

        return JobView(job_id, address, "PENDING" if job_id in self.jobs else "NOT_FOUND")

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def jobs_api(monkeypatch):
    def make(refusals: int, **kwargs) -> FakeJobsAPI:
        api = FakeJobsAPI(refusals, **kwargs)
        monkeypatch.setattr("orchestrator.cli.cluster.submit_job", api.submit_job)
        monkeypatch.setattr("orchestrator.cli.cluster.job_view", api.job_view)
        return api

    return make


def submit_new(root: str, api: FakeJobsAPI, run_id: str = "r1", log=lambda message: None) -> RunRecord:
    from orchestrator.cli.cluster import submit

    registry = RunRegistry(root)
    record = registry.create(RunRecord(run_id=run_id, job_id=f"kiln-{run_id}"), "run: {}\n")
    submit(
        registry,
        record,
        "http://head:8265",
        "kiln start r1",
        None,
        new_run=True,
        clock=lambda: api.now,
        sleep=api.sleep,
        log=log,
    )
    return record


def test_kiln_submit_waits_for_a_starting_heads_job_agent(tmp_path, jobs_api):
    api, said = jobs_api(refusals=3), []
    submit_new(str(tmp_path), api, log=said.append)
    assert said == ["the Ray head at http://head:8265 has no job agent up yet; waiting up to 60s for it"]  # once
    assert api.tries == 4 and api.jobs == {"kiln-r1"}
    assert RunRegistry(str(tmp_path)).load("r1").state == "PENDING"


def test_a_submission_the_head_never_takes_frees_the_run_id_and_says_what_to_do(tmp_path, jobs_api):
    api = jobs_api(refusals=100)
    with pytest.raises(UsageError) as refused:
        submit_new(str(tmp_path), api)
    message = str(refused.value)
    assert "\n" not in message and "http://head:8265" in message and "no job agent" in message
    assert "run r1 was not kept; submit again once the head is ready" in message
    assert 1000.0 + AGENT_WAIT_S <= api.now <= 1000.0 + AGENT_WAIT_S + 10.0  # bounded by AGENT_WAIT_S
    with pytest.raises(UnknownRun):
        RunRegistry(str(tmp_path)).load("r1")
    api.refusals = 0  # the head is ready: the same run.id is taken this time
    submit_new(str(tmp_path), api)
    assert RunRegistry(str(tmp_path)).load("r1").state == "PENDING" and "kiln-r1" in api.jobs


def test_another_refusal_is_not_retried_and_frees_a_new_runs_id(tmp_path, jobs_api):
    api = jobs_api(refusals=1, reply="the Ray Jobs API at http://head:8265: Request failed with status code 400: no")
    with pytest.raises(UsageError, match="status code 400"):
        submit_new(str(tmp_path), api)
    assert api.tries == 1 and RunRegistry(str(tmp_path)).run_ids() == []


def test_a_refused_resubmission_keeps_the_run_and_records_why(tmp_path, jobs_api):
    from orchestrator.cli.cluster import submit

    api = jobs_api(refusals=1, reply="status code 400: no")
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r2", job_id="kiln-r2-2"), "run: {}\n")
    record.state = "RUNNING"
    registry.save(record)
    record.state = "PREEMPTED"
    registry.save(record)
    with pytest.raises(UsageError):
        submit(registry, record, "http://head:8265", "kiln resume r2", None, clock=lambda: api.now, sleep=api.sleep)
    kept = registry.load("r2")
    assert (
        kept.state == "PREEMPTED"
        and kept.error == "the Ray job could not be submitted to http://head:8265: status code 400: no"
    )


@pytest.mark.parametrize(
    ("job_status", "waited_s", "expected"),
    [
        ("RUNNING", 0.0, StopWait.WAIT),  # Ray SIGTERMs the driver, which checkpoints nothing and exits
        ("RUNNING", STOP_NOW_WAIT_S, StopWait.WAIT),
        ("RUNNING", STOP_NOW_WAIT_S + 0.1, StopWait.GIVE_UP),
        ("STOPPED", 3.0, StopWait.ENDED),
        ("FAILED", STOP_NOW_WAIT_S + 5, StopWait.ENDED),  # ended: however long it took
        ("UNREACHABLE", 1.0, StopWait.WAIT),
    ],
)
def test_kiln_stop_now_waits_for_the_job_to_end_a_bounded_time(job_status, waited_s, expected):
    assert decide_stop_wait(job_status, waited_s) == expected


def followed_to_the_end(tmp_path, monkeypatch, recorded: str, job_log: str) -> tuple[int, str]:
    """`kiln submit --follow`'s verdict on run r1 (submitted PENDING) once its job ended FAILED with job_log."""
    import io

    from rich.console import Console

    from orchestrator.cli.cluster import finished
    from orchestrator.cluster.jobs import JobView

    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1", job_id="kiln-r1"), "run: {}\n")
    if recorded != "PENDING":
        record.state = recorded
        registry.save(record)
    monkeypatch.setattr(
        "orchestrator.cli.cluster.job_view", lambda address, job_id: JobView(job_id, address, "FAILED", "exit 127", 127)
    )
    monkeypatch.setattr("orchestrator.cli.cluster.job_logs", lambda address, job_id: job_log)
    out = io.StringIO()
    code = finished(registry, "r1", "http://head:8265", "kiln-r1", Console(file=out, width=300), ("PENDING", 0))
    return code, out.getvalue()


def test_a_job_that_never_ran_kiln_says_the_run_never_started_with_the_logs_last_lines(tmp_path, monkeypatch):
    log = "".join(f"setting up {i}\n" for i in range(20)) + "/bin/sh: 1: kiln: not found\n"
    code, said = followed_to_the_end(tmp_path, monkeypatch, "PENDING", log)
    assert code == 1
    assert "ended FAILED before it started run r1: the run never started on the cluster" in said
    assert said.rstrip().splitlines()[-2].strip() == "/bin/sh: 1: kiln: not found"  # the tail, then what to do
    assert "setting up 10" not in said and "setting up 11" in said  # its last 10 lines
    assert "driver was lost" not in said and "kiln resume" not in said


def test_a_launched_run_whose_job_ended_is_still_a_lost_driver_to_resume(tmp_path, monkeypatch):
    code, said = followed_to_the_end(tmp_path, monkeypatch, "RUNNING", "Killed\n")
    assert code == 1 and "its driver was lost; continue it with kiln resume r1 --address http://head:8265" in said
