"""A real S3-compatible server for tests and benchmarks: moto's server mode on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
