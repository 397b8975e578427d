"""ConfigError and the checks every config section shares: require, one_of, the batch math, the run-id pattern."""

from __future__ import annotations

import re

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: `$` admits a trailing newline


class ConfigError(ValueError):
    """A config value a user must fix; the message names the field and says what is allowed."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Fail unless value is one of allowed, naming the field and the choices."""
    require(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_batch(global_batch: int, micro_batch: int, data_parallel: int, ranks: str = "cluster.num_workers") -> int:
    """Micro-batches each worker accumulates per optimizer step, or fail naming the mismatch.

    global_batch = micro_batch x gradient accumulation x data-parallel ranks; the one place it is checked.
    ranks: what the data-parallel count is, as the user sets it.
    """
    per_pass = micro_batch * data_parallel
    if global_batch % per_pass:
        lower = max(per_pass, global_batch - global_batch % per_pass)
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by train.micro_batch ({micro_batch}) x "
            f"{ranks} ({data_parallel}) = {per_pass}; use a multiple of {per_pass} "
            f"(e.g. {lower} or {lower + per_pass})"
        )
    return global_batch // per_pass
