"""daemon.config: validation of the TOML config, every error with its key path, all at once; `qnetd check`."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from daemon import cli
from daemon.config import (
    DAEMON_FIELDS,
    DEFAULT_SOURCE,
    EX_CONFIG,
    RESERVED_NAMES,
    SUPERVISOR_FIELDS,
    ConfigError,
    default_config_text,
    load,
    validate,
)
from drivers import registry
from drivers.base import Laser, TimeTagger
from drivers.sim.devices import SimLaser
from drivers.sim.tagger import SimTimeTagger

REPO = Path(__file__).resolve().parents[2]


INPROCESS = Path(__file__).resolve().parents[2] / "config" / "sim-inprocess.toml"


def default_raw() -> dict:
    """The in-process testbed config (sim.tagger, sim.laser, ...): the base the option tests modify."""
    return tomllib.loads(INPROCESS.read_text())


def errors_of(raw: dict) -> list:
    with pytest.raises(ConfigError) as exc:
        validate(raw)
    return exc.value.errors


def paths_of(raw: dict) -> list[str]:
    return [e.path for e in errors_of(raw)]


def only_error(raw: dict):
    errs = errors_of(raw)
    assert len(errs) == 1, [str(e) for e in errs]
    return errs[0]


def minimal_laser() -> dict:
    return {"driver": "sim.laser", "limits": {"current_ma": [0.0, 50.0]}}


# -- the embedded default --------------------------------------------------------------------------------


def test_embedded_default_is_config_sim_toml():
    assert default_config_text() == (REPO / "config" / "sim.toml").read_text(encoding="utf-8")


def test_embedded_default_validates():
    raw = tomllib.loads(default_config_text())
    cfg = load()
    assert cfg.simulation is not None and set(cfg.simulation.instruments) == set(raw["simulation"]["instruments"])
    assert cfg.source == DEFAULT_SOURCE
    assert set(cfg.devices) == set(raw["devices"])
    for name, dev in cfg.devices.items():
        assert dev.driver == raw["devices"][name]["driver"]
        assert dev.driver_cls is registry.load(dev.driver)
        assert dev.enabled
        for lim, (lo, hi) in raw["devices"][name].get("limits", {}).items():
            assert dev.limits[lim] == (float(lo), float(hi))
    # the only enabled time tagger is the streaming one
    taggers = [n for n, d in cfg.devices.items() if issubclass(d.driver_cls, TimeTagger)]
    assert cfg.tagger == raw["acquisition"]["tagger"]
    assert taggers == [cfg.tagger]
    # [daemon] values from the file, defaults for keys it does not set
    for key, fld in DAEMON_FIELDS.items():
        assert cfg.daemon[key] == raw["daemon"].get(key, fld.default)
    # supervisor values inherited by every device unless the device overrides them
    for name, dev in cfg.devices.items():
        for key in SUPERVISOR_FIELDS:
            assert getattr(dev.supervisor, key) == raw["devices"][name].get(key, getattr(cfg.supervisor, key))


def test_inprocess_testbed_validates():
    cfg = load(INPROCESS)
    assert cfg.simulation is None and cfg.tagger == "tagger"


def test_default_options_are_filled_in():
    cfg = load(INPROCESS)
    pump = cfg.devices["pump"]
    given = default_raw()["devices"]["pump"]["options"]
    for key, fld in SimLaser.options.items():
        assert pump.options[key] == given.get(key, fld.default)


def test_validate_equals_load_of_the_file():
    raw = tomllib.loads((REPO / "config" / "sim.toml").read_text())
    cfg = validate(raw)
    assert set(cfg.devices) == set(load().devices)


def test_per_device_supervisor_override():
    raw = default_raw()
    raw["devices"]["pump"]["call_timeout_s"] = 0.5
    cfg = validate(raw)
    assert cfg.devices["pump"].supervisor.call_timeout_s == 0.5
    assert cfg.devices["pump"].supervisor.connect_timeout_s == raw["supervisor"]["connect_timeout_s"]
    assert cfg.devices["snspd"].supervisor.call_timeout_s == raw["supervisor"]["call_timeout_s"]


def test_empty_config_is_valid_with_defaults():
    cfg = validate({})
    assert cfg.devices == {}
    assert cfg.tagger is None
    assert cfg.daemon == {k: f.default for k, f in DAEMON_FIELDS.items()}


# -- wrong types and unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("daemon", "log_level", 5),
        ("daemon", "max_request_bytes", "big"),
        ("supervisor", "call_timeout_s", "fast"),
        ("supervisor", "backoff_factor", True),
        ("acquisition", "counts_interval_s", [1]),
    ],
)
def test_wrong_type_in_section(section, key, value):
    raw = default_raw()
    raw[section][key] = value
    assert only_error(raw).path == f"{section}.{key}"


@pytest.mark.parametrize(
    "device, key, value",
    [
        ("tagger", "channels", "8"),
        ("tagger", "pair_channels", [0, 4]),
        ("tagger", "seed", 1.5),
        ("pump", "threshold_ma", "20"),
        ("snspd", "critical_bias_ua", False),
    ],
)
def test_wrong_type_in_device_options(device, key, value):
    raw = default_raw()
    raw["devices"][device]["options"][key] = value
    err = only_error(raw)
    assert err.path.split("[")[0] == f"devices.{device}.options.{key}"


def test_wrong_type_device_level():
    raw = default_raw()
    raw["devices"]["pump"]["enabled"] = "yes"
    assert only_error(raw).path == "devices.pump.enabled"
    raw = default_raw()
    raw["devices"]["pump"]["options"] = "none"
    assert only_error(raw).path == "devices.pump.options"


def test_section_that_is_not_a_table():
    raw = default_raw()
    raw["supervisor"] = 3
    assert only_error(raw).path == "supervisor"
    raw = default_raw()
    raw["devices"] = [1, 2]
    del raw["acquisition"]["tagger"]  # else it also names a device that is now missing
    assert only_error(raw).path == "devices"


def test_unknown_top_level_key():
    raw = default_raw()
    raw["deamon"] = {}
    err = only_error(raw)
    assert err.path == "deamon"
    assert "daemon" in err.allowed


def test_unknown_key_in_daemon():
    raw = default_raw()
    raw["daemon"]["control_endpoint"] = "tcp://127.0.0.1:1"
    err = only_error(raw)
    assert err.path == "daemon.control_endpoint"
    assert "unknown" in err.message
    for key in DAEMON_FIELDS:
        assert key in err.allowed


def test_unknown_key_in_device():
    raw = default_raw()
    raw["devices"]["pump"]["driverr"] = "sim.laser"
    assert only_error(raw).path == "devices.pump.driverr"


def test_unknown_key_in_device_options():
    raw = default_raw()
    raw["devices"]["tagger"]["options"]["pair_rate"] = 1.0
    err = only_error(raw)
    assert err.path == "devices.tagger.options.pair_rate"
    assert "pair_rate_hz" in err.allowed


def test_missing_driver_key():
    raw = default_raw()
    del raw["devices"]["pump"]["driver"]
    err = only_error(raw)
    assert err.path == "devices.pump.driver"
    assert "missing" in err.message


def test_driver_of_wrong_type():
    raw = default_raw()
    raw["devices"]["pump"]["driver"] = 7
    assert only_error(raw).path == "devices.pump.driver"


def test_device_that_is_not_a_table():
    raw = default_raw()
    raw["devices"]["pump"] = "sim.laser"
    assert paths_of(raw) == ["devices.pump"]


def test_unknown_driver_name():
    raw = default_raw()
    raw["devices"]["pump"]["driver"] = "sim.lazer"
    err = only_error(raw)
    assert err.path == "devices.pump.driver"
    assert "'sim.lazer'" in err.message
    for name in registry.available():
        assert name in err.allowed


# -- ranges and choices ----------------------------------------------------------------------------------


def test_negative_pair_rate():
    raw = default_raw()
    raw["devices"]["tagger"]["options"]["pair_rate_hz"] = -1.0
    err = only_error(raw)
    assert err.path == "devices.tagger.options.pair_rate_hz"
    assert "Hz" in err.allowed


def test_log_level_not_allowed():
    raw = default_raw()
    raw["daemon"]["log_level"] = "verbose"
    err = only_error(raw)
    assert err.path == "daemon.log_level"
    for level in DAEMON_FIELDS["log_level"].choices:
        assert repr(level) in err.allowed


@pytest.mark.parametrize("key", sorted(SUPERVISOR_FIELDS))
def test_supervisor_values_below_minimum(key):
    fld = SUPERVISOR_FIELDS[key]
    raw = default_raw()
    raw["supervisor"][key] = fld.min - 1.0
    assert only_error(raw).path == f"supervisor.{key}"


def test_timeouts_above_maximum_in_device_override():
    fld = SUPERVISOR_FIELDS["call_timeout_s"]
    raw = default_raw()
    raw["devices"]["pump"]["call_timeout_s"] = fld.max * 2
    assert only_error(raw).path == "devices.pump.call_timeout_s"


# -- limits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[60.0, 0.0], 60.0, "0..60", [0.0], [0.0, 30.0, 60.0], [True, 60.0], [0.0, "60"], [], {"min": 0, "max": 60}],
)
def test_bad_limit_values(value):
    raw = default_raw()
    raw["devices"]["pump"]["limits"]["current_ma"] = value
    err = only_error(raw)
    assert err.path == "devices.pump.limits.current_ma"
    assert "mA" in err.allowed


def test_equal_min_max_limit_is_allowed():
    raw = default_raw()
    raw["devices"]["pump"]["limits"]["current_ma"] = [10, 10]
    assert validate(raw).devices["pump"].limits["current_ma"] == (10.0, 10.0)


def test_unknown_limit_name():
    raw = default_raw()
    raw["devices"]["pump"]["limits"]["voltage_v"] = [0, 5]
    err = only_error(raw)
    assert err.path == "devices.pump.limits.voltage_v"
    assert "current_ma" in err.allowed


def test_limit_that_belongs_to_another_driver():
    raw = default_raw()
    raw["devices"]["tagger"]["limits"]["current_ma"] = [0, 5]
    err = only_error(raw)
    assert err.path == "devices.tagger.limits.current_ma"
    for name in SimTimeTagger.limits:
        assert name in err.allowed


def test_laser_without_current_limit():
    assert "current_ma" in Laser.required_limits
    raw = default_raw()
    del raw["devices"]["pump"]["limits"]
    err = only_error(raw)
    assert err.path == "devices.pump.limits.current_ma"
    assert "missing" in err.message
    assert "mA" in err.allowed


def test_laser_with_empty_limits_table():
    raw = default_raw()
    raw["devices"]["pump"]["limits"] = {}
    assert only_error(raw).path == "devices.pump.limits.current_ma"


def test_reversed_required_limit_is_one_problem_not_two():
    raw = default_raw()
    raw["devices"]["pump"]["limits"]["current_ma"] = [60, 0]
    assert paths_of(raw) == ["devices.pump.limits.current_ma"]


# -- endpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://192.168.1.5:5555", "tcp://*:5555",
                                      "tcp://[::]:5555", "tcp://example.org:5555"])
@pytest.mark.parametrize("key", ["control", "publish"])
def test_non_loopback_endpoint_refused(key, endpoint):
    raw = default_raw()
    raw["daemon"][key] = endpoint
    err = only_error(raw)
    assert err.path == f"daemon.{key}"
    assert "loopback" in err.message


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://localhost:7000",
                                      "ipc:///tmp/qnetd-test.sock", "tcp://127.0.0.2:7000"])
def test_loopback_and_ipc_endpoints_accepted(endpoint):
    raw = default_raw()
    raw["daemon"]["control"] = endpoint
    assert validate(raw).daemon["control"] == endpoint


def test_endpoint_without_port():
    raw = default_raw()
    raw["daemon"]["control"] = "tcp://127.0.0.1"
    err = only_error(raw)
    assert err.path == "daemon.control"
    assert "port" in err.message


def test_same_control_and_publish_endpoint():
    raw = default_raw()
    raw["daemon"]["publish"] = raw["daemon"]["control"]
    err = only_error(raw)
    assert err.path == "daemon.publish"
    assert "daemon.control" in err.message


def test_publish_equal_to_default_control():
    raw = default_raw()
    del raw["daemon"]["control"]
    raw["daemon"]["publish"] = DAEMON_FIELDS["control"].default
    assert only_error(raw).path == "daemon.publish"


# -- device names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_reserved_device_names(name):
    raw = {"devices": {name: minimal_laser()}}
    err = only_error(raw)
    assert err.path == f"devices.{name}"
    assert "invalid device name" in err.message


@pytest.mark.parametrize("name", ["Pump", "1pump", "_pump", "pump-1", "pump.a", "pump a", "", "a" * 33, "pümp"])
def test_invalid_device_names(name):
    err = only_error({"devices": {name: minimal_laser()}})
    assert err.path == f"devices.{name}"


@pytest.mark.parametrize("name", ["a", "pump2", "pc_alice", "a" * 32])
def test_valid_device_names(name):
    assert name in validate({"devices": {name: minimal_laser()}}).devices


def test_device_name_with_trailing_newline_refused():
    with pytest.raises(ConfigError):
        validate({"devices": {"pump\n": minimal_laser()}})


# -- the streaming tagger --------------------------------------------------------------------------------


def test_several_taggers_need_acquisition_tagger():
    raw = default_raw()
    raw["devices"]["tagger2"] = copy.deepcopy(raw["devices"]["tagger"])
    del raw["acquisition"]["tagger"]
    err = only_error(raw)
    assert err.path == "acquisition.tagger"
    assert "tagger" in err.allowed and "tagger2" in err.allowed


def test_several_taggers_with_acquisition_tagger_named():
    raw = default_raw()
    raw["devices"]["tagger2"] = copy.deepcopy(raw["devices"]["tagger"])
    raw["acquisition"]["tagger"] = "tagger2"
    assert validate(raw).tagger == "tagger2"


def test_single_tagger_is_picked_without_acquisition_tagger():
    raw = default_raw()
    del raw["acquisition"]["tagger"]
    assert validate(raw).tagger == "tagger"


def test_disabled_tagger_is_not_counted():
    raw = default_raw()
    raw["devices"]["tagger2"] = copy.deepcopy(raw["devices"]["tagger"])
    raw["devices"]["tagger2"]["enabled"] = False
    del raw["acquisition"]["tagger"]
    assert validate(raw).tagger == "tagger"


def test_acquisition_tagger_names_unknown_device():
    raw = default_raw()
    raw["acquisition"]["tagger"] = "tagger9"
    err = only_error(raw)
    assert err.path == "acquisition.tagger"
    assert "tagger" in err.allowed


def test_acquisition_tagger_names_a_laser():
    raw = default_raw()
    raw["acquisition"]["tagger"] = "pump"
    err = only_error(raw)
    assert err.path == "acquisition.tagger"
    assert "not an enabled time tagger" in err.message


def test_acquisition_tagger_names_a_disabled_tagger():
    raw = default_raw()
    raw["devices"]["tagger"]["enabled"] = False
    assert only_error(raw).path == "acquisition.tagger"


def test_acquisition_tagger_names_an_invalid_device_reports_only_the_device():
    raw = default_raw()
    raw["devices"]["tagger"]["driver"] = "sim.nothing"
    assert paths_of(raw) == ["devices.tagger.driver"]


# -- all problems at once --------------------------------------------------------------------------------


def test_all_problems_reported_at_once():
    raw = default_raw()
    raw["daemon"]["log_level"] = "loud"
    raw["devices"]["tagger"]["options"]["pair_rate_hz"] = -5.0
    del raw["devices"]["pump"]["limits"]
    expected = {"daemon.log_level", "devices.tagger.options.pair_rate_hz", "devices.pump.limits.current_ma"}
    with pytest.raises(ConfigError) as exc:
        validate(raw, source="lab.toml")
    errs = exc.value.errors
    assert len(errs) == len(expected)
    assert {e.path for e in errs} == expected
    text = str(exc.value)
    assert text.startswith(f"lab.toml: {len(expected)} problem(s)")
    for path in expected:
        assert path in text


def test_many_problems_in_one_device_all_reported():
    raw = default_raw()
    pump = raw["devices"]["pump"]
    pump["colour"] = "red"
    pump["options"]["threshold_ma"] = -1.0
    pump["options"]["bogus"] = 1
    pump["limits"]["voltage_v"] = [0, 1]
    pump["limits"]["current_ma"] = [1]
    expected = {"devices.pump.colour", "devices.pump.options.threshold_ma", "devices.pump.options.bogus",
                "devices.pump.limits.voltage_v", "devices.pump.limits.current_ma"}
    paths = paths_of(raw)
    assert len(paths) == len(expected)
    assert set(paths) == expected


def test_problems_in_several_devices():
    raw = default_raw()
    names = ["pc_alice", "pc_bob", "snspd"]
    for name in names:
        raw["devices"][name]["bogus"] = 1
    assert sorted(paths_of(raw)) == sorted(f"devices.{n}.bogus" for n in names)


# -- sim.tagger cross-option checks ----------------------------------------------------------------------


def test_delays_ps_length_must_match_channels():
    raw = default_raw()
    n = raw["devices"]["tagger"]["options"]["channels"]
    raw["devices"]["tagger"]["options"]["delays_ps"] = [0] * (n - 1)
    err = only_error(raw)
    assert err.path == "devices.tagger.options.delays_ps"
    assert str(n) in err.allowed


def test_delays_ps_of_right_length_accepted():
    raw = default_raw()
    n = raw["devices"]["tagger"]["options"]["channels"]
    delays = [100 * i for i in range(n)]
    raw["devices"]["tagger"]["options"]["delays_ps"] = delays
    assert validate(raw).devices["tagger"].options["delays_ps"] == delays


def test_negative_delay_refused_with_index():
    raw = default_raw()
    n = raw["devices"]["tagger"]["options"]["channels"]
    raw["devices"]["tagger"]["options"]["delays_ps"] = [0] * (n - 1) + [-1]
    assert only_error(raw).path == "devices.tagger.options.delays_ps"


@pytest.mark.parametrize("bad_index", [0, 2])
def test_pair_channels_out_of_range(bad_index):
    raw = default_raw()
    opts = raw["devices"]["tagger"]["options"]
    n = opts["channels"]
    pairs = [list(p) for p in opts["pair_channels"]]
    pairs[bad_index] = [0, n]
    opts["pair_channels"] = pairs
    err = only_error(raw)
    assert err.path == f"devices.tagger.options.pair_channels[{bad_index}]"
    assert str(n) in err.allowed


def test_pair_channels_wrong_length_and_negative():
    raw = default_raw()
    raw["devices"]["tagger"]["options"]["pair_channels"] = [[0], [1, 5], [-1, 2], [1, 2, 3]]
    assert paths_of(raw) == ["devices.tagger.options.pair_channels[0]", "devices.tagger.options.pair_channels[2]",
                             "devices.tagger.options.pair_channels[3]"]


def test_fewer_channels_make_default_pairs_invalid():
    raw = default_raw()
    opts = raw["devices"]["tagger"]["options"]
    opts["channels"] = 4
    bad = [i for i, p in enumerate(opts["pair_channels"]) if max(p) >= 4]
    assert bad  # the default pairs use channels 4..7
    assert paths_of(raw) == [f"devices.tagger.options.pair_channels[{i}]" for i in bad]


# -- load() ----------------------------------------------------------------------------------------------


def test_load_file_and_overrides(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(default_config_text())
    cfg = load(path, {"daemon": {"log_level": "debug"}})
    assert cfg.source == str(path)
    assert cfg.daemon["log_level"] == "debug"


def test_load_override_is_validated(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(default_config_text())
    with pytest.raises(ConfigError) as exc:
        load(path, {"daemon": {"control": "tcp://0.0.0.0:5555"}})
    assert [e.path for e in exc.value.errors] == ["daemon.control"]


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert exc.value.errors[0].path == str(path)


def test_load_not_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon\ncontrol = \n")
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert "TOML" in exc.value.errors[0].message


def test_load_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[daemon]\nlog_level = "d\xe9bug"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert "UTF-8" in exc.value.errors[0].message


# -- qnetd check -----------------------------------------------------------------------------------------


BAD_CONFIG = """
[daemon]
control = "tcp://0.0.0.0:5555"

[devices.tagger]
driver = "sim.tagger"
[devices.tagger.options]
pair_rate_hz = -3.0
"""


def test_cli_check_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    assert cli.main(["check", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "devices.tagger.options.pair_rate_hz" in err
    assert "daemon.control" in err
    assert "loopback" in err
    assert "2 config problem(s)" in err


def test_cli_check_good_file(tmp_path, capsys):
    path = tmp_path / "good.toml"
    path.write_text(default_config_text())
    assert cli.main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out
    for name in default_raw()["devices"]:
        assert name in out


def test_cli_check_default():
    assert cli.main(["check"]) == 0


def test_cli_check_not_toml(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("this is not = = toml [\n")
    assert cli.main(["check", "--config", str(path)]) == EX_CONFIG
    assert str(path) in capsys.readouterr().err


def test_cli_check_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.toml"
    assert cli.main(["check", "--config", str(path)]) == EX_CONFIG
    assert str(path) in capsys.readouterr().err


def test_ex_config_is_sysexits_value():
    import os

    if hasattr(os, "EX_CONFIG"):
        assert EX_CONFIG == os.EX_CONFIG


def test_lab_example_config_validates():
    """config/lab-bbm92.example.toml is what a lab copies: it must stay valid as drivers evolve."""
    cfg = load(INPROCESS.parent / "lab-bbm92.example.toml")
    assert cfg.simulation is None and cfg.analysis is not None
    assert cfg.devices["pump"].limits["current_ma"] == (0.0, 55.0)
    assert {d.driver for d in cfg.devices.values()} == {"swabian.timetagger", "thorlabs.cld", "thorlabs.mpc",
                                                       "singlequantum.eos"}


def test_driver_required_limits_add_to_the_interfaces():
    """A laser driver declaring its own required limit still must have the interface's current_ma."""
    from drivers.base import Laser, all_required_limits
    from drivers.params import Field

    class TecLaser(Laser):
        limits = {"temperature_c": Field(unit="degC")}
        required_limits = ("temperature_c",)

    assert all_required_limits(TecLaser) == ["current_ma", "temperature_c"]
