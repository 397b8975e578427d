"""The installed `kiln` command as a user runs it: a process, its exit code and what it prints."""

from __future__ import annotations

from tests.helpers import kiln


def test_cli_usage_error_is_one_line_exit_2_and_starts_no_ray(tmp_path):
    result = kiln("train", "experiment=quickstart", "train.max_step=5", f"storage.root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "train.max_steps" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was registered, no Ray started
