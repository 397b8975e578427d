"""`kiln sweep OVERRIDES`: what each piece of Hydra's sweep grammar trains, and every mistake named up front.

plan_sweep composes every point with the real conf/ (it takes a fraction of a second), so a point that
`kiln train` would refuse is refused here, before a sweep is recorded or a trial started.
"""

from __future__ import annotations

import collections
import random
import re

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from orchestrator.config import KilnConfig, UsageError, compose_config
from orchestrator.sweep.settings import MAX_SWEEP_ID, SweepConfig, is_sweep_setting, parse_settings, sweep_keys
from orchestrator.sweep.space import Dimension, SweepSpace, parse_space, plan_sweep

SHORT = "train.max_steps=4"  # every sweep here is a small one
NOTHING_STARTED = "; nothing was started"


def plan(*overrides: str, **kwargs):
    return plan_sweep([SHORT, *overrides], **kwargs)


def never_compose(overrides: list[str]) -> KilnConfig:
    raise AssertionError(f"a point was composed ({overrides}) although the sweep's settings are wrong")


def refused(*overrides: str) -> str:
    """The one-line message a sweep is refused with."""
    with pytest.raises(UsageError) as raised:
        plan(*overrides)
    return str(raised.value)


def numbers(points: list[list[str]], key: str) -> list[float]:
    """The values a key takes over the points, as numbers."""
    return [float(o.split("=", 1)[1]) for point in points for o in point if o.split("=", 1)[0] == key]


# ---- grid: every combination, in Hydra's order --------------------------------------------------------------


def test_a_grid_trains_every_combination_with_the_last_key_varying_fastest():
    swept = plan("optim.lr=0.1,0.2", "model.n_layer=1,2")
    assert swept.points == [
        ["optim.lr=0.1", "model.n_layer=1"],
        ["optim.lr=0.1", "model.n_layer=2"],
        ["optim.lr=0.2", "model.n_layer=1"],
        ["optim.lr=0.2", "model.n_layer=2"],
    ]
    assert swept.space.fixed == [SHORT]
    assert [d.key for d in swept.space.dimensions] == ["optim.lr", "model.n_layer"]
    assert swept.settings == SweepConfig()  # a grid, val/loss, lowest wins
    # the base config is the first point's: what batch math and the trials' length come from
    assert (swept.base.train.max_steps, swept.base.optim.lr, swept.base.model.n_layer) == (4, 0.1, 1)


def test_range_and_choice_expand_like_comma_lists():
    swept = plan("model.n_layer=range(1,4)", "model.n_head=choice(2,4)")
    assert swept.points == [
        [f"model.n_layer={layers}", f"model.n_head={heads}"] for layers in (1, 2, 3) for heads in (2, 4)
    ]


def test_glob_sweeps_the_config_group_options_it_matches():
    swept = plan("strategy=glob(zero*)")
    assert swept.points == [["strategy=zero1"], ["strategy=zero2"], ["strategy=zero3"], ["strategy=zero3_offload"]]
    everything_but = plan("strategy=glob(*,exclude=[zero*,fsdp])")
    assert everything_but.points == [["strategy=ddp"]]


def test_fixed_overrides_go_to_every_trial_and_sweep_settings_to_the_sweep():
    typed = [SHORT, "optim.lr=0.1,0.2", "sweep.id=lr-sweep", "sweep.mode=max", "sweep.metric=val/ppl", "train.seed=7"]
    swept = plan_sweep(typed)
    assert swept.space.fixed == [SHORT, "train.seed=7"]
    assert swept.space.typed == typed
    assert [d.typed for d in swept.space.dimensions] == ["optim.lr=0.1,0.2"]
    assert (swept.settings.id, swept.settings.mode, swept.settings.metric) == ("lr-sweep", "max", "val/ppl")
    assert not any("sweep." in override for point in swept.points for override in point)
    assert swept.base.train.seed == 7


# ---- random: seeded draws inside the intervals --------------------------------------------------------------

LOG_LR = "optim.lr=tag(log,interval(1e-5,1e-3))"


def random_sweep(*overrides: str, trials: int = 4, seed: int | None = None):
    settings = ["sweep.search=random", f"sweep.num_trials={trials}"]
    return plan(*overrides, *settings, *([f"sweep.seed={seed}"] if seed is not None else []))


def test_random_search_draws_the_same_points_for_the_same_seed_and_others_for_another():
    first = random_sweep(LOG_LR, "model.n_layer=1,2,3", seed=3)
    assert len(first.points) == 4 and all(len(point) == 2 for point in first.points)
    assert random_sweep(LOG_LR, "model.n_layer=1,2,3", seed=3).points == first.points
    assert random_sweep(LOG_LR, "model.n_layer=1,2,3", seed=4).points != first.points
    # no seed is seed 0: a sweep typed twice trains the same points
    assert (
        random_sweep(LOG_LR, "model.n_layer=1,2,3").points == random_sweep(LOG_LR, "model.n_layer=1,2,3", seed=0).points
    )


def test_random_draws_stay_inside_the_interval_and_a_log_interval_spreads_over_its_decades():
    swept = random_sweep(LOG_LR, trials=6, seed=1)
    (lr,) = swept.space.dimensions
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-3, True, False)
    assert all(1e-5 <= value <= 1e-3 for value in numbers(swept.points, "optim.lr"))
    # many draws: a log interval puts as many below the geometric middle (1e-4) as above it...
    many = numbers(swept.space.draws(2000, seed=1), "optim.lr")
    assert all(1e-5 <= value <= 1e-3 for value in many)
    assert 0.4 < sum(value < 1e-4 for value in many) / len(many) < 0.6
    # ...where a plain interval over the same bounds puts about 9% there
    plain = numbers(random_sweep("optim.lr=interval(1e-5,1e-3)", trials=2).space.draws(2000, seed=1), "optim.lr")
    assert 0.05 < sum(value < 1e-4 for value in plain) / len(plain) < 0.15


def test_an_interval_over_an_int_setting_draws_ints_and_over_a_float_setting_floats():
    swept = random_sweep("model.n_layer=interval(1,4)", "optim.weight_decay=interval(0,0.5)", trials=6)
    layers, decay = swept.space.dimensions
    assert layers.integer and not decay.integer
    for point in swept.points:
        assert re.fullmatch(r"model\.n_layer=[1-4]", point[0]), point
    many = swept.space.draws(200, seed=0)
    assert {point[0] for point in many} == {f"model.n_layer={n}" for n in (1, 2, 3, 4)}
    assert all(0 <= value <= 0.5 for value in numbers(many, "optim.weight_decay"))
    assert any(not value.is_integer() for value in numbers(many, "optim.weight_decay"))


def test_every_int_of_an_int_interval_is_drawn_about_equally_often():
    layers = Dimension("model.n_layer", low=1.0, high=4.0, integer=True, typed="model.n_layer=interval(1,4)")
    rng = random.Random(0)
    counts = collections.Counter(layers.draw(rng) for _ in range(4000))
    shares = {value: count / 4000 for value, count in sorted(counts.items())}
    assert all(0.2 < share < 0.3 for share in shares.values()), shares


def test_random_search_checks_every_drawn_point_before_anything_starts():
    # 128 is divisible by 1, 2, 4 and 8 heads only: seed 0 draws a head count it is not divisible by
    message = refused("model.n_head=interval(1,8)", "sweep.search=random", "sweep.num_trials=8")
    assert re.match(
        r"point \d \(model\.n_head=[3567]\): model\.n_embd \(128\) must be divisible by model\.n_head", message
    )
    assert message.endswith(NOTHING_STARTED)


# ---- Optuna: a distribution per key, every value checked up front ------------------------------------------


def test_optuna_gets_a_distribution_for_each_swept_key_and_no_points_yet():
    swept = plan(
        LOG_LR, "model.n_layer=interval(1,4)", "strategy=ddp,zero1", "sweep.search=optuna", "sweep.num_trials=5"
    )
    assert swept.points == []
    space = swept.space.optuna_space()
    assert list(space) == ["optim.lr", "model.n_layer", "strategy"]
    assert space["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["model.n_layer"] == IntDistribution(1, 4)
    assert space["strategy"] == CategoricalDistribution(["ddp", "zero1"])
    # a suggestion becomes the trial's overrides, in the order the keys were typed, as the trial used them
    suggestion = {"strategy": "zero1", "model.n_layer": 3, "optim.lr": 0.000123456789}
    assert swept.space.point_from(suggestion) == ["optim.lr=0.000123457", "model.n_layer=3", "strategy=zero1"]


def test_an_int_log_interval_is_an_int_log_distribution():
    swept = plan("model.n_layer=tag(log,interval(1,8))", "sweep.search=optuna", "sweep.num_trials=2")
    assert swept.space.optuna_space() == {"model.n_layer": IntDistribution(1, 8, log=True)}


def test_probe_points_put_every_value_and_both_interval_ends_in_front_of_the_validation_once():
    space = SweepSpace(
        fixed=[],
        dimensions=[
            Dimension("optim.lr", values=("0.1", "0.2", "0.3")),
            Dimension("model.n_layer", low=1.0, high=4.0, integer=True),
            Dimension("strategy", values=("ddp",)),
        ],
        settings=SweepConfig(search="optuna", num_trials=3),
    )
    probes = space.probe_points()
    first = ["optim.lr=0.1", "model.n_layer=1", "strategy=ddp"]
    assert probes[0] == first
    assert len(probes) == 1 + 2 + 1  # the first point, then each other value once
    assert len({tuple(point) for point in probes}) == len(probes)
    for point in probes[1:]:
        assert sum(a != b for a, b in zip(point, first, strict=True)) == 1  # one key moved at a time
    seen = {override for point in probes for override in point}
    assert seen == {
        "optim.lr=0.1",
        "optim.lr=0.2",
        "optim.lr=0.3",
        "model.n_layer=1",
        "model.n_layer=4",
        "strategy=ddp",
    }


def test_optuna_refuses_a_bad_value_or_interval_end_naming_it():
    message = refused("model.n_head=1,3", "sweep.search=optuna", "sweep.num_trials=2")
    assert message.startswith("value (model.n_head=3): model.n_embd (128) must be divisible"), message
    assert message.endswith(NOTHING_STARTED)
    message = refused("model.n_layer=interval(0,4)", "sweep.search=optuna", "sweep.num_trials=2")
    assert "(model.n_layer=0): model.n_layer must be > 0, got 0" in message and message.endswith(NOTHING_STARTED)


@pytest.mark.parametrize(
    "search, interval",
    [
        ("random", "optim.weight_decay=tag(log,interval(0,0.1))"),
        ("optuna", "optim.weight_decay=tag(log,interval(0,0.1))"),
        ("optuna", "optim.weight_decay=interval(0.2,0.1)"),
    ],
)
def test_an_interval_the_search_cannot_draw_from_is_refused_up_front(search, interval):
    with pytest.raises(UsageError, match="weight_decay"):
        swept = plan(interval, f"sweep.search={search}", "sweep.num_trials=2")
        swept.space.optuna_space()  # what the driver builds first


# ---- mistakes in the points: named, nothing started ---------------------------------------------------------


def test_a_bad_point_is_named_and_nothing_starts():
    composed: list[list[str]] = []

    def compose(overrides: list[str]) -> KilnConfig:
        composed.append(overrides)
        return compose_config(overrides)

    with pytest.raises(UsageError) as raised:
        plan("optim.lr=0.1,-1", compose=compose)
    assert str(raised.value) == "point 2 (optim.lr=-1): optim.lr must be > 0, got -1.0; nothing was started"
    assert composed[-1] == [SHORT, "optim.lr=-1"]  # it stopped at the bad point


def test_an_unknown_config_key_in_a_point_is_named_with_a_suggestion():
    message = refused("optim.lrr=0.1,0.2")
    assert message.startswith("point 1 (optim.lrr=0.1): unknown config key 'optim.lrr'; did you mean optim.lr?")
    assert message.endswith(NOTHING_STARTED)


def test_an_unknown_group_option_is_named_with_the_options_there_are():
    message = refused("strategy=ddp,zero9")
    assert message.startswith("point 2 (strategy=zero9): strategy=zero9: no such option (did you mean strategy=zero3?)")
    assert "available: ddp, fsdp, zero1, zero2, zero3, zero3_offload" in message
    assert message.endswith(NOTHING_STARTED)


def test_a_glob_that_matches_no_option_is_refused():
    assert (
        refused("strategy=glob(nope*)")
        == "strategy=glob(nope*): this sweep has no values (a glob that matches no option?)"
    )


def test_an_interval_in_a_grid_is_refused_before_any_point_is_composed():
    with pytest.raises(UsageError) as raised:
        plan("optim.lr=interval(1e-4,1e-3)", "model.n_layer=1,2", compose=never_compose)
    message = str(raised.value)
    assert message.startswith("optim.lr=interval(1e-4,1e-3): an interval has no grid points")
    assert "sweep.search=random or optuna" in message


# ---- mistakes in the sweep's own settings: refused before any point is composed -----------------------------


SETTING_MISTAKES = [
    (
        ["optim.lr=0.1,0.2", "sweep.num_trial=3"],
        "unknown sweep setting 'sweep.num_trial'; did you mean sweep.num_trials? known: sweep.id, sweep.search",
    ),
    (["optim.lr=0.1,0.2", "sweep.num_trials=3"], "sweep.num_trials is ignored by sweep.search=grid"),
    (["optim.lr=0.1,0.2", "sweep.seed=3"], "sweep.seed is ignored by sweep.search=grid"),
    (["optim.lr=0.1,0.2", "sweep.search=random"], "sweep.search=random needs sweep.num_trials=N"),
    (["optim.lr=0.1,0.2", "sweep.search=optuna"], "sweep.search=optuna needs sweep.num_trials=N"),
    (["optim.lr=0.1,0.2", "sweep.grace_period=2"], "sweep.grace_period is a setting of ASHA, ignored unless"),
    (["optim.lr=0.1,0.2", "sweep.reduction_factor=3"], "sweep.reduction_factor is a setting of ASHA"),
    (["optim.lr=0.1,0.2", "sweep.seed=1,2"], "sweep.seed=1,2: sweep.* settings describe the sweep and cannot"),
    (["optim.lr=0.1,0.2", "run.id=mine"], "run.id=mine: a sweep names its trials <sweep.id>-<n>: set sweep.id="),
    (["optim.lr=0.1,0.2", "+run.id=mine"], "+run.id=mine: a sweep names its trials"),
    (["optim.lr=0.1"], "nothing to sweep: give a key several values"),
    (["optim.lr=0.1,0.2", "optim.lr=0.3,0.4"], "optim.lr is swept twice; give each key one sweep"),
    (["optim.lr=0.1,0.2", "+optim.lr=0.3,0.4"], "optim.lr is swept twice"),
    (["optim.lr=0.1,0.2", f"sweep.id={'a' * (MAX_SWEEP_ID + 1)}"], "sweep.id must be 1-56 letters, digits"),
    (["optim.lr=0.1,0.2", "sweep.id=my/sweep"], "sweep.id must be 1-56 letters, digits"),
    (["optim.lr=0.1,0.2", "sweep.id=-lr"], "sweep.id must be 1-56 letters, digits"),
    (["optim.lr=0.1,0.2", "sweep.search=bayes"], "sweep.search must be one of grid, random, optuna; got 'bayes'"),
    (["optim.lr=0.1,0.2", "sweep.mode=best"], "sweep.mode must be one of min, max; got 'best'"),
    (["optim.lr=0.1,0.2", "sweep.early_stop=hyperband"], "sweep.early_stop must be one of none, asha"),
    (["optim.lr=0.1,0.2", "sweep.search=random", "sweep.num_trials=0"], "sweep.num_trials must be >= 1, got 0"),
    (
        ["optim.lr=0.1,0.2", "sweep.search=random", "sweep.num_trials=many"],
        "sweep.num_trials: Value 'many' of type 'str' could not be converted to Integer",
    ),
    (["optim.lr=0.1,0.2", "sweep.max_concurrent=0"], "sweep.max_concurrent must be >= 1, got 0"),
    (
        ["optim.lr=0.1,0.2", "sweep.early_stop=asha", "sweep.reduction_factor=1"],
        "sweep.reduction_factor must be >= 2, got 1",
    ),
    (["optim.lr=0.1,0.2", "sweep.metric="], "sweep.metric must name a metric of metrics.jsonl"),
    (["optim.lr=0.1,0.2", "sweep.trial_restarts=-2"], "sweep.trial_restarts must be >= -1 (-1: unlimited), got -2"),
]


@pytest.mark.parametrize(
    "overrides, expected", SETTING_MISTAKES, ids=[overrides[-1] for overrides, _ in SETTING_MISTAKES]
)
def test_a_wrong_sweep_setting_is_named_before_any_point_is_composed(overrides, expected):
    with pytest.raises(UsageError) as raised:
        plan(*overrides, compose=never_compose)
    assert str(raised.value).startswith(expected), str(raised.value)


def test_the_longest_sweep_id_leaves_room_for_the_trial_numbers():
    longest = "a" * MAX_SWEEP_ID
    assert plan("optim.lr=0.1,0.2", f"sweep.id={longest}").settings.id == longest
    assert len(f"{longest}-1234567") == 64  # a run id's limit


# ---- the settings on their own ------------------------------------------------------------------------------


def test_parse_settings_types_what_hydra_parsed():
    settings = parse_settings([("sweep.search", "random"), ("sweep.num_trials", "3"), ("sweep.seed", 7)])
    assert settings == SweepConfig(search="random", num_trials=3, seed=7)
    assert settings.as_dict()["num_trials"] == 3 and settings.as_dict()["metric"] == "val/loss"
    asha = parse_settings([("sweep.early_stop", "asha"), ("sweep.grace_period", 2), ("sweep.reduction_factor", 3)])
    assert (asha.early_stop, asha.grace_period, asha.reduction_factor) == ("asha", 2, 3)


def test_check_names_the_first_ignored_setting():
    SweepConfig(search="optuna", num_trials=4, seed=1, early_stop="asha", grace_period=1).check()
    with pytest.raises(UsageError, match=r"^sweep\.grace_period is a setting of ASHA"):
        SweepConfig(search="optuna", num_trials=4, grace_period=1).check()
    with pytest.raises(UsageError, match=r"^sweep\.seed is ignored by sweep\.search=grid"):
        SweepConfig(seed=1).check()


def test_sweep_settings_are_told_apart_from_trial_settings():
    for override in ("sweep.id=x", "+sweep.seed=1", "++sweep.mode=max"):
        assert is_sweep_setting(override), override
    for override in ("sweeps.x=1", "optim.sweep=1", "tracker.sweep_id=x"):
        assert not is_sweep_setting(override), override
    assert sweep_keys()[:3] == ["sweep.id", "sweep.search", "sweep.num_trials"]


def test_parse_space_keeps_the_typed_key_and_the_log_tag():
    space = parse_space(["+optim.lr=tag(log,interval(1e-5,1e-3))", "sweep.search=random", "sweep.num_trials=2"])
    (lr,) = space.dimensions
    assert (lr.key, lr.low, lr.high, lr.log, lr.typed) == (
        "+optim.lr",
        1e-5,
        1e-3,
        True,
        "+optim.lr=tag(log,interval(1e-5,1e-3))",
    )
    drawn = lr.draw(random.Random(0))
    assert drawn.startswith("+optim.lr=") and 1e-5 <= float(drawn.split("=")[1]) <= 1e-3


def test_a_value_typed_before_a_keys_sweep_gives_way_to_it_and_one_typed_after_is_refused():
    # An experiment's base value, then the sweep of the same key: the later override wins, as in Hydra.
    swept = plan("model.n_layer=2", "model.n_layer=1,3")
    assert "model.n_layer=2" not in swept.space.fixed
    assert swept.points == [["model.n_layer=1"], ["model.n_layer=3"]]
    message = refused("model.n_layer=1,3", "model.n_layer=2")
    assert "model.n_layer=2 comes after the sweep of model.n_layer" in message


def test_an_int_setting_takes_an_interval_with_whole_number_ends_only():
    message = refused("model.n_layer=interval(1.5,3.5)", "sweep.search=random", "sweep.num_trials=2")
    assert "model.n_layer is an int setting; give the interval whole-number ends" in message


def test_asha_refuses_a_sweep_of_the_steps_it_measures_trials_in():
    message = refused("train.max_steps=4,8", "sweep.early_stop=asha")
    assert "cannot be swept" in message and "train.max_steps" in message


def test_a_sweep_over_dpo_beta_composes_each_point_as_a_dpo_run_and_names_a_bad_beta():
    dpo = ["task=dpo", "data=prepared", "data.path=/data/pairs", "model.init_from=/models/sft"]
    swept = plan(*dpo, "dpo.beta=0.05,0.1,0.5", "dpo.loss=sigmoid,ipo")
    assert len(swept.points) == 6 and numbers(swept.points, "dpo.beta") == [0.05, 0.05, 0.1, 0.1, 0.5, 0.5]
    assert (swept.base.task.name, swept.base.dpo.beta, swept.base.dpo.loss) == ("dpo", 0.05, "sigmoid")
    message = refused(*dpo, "dpo.beta=0.1,0")
    assert "point 2 (dpo.beta=0)" in message and "dpo.beta" in message and NOTHING_STARTED in message, message
