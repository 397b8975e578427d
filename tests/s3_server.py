"""A real S3-compatible server for tests and benchmarks: moto's server mode on a free loopback port."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

# Ports handed out come from below the kernel's ephemeral range (32768-60999 on Linux) and above Ray's
# worker ports (10002-19999): a port found free there cannot be taken, before its server binds it, by an
# outgoing connection or by another process's bind to port 0 (which is how Ray, gloo and torchrun pick
# theirs), the race that once failed a Ray node's start on a busy machine. Each xdist worker has a slice of
# its own, starts at a place of its own within it, and never hands the same port out twice.
PORT_SLICES = [range(start, start + 3000) for start in (20000, 23000, 26000, 29000)]
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, outside the range the kernel picks ports from."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    ports = PORT_SLICES[int(worker) % len(PORT_SLICES) if worker.isdigit() else 0]
    start = random.Random(os.getpid()).randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(start + offset) % len(ports)]
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def start_moto(log: IO | None = None, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """Start `moto_server` on 127.0.0.1 and wait until it accepts connections; returns (process, endpoint)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)


def aws_env(endpoint: str) -> dict[str, str]:
    """The AWS variables that point s3fs (in this process and every child) at the server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def stop(server: subprocess.Popen) -> None:
    """Stop the server."""
    server.terminate()
    server.wait(timeout=30)


if __name__ == "__main__":  # a manual server: python -m tests.s3_server
    process, url = start_moto(sys.stdout)
    print(url, flush=True)
    os.environ.update(aws_env(url))
    process.wait()
