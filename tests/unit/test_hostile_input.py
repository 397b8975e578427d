"""Hostile or careless input: one line naming the thing and the fix, nothing lost, nothing leaked."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main, resume_root
from orchestrator.config import UsageError, compose_config
from orchestrator.run.lifecycle import reopen_run
from orchestrator.run.planning import start_run
from orchestrator.run.registry import DamagedRun, RunExists, RunRecord, RunRegistry

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 with one stderr line and no traceback; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=1e999", "optim.lr must be a finite number, got inf"),
        ("optim.eps=nan", "optim.eps must be a finite number, got nan"),
        ("checkpoint.preempt_grace_s=inf", "checkpoint.preempt_grace_s must be a finite number"),
        ("run.id='abc\n'", "run.id must be 1-64 letters"),
        ("run.id=abc\n", "could not parse override 'run.id=abc\\n': character '\\n' is not allowed unquoted"),
        ("run.id=ünï", "could not parse override 'run.id=ünï': character 'ü' is not allowed unquoted"),
        ("run.id='ünï'", "run.id must be 1-64 letters"),
        ("data.path=/data/web", "data.path=/data/web is ignored by data.source=stdlib"),
        ("data.mixture=[{path: /a, weight: 1}]", "data.mixture is ignored by data.source=stdlib"),
        (f"storage.root=s3://AKIAEXAMPLE:{SECRET}@bucket/runs", "storage.root has credentials written into its URL"),
        (f"tracker.tags=[ok, 's3://AKIAEXAMPLE:{SECRET}@bucket/x']", "tracker.tags[1] has credentials"),
    ],
)
def test_bad_values_fail_in_one_line_before_anything_starts(capsys, override, expected):
    line = one_line_error(capsys, ["train", "experiment=quickstart", override])
    assert expected in line
    assert SECRET not in line


def test_data_max_files_with_prepared_data_is_an_error():
    with pytest.raises(UsageError, match="data.max_files caps the built-in corpus only"):
        compose_config(["data=prepared", "data.path=/x", "data.max_files=10"])


def test_storage_root_that_is_a_file_or_unwritable_is_named(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UsageError, match=f"storage.root={a_file} is a file, not a folder"):
        RunRegistry(str(a_file)).check_root()
    with pytest.raises(UsageError, match=r"storage.root=.*/file.txt/runs is not writable \(Not a directory\)"):
        RunRegistry(str(a_file / "runs")).check_root()
    # Root ignores permission bits, so use a file system nobody can create folders in.
    with pytest.raises(UsageError, match="storage.root=/proc/kiln-runs is not writable"):
        RunRegistry("/proc/kiln-runs").check_root()
    RunRegistry(str(tmp_path / "new" / "runs")).check_root()
    assert (tmp_path / "new" / "runs").is_dir() and not list((tmp_path / "new" / "runs").iterdir())


def test_a_data_error_leaves_no_run_folder_behind(tmp_path):
    cfg = compose_config(
        ["data=prepared", f"data.path={tmp_path}/missing", "run.id=r1", f"storage.root={tmp_path}/runs"]
    )
    with pytest.raises(Exception, match="missing"):
        start_run(cfg, log=lambda m: None)
    assert not (tmp_path / "runs" / "r1").exists()


def test_a_folder_with_another_runs_checkpoints_is_never_written_into(tmp_path):
    orphan = tmp_path / "runs" / "r1" / "checkpoints" / "step_000010"
    orphan.mkdir(parents=True)
    (orphan / "MANIFEST.json").write_text("{}")
    registry = RunRegistry(str(tmp_path / "runs"))
    with pytest.raises(RunExists, match="already holds files \\(checkpoints\\) but no run.json"):
        registry.create(RunRecord(run_id="r1"), "config: 1\n")
    assert sorted(p.name for p in (tmp_path / "runs" / "r1").iterdir()) == ["checkpoints"]
    registry.create(RunRecord(run_id="r2"), "config: 2\n")
    with pytest.raises(RunExists, match="run 'r2' already exists"):
        registry.create(RunRecord(run_id="r2"), "config: 3\n")
    assert (tmp_path / "runs" / "r2" / "config.yaml").read_text() == "config: 2\n"


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"run_id": "r1", "state": "RUNN', "not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('"r1"', "holds a JSON str, not an object"),
        ('{"state": "RUNNING"}', "has no run_id"),
        ('{"run_id": "r1", "step": "ten"}', "field 'step' is str, expected int"),
        ('{"run_id": "r1", "attempts": [3]}', "is int, expected object"),  # field 'attempts[0]'; a regex here
        ('{"run_id": "r1", "state": "WEIRD"}', "state 'WEIRD' is not one of"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
)
def test_a_damaged_run_json_is_named_by_every_command_and_runs_lists_the_others(tmp_path, capsys, content, problem):
    root = tmp_path / "runs"
    registry = RunRegistry(str(root))
    registry.create(RunRecord(run_id="good", state="SUCCEEDED"), "x: 1\n")
    registry.create(RunRecord(run_id="r1"), "x: 1\n")
    target = root / "r1" / "run.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DamagedRun, match=problem):
        registry.load("r1")
    for argv in (["status", "r1"], ["stop", "r1"], ["resume", "r1"], ["export", "r1", "--out", str(tmp_path / "o")]):
        line = one_line_error(capsys, [*argv, "--storage-root", str(root)])
        assert f"{target} is damaged" in line and problem in line and "move the run folder aside" in line
    assert main(["runs", "--storage-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "SUCCEEDED" in out and "DAMAGED" in out and f"{target} is damaged" in out


def test_resume_applies_storage_root_or_refuses_to_move_a_run(tmp_path, capsys):
    assert resume_root(None, ["storage.root=/a", "train.max_steps=9"]) == ("/a", ["train.max_steps=9"])
    assert resume_root("/a", ["storage.root=/a"]) == ("/a", [])
    with pytest.raises(UsageError, match="disagree"):
        resume_root("/b", ["storage.root=/a"])
    root = tmp_path / "runs"
    cfg = compose_config(["experiment=quickstart", "run.id=r1", f"storage.root={root}"])
    RunRegistry(str(root)).create(
        RunRecord(run_id="r1", state="FAILED"), __import__("orchestrator.config", fromlist=["to_yaml"]).to_yaml(cfg)
    )
    with pytest.raises(UsageError, match="cannot move one"):
        reopen_run(str(root), "r1", [f"storage.root={tmp_path}/elsewhere"])
    _, _, reopened = reopen_run(str(root), "r1", [f"storage.root={root}"])
    assert reopened.storage.root == str(root)
    # Through the CLI the override says where the run lives, exactly like --storage-root.
    line = one_line_error(capsys, ["resume", "nope", f"storage.root={root}"])
    assert f"unknown run 'nope' under {root}" in line


def test_credentials_in_a_storage_root_argument_never_reach_output(tmp_path, capsys, monkeypatch):
    line = one_line_error(capsys, ["runs", "--storage-root", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"])
    assert "--storage-root has credentials written into its URL" in line and SECRET not in line
    monkeypatch.setenv("KILN_STORAGE_ROOT", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs")
    line = one_line_error(capsys, ["status", "r1", "--storage-root", str(tmp_path)])
    assert "KILN_STORAGE_ROOT has credentials" in line and SECRET not in line


def test_an_unexpected_error_is_one_redacted_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)

    def explode(args, console):
        raise RuntimeError(f"deep inside a library: key={SECRET} url=s3://AKIAEXAMPLE:{SECRET}@bucket/x\nline two")

    monkeypatch.setattr("orchestrator.cli.cmd_runs", explode)
    code = main(["runs", "--storage-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected error: RuntimeError: deep inside a library" in err and "KILN_DEBUG=1" in err
    assert SECRET not in err
    monkeypatch.setenv("KILN_DEBUG", "1")
    main(["runs", "--storage-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert "Traceback" in err and SECRET not in err


def test_everything_the_registry_and_event_log_write_is_redacted(tmp_path, monkeypatch):
    from trainers.run.events import record_event

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    registry = RunRegistry(str(tmp_path))
    record = registry.create(RunRecord(run_id="r1", error=f"failed with {SECRET}"), "x: 1\n")
    record.notes.append(f"endpoint https://u:{SECRET}@host/x")
    registry.save(record)
    record_event(registry.run_url("r1"), "failed", summary=f"boom {SECRET}")
    for path in (tmp_path / "r1").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(), path


def test_worker_log_lines_are_redacted(monkeypatch):
    import io
    import logging

    from data_pipeline.redaction import RedactingFilter

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("kiln.test-redaction")
    logger.addHandler(handler)
    try:
        logger.warning("could not reach %s with key %s", f"s3://AKIAEXAMPLE:{SECRET}@b/x", SECRET)
    finally:
        logger.removeHandler(handler)
    assert SECRET not in buffer.getvalue() and "could not reach s3://***REDACTED***@b/x" in buffer.getvalue()


def test_run_json_of_a_copied_folder_is_named(tmp_path, capsys):
    registry = RunRegistry(str(tmp_path))
    registry.create(RunRecord(run_id="a"), "x: 1\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text(json.dumps({"run_id": "a"}))
    with pytest.raises(DamagedRun, match="names another run \\('a'\\)"):
        registry.load("b")
