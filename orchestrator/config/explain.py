"""Hydra's and OmegaConf's composition errors, turned into one line that names the key and says what to do."""

from __future__ import annotations

import difflib
import re

from orchestrator.config.keys import CONF_DIR, FREE_FORM_DICTS, QUOTED_DICT_KEY, config_keys, group_names


def explain_composition_error(exc: Exception, overrides: list[str]) -> str:
    """One actionable line for a Hydra/OmegaConf composition failure."""
    text = "\n".join(str(e) for e in _exception_chain(exc))
    missing_option = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        hint = difflib.get_close_matches(option, choices, n=1)
        did_you_mean = f" (did you mean {group}={hint[0]}?)" if hint else ""
        return f"{group}={option}: no such option{did_you_mean}; available: {', '.join(choices)}"
    key = _failing_key(text)
    if key and (
        "not in" in text
        or "not in struct" in text
        or ("Could not override" in text and "could not be converted" not in text and "Invalid value" not in text)
    ):
        return unknown_key_message(key)
    converted = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if key and converted:
        value, wanted = converted.groups()
        return f"{key}: expected {wanted.lower()}, got {value!r}"
    invalid = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text)
    if key and invalid:
        return f"{key}: invalid value {invalid.group(1)!r}; expected one of {invalid.group(2)}"
    free_form = free_form_problem(key, text, overrides)
    if free_form:
        return free_form
    if "LexerNoViableAltException" in text or "mismatched input" in text or "no viable alternative" in text:
        return unparsable_override_message(text, overrides)
    parse = re.search(r"Error parsing override '([^']*)'", text)
    if parse:
        return f"could not parse override '{parse.group(1)}': write key=value (e.g. train.max_steps=100)"
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"invalid config: {first}" + (f" (key: {key})" if key else "")


def free_form_problem(key: str | None, text: str, overrides: list[str]) -> str | None:
    """A free-form dict given something other than name:amount pairs, or a quoted key, with its spelling."""
    for name, example in FREE_FORM_DICTS.items():
        mine = [o for o in overrides if o.lstrip("+").startswith(name)]
        parse_error = "Error merging override" not in text and "Could not override" not in text
        if parse_error and any(QUOTED_DICT_KEY.search(o.partition("=")[2]) for o in mine):
            return f"{name}: write a key with ':' with a backslash before the ':', not in quotes: {example}"
        if key and (key == name or key.startswith(name + ".")):
            given = next((o.partition("=")[2] for o in mine), "")
            return f"{name} maps resource names to amounts > 0, e.g. {example}; got {given!r}"
    return None


def unparsable_override_message(text: str, overrides: list[str]) -> str:
    """Name the override Hydra's grammar rejected and the character it stumbled on."""
    culprit = next((o for o in overrides if o.strip() and o.strip() in text), None)
    odd = [o for o in overrides if any(not ch.isascii() or not ch.isprintable() for ch in o)]
    culprit = culprit if culprit is not None else (odd[0] if odd else None)
    if culprit is None:
        return "could not parse an override: write key=value (e.g. train.max_steps=100)"
    key = culprit.split("=", 1)[0]
    bad = next((ch for ch in culprit if not ch.isascii() or not ch.isprintable()), None)
    what = f"character {bad!r} is not allowed unquoted" if bad else "it does not fit Hydra's override grammar"
    return f"could not parse override {culprit!r}: {what}; quote the value ({key}='...') or remove it"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    return chain


def _failing_key(text: str) -> str | None:
    for pattern in (
        r"Could not override '([^']+)'",
        r"full_key: ([\w.\[\]]+)",
        r"Could not append to config\. An item is already at '([^']+)'",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def unknown_key_message(key: str) -> str:
    """Name an unknown key and suggest the closest valid one."""
    known = config_keys() + group_names()
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not hint and "." in key:
        section, _, _leaf = key.rpartition(".")
        same_section = [k for k in known if k.startswith(section + ".")]
        hint = difflib.get_close_matches(key, same_section, n=1, cutoff=0.3)
    suggestion = f"; did you mean {hint[0]}?" if hint else ""
    return f"unknown config key '{key}'{suggestion} (run `kiln train --list-keys` to list them)"
