"""Failpoints: named places in the workers' loop where a test makes a fault happen at an exact step.

Modelled on etcd's gofail and TiKV's fail-rs. A failpoint is inert unless the environment arms it, so
production pays one dict lookup per call:

    KILN_FAILPOINTS="loop.after_step(step=3,rank=0)=pause;checkpoint.committed(step=10,rank=1)=kill"
    KILN_FAILPOINT_DIR=/tmp/fp      # required when any point is armed

Each entry is `NAME[(KEY=VALUE,...)]=ACTION`: the point fires where it is called with every KEY equal to
VALUE (its `run`, `step`, `rank`). An armed point fires **once per KILN_FAILPOINT_DIR**: the first
process to reach it claims it (an exclusive marker file), so a restarted worker that passes the same step
again runs on, and "kill rank 1 after commit 10" happens exactly once.

Every firing first appends a JSON line (pid and the call's values) to `DIR/NAME.reached`. Actions:

- `pause`: block until `DIR/NAME.release` exists (every process held at NAME goes on) or
  `DIR/NAME(KEY=VALUE,...).release`, its conditions with the keys in sorted order (only that entry's
  process goes on): the test holds the run at that step, acts (kills, stops, checks), then releases it.
- `hang`: SIGSTOP this process: frozen whole, its own watchdog included (a wedged rank; only SIGKILL ends it).
- `kill`: SIGKILL this process (a crashed worker, the OOM killer).
- `exit(CODE)`: leave at once with CODE, no cleanup.
- `raise`: raise FailpointError (an exception inside the loop).
- `sleep(SECONDS)`: a slow step.

The points are listed in POINTS. Tests arm, wait for and release them with tests/failpoints.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass

ARMED_VAR = "KILN_FAILPOINTS"
DIR_VAR = "KILN_FAILPOINT_DIR"

# Every point Kiln calls, and where; arming an unknown name is an error (a typo would never fire).
POINTS = {
    "loop.after_step": "rank `rank` of run `run` finished optimizer step `step` (before its sync, eval, checkpoint)",
    "checkpoint.committed": "a worker's checkpoint of `step` is committed (its MANIFEST.json written)",
    "sweep.asha_decided": "the sweep's ASHA decided on trial `trial`'s result of `step` (a prune's STOP is written)",
}

ENTRY = re.compile(r"^(?P<name>[\w.]+)(?:\((?P<when>[^)]*)\))?=(?P<action>\w+)(?:\((?P<arg>[^)]*)\))?$")
ACTIONS = ("pause", "hang", "kill", "exit", "raise", "sleep")


class FailpointError(RuntimeError):
    """What the `raise` action raises."""


@dataclass(frozen=True)
class Armed:
    """One armed point: where it fires and what it does there."""

    name: str
    when: tuple[tuple[str, str], ...]
    action: str
    arg: str | None

    def matches(self, values: dict[str, object]) -> bool:
        """True where every condition names a value the call passed, equal as text."""
        return all(key in values and str(values[key]) == want for key, want in self.when)


def parse(spec: str) -> dict[str, list[Armed]]:
    """KILN_FAILPOINTS' text -> name -> its armed entries; ValueError names a malformed entry."""
    armed: dict[str, list[Armed]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        match = ENTRY.match(entry)
        if not match or match["name"] not in POINTS or match["action"] not in ACTIONS:
            raise ValueError(
                f"{ARMED_VAR}: cannot use {entry!r}: write NAME[(KEY=VALUE,...)]=ACTION with NAME one of "
                f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}"
            )
        pairs = [pair.split("=", 1) for pair in filter(None, (p.strip() for p in (match["when"] or "").split(",")))]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{ARMED_VAR}: {entry!r}: each condition is KEY=VALUE")
        when = tuple((key.strip(), value.strip()) for key, value in pairs)
        armed.setdefault(match["name"], []).append(Armed(match["name"], when, match["action"], match["arg"]))
    return armed


_armed: dict[str, list[Armed]] | None = None


def armed_points() -> dict[str, list[Armed]]:
    """The points this process's environment arms (parsed once)."""
    global _armed
    if _armed is None:
        spec = os.environ.get(ARMED_VAR, "")
        _armed = parse(spec) if spec else {}
        if _armed and not os.environ.get(DIR_VAR):
            raise ValueError(f"{ARMED_VAR} is set but {DIR_VAR} is not: name a folder the test and the run share")
    return _armed


def failpoint(name: str, **values: object) -> bool:
    """Fire the point `name` if the environment armed it for these values; whether it fired (then returned)."""
    points = armed_points()
    if not points:
        return False
    fired = False
    for point in points.get(name, ()):
        if point.matches(values) and claim(point):
            act(point, values)
            fired = True
    return fired


def release_files(name: str, when: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """The files that release a process paused at `name` under these conditions: any held there, or this entry."""
    conditions = ",".join(f"{key}={value}" for key, value in sorted(when))
    return f"{name}.release", f"{name}({conditions}).release"


def claim(point: Armed) -> bool:
    """True for the first process to reach this point (once per KILN_FAILPOINT_DIR)."""
    marker = os.path.join(os.environ[DIR_VAR], f"{point.name}{list(point.when)}.fired")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def act(point: Armed, values: dict[str, object]) -> None:
    """Announce the arrival (the test learns the pid and values), then do what the point was armed to do."""
    announce(point.name, values)
    if point.action == "hang":
        # Frozen whole, as a wedged process is: every thread stops, its step watchdog too, so only its peers'
        # watchdogs can see the hang (and which rank reports it never depends on two watchdogs racing).
        os.kill(os.getpid(), signal.SIGSTOP)
    elif point.action == "pause":
        releases = [os.path.join(os.environ[DIR_VAR], f) for f in release_files(point.name, point.when)]
        while not any(os.path.exists(release) for release in releases):
            time.sleep(0.05)
    elif point.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point.action == "exit":
        os._exit(int(point.arg or 1))
    elif point.action == "raise":
        raise FailpointError(f"failpoint {point.name} fired at {values}")
    elif point.action == "sleep":
        time.sleep(float(point.arg or 1))


def announce(name: str, values: dict[str, object]) -> None:
    """Append this process's arrival at `name` to DIR/NAME.reached, for the test waiting on it."""
    line = json.dumps({"pid": os.getpid(), **{k: v for k, v in values.items() if isinstance(v, int | str)}})
    with open(os.path.join(os.environ[DIR_VAR], f"{name}.reached"), "a") as out:
        out.write(line + "\n")


def environment() -> dict[str, str]:
    """The failpoint variables of this process, for launchers that start workers with an explicit environment."""
    return {key: os.environ[key] for key in (ARMED_VAR, DIR_VAR) if os.environ.get(key)}
