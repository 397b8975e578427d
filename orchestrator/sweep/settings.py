"""`sweep.*`: how a sweep searches, prunes and runs its trials; typed and checked before anything starts."""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import UsageError
from trainers.config import RUN_ID_PATTERN

SEARCHES = ("grid", "random", "optuna")
EARLY_STOPS = ("none", "asha")
MODES = ("min", "max")
# A trial's run id is `<sweep_id>-<n>`, and a run id has at most 64 characters.
MAX_SWEEP_ID = 56
SWEEP_KEY = re.compile(r"^\+*sweep\.")


@dataclass
class SweepConfig:
    """What `sweep.*` overrides set; None means "not given" so that an ignored setting can be named."""

    id: str | None = None
    search: str = "grid"
    num_trials: int | None = None  # random and optuna: how many trials in all
    metric: str = "val/loss"
    mode: str = "min"
    early_stop: str = "none"
    grace_period: int | None = None  # asha: training steps every trial gets (default: train.eval_every)
    reduction_factor: int | None = None  # asha: keep the best 1/N at each rung (default 2)
    max_concurrent: int | None = None  # default: as many trials as the cluster's resources fit
    seed: int | None = None  # random and optuna: the sampler's seed (default 0)
    # Restarts of a trial whose actor died (its process crashed, its node was lost); the restarted trial
    # continues its run from the last committed checkpoint. A run that fails on its own (NaN, bad data) ends
    # its trial FAILED and is never restarted here: worker loss inside a run is cluster.max_failures'.
    trial_restarts: int = 2

    def check(self) -> None:
        """UsageError naming the first bad or ignored setting."""
        for name, value, allowed in (
            ("search", self.search, SEARCHES),
            ("early_stop", self.early_stop, EARLY_STOPS),
            ("mode", self.mode, MODES),
        ):
            if value not in allowed:
                raise UsageError(f"sweep.{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.id is not None and not (RUN_ID_PATTERN.fullmatch(self.id) and len(self.id) <= MAX_SWEEP_ID):
            raise UsageError(
                f"sweep.id must be 1-{MAX_SWEEP_ID} letters, digits, '.', '_' or '-' (starting with a letter or "
                f"digit; trials are named <sweep.id>-<n>); got {self.id!r}"
            )
        if self.search == "grid":
            for name in ("num_trials", "seed"):
                if getattr(self, name) is not None:
                    raise UsageError(
                        f"sweep.{name} is ignored by sweep.search=grid (a grid runs every point once); "
                        "remove it, or set sweep.search=random or optuna"
                    )
        elif self.num_trials is None:
            raise UsageError(f"sweep.search={self.search} needs sweep.num_trials=N: how many trials to run in all")
        if self.early_stop != "asha":
            for name in ("grace_period", "reduction_factor"):
                if getattr(self, name) is not None:
                    raise UsageError(f"sweep.{name} is a setting of ASHA, ignored unless sweep.early_stop=asha")
        for name in ("num_trials", "grace_period", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"sweep.{name} must be >= 1, got {value}")
        if self.trial_restarts < -1:
            raise UsageError(f"sweep.trial_restarts must be >= -1 (-1: unlimited), got {self.trial_restarts}")
        if self.reduction_factor is not None and self.reduction_factor < 2:
            raise UsageError(f"sweep.reduction_factor must be >= 2, got {self.reduction_factor}")
        if not self.metric:
            raise UsageError("sweep.metric must name a metric of metrics.jsonl, e.g. val/loss")

    def as_dict(self) -> dict:
        """The settings as plain data (sweep.json)."""
        return asdict(self)


def sweep_keys() -> list[str]:
    """Every `sweep.*` key, for --list-keys."""
    return [f"sweep.{f.name}" for f in fields(SweepConfig)]


def is_sweep_setting(override: str) -> bool:
    """Whether an override sets `sweep.*` (a setting of the sweep, not of its trials)."""
    return bool(SWEEP_KEY.match(override))


def parse_settings(pairs: list[tuple[str, object]]) -> SweepConfig:
    """The SweepConfig that `sweep.*` settings (key, value as Hydra parsed it) give; UsageError naming a bad one.

    A value may be anything Hydra parses (a list, null, ...): OmegaConf checks it against the setting's type.
    """
    settings = OmegaConf.structured(SweepConfig)
    for key, value in pairs:
        name = key.removeprefix("sweep.")
        if name not in {f.name for f in fields(SweepConfig)}:
            hint = difflib.get_close_matches(key, sweep_keys(), n=1)
            suggestion = f"did you mean {hint[0]}? " if hint else ""
            raise UsageError(f"unknown sweep setting '{key}'; {suggestion}known: {', '.join(sweep_keys())}")
        try:
            setattr(settings, name, value)
        except OmegaConfBaseException as exc:
            raise UsageError(f"{key}: {str(exc).splitlines()[0]}") from None
    config = OmegaConf.to_object(settings)
    assert isinstance(config, SweepConfig)
    config.check()
    return config
