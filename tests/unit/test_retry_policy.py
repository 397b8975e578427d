"""When a store call is retried and how long it waits: the policy's decisions, and retrying() driven by a
fake sleep that records the waits. No server, no sleeping, no wall clock."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from data_pipeline import storage, store_retry
from data_pipeline.store_retry import GiveUp, RetryPolicy, StorageError
from tests.helpers import client_error, failing


def test_backoff_doubles_from_the_base_up_to_the_cap():
    policy = RetryPolicy(attempts=10, base_s=0.2, cap_s=10.0)
    assert [policy.max_delay(n) for n in range(1, 10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]


def test_full_jitter_draws_between_zero_and_the_backoff():
    policy = RetryPolicy(attempts=5, base_s=1.0, cap_s=3.0)
    drawn = []
    assert policy.delay(3, lambda low, high: drawn.append((low, high)) or 0.5) == 0.5
    assert drawn == [(0, 3.0)]


def test_the_policy_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(store_retry.RETRIES_ENV, "3")
    assert RetryPolicy.from_env() == RetryPolicy(3, store_retry.RETRY_BASE_S, store_retry.RETRY_CAP_S)
    monkeypatch.delenv(store_retry.RETRIES_ENV)
    assert RetryPolicy.from_env().attempts == store_retry.DEFAULT_ATTEMPTS
    monkeypatch.setenv(store_retry.RETRIES_ENV, "0")
    with pytest.raises(ValueError, match=store_retry.RETRIES_ENV):
        RetryPolicy.from_env()


@pytest.mark.parametrize(
    "error", [client_error("SlowDown", 503), client_error("InternalError", 500), ConnectionResetError("reset")]
)
def test_transient_errors_are_retried_until_the_last_attempt(error):
    policy = RetryPolicy(attempts=3)
    assert policy.after_failure("read", "s3://b/k", error, 1) is None
    assert policy.after_failure("read", "s3://b/k", error, 2) is None
    end = policy.after_failure("read", "s3://b/k", error, 3)
    assert isinstance(end.error, StorageError) and end.cause is error
    assert str(end.error).startswith("s3://b/k: read failed 3 times, last with ")


def test_permanent_errors_give_up_at_once_with_what_to_do():
    end = RetryPolicy().after_failure("write", "s3://b/k", client_error("NoSuchBucket", 404), 1)
    assert str(end.error) == "s3://b/k: bucket 'b' does not exist; create it or fix storage.root"
    refused = RetryPolicy().after_failure("write", "s3://b/k", ConnectionRefusedError(), 1)
    assert "cannot reach the object store" in str(refused.error)


def test_errors_nobody_classified_are_re_raised_as_they_are():
    policy = RetryPolicy()
    assert policy.after_failure("read", "s3://b/k", FileNotFoundError("b/k"), 1) == GiveUp()
    assert policy.after_failure("read", "s3://b/k", client_error("InvalidRange", 416), 1) == GiveUp()
    assert policy.after_failure("read", "s3://b/k", StorageError("inner retrying gave up"), 1) == GiveUp()


def test_an_error_repeating_url_credentials_is_replaced_without_its_cause():
    url = "s3://AKIA:sup3r-secret-value@b/k"
    end = RetryPolicy().after_failure("read", url, ValueError(f"bad {url}"), 1)
    assert end.cause is None and "sup3r-secret-value" not in str(end.error)


def test_retrying_waits_the_backoff_between_tries_and_not_after_the_last(waits):
    fn = failing(client_error("SlowDown", 503), ConnectionResetError("reset"))
    assert storage.retrying("write", "s3://b/k", fn) == "done" and fn.calls == 3
    assert waits == [store_retry.RETRY_BASE_S, store_retry.RETRY_BASE_S * 2]

    waits.clear()
    fn = failing(*[client_error("SlowDown", 503)] * 20)
    with pytest.raises(StorageError, match=r"^s3://b/k: read failed 8 times, last with SlowDown 503"):
        storage.retrying("read", "s3://b/k", fn)
    assert fn.calls == 8 and len(waits) == 7  # no wait after the last try
    assert waits == [RetryPolicy().max_delay(n) for n in range(1, 8)]


def test_retrying_never_waits_on_a_permanent_error(waits):
    fn = failing(client_error("NoSuchBucket", 404))
    with pytest.raises(StorageError, match="bucket 'b' does not exist") as raised:
        storage.retrying("read", "s3://b/k", fn)
    assert fn.calls == 1 and waits == []
    assert isinstance(raised.value.__cause__, ClientError)


def test_retrying_re_raises_unclassified_errors_unchanged(waits):
    error = FileNotFoundError("b/k")
    with pytest.raises(FileNotFoundError) as raised:
        storage.retrying("read", "s3://b/k", failing(error))
    assert raised.value is error and waits == []


def test_nested_retrying_does_not_retry_what_the_inner_one_gave_up_on(waits, monkeypatch):
    monkeypatch.setenv(store_retry.RETRIES_ENV, "2")
    inner = failing(*[client_error("SlowDown", 503)] * 5)
    with pytest.raises(StorageError, match="failed 2 times"):
        storage.retrying("read", "s3://b/outer", storage.retrying, "read", "s3://b/inner", inner)
    assert inner.calls == 2 and len(waits) == 1
