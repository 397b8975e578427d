"""Credentials written into a URL never come back in an error, and only a missing host or a refused
connection counts as an unreachable store. No store is reached: an unreachable one is shown in
tests/integration/test_storage_faults.py."""

from __future__ import annotations

import socket

import pytest

from data_pipeline import storage, store_retry
from data_pipeline.storage import StorageError
from tests.helpers import storage_warnings

SECRET_URL = "s3://AKIAEXAMPLEKEY:supersecretvalue@kiln-test/x"


@pytest.mark.parametrize("call", [storage.exists, storage.read_bytes], ids=["exists", "read_bytes"])
def test_credentials_in_a_url_fail_in_one_line_without_the_secret(no_store, call, caplog):
    with pytest.raises(StorageError) as raised:
        call(SECRET_URL)
    message = str(raised.value)
    assert "supersecretvalue" not in message and "\n" not in message
    assert message.startswith("s3://***REDACTED***@kiln-test/x: ")
    assert "credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert not storage_warnings(caplog)


def test_only_a_missing_host_or_a_refused_connection_counts_as_unreachable():
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert store_retry.unreachable(refused) == "connection refused"
    wrapped = OSError("Could not connect to the endpoint URL")
    wrapped.__cause__ = dns
    assert store_retry.unreachable(wrapped, host="store.example") == "host 'store.example' does not resolve"
    for other in (ConnectionResetError("reset by peer"), TimeoutError("read timed out"), OSError("disk full")):
        assert store_retry.unreachable(other) is None
