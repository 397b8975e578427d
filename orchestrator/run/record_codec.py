"""The one codec between Kiln's record dataclasses and their JSON files (run.json, sweep.json).

The dataclass is the schema: writing walks `dataclasses.fields`, reading checks every value against the
field's type hint and names the field that does not fit, so no second table of types is kept in step.
These rules are the on-storage contract:

- Fields are written in declaration order, every one of them, except where a field's metadata says
  otherwise: OMIT_IF_NONE leaves it out while it is None, OMIT_IF_EMPTY while it is an empty list, and
  `written_with(name)` while the field `name` is None. So an attempt's keys appear only once they are
  known, exactly as Kiln wrote them before the records were typed.
- A key this Kiln does not know (a newer Kiln added it) is kept aside on the object and written back as
  it was: an older Kiln reads such a file, and saving it loses nothing.
- `format_version` counts incompatible changes only (a renamed or retyped key, a new enum value an older
  Kiln could not act on); adding a key does not bump it. A file without one is version 1. A file newer
  than the reader is refused with NewerFormat instead of being misread.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

VERSION_KEY = "format_version"
UNKNOWN_KEYS = "_unknown_keys"  # the attribute that keeps a newer Kiln's keys for the next write
_OMIT = "kiln_omit"
OMIT_IF_NONE: Mapping[str, object] = {_OMIT: "none"}
OMIT_IF_EMPTY: Mapping[str, object] = {_OMIT: "empty"}


class NewerFormat(ValueError):
    """The file was written by a newer Kiln, in a format_version this one cannot read."""


def written_with(name: str) -> Mapping[str, object]:
    """Field metadata: write the field (null included) exactly when the field `name` is not None."""
    return {_OMIT: ("with", name)}


def to_json(record: object) -> str:
    """The record as its file's text (indented JSON, keys in field order)."""
    return json.dumps(encode(record), indent=2)


def from_json(cls: type[T], text: str) -> T:
    """Parse a record file; ValueError says in one line what is wrong (NewerFormat for a newer Kiln's file)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; truncated?)") from None
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    version = data.get(VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(_mismatch(VERSION_KEY, version, "int"))
    current = _current_version(cls)
    if version > current:
        raise NewerFormat(
            f"was written by a newer Kiln ({VERSION_KEY} {version}; this Kiln reads up to {current}); "
            "upgrade Kiln to read it"
        )
    # Version 1 is the only format so far: an older file needs no migration, and is written back as current.
    return decode(cls, {**data, VERSION_KEY: current})


def encode(record: object) -> dict[str, object]:
    """The JSON object of a record dataclass, by the rules above."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if not _omitted(record, f, value):
            out[f.name] = _plain(value)
    for key, value in getattr(record, UNKNOWN_KEYS, {}).items():
        out.setdefault(key, value)
    return out


def decode(cls: type[T], data: object, path: str = "") -> T:
    """A record dataclass from its JSON object; ValueError naming the field that does not fit."""
    if not isinstance(data, dict):
        raise ValueError(_mismatch(path, data, "object"))
    hints = _hints(cls)
    known = {key: _value(hints[key], value, _join(path, key)) for key, value in data.items() if key in hints}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in known:
            raise ValueError(f"{path + ' ' if path else ''}has no {f.name}")
    record = cls(**known)
    unknown = {key: value for key, value in data.items() if key not in hints}
    if unknown:
        setattr(record, UNKNOWN_KEYS, unknown)
    return record


def _omitted(record: object, f: dataclasses.Field[object], value: object) -> bool:
    """Whether the field's metadata says to leave it out of the file now."""
    rule = f.metadata.get(_OMIT)
    if rule == "none":
        return value is None
    if rule == "empty":
        return value == []
    if isinstance(rule, tuple):
        return getattr(record, rule[1]) is None
    return False


def _plain(value: object) -> object:
    """A field's value as JSON data: nested records encoded, enums as their value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, object]] = {}


def _hints(cls: type) -> dict[str, object]:
    """The type hint of each field the constructor takes (the annotations are strings until evaluated)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _HINTS[cls]


def _current_version(cls: type) -> int:
    """The format_version this Kiln writes for cls: the field's default."""
    field = next((f for f in dataclasses.fields(cls) if f.name == VERSION_KEY), None)
    return field.default if field is not None and isinstance(field.default, int) else 1


def _value(hint: object, value: object, path: str) -> object:
    """value checked against hint (and built into a record or enum where the hint says so)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is object or hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _union(args, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _member(hint, value, path)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return decode(hint, value, path)
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ValueError(_mismatch(path, value, "list"))
        return [_value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(_mismatch(path, value, "dict"))
        return {k: _value(args[1], v, _join(path, k)) for k, v in value.items()} if args else value
    return _scalar(hint, value, path)


def _union(args: tuple[object, ...], value: object, path: str) -> object:
    """value checked against `A | B | None`: None where allowed, else the first alternative that fits."""
    if value is None and type(None) in args:
        return None
    choices = [a for a in args if a is not type(None)]
    for choice in choices[:-1]:
        try:
            return _value(choice, value, path)
        except ValueError:
            continue
    return _value(choices[-1], value, path)


def _member(cls: type[enum.Enum], value: object, path: str) -> enum.Enum:
    """The enum member whose value is value; the error lists the known ones."""
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{path} {value!r} is not one of {', '.join(str(m.value) for m in cls)}") from None


def _scalar(hint: object, value: object, path: str) -> object:
    """A str, int, float or bool, as the hint says (a bool is no int; an int is a float, kept as written)."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(hint, type) or hint not in (str, int, float, bool):
        raise TypeError(f"the record codec cannot read a field typed {hint!r} ({path})")
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(_mismatch(path, value, hint.__name__))
    return value


def _mismatch(path: str, value: object, expected: str) -> str:
    """The one-line message for a value of the wrong JSON type."""
    return f"field {path!r} is {type(value).__name__}, expected {expected}"


def _join(path: str, key: str) -> str:
    """The dotted path of a nested field, as messages name it."""
    return f"{path}.{key}" if path else key
