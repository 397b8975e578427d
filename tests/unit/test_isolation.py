"""Unit tests start no process and no server: tests/unit/conftest.py refuses each way of doing so."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
from types import SimpleNamespace

import pytest

from tests.unit.conftest import NotAUnitTest, pytest_runtest_setup


@pytest.mark.parametrize(
    "start",
    [
        lambda: subprocess.run(["true"], check=False),
        lambda: os.system("true"),
        lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
        lambda: socket.create_server(("127.0.0.1", 0)),
    ],
    ids=["subprocess", "os.system", "multiprocessing", "server-socket"],
)
def test_starting_a_process_or_a_server_is_refused(no_process_or_server, start):
    with pytest.raises(NotAUnitTest, match="move it to tests/integration"):
        start()
    # Recorded as well, so a library that swallows the error still fails the test at teardown.
    assert no_process_or_server
    no_process_or_server.clear()


def test_asking_for_the_s3_server_is_refused_before_it_starts():
    item = SimpleNamespace(nodeid="tests/unit/test_x.py::test_y", fixturenames=["tmp_path", "s3"])
    with pytest.raises(pytest.fail.Exception, match=r"uses `s3` .*: move it to tests/integration"):
        pytest_runtest_setup(item)
    pytest_runtest_setup(SimpleNamespace(nodeid="tests/unit/test_x.py::test_z", fixturenames=["tmp_path"]))
