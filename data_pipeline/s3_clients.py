"""How every s3fs/botocore client in a Kiln process is set up, ours or a library's (torch DCP's writer).

Patient retries and timeouts (botocore's standard mode, more attempts), no listing cache (other
processes write the same folders), their DEBUG retry notices repeated as `kiln.storage` warnings,
and no retries at all against an endpoint that cannot be reached. `configure_object_stores` applies
all of it once, when `data_pipeline.storage` is imported.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import fsspec

from data_pipeline.redaction import redact_text
from data_pipeline.store_retry import log, unreachable

BOTOCORE_ATTEMPTS = 5  # per HTTP request (standard mode's own default is 3), under s3fs's 5 tries per call
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60  # s3fs's 15 s default is short for a 50 MB part on a busy link


def _configure_s3() -> None:
    """Default every s3fs filesystem, ours or a library's, to patient botocore retries and timeouts.

    Only fills in what nobody set: fsspec config (conf files, FSSPEC_S3_* env) and AWS settings
    (AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, the profile's retry_mode / max_attempts) win. Not s3fs's own
    `retries`: S3FileSystem forwards unknown options to AioSession, which rejects it (TypeError).
    """
    conf = fsspec.config.conf.setdefault("s3", {})
    # Several processes write a run's folder (every rank, Ray's controller, the driver): a cached
    # listing would hide their files (new events, another rank's shards) from this process.
    conf.setdefault("use_listings_cache", False)
    config_kwargs = dict(conf.get("config_kwargs") or {})
    config_kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config_kwargs.setdefault("read_timeout", READ_TIMEOUT_S)
    retries = dict(config_kwargs.get("retries") or {})
    user = _aws_retry_settings()
    if "mode" not in retries and "retry_mode" not in user:
        # legacy (the default) retries the same errors, but its backoff has no cap and no retry quota:
        # standard (AWS's recommendation) stops hammering a store that keeps failing
        retries["mode"] = "standard"
    if not {"max_attempts", "total_max_attempts"} & retries.keys() and "max_attempts" not in user:
        retries["total_max_attempts"] = BOTOCORE_ATTEMPTS
    if retries:
        config_kwargs["retries"] = retries
    conf["config_kwargs"] = config_kwargs


def _aws_retry_settings() -> set[str]:
    """Which of retry_mode / max_attempts the user set for botocore (env or AWS profile)."""
    names = {
        name
        for env, name in (("AWS_RETRY_MODE", "retry_mode"), ("AWS_MAX_ATTEMPTS", "max_attempts"))
        if os.environ.get(env)
    }
    try:
        import botocore.session
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return names
    try:
        names |= {"retry_mode", "max_attempts"} & botocore.session.Session().get_scoped_config().keys()
    except BotoCoreError as exc:  # a broken profile: botocore says so itself when it is used
        log.debug("not reading AWS retry settings from the profile: %s", exc)
    return names


# The DEBUG lines in which botocore and s3fs announce a retry (their message templates), by library.
_RETRY_NOTICES = {
    "Retry needed, retrying request after delay of: %s": "botocore",  # standard/adaptive mode
    "Retry needed, action of: %s": "botocore",  # legacy mode
    "Retryable error: %s": "s3fs",
    "Client error (maybe retryable): %s": "s3fs",
}
_S3FS_RETRIED = ("SlowDown", "reduce your request rate", "XAmzContentSHA256Mismatch")  # s3fs's own list


class _RetryLogBridge(logging.Filter):
    """Repeats s3fs's and botocore's DEBUG retry notices as kiln.storage warnings.

    Their loggers are lowered to DEBUG so the notices exist at all; this filter then drops every
    other record below the level the logger had before, so nothing else gets louder.
    """

    kiln_retry_bridge = True

    def __init__(self, logger: logging.Logger, lowered: bool):
        super().__init__()
        self.logger, self.lowered = logger, lowered

    def filter(self, record: logging.LogRecord) -> bool:
        source = _RETRY_NOTICES.get(record.msg) if isinstance(record.msg, str) else None
        # positional arguments only: logging turns a lone dict argument into a mapping (never the case here)
        args: tuple[Any, ...] = record.args if isinstance(record.args, tuple) else ()
        if source == "botocore" and getattr(_VETOED, "retry", False):
            pass  # botocore's handler still announces the retry that _no_retry_when_unreachable called off
        elif source == "botocore":
            log.warning(
                "retrying an S3 request after a transient error (botocore, waiting %.2fs)",
                float(args[0]) if args else 0.0,
            )
        elif source == "s3fs":
            error = str(args[0]) if args else ""
            if record.msg.startswith("Retryable") or any(p in error for p in _S3FS_RETRIED):
                # s3fs logs this on its last try too, before giving up: hence not "retrying"
                log.warning(
                    "transient error in an S3 call, s3fs tries again unless out of tries: %s", redact_text(error)[:300]
                )
        if not self.lowered or self.logger.parent is None:
            return True
        return record.levelno >= self.logger.parent.getEffectiveLevel()


def _bridge_retry_logs() -> None:
    """Install _RetryLogBridge on the loggers where botocore and s3fs announce retries (once)."""
    for name in ("botocore.retries.standard", "botocore.retryhandler", "s3fs"):
        logger = logging.getLogger(name)
        if any(getattr(f, "kiln_retry_bridge", False) for f in logger.filters):
            continue
        # a level someone set (S3FS_LOGGING_LEVEL makes s3fs set one when imported) is theirs to keep
        lowered = logger.level == logging.NOTSET and not (name == "s3fs" and os.environ.get("S3FS_LOGGING_LEVEL"))
        if lowered:
            logger.setLevel(logging.DEBUG)
        logger.addFilter(_RetryLogBridge(logger, lowered))


_VETOED = threading.local()  # set by the needs-retry handler, read by the log bridge right after it


def _no_retry_when_unreachable(caught_exception: BaseException | None = None, **_: Any) -> bool | None:
    """botocore needs-retry handler: False (retry nothing) when the endpoint cannot be reached at all.

    Without it, botocore spends up to 5 backed-off attempts on every call to a host that does not
    exist or a port where nothing listens. None leaves the decision to botocore's own handler.
    """
    _VETOED.retry = caught_exception is not None and unreachable(caught_exception) is not None
    return False if _VETOED.retry else None


def _stop_retrying_unreachable_endpoints() -> None:
    """Register _no_retry_when_unreachable first on every botocore session created from now on (once)."""
    try:
        from botocore import handlers
    except ImportError:
        return
    spec = ("needs-retry.s3.*", _no_retry_when_unreachable, handlers.REGISTER_FIRST)
    if not any(entry[1] is _no_retry_when_unreachable for entry in handlers.BUILTIN_HANDLERS):
        handlers.BUILTIN_HANDLERS.append(spec)


def configure_object_stores() -> None:
    """Patient, visible retries and no listing cache for every s3fs client in this process (idempotent)."""
    _configure_s3()
    _bridge_retry_logs()
    _stop_retrying_unreachable_endpoints()
