"""The one redaction: credentials kept out of everything Kiln prints, logs or writes (configs, run files, W&B)."""

from __future__ import annotations

import logging
import os
import re
from typing import TypeVar, cast

REDACTED = "***REDACTED***"
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
SECRET_KEY = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)", re.I)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.I)

T = TypeVar("T")


def secret_values() -> list[str]:
    """Values of well-known secret environment variables that are set (long enough to be real)."""
    return [v for v in (os.environ.get(k, "") for k in SECRET_ENV_VARS) if len(v) >= 8]


def redact_text(text: str) -> str:
    """Text with secret env values and user:password@ URL credentials replaced."""
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact(obj: T) -> T:
    """A copy of nested dicts/lists with secret-named keys and secret values replaced (of obj's own type; a dict
    comes back a plain dict)."""
    if isinstance(obj, dict):
        return cast(
            T,
            {
                k: (REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "") else redact(v))
                for k, v in obj.items()
            },
        )
    if isinstance(obj, (list, tuple)):
        return cast(T, type(obj)(redact(v) for v in obj))
    if isinstance(obj, str):
        return cast(T, redact_text(obj))
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter that passes every log message through redact_text before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logging() -> None:
    """Install RedactingFilter on every handler of the root logger (call after configuring logging)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
