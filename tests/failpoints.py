"""Arming Kiln's failpoints (trainers/failpoints.py) from a test: hold a run at an exact step, act, release it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainers.failpoints import ARMED_VAR, DIR_VAR, parse, release_files


class Failpoints:
    """The failpoints a test arms for the processes it starts (pass `.env` to them), and their arrivals."""

    def __init__(self, folder: Path, *entries: str):
        parse(";".join(entries))  # a typo fails here, in the test, not silently in a worker
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.env = {ARMED_VAR: ";".join(entries), DIR_VAR: str(folder)}

    def arrivals(self, name: str) -> list[dict]:
        """Each arrival at `name` so far: the process's pid and the values the point was called with."""
        path = self.folder / f"{name}.reached"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait(self, name: str, proc=None, timeout: float = 300, **values: object) -> dict:
        """Block until a process reaches `name` with these values (held there if it paused); returns the arrival.

        Not a race: the point either fires, or the run ends first, or the timeout says which point never came.
        """
        deadline = time.monotonic() + timeout

        def arrived() -> list[dict]:
            return [a for a in self.arrivals(name) if all(a.get(k) == v for k, v in values.items())]

        while not arrived():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the run ended ({proc.returncode}) before failpoint {name}{values} fired")
            if time.monotonic() > deadline:
                raise AssertionError(f"failpoint {name}{values} did not fire in {timeout:.0f}s")
            time.sleep(0.1)
        return arrived()[0]

    def release(self, name: str, **when: object) -> None:
        """Let every process paused at `name` go on; or, given an entry's conditions, only that entry's process."""
        everyone, this_entry = release_files(name, tuple((key, str(value)) for key, value in when.items()))
        (self.folder / (this_entry if when else everyone)).touch()
