"""An object store that cannot be reached fails in seconds, naming the endpoint; credentials written into
a URL never come back in an error. The store is the session's moto server (or nothing at all)."""

from __future__ import annotations

import logging
import socket

import pytest

from data_pipeline import storage, store_retry
from data_pipeline.storage import StorageError
from tests.s3_server import free_port

SECRET_URL = "s3://AKIAEXAMPLEKEY:supersecretvalue@kiln-test/x"


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kiln.storage" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("call", [storage.exists, storage.read_bytes], ids=["exists", "read_bytes"])
def test_credentials_in_a_url_fail_in_one_line_without_the_secret(s3, call, caplog):
    with pytest.raises(StorageError) as raised:
        call(SECRET_URL)
    message = str(raised.value)
    assert "supersecretvalue" not in message and "\n" not in message
    assert message.startswith("s3://***REDACTED***@kiln-test/x: ")
    assert "credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert not retry_warnings(caplog)


@pytest.mark.parametrize(
    "endpoint, reason",
    [
        ("http://no-such-host.invalid:9", "host 'no-such-host.invalid' does not resolve"),
        ("http://127.0.0.1:{port}", "connection refused"),
    ],
    ids=["dns-failure", "connection-refused"],
)
def test_an_unreachable_endpoint_is_permanent_and_named(s3, endpoint, reason, monkeypatch, fresh_s3fs, caplog):
    endpoint = endpoint.format(port=free_port())
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError) as raised:
        storage.exists("s3://kiln-test/runs/x/run.json")
    message = str(raised.value)
    assert message.startswith(
        f"s3://kiln-test/runs/x/run.json: cannot reach the object store at {endpoint} ({reason}); "
    )
    assert "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert retry_warnings(caplog) == []  # neither botocore nor Kiln retried


def test_only_a_missing_host_or_a_refused_connection_counts_as_unreachable():
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert store_retry.unreachable(refused) == "connection refused"
    wrapped = OSError("Could not connect to the endpoint URL")
    wrapped.__cause__ = dns
    assert store_retry.unreachable(wrapped, host="store.example") == "host 'store.example' does not resolve"
    for other in (ConnectionResetError("reset by peer"), TimeoutError("read timed out"), OSError("disk full")):
        assert store_retry.unreachable(other) is None
