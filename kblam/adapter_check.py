"""Checking an adapter folder before anything is built from it.

A config is checked field by field against its dataclass (``KBLaMConfig``): each field's annotation
gives its type, ``metadata["check"]`` (when present) its range or form, and a field without a
default is required. A new config field needs no code here unless its type is a new kind. The
weights are checked against the shapes the config implies, and must be finite. Every failure is an
``AdapterLoadError`` naming the file and the field or tensor.

No torch at import time: ``kblam`` exports ``AdapterLoadError`` and must stay light.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import string
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kblam.kb import FIELDS, _short_repr

# (value, every field of the config) -> what is wrong, or None. Only called on values of the right type.
Check = Callable[[Any, Mapping[str, Any]], "str | None"]


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded. ``str()`` reads like
    ``"adapter/kblam_config.json, field 'kb_scale_factor': must be > 0, got 0"``."""

    def __init__(self, reason: str, *, path: str | Path, field: str | None = None, tensor: str | None = None):
        self.reason = reason
        self.path = str(path)
        self.field = field
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f", field {self.field!r}" if self.field else f", tensor {self.tensor!r}" if self.tensor else ""
        return f"{self.path}{where}: {self.reason}"

    def __reduce__(self):  # keyword-only arguments would be lost when pickled
        return (type(self), (self.reason,), self.__dict__)


def show(value: Any) -> str:
    """A value as it was written in the JSON file, shortened (and safe for deep nesting)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _short_repr(value)


# --- ranges and forms, used as `metadata={"check": ...}` on dataclass fields --------------------

def at_least(low: int) -> Check:
    return lambda v, _: None if v >= low else f"must be >= {low}, got {show(v)}"


def positive(value: float, _) -> str | None:
    return None if value > 0 else f"must be > 0, got {show(value)}"


def non_empty(value: str, _) -> str | None:
    return None if value.strip() else "must not be empty"


def divides(other: str) -> Check:
    def check(value: int, config: Mapping[str, Any]) -> str | None:
        if value < 1:
            return f"must be >= 1, got {show(value)}"
        total = config.get(other)
        if isinstance(total, int) and total % value:
            return f"must divide {other} ({total}), got {value}"
        return None
    return check


def distinct_among(allowed: tuple[str, ...]) -> Check:
    def check(value: list[str], _) -> str | None:
        if any(v not in allowed for v in value) or len(set(value)) < len(value):
            return f"must be distinct names among {', '.join(map(repr, allowed))}, got {show(value)}"
        return None
    return check


def layer_indices(value: list[int], config: Mapping[str, Any]) -> str | None:
    if not value:
        return "must list at least one layer"
    if any(b <= a for a, b in itertools.pairwise(value)):
        return f"must be distinct layer indices in ascending order, got {show(value)}"
    n = config.get("num_hidden_layers")
    if value[0] < 0 or (isinstance(n, int) and value[-1] >= n):
        return f"must be layers of the base model, 0..{n - 1 if isinstance(n, int) else '?'}, got {show(value)}"
    return None


def triple_template(value: str, _) -> str | None:
    """Only plain {name}, {property} and {value}: str.format would otherwise reach attributes and
    items of Python objects ({name.__class__}), and a format spec such as {name:>999999999} would
    build a gigabyte string for every triple."""
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as err:
        return f"is not a valid template ({err}), got {show(value)}"
    used = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS or spec or conversion:
            text = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return f"may contain only {{name}}, {{property}} and {{value}}, found {text[:60]}"
        used.append(name)
    return None if used else f"must contain at least one of {{name}}, {{property}}, {{value}}, got {show(value)}"


# --- types, from the dataclass annotations --------------------------------------------------------

def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


# annotation -> (does a parsed JSON value fit?, what the file should hold, the plural for lists)
_SIMPLE: dict[Any, tuple[Callable[[Any], bool], str, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", "booleans"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "integers"),  # bool is an int
    float: (_finite_number, "a finite number", "finite numbers"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
    dict: (lambda v: isinstance(v, dict), "a JSON object", "JSON objects"),
}


def _options(hint: Any) -> tuple[Any, ...]:
    """`X | None` -> (X, NoneType); anything else -> (hint,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _type_problem(value: Any, hint: Any) -> str | None:
    """What `value` (parsed JSON) should have been for the annotation `hint`, or None when it fits."""
    wanted = []
    for option in _options(hint):
        if option is type(None):
            if value is None:
                return None
            wanted.append("null")
        elif typing.get_origin(option) is list and typing.get_args(option)[0] in _SIMPLE:
            fits, _, plural = _SIMPLE[typing.get_args(option)[0]]
            if isinstance(value, list) and all(fits(v) for v in value):
                return None
            wanted.append(f"a list of {plural}")
        elif (simple := typing.get_origin(option) or option) in _SIMPLE:  # dict[str, Any] counts as dict
            fits, what, _ = _SIMPLE[simple]
            if fits(value):
                return None
            wanted.append(what)
        else:
            raise TypeError(f"adapter_check has no rule for the annotation {option!r}; add one to _SIMPLE")
    return " or ".join(wanted)


def config_from_dict(cls: type, data: Any, path: Path) -> Any:
    """Build the dataclass `cls` from parsed JSON, or raise AdapterLoadError naming the field."""
    if not isinstance(data, dict):
        raise AdapterLoadError(f"must be a JSON object of config fields, got {type(data).__name__}", path=path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise AdapterLoadError(f"unknown field(s) {', '.join(map(show, unknown[:5]))} "
                               "(written by a newer kblam, or a typo?)", path=path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise AdapterLoadError("is missing (required)", path=path, field=name)
            continue
        value = data[name]
        expected = _type_problem(value, hints[name])
        if expected is not None:
            raise AdapterLoadError(f"must be {expected}, got {show(value)}", path=path, field=name)
        # JSON writes 100.0 as 100; the dataclass says float.
        values[name] = float(value) if float in _options(hints[name]) and _finite_number(value) else value
    for name, value in values.items():
        check = fields[name].metadata.get("check")
        if check is not None and value is not None and (problem := check(value, values)):
            raise AdapterLoadError(problem, path=path, field=name)
    return cls(**values)


def read_json_object(path: Path) -> Any:
    """Parse a config file; every failure (encoding, syntax, nesting, repeated keys) names it."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AdapterLoadError(f"is not UTF-8 text (byte offset {err.start})", path=path) from None

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            raise AdapterLoadError(f"key {show(next(k for k in keys if keys.count(k) > 1))} appears twice "
                                   "in one object: which value is meant?", path=path)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                               path=path) from None
    except RecursionError:
        raise AdapterLoadError("is not a config: JSON nested too deeply", path=path) from None
    except AdapterLoadError:
        raise
    except ValueError as err:  # an integer longer than Python's int/str conversion limit
        raise AdapterLoadError(f"is not a config: {err}", path=path) from None


def check_weights(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Every tensor the config needs, no other, each of the right shape, floating point and finite."""
    import torch

    missing = [k for k in expected if k not in state]
    if missing:
        raise AdapterLoadError(f"missing {len(missing)} tensor(s) the config needs, e.g. {', '.join(map(repr, missing[:3]))} "
                               "(weights saved for another config?)", path=path, tensor=missing[0])
    extra = [k for k in state if k not in expected]
    if extra:
        raise AdapterLoadError(f"{len(extra)} tensor(s) the config does not use, e.g. {', '.join(map(repr, extra[:3]))} "
                               "(weights saved for another config?)", path=path, tensor=extra[0])
    for name, want in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != want:
            raise AdapterLoadError(f"has shape {tuple(tensor.shape)}, the config needs {want}", path=path, tensor=name)
        if not tensor.dtype.is_floating_point:
            raise AdapterLoadError(f"has dtype {tensor.dtype}, adapter weights are floating point", path=path, tensor=name)
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterLoadError(f"{bad:,} of {tensor.numel():,} values are NaN or infinite", path=path, tensor=name)
