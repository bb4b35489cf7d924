"""daemon.api.methods (bind_params, MethodTable) and drivers.base.exposed_methods / method_spec."""

from __future__ import annotations

import asyncio
import typing
from typing import Annotated

import pytest

from daemon.api.errors import INVALID_PARAMS, METHOD_NOT_FOUND, InvalidParams, MethodNotFound
from daemon.api.methods import MethodTable, bind_params
from drivers.base import Laser, TimeTagger, exposed, exposed_methods, method_spec
from drivers.params import Field
from drivers.sim.devices import SimLaser, SimPhotonDetector, SimPolarizationController
from drivers.sim.tagger import SimTimeTagger


def sample(
    milliamps: Annotated[float, Field(unit="mA", min=0, max=100)],
    mode: Annotated[str, Field(choices=("cw", "pulsed"))] = "cw",
    count: int = 1,
) -> None:
    """A sample method."""


SPEC = method_spec("dev.sample", sample, skip_self=False)
NAMES = [p.name for p in SPEC.params]


# -- method_spec -----------------------------------------------------------------------------------------


def test_method_spec_from_signature():
    assert SPEC.name == "dev.sample"
    assert NAMES == ["milliamps", "mode", "count"]
    ma, mode, count = SPEC.params
    assert ma.type is float and ma.required and ma.field.unit == "mA"
    assert mode.type is str and not mode.required and mode.default == "cw"
    assert count.type is int and count.default == 1
    assert SPEC.doc == "A sample method."
    assert SPEC.returns == "null"
    d = SPEC.describe()
    assert d["params"][0] == {"name": "milliamps", "type": "number", "unit": "mA", "min": 0, "max": 100,
                              "required": True}
    assert d["params"][2]["default"] == 1


def test_method_spec_refuses_varargs():
    def f(*args: int) -> None: ...

    with pytest.raises(TypeError, match="named parameters"):
        method_spec("f", f, skip_self=False)


# -- bind_params -----------------------------------------------------------------------------------------


def test_bind_object_params():
    out = bind_params(SPEC, {"milliamps": 5, "mode": "pulsed"})
    assert out == {"milliamps": 5.0, "mode": "pulsed"}
    assert type(out["milliamps"]) is float


def test_bind_positional_params():
    assert bind_params(SPEC, [5, "pulsed", 3.0]) == {"milliamps": 5.0, "mode": "pulsed", "count": 3}
    assert bind_params(SPEC, [7]) == {"milliamps": 7.0}


def test_bind_too_many_positional():
    with pytest.raises(InvalidParams) as exc:
        bind_params(SPEC, [1, "cw", 1, "extra"])
    assert exc.value.code == INVALID_PARAMS
    assert str(len(NAMES)) in exc.value.message
    assert exc.value.data["params"] == NAMES and isinstance(exc.value.data["allowed"], str)


def test_bind_unknown_param_names_it_and_lists_allowed():
    with pytest.raises(InvalidParams) as exc:
        bind_params(SPEC, {"milliamps": 1, "current": 3})
    e = exc.value
    assert e.code == INVALID_PARAMS
    assert "'current'" in e.message
    for name in NAMES:
        assert name in e.message
    assert e.data["param"] == "current" and e.data["params"] == NAMES and "milliamps" in e.data["allowed"]


def test_bind_missing_required():
    for params in ({}, None, {"mode": "cw"}, []):
        with pytest.raises(InvalidParams) as exc:
            bind_params(SPEC, params)
        assert exc.value.data["param"] == "milliamps"
        assert "milliamps" in exc.value.message
        assert "mA" in exc.value.message


@pytest.mark.parametrize(
    "params, bad",
    [
        ({"milliamps": "five"}, "milliamps"),
        ({"milliamps": True}, "milliamps"),
        ({"milliamps": None}, "milliamps"),
        ({"milliamps": 101}, "milliamps"),
        ({"milliamps": -1}, "milliamps"),
        ({"milliamps": 1, "mode": "burst"}, "mode"),
        ({"milliamps": 1, "count": 1.5}, "count"),
        ([1, "cw", "3"], "count"),
    ],
)
def test_bind_wrong_type_or_range(params, bad):
    with pytest.raises(InvalidParams) as exc:
        bind_params(SPEC, params)
    e = exc.value
    assert e.code == INVALID_PARAMS
    assert e.data["param"] == bad
    assert bad in e.message
    assert e.data["allowed"]


def test_bind_params_not_object_or_array():
    for params in (5, "milliamps=5", True):
        with pytest.raises(InvalidParams):
            bind_params(SPEC, params)


def test_bind_leaves_defaults_to_the_handler():
    # optional params not given are left out: the handler's own default applies
    out = bind_params(SPEC, {"milliamps": 2})
    assert out == {"milliamps": 2.0}


def test_defaults_are_filled_by_the_call():
    seen = {}

    async def handler(milliamps: float, mode: str = "cw", count: int = 1) -> dict:
        seen.update(milliamps=milliamps, mode=mode, count=count)
        return dict(seen)

    table = MethodTable()
    table.add("dev.sample", handler, SPEC)
    result = asyncio.run(table.call("dev.sample", {"milliamps": 3}))
    assert result == {"milliamps": 3.0, "mode": SPEC.params[1].default, "count": SPEC.params[2].default}


# -- MethodTable -----------------------------------------------------------------------------------------


async def _set_current(milliamps: Annotated[float, Field(unit="mA")]) -> None:
    """Set the current."""


async def _status() -> dict:
    """Status."""
    return {"ok": True}


def make_table() -> MethodTable:
    t = MethodTable()
    t.add("pump.set_current", _set_current, group="pump")
    t.add("pump.status", _status, group="pump")
    t.add("daemon.status", _status)
    return t


def test_unknown_method_lists_similar_names():
    t = make_table()
    with pytest.raises(MethodNotFound) as exc:
        t.get("pump.set_curent")
    e = exc.value
    assert e.code == METHOD_NOT_FOUND == -32601
    similar = [n for n in t.names() if n.startswith("pump.")]
    assert e.data == {"method": "pump.set_curent", "similar": similar}
    for name in similar:
        assert name in e.message


def test_unknown_device_has_no_similar():
    t = make_table()
    with pytest.raises(MethodNotFound) as exc:
        asyncio.run(t.call("laser.on", {}))
    assert exc.value.data["similar"] == []
    assert "daemon.describe" in exc.value.message


def test_table_call_validates_params():
    t = make_table()
    with pytest.raises(InvalidParams):
        asyncio.run(t.call("pump.set_current", {"milliamps": "x"}))
    assert asyncio.run(t.call("pump.status", None)) == {"ok": True}


def test_table_names_describe_and_groups():
    t = make_table()
    assert t.names() == sorted(["pump.set_current", "pump.status", "daemon.status"])
    assert "pump.status" in t
    desc = {d["name"]: d for d in t.describe()}
    assert desc["pump.set_current"]["group"] == "pump"
    assert desc["pump.set_current"]["params"][0]["unit"] == "mA"
    assert desc["daemon.status"]["group"] == "daemon"
    t.remove_group("pump")
    assert t.names() == ["daemon.status"]


def test_duplicate_registration_refused():
    t = make_table()
    with pytest.raises(ValueError, match="twice"):
        t.add("pump.status", _status)


def test_spec_from_method_spec_is_renamed():
    t = MethodTable()
    spec = exposed_methods(SimLaser)["set_current"]
    t.add("pump.set_current", _set_current, spec, group="pump")
    d = t.describe()[0]
    assert d["name"] == "pump.set_current"
    assert d["params"][0]["limit"] == "current_ma"


# -- exposed_methods -------------------------------------------------------------------------------------


def test_sim_laser_exposes_the_laser_interface():
    methods = exposed_methods(SimLaser)
    assert {"set_current", "set_output", "status"} <= set(methods)
    assert list(methods) == sorted(methods)


def test_sim_laser_set_current_keeps_interface_limit():
    # precondition: the simulated laser's override carries no annotation of its own
    own_hints = typing.get_type_hints(SimLaser.set_current, include_extras=True)
    assert typing.get_origin(own_hints.get("milliamps", float)) is not Annotated
    assert SimLaser.set_current is not Laser.set_current
    spec = exposed_methods(SimLaser)["set_current"]
    (p,) = spec.params
    assert p.name == "milliamps"
    assert p.field.limit == "current_ma"
    assert p.field.unit == "mA"
    assert p.type is float
    assert p.required


def test_override_cannot_drop_a_limit_even_if_exposed_again():
    class LooseLaser(Laser):
        @exposed
        def set_current(self, milliamps: float) -> None:
            """No limit here."""

    spec = exposed_methods(LooseLaser)["set_current"]
    assert spec.params[0].field.limit == "current_ma"


def test_driver_specific_methods_are_added():
    class FancyLaser(SimLaser):
        @exposed
        def set_temperature(self, celsius: Annotated[float, Field(unit="C", min=10, max=40)]) -> None:
            """Set the diode temperature."""

        def helper(self) -> None:  # not exposed
            pass

    methods = exposed_methods(FancyLaser)
    assert "set_temperature" in methods
    assert "helper" not in methods
    assert methods["set_temperature"].params[0].field.unit == "C"
    assert set(exposed_methods(SimLaser)) < set(methods)


@pytest.mark.parametrize(
    "cls, method, param, limit",
    [
        (SimTimeTagger, "set_input_delay", "picoseconds", "input_delay_ps"),
        (SimPolarizationController, "move", "degrees", "angle_deg"),
        (SimPhotonDetector, "set_bias", "microamps", "bias_ua"),
    ],
)
def test_other_sim_drivers_keep_interface_limits(cls, method, param, limit):
    spec = exposed_methods(cls)[method]
    by_name = {p.name: p for p in spec.params}
    assert by_name[param].field.limit == limit
    assert limit in cls.limits


def test_non_exposed_interface_methods_are_not_rpc():
    methods = exposed_methods(SimTimeTagger)
    for name in ("read", "start_stream", "stop_stream", "connect", "close", "safe_state"):
        assert name not in methods
    assert set(exposed_methods(TimeTagger)) == set(methods)
