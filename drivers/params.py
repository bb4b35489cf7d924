"""Typed, unit-carrying parameters: one description serves config options and RPC parameters.

A :class:`Field` says what a value may be (type, unit, range, choices) and documents it. The daemon uses
the same object to validate a TOML option, to validate an RPC parameter, and to describe both to clients
(``daemon.describe``), so the check and its documentation cannot drift apart.

RPC parameters are declared on driver methods with ``typing.Annotated``::

    @exposed
    def set_current(self, milliamps: Annotated[float, Field(unit="mA", min=0, limit="current_ma")]) -> None:
        ...
"""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "ParamError", "REQUIRED", "check_value", "type_name", "validate_table"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Field:
    """What a value may be.

    ``type`` and ``default`` matter for options (an RPC parameter takes them from the method signature).
    ``limit`` names a configurable safety limit (``[devices.X.limits] NAME = [min, max]``) that the daemon
    enforces before the call reaches the device.
    """

    type: Any = None
    default: Any = REQUIRED
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    limit: str | None = None
    doc: str = ""

    def describe(self, typ: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type_name(typ if typ is not None else self.type)}
        for key in ("unit", "min", "max", "limit"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.doc:
            out["doc"] = self.doc
        return out

    def allowed(self, typ: Any = None) -> str:
        """A short human sentence of what is allowed, for error messages."""
        typ = typ if typ is not None else self.type
        text = type_name(typ)
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        bounds = []
        if self.min is not None:
            bounds.append(f">= {num(self.min)}")
        if self.max is not None:
            bounds.append(f"<= {num(self.max)}")
        if bounds:
            text += " " + " and ".join(bounds)
        if self.unit:
            text += f" (in {self.unit})"
        return text


def num(x: float) -> str:
    """A number for messages: exact for integers, up to 12 significant digits otherwise (no 2.68435e+08)."""
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.12g}"


class ParamError(ValueError):
    """A value that does not fit its Field. ``path`` names the key or parameter."""

    def __init__(self, path: str, message: str, allowed: str | None = None) -> None:
        self.path = path
        self.message = message
        self.allowed = allowed
        text = f"{path}: {message}"
        if allowed:
            text += f"; allowed: {allowed}"
        super().__init__(text)


_SCALARS = {float: "number", int: "integer", bool: "boolean", str: "string"}


def _unwrap_optional(typ: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0], True
    return typ, False


def type_name(typ: Any) -> str:
    """The wire name of a Python type: number, integer, boolean, string, array of ..., object."""
    if typ is None or typ is Any:
        return "any"
    inner, optional = _unwrap_optional(typ)
    if optional:
        return type_name(inner) + " or null"
    if inner in _SCALARS:
        return _SCALARS[inner]
    origin = typing.get_origin(inner)
    if origin is list:
        (item,) = typing.get_args(inner) or (Any,)
        return f"array of {type_name(item)}"
    if inner is dict or origin is dict:
        return "object"
    return getattr(inner, "__name__", str(inner))


def _check_type(value: Any, typ: Any, path: str, field: Field) -> Any:
    if typ is None or typ is Any:
        return value
    inner, optional = _unwrap_optional(typ)
    if value is None:
        if optional:
            return None
        raise ParamError(path, "must not be null", field.allowed(typ))
    typ = inner
    if typ is bool:
        if not isinstance(value, bool):
            raise ParamError(path, f"expected a boolean, got {_show(value)}", field.allowed(typ))
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParamError(path, f"expected an integer, got {_show(value)}", field.allowed(typ))
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(path, f"expected a number, got {_show(value)}", field.allowed(typ))
        value = float(value)
        if not math.isfinite(value):
            raise ParamError(path, f"expected a finite number, got {value}", field.allowed(typ))
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ParamError(path, f"expected a string, got {_show(value)}", field.allowed(typ))
        return value
    origin = typing.get_origin(typ)
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(path, f"expected an array, got {_show(value)}", field.allowed(typ))
        (item,) = typing.get_args(typ) or (Any,)
        plain = Field()
        return [_check_type(v, item, f"{path}[{i}]", plain) for i, v in enumerate(value)]
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise ParamError(path, f"expected a table/object, got {_show(value)}", field.allowed(typ))
        return value
    raise TypeError(f"{path}: unsupported parameter type {typ!r}")


def _show(value: Any) -> str:
    name = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} {text}"


def check_value(value: Any, field: Field, path: str, typ: Any = None) -> Any:
    """Validate (and lightly coerce: int to float, integral float to int) ``value`` against ``field``."""
    typ = typ if typ is not None else field.type
    value = _check_type(value, typ, path, field)
    if field.choices is not None and value not in field.choices:
        raise ParamError(path, f"{value!r} is not allowed", field.allowed(typ))
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if field.min is not None and item < field.min:
                raise ParamError(path, f"{item!r} is below the minimum", field.allowed(typ))
            if field.max is not None and item > field.max:
                raise ParamError(path, f"{item!r} is above the maximum", field.allowed(typ))
    return value


def validate_table(raw: Any, schema: dict[str, Field], path: str, errors: list[ParamError], *,
                   custom: tuple[str, ...] = (), extra_keys: tuple[str, ...] = (),
                   not_table_hint: str | None = None) -> dict[str, Any]:
    """Validate one config table against ``schema``, appending every problem to ``errors``.

    Reports unknown keys, missing required keys and bad values, each with its key path (``path.key``).
    Returns a value for every schema key: the checked value, else a copy of the default (None for a
    required key). Keys in ``custom`` are returned unchecked for the caller to check; ``extra_keys`` are
    keys the caller reads itself: accepted, listed first among the allowed keys, not returned.
    A ``raw`` that is not a table is one error (allowed: ``not_table_hint``) and gives all defaults.
    """

    def default(fld: Field) -> Any:
        return None if fld.default is REQUIRED else copy.deepcopy(fld.default)

    if not isinstance(raw, dict):
        errors.append(ParamError(path, f"expected a table, got {type(raw).__name__}", not_table_hint))
        return {k: default(f) for k, f in schema.items()}
    out: dict[str, Any] = {}
    for key in raw:
        if key not in schema and key not in extra_keys:
            allowed = "one of " + ", ".join([*extra_keys, *sorted(schema)])
            errors.append(ParamError(_join(path, key), "unknown key", allowed))
    for key, fld in schema.items():
        kp = _join(path, key)
        if key not in raw:
            if fld.default is REQUIRED:
                errors.append(ParamError(kp, "missing", fld.allowed()))
            out[key] = default(fld)
        elif key in custom:
            out[key] = raw[key]
        else:
            try:
                out[key] = check_value(raw[key], fld, kp)
            except ParamError as e:
                errors.append(e)
                out[key] = default(fld)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
