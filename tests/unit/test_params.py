"""drivers.params: check_value, Field.allowed, ParamError."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.params import REQUIRED, Field, ParamError, check_value, type_name, validate_table


# -- integers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 7, -3, 10**18])
def test_int_accepts_ints_unchanged(value):
    out = check_value(value, Field(int), "n")
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [3.0, -2.0, 0.0, 1e15])
def test_int_accepts_integral_float_and_returns_int(value):
    out = check_value(value, Field(int), "n")
    assert type(out) is int
    assert out == int(value)


@pytest.mark.parametrize("value", [3.5, -0.25, float("nan"), float("inf"), float("-inf"), "3", [3], None, True, False])
def test_int_refuses_non_integers(value):
    with pytest.raises(ParamError) as exc:
        check_value(value, Field(int), "opts.n")
    assert exc.value.path == "opts.n"


# -- floats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 3, -7, 2.5, 1e300])
def test_float_accepts_numbers_and_returns_float(value):
    out = check_value(value, Field(float), "x")
    assert type(out) is float
    assert out == float(value)


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(value):
    with pytest.raises(ParamError, match="expected a number"):
        check_value(value, Field(float), "x")
    with pytest.raises(ParamError, match="expected an integer"):
        check_value(value, Field(int), "x")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_refuses_nan_and_inf(value):
    with pytest.raises(ParamError, match="finite"):
        check_value(value, Field(float), "x")


@pytest.mark.parametrize("value", ["1.0", None, [1.0], {"a": 1}])
def test_float_refuses_non_numbers(value):
    with pytest.raises(ParamError):
        check_value(value, Field(float), "x")


# -- bool, str, list, dict, optional ---------------------------------------------------------------------


def test_bool_accepts_only_booleans():
    assert check_value(True, Field(bool), "b") is True
    assert check_value(False, Field(bool), "b") is False
    for bad in (0, 1, 1.0, "true"):
        with pytest.raises(ParamError, match="expected a boolean"):
            check_value(bad, Field(bool), "b")


def test_str_accepts_only_strings():
    assert check_value("", Field(str), "s") == ""
    assert check_value("abc", Field(str), "s") == "abc"
    for bad in (1, 1.5, True, ["a"], b"a"):
        with pytest.raises(ParamError, match="expected a string"):
            check_value(bad, Field(str), "s")


def test_list_of_int_checks_and_coerces_items():
    out = check_value([1, 2.0, -3], Field(list[int]), "l")
    assert out == [1, 2, -3]
    assert all(type(v) is int for v in out)


def test_list_item_error_names_the_index():
    with pytest.raises(ParamError) as exc:
        check_value([1, 2, "x", 4], Field(list[int]), "opts.delays")
    assert exc.value.path == "opts.delays[2]"


def test_list_refuses_non_list():
    for bad in ((1, 2), "12", 3, {"a": 1}):
        with pytest.raises(ParamError, match="expected an array"):
            check_value(bad, Field(list[int]), "l")


def test_nested_list_checks_inner_items():
    assert check_value([[0, 4], [1, 5]], Field(list[list[int]]), "p") == [[0, 4], [1, 5]]
    with pytest.raises(ParamError) as exc:
        check_value([[0, 4], [1, True]], Field(list[list[int]]), "p")
    assert exc.value.path == "p[1][1]"


def test_list_min_max_apply_to_each_item():
    fld = Field(list[int], min=0, max=10)
    assert check_value([0, 10, 5], fld, "l") == [0, 10, 5]
    with pytest.raises(ParamError, match="below the minimum"):
        check_value([0, -1], fld, "l")
    with pytest.raises(ParamError, match="above the maximum"):
        check_value([11], fld, "l")


def test_dict():
    assert check_value({"a": 1}, Field(dict), "d") == {"a": 1}
    with pytest.raises(ParamError, match="table/object"):
        check_value([("a", 1)], Field(dict), "d")


def test_optional_accepts_none_only_when_optional():
    assert check_value(None, Field(Optional[int]), "o") is None
    assert check_value(None, Field(int | None), "o") is None
    assert check_value(4.0, Field(int | None), "o") == 4
    with pytest.raises(ParamError, match="must not be null"):
        check_value(None, Field(int), "o")


def test_any_type_passes_through():
    sentinel = object()
    assert check_value(sentinel, Field(), "a") is sentinel
    assert check_value(sentinel, Field(Any), "a") is sentinel


def test_typ_argument_overrides_field_type():
    # RPC parameters take their type from the signature, the Field only carries unit/range
    fld = Field(unit="mA", min=0)
    assert check_value(3, fld, "milliamps", float) == 3.0
    with pytest.raises(ParamError):
        check_value("3", fld, "milliamps", float)


def test_unsupported_type_is_a_programming_error():
    with pytest.raises(TypeError):
        check_value(1, Field(set), "x")


# -- ranges and choices ----------------------------------------------------------------------------------


def test_min_max_are_inclusive():
    lo, hi = -2.5, 60.0
    fld = Field(float, min=lo, max=hi)
    assert check_value(lo, fld, "x") == lo
    assert check_value(hi, fld, "x") == hi
    with pytest.raises(ParamError, match="below the minimum"):
        check_value(math.nextafter(lo, -math.inf), fld, "x")
    with pytest.raises(ParamError, match="above the maximum"):
        check_value(math.nextafter(hi, math.inf), fld, "x")


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-1e6, 1e6),
    width=st.floats(0, 1e6),
    value=st.floats(allow_nan=False, allow_infinity=False, min_value=-3e6, max_value=3e6),
)
def test_range_property(lo, width, value):
    hi = lo + width
    fld = Field(float, min=lo, max=hi)
    if lo <= value <= hi:
        assert check_value(value, fld, "x") == value
    else:
        with pytest.raises(ParamError):
            check_value(value, fld, "x")


def test_choices():
    fld = Field(str, "info", choices=("debug", "info", "warning"))
    for ok in fld.choices:
        assert check_value(ok, fld, "daemon.log_level") == ok
    with pytest.raises(ParamError) as exc:
        check_value("verbose", fld, "daemon.log_level")
    e = exc.value
    assert e.path == "daemon.log_level"
    assert "'verbose'" in e.message
    for choice in fld.choices:
        assert repr(choice) in e.allowed


def test_bool_not_range_checked_as_number():
    # a boolean field with a (meaningless) min must not compare True with it
    assert check_value(True, Field(bool, min=5), "b") is True


# -- ParamError and allowed text -------------------------------------------------------------------------


def test_param_error_path_and_allowed_mention_unit():
    fld = Field(float, unit="mA", min=0, max=60)
    with pytest.raises(ParamError) as exc:
        check_value(75.0, fld, "devices.pump.options.current")
    e = exc.value
    assert e.path == "devices.pump.options.current"
    assert "mA" in e.allowed
    assert f">= {fld.min:g}" in e.allowed and f"<= {fld.max:g}" in e.allowed
    assert str(e).startswith(e.path + ": ")
    assert e.allowed in str(e)
    assert isinstance(e, ValueError)


def test_type_error_allowed_mentions_unit_too():
    with pytest.raises(ParamError) as exc:
        check_value("fast", Field(float, unit="Hz"), "rate")
    assert "Hz" in exc.value.allowed
    assert "number" in exc.value.allowed


def test_param_error_without_allowed():
    e = ParamError("a.b", "broken")
    assert str(e) == "a.b: broken"
    assert e.allowed is None


def test_allowed_text():
    assert Field(int, min=1).allowed() == "integer >= 1"
    assert "one of 'a', 'b'" in Field(str, choices=("a", "b")).allowed()
    assert Field(float, unit="ps").allowed().endswith("(in ps)")


def test_type_names():
    assert type_name(float) == "number"
    assert type_name(int) == "integer"
    assert type_name(bool) == "boolean"
    assert type_name(str) == "string"
    assert type_name(list[int]) == "array of integer"
    assert type_name(list[list[int]]) == "array of array of integer"
    assert type_name(dict) == "object"
    assert type_name(int | None) == "integer or null"
    assert type_name(None) == "any"


def test_required_sentinel_and_describe():
    assert Field().default is REQUIRED
    d = Field(float, unit="mA", min=0, limit="current_ma", doc="drive").describe()
    assert d == {"type": "number", "unit": "mA", "min": 0, "limit": "current_ma", "doc": "drive"}
    assert Field(str, choices=("x",)).describe()["choices"] == ["x"]


# -- validate_table --------------------------------------------------------------------------------------

SCHEMA = {"name": Field(str), "n": Field(int, 3, min=0), "xs": Field(list[int], [1, 2])}


def test_validate_table_reports_every_problem_with_its_path():
    errors: list[ParamError] = []
    out = validate_table({"n": -1, "bogus": 1}, SCHEMA, "t", errors)
    assert [(e.path, e.message) for e in errors] == [
        ("t.bogus", "unknown key"), ("t.name", "missing"), ("t.n", "-1 is below the minimum")]
    assert errors[0].allowed == "one of n, name, xs"
    assert out == {"name": None, "n": 3, "xs": [1, 2]}
    assert out["xs"] is not SCHEMA["xs"].default  # defaults are copies


def test_validate_table_custom_extra_keys_and_not_a_table():
    errors: list[ParamError] = []
    out = validate_table({"name": "a", "xs": "raw", "model": "m"}, SCHEMA, "", errors,
                         custom=("xs",), extra_keys=("model",))
    assert errors == [] and out == {"name": "a", "n": 3, "xs": "raw"}
    validate_table({"zz": 1}, SCHEMA, "", errors, extra_keys=("model",))
    assert errors[0].path == "zz" and errors[0].allowed == "one of model, n, name, xs"
    errors.clear()
    assert validate_table([], SCHEMA, "t", errors, not_table_hint="a TOML table") == {"name": None, "n": 3, "xs": [1, 2]}
    assert str(errors[0]) == "t: expected a table, got list; allowed: a TOML table"
