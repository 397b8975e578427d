"""Is a run's driver still alive? Decided from what the driver recorded in run.json, not from a guess.

On the driver's own machine the answer is exact: its pid either exists with the start time it
recorded (alive) or not (gone, at once, even a second after a SIGKILL). Elsewhere only run.json's
heartbeat (`updated`, rewritten every few seconds) can tell, so the driver counts as gone once that
has been silent for GONE_AFTER_S, and the verdict says how long that still is.
"""

from __future__ import annotations

import calendar
import getpass
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

GONE_AFTER_S = 30  # the driver rewrites run.json every ~5 s while its run is alive
# psutil derives a start time from boot time and clock ticks: equal for one process, a tick apart at worst.
START_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class Verdict:
    """Whether a run's driver is alive, why, and (for another host) when to ask again."""

    alive: bool
    reason: str
    retry_in_s: int | None = None


def this_host() -> dict[str, str | None]:
    """This machine as a driver records it: hostname plus pid namespace (containers sharing a hostname)."""
    return {"host": socket.gethostname(), "pid_ns": _pid_namespace()}


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_start_time(pid: int) -> float | None:
    """The start time (epoch seconds) of process pid on this machine, or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


@dataclass(frozen=True)
class DriverIdentity:
    """A Kiln process that drives (or stops) a run or a sweep: which machine, process, user and command."""

    host: str
    pid: int
    user: str
    command: str
    pid_ns: str | None = None  # the pid namespace: containers may share a hostname
    started: float | None = None  # the process's start time: a reused pid is another process

    @classmethod
    def here(cls, command: str) -> DriverIdentity:
        """This process, running `command`."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _user(), command, _pid_namespace(), pid_start_time(pid))

    def liveness_json(self) -> dict[str, object]:
        """run.json's and sweep.json's `driver`: what `driver_alive` later reads to tell whether it still runs."""
        return {
            "host": self.host,
            "pid_ns": self.pid_ns,
            "pid": self.pid,
            "started": self.started,
            "command": self.command,
        }

    def event_json(self) -> dict[str, object]:
        """An event's (and so an attempt's) `driver`: who acted, for the people reading the record."""
        return {"host": self.host, "pid": self.pid, "user": self.user, "command": self.command}

    @property
    def who(self) -> str:
        """user@host, as stop reasons name who asked."""
        return f"{self.user}@{self.host}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's anonymous uid): the uid still says who
        return str(os.getuid())


def utc_seconds(timestamp: str) -> float:
    """Epoch seconds of an ISO 8601 UTC timestamp as run.json holds it."""
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))


def same_host(driver: dict, here: dict) -> bool:
    """Whether the driver ran where we are (same hostname and, when both are known, pid namespace)."""
    if driver.get("host") != here.get("host"):
        return False
    return driver.get("pid_ns") is None or here.get("pid_ns") is None or driver["pid_ns"] == here["pid_ns"]


def driver_alive(
    driver: dict | None,
    updated_utc: str,
    now: float,
    here: dict,
    started_of: Callable[[int], float | None],
    gone_after_s: float = GONE_AFTER_S,
) -> Verdict:
    """Whether the driver a RUNNING run recorded still runs: by its pid on this host, else by its heartbeat."""
    driver = driver if isinstance(driver, dict) else {}
    pid = driver.get("pid")
    host = f"host {driver['host']}" if driver.get("host") else "an unknown host"
    if isinstance(pid, int) and same_host(driver, here):
        started = started_of(pid)
        recorded = driver.get("started")
        if started is None:
            return Verdict(False, f"its driver (pid {pid} on this host) is gone")
        if isinstance(recorded, (int, float)) and abs(started - recorded) > START_TIME_TOLERANCE_S:
            return Verdict(
                False, f"its driver (pid {pid} on this host) is gone (the pid now belongs to another process)"
            )
        return Verdict(True, f"its driver `{driver.get('command') or 'kiln'}` is running as pid {pid} on this host")
    try:
        age = max(0.0, now - utc_seconds(updated_utc))
    except (TypeError, ValueError):
        return Verdict(False, f"its driver on {host} left no readable heartbeat (run.json updated={updated_utc!r})")
    if age >= gone_after_s:
        return Verdict(False, f"its driver on {host} last recorded {age:.0f}s ago")
    wait = max(1, math.ceil(gone_after_s - age))
    return Verdict(
        True,
        f"its driver on {host} last recorded {age:.0f}s ago; it is considered gone after "
        f"{gone_after_s:.0f}s: retry in {wait}s",
        retry_in_s=wait,
    )
