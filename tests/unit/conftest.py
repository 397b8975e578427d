"""What makes a unit test one: it starts no process and no server. A test that does fails here: it
belongs in tests/integration (the session's S3 server, Ray, the CLI) or tests/distributed (torchrun)."""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess

import pytest

from data_pipeline import store_retry
from tests.s3_server import aws_env, free_port

# Session fixtures start their server before any test-level guard could see it: refused by name.
SERVER_FIXTURES = {"s3": "the session's moto S3 server"}


class NotAUnitTest(RuntimeError):
    """A unit test tried to start a process or a server."""


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Refuse a unit test that asks for a server fixture, before the server starts."""
    for name, what in SERVER_FIXTURES.items():
        if name in item.fixturenames:
            pytest.fail(f"{item.nodeid} uses `{name}` ({what}): move it to tests/integration", pytrace=False)


@pytest.fixture(autouse=True)
def no_process_or_server(monkeypatch):
    """Every way Python starts a process, and listening on a socket, raises NotAUnitTest.

    The attempts are also kept and fail the test at teardown, so a library that catches the error and
    carries on (probing for a compiler, say) cannot hide one. gloo and other C++ code is not patched:
    a one-process group on a file:// store stays allowed. Yields the list of attempts.
    """
    attempts: list[str] = []

    def refuse(what: str):
        def refused(*args, **kwargs):
            attempts.append(f"{what}: {args[0] if args else ''}"[:200])
            raise NotAUnitTest(f"a unit test may not {what}; move it to tests/integration")

        return refused

    # subprocess (its own reference) and multiprocessing's spawn/forkserver start processes through
    # fork_exec, multiprocessing's fork through os.fork; setattr raises if a Python upgrade renames one.
    monkeypatch.setattr(subprocess, "_fork_exec", refuse("start a process"))
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse("start a process"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, refuse(f"start a process (os.{name})"))
    monkeypatch.setattr(socket.socket, "listen", refuse("listen on a socket (start a server)"))
    yield attempts
    if attempts:
        pytest.fail("a unit test started a process or a server: " + "; ".join(attempts), pytrace=False)


@pytest.fixture
def no_store(monkeypatch, fresh_s3fs):
    """AWS variables pointing at a loopback port nobody listens on: s3:// URLs parse and clients build,
    and a test that reaches for the store fails at once with 'connection refused'."""
    for key, value in aws_env(f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(key, value)


def longest(low: float, high: float) -> float:
    """A jitter draw that always picks the top of its range, so waits are predictable."""
    return high


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits retrying() asks for, recorded instead of slept; jitter always draws its maximum."""
    recorded: list[float] = []
    monkeypatch.setattr(store_retry, "sleep", recorded.append)
    monkeypatch.setattr(store_retry, "uniform", longest)
    monkeypatch.delenv(store_retry.RETRIES_ENV, raising=False)
    return recorded
