"""Hydra's sweep grammar -> the points a sweep trains, every one composed and validated up front.

Hydra's own override parser reads the command line (comma lists, `range`, `choice`, `interval`, `glob`,
`tag(log, ...)`); this module only decides what each parsed sweep means for grid, random and Optuna.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.config import KilnConfig, UsageError, compose_config
from orchestrator.sweep.settings import SweepConfig, is_sweep_setting, parse_settings

if TYPE_CHECKING:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override
    from optuna.distributions import BaseDistribution

# Keys a sweep sets on each trial itself.
TRIAL_OWNED = {"run.id": "a sweep names its trials <sweep.id>-<n>: set sweep.id=NAME instead"}
LOG_TAG = "log"
ASHA_SCALE = ("train.max_steps", "train.eval_every")  # what sets ASHA's max_t and its default grace period
# One value of a swept key: a listed value (as typed), a draw from an interval, or an Optuna suggestion.
ParamValue = int | float | str | bool


@dataclass(frozen=True)
class Dimension:
    """One swept key: a list of values, or an interval (random and Optuna only)."""

    key: str  # as typed, with any +/++ prefix and @package
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False  # an interval over an int setting draws ints
    typed: str = ""  # the override as the user typed it

    @property
    def is_interval(self) -> bool:
        return self.low is not None

    def assign(self, value: ParamValue) -> str:
        """The override that gives this key one value."""
        return f"{self.key}={format_value(value, self.integer)}"

    def draw(self, rng: random.Random) -> str:
        """A random value (for sweep.search=random)."""
        if not self.is_interval:
            return self.assign(rng.choice(self.values))
        low, high = float(self.low or 0), float(self.high or 0)
        if self.integer:
            # Each int equally likely (as Optuna's IntDistribution draws them); log: uniform in log(int).
            if not self.log:
                return self.assign(rng.randint(int(low), int(high)))
            value = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
            return self.assign(min(int(high), math.floor(value)))
        if self.log:
            return self.assign(math.exp(rng.uniform(math.log(low), math.log(high))))
        return self.assign(rng.uniform(low, high))

    def probes(self) -> list[str]:
        """The values validated up front: every listed value, an interval's two ends."""
        if self.low is not None and self.high is not None:  # an interval (interval_dimension sets both ends)
            return [self.assign(self.low), self.assign(self.high)]
        return [self.assign(v) for v in self.values]


def format_value(value: ParamValue, integer: bool = False) -> str:
    """A value as an override writes it (floats with 6 significant digits: what the trial really used)."""
    if integer:
        return str(round(float(value)))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class SweepSpace:
    """What a sweep trains: overrides every trial gets, the swept dimensions, and the sweep's settings."""

    fixed: list[str]
    dimensions: list[Dimension]
    settings: SweepConfig
    typed: list[str] = field(default_factory=list)  # the whole command line as given

    def grid(self) -> list[list[str]]:
        """Every combination, in Hydra's order (the last key varies fastest)."""
        intervals = [d.typed for d in self.dimensions if d.is_interval]
        if intervals:
            raise UsageError(
                f"{intervals[0]}: an interval has no grid points; set sweep.search=random or optuna "
                "(with sweep.num_trials=N), or list the values (a,b,c)"
            )
        return [list(point) for point in itertools.product(*[d.probes() for d in self.dimensions])]

    def draws(self, count: int, seed: int) -> list[list[str]]:
        """count random points (sweep.search=random), the same ones for the same seed."""
        rng = random.Random(seed)
        return [[d.draw(rng) for d in self.dimensions] for _ in range(count)]

    def probe_points(self) -> list[list[str]]:
        """Points that put every value (an interval's ends) of every key in front of the validation once."""
        first = [d.probes()[0] for d in self.dimensions]
        points = [first]
        for i, dimension in enumerate(self.dimensions):
            for probe in dimension.probes()[1:]:
                points.append([*first[:i], probe, *first[i + 1 :]])
        return points

    def optuna_space(self) -> dict[str, BaseDistribution]:
        """Optuna distributions keyed by the swept key, for Ray Tune's OptunaSearch."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        space: dict[str, BaseDistribution] = {}
        for d in self.dimensions:
            if not d.is_interval:
                space[d.key] = CategoricalDistribution(list(d.values))
            elif d.integer:
                space[d.key] = IntDistribution(int(d.low or 0), int(d.high or 0), log=d.log)
            else:
                space[d.key] = FloatDistribution(float(d.low or 0), float(d.high or 0), log=d.log)
        return space

    def point_from(self, params: dict[str, ParamValue]) -> list[str]:
        """The overrides of one Optuna suggestion, in the order the keys were given."""
        return [d.assign(params[d.key]) for d in self.dimensions]


def parse_space(overrides: list[str]) -> SweepSpace:
    """Split a sweep's command line into sweep settings, fixed overrides and swept dimensions (Hydra's parser)."""
    fixed, dimensions, settings = parse_overrides(overrides)
    check_swept_once(dimensions)
    fixed = without_swept_keys(fixed, dimensions, overrides)
    if not dimensions:
        raise UsageError(
            "nothing to sweep: give a key several values, e.g. optim.lr=1e-4,3e-4, range(1,4), choice(a,b), "
            "interval(1e-5,1e-3) or glob(zero*)"
        )
    return SweepSpace(fixed, dimensions, parse_settings(settings), typed=list(overrides))


def parse_overrides(overrides: list[str]) -> tuple[list[str], list[Dimension], list[tuple[str, object]]]:
    """Each override read by Hydra's parser, in order: (fixed overrides, swept dimensions, sweep.* settings)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from orchestrator.config import CONF_DIR, explain_composition_error

    fixed: list[str] = []
    dimensions: list[Dimension] = []
    settings: list[tuple[str, object]] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="kiln-sweep"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        for typed in overrides:
            try:
                parsed = parse_one(parser, typed)
                if is_sweep_setting(typed):
                    settings.append((parsed.key_or_group, parsed.value()))
                elif parsed.is_sweep_override():
                    dimensions.append(swept_dimension(parsed, typed))
                else:
                    fixed.append(typed)
            except HydraException as exc:
                raise UsageError(explain_composition_error(exc, [typed])) from None
    return fixed, dimensions, settings


def parse_one(parser: OverridesParser, typed: str) -> Override:
    """One override as Hydra parses it; UsageError for a sweep of a sweep.* setting or for a key a sweep sets."""
    (parsed,) = parser.parse_overrides([typed])
    if is_sweep_setting(typed):
        if parsed.is_sweep_override():
            raise UsageError(f"{typed}: sweep.* settings describe the sweep and cannot be swept")
        return parsed
    owned = TRIAL_OWNED.get(parsed.key_or_group)
    if owned:
        raise UsageError(f"{typed}: {owned}")
    return parsed


def swept_dimension(parsed: Override, typed: str) -> Dimension:
    """The dimension of a sweep override; UsageError for one that gives no value to try."""
    from hydra.core.override_parser.types import IntervalSweep

    value = parsed.value()
    key = parsed.get_key_element()
    if isinstance(value, IntervalSweep):
        if value.start is None or value.end is None:
            raise UsageError(f"{typed}: an interval needs both ends, e.g. interval(1e-5,1e-3)")
        return interval_dimension(key, value.start, value.end, LOG_TAG in value.tags, typed)
    values = tuple(parsed.sweep_string_iterator())
    if not values:
        raise UsageError(f"{typed}: this sweep has no values (a glob that matches no option?)")
    return Dimension(key, values=values, typed=typed)


def check_swept_once(dimensions: list[Dimension]) -> None:
    """UsageError if a key is swept twice."""
    keys = [d.key.lstrip("+") for d in dimensions]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UsageError(f"{twice[0]} is swept twice; give each key one sweep")


def without_swept_keys(fixed: list[str], dimensions: list[Dimension], overrides: list[str]) -> list[str]:
    """The fixed overrides less those of a swept key; UsageError for one typed after its key's sweep.

    As in Hydra, the later override of a key wins: a value typed before the key's sweep is replaced by
    it; one typed after would replace every point of the sweep, which is surely a mistake.
    """
    order = {typed: i for i, typed in enumerate(overrides)}
    swept_at = {d.key.lstrip("+"): order[d.typed] for d in dimensions}
    kept = []
    for typed in fixed:
        key = typed.lstrip("+~").partition("=")[0]
        if key in swept_at and order[typed] > swept_at[key]:
            raise UsageError(f"{typed} comes after the sweep of {key} and would replace every point of it; remove one")
        if key not in swept_at:
            kept.append(typed)
    return kept


def interval_dimension(key: str, low: float, high: float, log: bool, typed: str) -> Dimension:
    """An interval's dimension; UsageError for one no search can draw from. Over an int setting it draws ints."""
    if not low < high:
        raise UsageError(f"{typed}: an interval needs its low end below its high end")
    if log and low <= 0:
        raise UsageError(f"{typed}: a log interval needs a low end above 0")
    integer = schema_type(key.lstrip("+").split("@")[0]) is int
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise UsageError(f"{typed}: {key.lstrip('+')} is an int setting; give the interval whole-number ends")
    return Dimension(key, low=low, high=high, log=log, integer=integer, typed=typed)


def schema_type(key: str) -> object:
    """The type the config schema gives a dotted key (int, float, str | None, ...), None if it names no typed field."""
    node: object = KilnConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


@dataclass
class SweepPlan:
    """A validated sweep: its space, and its points (every one for grid and random; none yet for Optuna)."""

    space: SweepSpace
    points: list[list[str]]
    base: KilnConfig  # the config of the first point: batch math, steps, what a trial needs

    @property
    def settings(self) -> SweepConfig:
        return self.space.settings


def plan_sweep(overrides: list[str], compose: Callable[[list[str]], KilnConfig] = compose_config) -> SweepPlan:
    """Parse, expand and validate a sweep; UsageError naming the first bad point before anything runs.

    Grid and random points are the trials, each composed as it will run; Optuna's points are not known
    yet, so every value of every key (an interval's ends) is composed once instead.
    """
    space = parse_space(overrides)
    settings = space.settings
    scheduled = [d.typed for d in space.dimensions if d.key.lstrip("+") in ASHA_SCALE]
    if settings.early_stop == "asha" and scheduled:
        raise UsageError(
            f"{scheduled[0]}: ASHA measures every trial in the same training steps, so with sweep.early_stop=asha "
            "train.max_steps and train.eval_every cannot be swept"
        )
    if settings.search == "optuna":
        probes = space.probe_points()
        configs = [compose_point(compose, space.fixed, point, "value") for point in probes]
        return SweepPlan(space, [], configs[0])
    points = space.grid() if settings.search == "grid" else space.draws(settings.num_trials or 0, settings.seed or 0)
    configs = [compose_point(compose, space.fixed, point, f"point {n}") for n, point in enumerate(points, 1)]
    return SweepPlan(space, points, configs[0])


def compose_point(
    compose: Callable[[list[str]], KilnConfig], fixed: list[str], point: list[str], label: str
) -> KilnConfig:
    """One point's config, or UsageError naming the point and what is wrong with it."""
    try:
        return compose(fixed + point)
    except UsageError as exc:
        raise UsageError(f"{label} ({' '.join(point)}): {exc}; nothing was started") from None
