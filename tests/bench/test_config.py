"""The [simulation] table: defaults, every error with its key path, presets, per-detector overrides."""

from __future__ import annotations

import math

import pytest

from drivers.sim.bench.config import DETECTOR_PRESETS, SCHEMA, BenchConfig, default_config, validate


def paths(raw: dict) -> dict[str, str]:
    cfg, errors = validate(raw)
    assert cfg is None and errors
    return {e.path: str(e) for e in errors}


def test_empty_table_is_the_typical_lab():
    cfg, errors = validate({})
    assert errors == [] and isinstance(cfg, BenchConfig)
    assert cfg.enabled and cfg.source.bell_state == "phi+" and 0.95 <= cfg.source.visibility <= 0.99
    assert cfg.pump.output_on and 0.1 <= cfg.pump.power_mw <= 10  # a fresh bench produces pairs
    assert 1e4 <= cfg.source.brightness <= 1e6
    assert cfg.alice.loss_db_per_km == 0.2 and cfg.alice.group_index == 1.468
    assert cfg.detectors.efficiency == (0.85,) * 8 and cfg.detectors.dead_time_ns == (50.0,) * 8
    assert cfg.detectors.critical_bias_ua == (20.0,) * 8 and cfg.detectors.nominal_bias_ua == (15.0,) * 8
    assert cfg.tagger.channels == 8 and cfg.tagger.input_delays_ps == (0,) * 8
    assert cfg.receivers.alice_angles_deg == (0.0, 45.0) and cfg.receivers.bob_angles_deg == (0.0, 45.0)
    assert cfg.eve.fraction == 0.0


def test_every_field_is_documented():
    for table, fields in SCHEMA.items():
        for key, field in fields.items():
            assert field.doc, f"{table}.{key} has no doc"


def test_instruments_are_ignored_and_enabled_is_accepted():
    cfg, errors = validate({"enabled": False, "instruments": {"pump": {"model": "whatever", "x": [1, 2]}}})
    assert errors == [] and cfg.enabled is False
    assert "simulation.enabled" in paths({"enabled": "yes"})


def test_all_problems_are_reported_with_full_paths():
    got = paths({
        "seed": -1,
        "bogus": 1,
        "source": {"visibility": 1.5, "bell_state": "phi", "brightness": -3},
        "pump": {"current_ma": 150.0},
        "arms": {"alice": {"loss_db": -1, "initial_unitary": "haar"}, "bob": {"drift_rad2_per_s": -0.1}, "carol": {}},
        "receivers": {"mode": "e91", "bob_angles_deg": [1, 2, 3]},
        "detectors": {"preset": "pmt", "efficiency": 1.2, "dark_count_hz": [1.0] * 7, "dead_time_ns": -1},
        "tagger": {"channels": 4, "resolution_ps": 0, "input_delays_ps": [0, -1]},
        "eve": {"fraction": 2, "arm": "carol"},
    })
    for path in [
        "simulation.seed", "simulation.bogus", "simulation.source.visibility", "simulation.source.bell_state",
        "simulation.source.brightness", "simulation.pump.current_ma", "simulation.arms.alice.loss_db",
        "simulation.arms.alice.initial_unitary", "simulation.arms.bob.drift_rad2_per_s", "simulation.arms.carol",
        "simulation.receivers.mode", "simulation.receivers.bob_angles_deg", "simulation.detectors.preset",
        "simulation.detectors.efficiency", "simulation.detectors.dark_count_hz", "simulation.detectors.dead_time_ns",
        "simulation.tagger.channels", "simulation.tagger.resolution_ps", "simulation.tagger.input_delays_ps[1]",
        "simulation.eve.fraction", "simulation.eve.arm",
    ]:
        assert path in got, (path, sorted(got))
    assert "allowed" in got["simulation.source.bell_state"] and "phi+" in got["simulation.source.bell_state"]
    assert "<= 1" in got["simulation.source.visibility"]
    assert "current_limit_ma" in got["simulation.pump.current_ma"]


def test_the_prefix_follows_the_path_argument():
    cfg, errors = validate({"source": {"visibility": -1}}, path="lab.sim")
    assert [e.path for e in errors] == ["lab.sim.source.visibility"]


def test_spad_preset_and_per_detector_overrides():
    cfg, errors = validate({"detectors": {"preset": "spad", "efficiency": [0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4],
                                          "dark_count_hz": 500}})
    assert errors == []
    d = cfg.detectors
    assert d.efficiency[4] == 0.4 and d.dark_count_hz == (500.0,) * 8
    assert d.dead_time_ns == (DETECTOR_PRESETS["spad"]["dead_time_ns"],) * 8
    assert d.jitter_ps == (150.0,) * 8 and d.critical_bias_ua == (None,) * 8
    assert "simulation.detectors.critical_bias_ua" in paths({"detectors": {"preset": "spad", "critical_bias_ua": 10}})


def test_an_snspd_biased_above_critical_at_start_is_refused():
    got = paths({"detectors": {"critical_bias_ua": 12.0}})  # nominal 15 uA
    assert "simulation.detectors.nominal_bias_ua" in got


def test_tagger_lists_follow_the_channel_count():
    cfg, errors = validate({"tagger": {"channels": 10, "input_delays_ps": list(range(10)), "dead_time_ns": 3}})
    assert errors == [] and cfg.tagger.input_delays_ps[9] == 9 and cfg.tagger.dead_time_ns == (3.0,) * 10
    assert "simulation.tagger.input_delays_ps" in paths({"tagger": {"input_delays_ps": [0] * 7}})
    assert "simulation.tagger.dead_time_ns" in paths({"tagger": {"dead_time_ns": [1.0] * 3}})


def test_chsh_mode_defaults_bob_to_22_5_and_67_5():
    cfg, _ = validate({"receivers": {"mode": "chsh"}})
    assert cfg.receivers.bob_angles_deg == (22.5, 67.5) and cfg.receivers.alice_angles_deg == (0.0, 45.0)


def test_arm_transmission_and_delay():
    cfg = default_config(arms={"bob": {"fiber_km": 25.0, "loss_db": 3.0}})
    assert math.isclose(cfg.bob.transmission, 10 ** (-(3.0 + 25 * 0.2) / 10))
    assert abs(cfg.bob.delay_ps - 25e3 * 1.468 / 299_792_458 * 1e12) <= 0.5


def test_default_config_raises_on_bad_overrides():
    with pytest.raises(ValueError, match="simulation.eve.fraction"):
        default_config(eve={"fraction": -1})
