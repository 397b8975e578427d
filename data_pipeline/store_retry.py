"""Retries for object-store calls: transient errors retried with backoff, permanent ones named.

Transient errors (5xx, throttling, dropped connections, timeouts) are retried with exponential
backoff and full jitter, each retry a warning on the "kiln.storage" logger; permanent ones (no
bucket, no permission, rejected credentials) raise `StorageError` at once, naming the URL and what to
do. Code that opens s3 files itself (torch DCP's FsspecWriter) still gets botocore's and s3fs's own
retries, which `data_pipeline/s3_clients.py` makes patient and visible.

An endpoint that cannot be reached at all (its host does not resolve, or nothing listens on its port)
is a setting to fix, not a hiccup: botocore is told not to retry it and it raises StorageError at once.
Credentials written into a URL are never repeated in a message.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from data_pipeline.redaction import REDACTED, URL_CREDENTIALS, redact_text

log = logging.getLogger("kiln.storage")
T = TypeVar("T")
P = ParamSpec("P")

RETRIES_ENV = "KILN_STORAGE_RETRIES"  # total attempts per operation, the first included
DEFAULT_ATTEMPTS = 8
RETRY_BASE_S = 0.2  # full jitter: attempt n waits uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**(n-1)))
RETRY_CAP_S = 10.0

# S3 error codes retrying will not fix, and what the user should do about each.
_CREDENTIALS = (
    "the store rejected the credentials ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile"
)
_DENIED = "access denied ({code}); give these credentials access to bucket '{bucket}' or fix storage.root"
_PERMANENT = {
    "NoSuchBucket": "bucket '{bucket}' does not exist; create it or fix storage.root",
    "InvalidBucketName": "'{bucket}' is not a valid bucket name; fix storage.root",
    "AccessDenied": _DENIED,
    "AllAccessDisabled": _DENIED,
    "AccountProblem": "the account behind these credentials cannot use the store ({code}); check it with the provider",
    "InvalidAccessKeyId": _CREDENTIALS,
    "SignatureDoesNotMatch": _CREDENTIALS,
    "ExpiredToken": _CREDENTIALS,
    "InvalidToken": _CREDENTIALS,
    "TokenRefreshRequired": _CREDENTIALS,
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")
_IN_URL = (
    "credentials must not be written into the URL; put them in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "or an AWS profile and give s3://bucket/path"
)
_UNREACHABLE = (
    "cannot reach the object store at {endpoint} ({reason}); check AWS_ENDPOINT_URL (or the "
    "endpoint_url in the fsspec s3 config) and that the store is running"
)
# Answers that stay the same however often asked (s3fs raises these for 404s and 403s too).
_DEFINITE = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Codes that mean "try again": throttling, server trouble, and bodies damaged in transit.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "OperationAborted",
    "XAmzContentSHA256Mismatch",
    "BadDigest",
    "IncompleteBody",
    "500",
    "502",
    "503",
    "504",
}


class StorageError(OSError):
    """A storage failure not worth retrying again; the message names the URL and what to do."""


def _transient_types() -> tuple[type, ...]:
    """Exception classes (from whichever of botocore/aiohttp is installed) that a retry may cure."""
    found: list[type] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:
        from botocore import exceptions as boto
        from botocore.parsers import ResponseParserError

        # ResponseParserError: throttling replies sometimes come as broken XML (s3fs issue 484)
        found += [
            boto.HTTPClientError,
            boto.ConnectionError,
            boto.IncompleteReadError,
            ResponseParserError,
            getattr(boto, "FlexibleChecksumError", boto.IncompleteReadError),
        ]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    except ImportError:
        pass
    return tuple(found)


_TRANSIENT_TYPES = _transient_types()


def retry_attempts() -> int:
    """Attempts per storage operation: $KILN_STORAGE_RETRIES, else 8."""
    raw = os.environ.get(RETRIES_ENV, "").strip()
    if not raw:
        return DEFAULT_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{RETRIES_ENV} must be a whole number of attempts >= 1, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class GiveUp:
    """The end of retrying: raise error from cause, or re-raise the caught exception when error is None."""

    error: StorageError | None = None
    cause: BaseException | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often a store call is tried and how long to wait between tries: decisions only, no clock."""

    attempts: int = DEFAULT_ATTEMPTS
    base_s: float = RETRY_BASE_S
    cap_s: float = RETRY_CAP_S

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """$KILN_STORAGE_RETRIES attempts with the module's backoff settings (read now, so tests can set them)."""
        return cls(retry_attempts(), RETRY_BASE_S, RETRY_CAP_S)

    def max_delay(self, attempt: int) -> float:
        """The longest wait after failed attempt n (from 1): base_s doubling per attempt, at most cap_s."""
        return min(self.cap_s, self.base_s * 2 ** (attempt - 1))

    def delay(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """The wait after failed attempt n: full jitter, uniform(0, max_delay(n))."""
        return uniform(0, self.max_delay(attempt))

    def after_failure(self, operation: str, url: str, exc: BaseException, attempt: int) -> GiveUp | None:
        """None to try again after failed attempt n (from 1), or how to give up: permanent, unknown, or out of tries."""
        if isinstance(exc, StorageError):
            return GiveUp()  # already classified (and retried) by an inner retrying()
        permanent = _permanent(url, exc)
        if permanent is not None:
            # the cause's text may repeat credentials written into the URL: then it goes
            return GiveUp(permanent, None if _leaks(url, exc) else exc)
        if not _transient(exc):
            if _leaks(url, exc):
                return GiveUp(StorageError(f"{redact_text(url)}: {operation} failed: {_describe(exc, url)}"))
            return GiveUp()
        if attempt >= self.attempts:
            return GiveUp(
                StorageError(
                    f"{redact_text(url)}: {operation} failed {self.attempts} times, last with "
                    f"{_describe(exc, url)}; the store is down or overloaded (more tries: "
                    f"{RETRIES_ENV})"
                ),
                exc,
            )
        return None


# Where retrying() waits and draws its jitter: module attributes looked up at each retry, so a test
# swaps in fakes (monkeypatch) that record the waits instead of sleeping through them.
sleep: Callable[[float], None] = time.sleep
uniform: Callable[[float, float], float] = random.uniform


def retrying(operation: str, url: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs), retried on transient store errors; permanent ones raise StorageError."""
    policy = RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            end = policy.after_failure(operation, url, exc, attempt)
            if end is not None:
                if end.error is None:
                    raise
                raise end.error from end.cause
            delay = policy.delay(attempt, uniform)
            log.warning(
                "retrying %s %s after %s (attempt %d/%d, waiting %.2fs)",
                operation,
                redact_text(url),
                _describe(exc, url),
                attempt + 1,
                policy.attempts,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")


def exception_chain(exc: BaseException | None) -> Iterable[BaseException]:
    """exc and the exceptions it was raised from (s3fs hides the botocore error as the cause)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _code(exc: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of a botocore ClientError, else (None, None)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _bucket(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]


def _userinfo(url: str) -> str | None:
    """The 'key:secret' written into url, if any (botocore repeats it without the scheme)."""
    found = URL_CREDENTIALS.match(url)
    return found.group(0)[len(found.group("scheme")) : -1] if found else None


def _redact(text: str, url: str) -> str:
    """text with secrets, URL credentials and url's own userinfo (even scheme-less) replaced."""
    userinfo = _userinfo(url)
    if userinfo:
        text = text.replace(userinfo, REDACTED)
    return redact_text(text)


def _leaks(url: str, exc: BaseException) -> bool:
    """Whether exc's text would repeat the credentials written into url."""
    userinfo = _userinfo(url)
    if not userinfo:
        return False
    return any(userinfo in str(error) for error in exception_chain(exc))


def unreachable(exc: BaseException, host: str | None = None) -> str | None:
    """'connection refused' or "host '...' does not resolve" if exc (or its cause) says so, else None."""
    for error in exception_chain(exc):
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            # EAI_AGAIN (no DNS answer) too: retrying a name lookup for minutes helps nobody
            name = f"host '{host}'" if host else "the host name"
            return (
                f"{name} could not be resolved: no DNS answer"
                if error.errno == socket.EAI_AGAIN
                else f"{name} does not resolve"
            )
        nested = getattr(error, "kwargs", None)  # botocore keeps the aiohttp/urllib3 error here, not as cause
        if isinstance(nested, dict) and isinstance(nested.get("error"), BaseException):
            found = unreachable(nested["error"], host)
            if found:
                return found
    return None


def _endpoint(exc: BaseException) -> str | None:
    """scheme://host:port that exc failed to connect to (botocore names the request URL)."""
    for error in exception_chain(exc):
        kwargs = getattr(error, "kwargs", None)
        url = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
        if isinstance(url, str) and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://{rest.split('/', 1)[0]}"
    return None


def no_such_bucket(url: str) -> StorageError:
    """The error for a URL whose bucket does not exist."""
    return StorageError(f"{redact_text(url)}: " + _PERMANENT["NoSuchBucket"].format(bucket=_bucket(url)))


def _permanent(url: str, exc: BaseException) -> StorageError | None:
    """A StorageError saying what to do, if exc (or its cause) is one retrying cannot fix."""
    where = redact_text(url)
    for error in exception_chain(exc):
        code, _ = _code(error)
        if code in _PERMANENT:
            return StorageError(f"{where}: " + _PERMANENT[code].format(bucket=_bucket(url), code=code))
        if type(error).__name__ in _NO_CREDENTIALS:
            return StorageError(
                f"{where}: no storage credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if type(error).__name__ == "ParamValidationError":  # botocore refused the request before sending it
            if _userinfo(url):
                return StorageError(f"{where}: {_IN_URL}")
            first = _redact(str(error), url).replace("Parameter validation failed:", "").strip().splitlines()
            return StorageError(
                f"{where}: the request was refused before reaching the store "
                f"({first[0][:200] if first else 'invalid parameters'}); fix the URL"
            )
    endpoint = _endpoint(exc)
    reason = unreachable(exc, endpoint.split("://", 1)[1].rsplit(":", 1)[0] if endpoint else None)
    if reason:
        return StorageError(
            f"{where}: " + _UNREACHABLE.format(endpoint=_redact(endpoint or "its endpoint", url), reason=reason)
        )
    return None


def _transient(exc: BaseException) -> bool:
    """Whether exc (or its cause) is a store hiccup that the same call may get past next time."""
    for error in exception_chain(exc):
        if isinstance(error, _DEFINITE):
            return False
        code, status = _code(error)
        if code is not None or status is not None:  # the store answered: its code decides
            return code in _TRANSIENT_CODES or (status or 0) >= 500 or status == 429
        if "CERTIFICATE_VERIFY_FAILED" in str(error):  # an SSL setup problem, not a hiccup
            return False
        if isinstance(error, _TRANSIENT_TYPES):
            return True
    return False


def _describe(exc: BaseException, url: str = "") -> str:
    """'SlowDown 503' for a store's answer, else 'ConnectionClosedError: ...', credentials redacted."""
    for error in exception_chain(exc):
        code, status = _code(error)
        if code is not None:
            return f"{code} {status}" if status and str(status) != code else code
    return _redact(f"{type(exc).__name__}: {exc}", url).replace("\n", " ")[:300]
