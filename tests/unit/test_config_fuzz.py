"""Whatever a user types on the command line, `kiln train` either accepts it or answers one line, exit 2."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import CONF_DIR, UsageError, compose_config, config_keys, group_names

KEYS = config_keys()
GROUPS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in group_names()}

numbers = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e999", "-1e999", "nan", "inf", "-inf", "0", "-0.0", "1e-320", "0x10", "1_000"]),
)
texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(lambda t: "'" + t.replace("'", "") + "'"),
    st.sampled_from(
        [
            "",
            "null",
            "true",
            "false",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "???",
            "${oops}",
            "s3://AKIA:secretsecret@bucket/x",
            "/tmp/kiln fuzz",
            "ünï",
            "a\nb",
            "'a\nb'",
        ]
    ),
)
values = st.one_of(numbers, texts)


@st.composite
def overrides(draw) -> list[str]:
    """A few overrides: known keys with random values, group choices (real or not), now and then a typo."""
    chosen = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["key", "key", "key", "group", "typo"]))
        if kind == "group":
            group = draw(st.sampled_from(sorted(GROUPS)))
            option = draw(st.one_of(st.sampled_from(GROUPS[group] or ["none"]), st.text(max_size=6)))
            chosen.append(f"{group}={option}")
        else:
            key = draw(st.sampled_from(KEYS))
            if kind == "typo":
                key = key[:-1] + draw(st.sampled_from("xyz_"))
            chosen.append(f"{key}={draw(values)}")
    return chosen


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(overrides())
def test_random_overrides_validate_or_fail_with_one_line(chosen):
    try:
        cfg = compose_config(["experiment=quickstart", *chosen])
    except UsageError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        assert "secretsecret" not in message
        return
    # Accepted: then every number in it is finite (nothing non-finite slips past validation).
    for section in ("optim", "train", "model", "checkpoint"):
        for name, value in vars(getattr(cfg, section)).items():
            assert not (isinstance(value, float) and not math.isfinite(value)), f"{section}.{name}={value}"
