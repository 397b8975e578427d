"""Kiln's storage retries, without a store: which errors are retried and how that is logged, which fail
at once, and the patient retry settings every S3 client gets. Against a real, flaky store (moto behind a
FaultyProxy): tests/integration/test_storage_faults.py."""

from __future__ import annotations

import logging
import re

import fsspec
import pytest
import s3fs
from botocore.exceptions import NoCredentialsError

from data_pipeline import s3_clients, storage, store_retry
from data_pipeline.storage import StorageError
from tests.helpers import client_error, failing, storage_warnings


def test_transient_errors_are_retried_and_logged(waits, caplog):
    fn = failing(client_error("ServiceUnavailable", 503), ConnectionResetError("reset by peer"))
    assert storage.retrying("write", "s3://b/k", fn) == "done" and fn.calls == 3
    first, second = storage_warnings(caplog)
    assert re.fullmatch(
        r"retrying write s3://b/k after ServiceUnavailable 503 "
        r"\(attempt 2/8, waiting 0\.\d\ds\)",
        first,
    )
    assert re.fullmatch(
        r"retrying write s3://b/k after ConnectionResetError: reset by peer "
        r"\(attempt 3/8, waiting 0\.\d\ds\)",
        second,
    )


def test_retrying_gives_up_after_the_configured_attempts(waits, monkeypatch):
    monkeypatch.setenv(store_retry.RETRIES_ENV, "3")
    fn = failing(*[client_error("SlowDown", 503)] * 5)
    with pytest.raises(StorageError, match=r"^s3://b/k: read failed 3 times, last with SlowDown 503"):
        storage.retrying("read", "s3://b/k", fn)
    assert fn.calls == 3
    monkeypatch.setenv(store_retry.RETRIES_ENV, "lots")
    with pytest.raises(ValueError, match=store_retry.RETRIES_ENV):
        storage.retrying("read", "s3://b/k", fn)


@pytest.mark.parametrize(
    "error, expected",
    [
        (client_error("AccessDenied", 403), r"^s3://b/k: access denied \(AccessDenied\); give these credentials"),
        (client_error("InvalidAccessKeyId", 403), r"^s3://b/k: the store rejected the credentials"),
        (client_error("SignatureDoesNotMatch", 403), r"^s3://b/k: the store rejected the credentials"),
        (NoCredentialsError(), r"^s3://b/k: no storage credentials found"),
        (FileNotFoundError("b/k"), None),
        (client_error("InvalidRange", 416), None),
    ],
)
def test_permanent_errors_fail_at_once(error, expected, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-secret-value")
    fn = failing(error)
    with pytest.raises(StorageError if expected else type(error)) as raised:
        storage.retrying("write", "s3://b/k", fn)
    assert fn.calls == 1
    if expected:
        assert re.match(expected, str(raised.value)) and "sup3r-secret-value" not in str(raised.value)


def test_credentials_never_reach_the_log(waits, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-secret-value")
    fn = failing(ConnectionError("to http://AKIA:sup3r-secret-value@host failed"))
    storage.retrying("read", "s3://b/k", fn)
    assert storage_warnings(caplog) and not any("sup3r-secret-value" in m for m in storage_warnings(caplog))


def test_library_retry_notices_become_warnings_and_nothing_else_gets_louder(caplog):
    logging.getLogger("s3fs").debug("CALL: %s", "list_objects_v2")
    logging.getLogger("botocore.retries.standard").debug("Not retrying request.")
    logging.getLogger("botocore.retries.standard").debug("Retry needed, retrying request after delay of: %s", 0.25)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("kiln.storage", "retrying an S3 request after a transient error (botocore, waiting 0.25s)")
    ]


def test_s3_clients_get_patient_retry_defaults(no_store, monkeypatch):
    config = s3fs.S3FileSystem().s3.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": s3_clients.BOTOCORE_ATTEMPTS}
    assert (config.connect_timeout, config.read_timeout) == (s3_clients.CONNECT_TIMEOUT_S, s3_clients.READ_TIMEOUT_S)
    # what the user set wins: AWS_MAX_ATTEMPTS, and anything already in fsspec's config
    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"config_kwargs": {"read_timeout": 5}}})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3_clients._configure_s3()
    assert fsspec.config.conf["s3"]["config_kwargs"] == {
        "read_timeout": 5,
        "connect_timeout": 10,
        "retries": {"mode": "standard"},
    }
