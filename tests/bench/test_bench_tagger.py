"""drivers.sim.bench_tagger.BenchTimeTagger: the driver over a BenchModel (speed 0: as fast as read)."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import registry
from drivers.base import DeviceError, TagFlags
from drivers.params import check_value
from drivers.sim.bench_tagger import BenchTimeTagger
from tests.bench.helpers import make_model


def options(**kw):
    opts = {name: f.default for name, f in BenchTimeTagger.options.items()}
    opts.update({"speed": 0.0, "batch_ms": 5.0, **kw})
    for name, f in BenchTimeTagger.options.items():
        check_value(opts[name], f, name)
    return opts


def test_entry_point_resolves_to_the_driver():
    assert registry.load("sim.bench_tagger") is BenchTimeTagger


def test_without_a_running_bench_connect_says_why():
    tagger = BenchTimeTagger("tagger", options())
    assert tagger.opts["bench"] == "sim://bench"
    with pytest.raises(ConnectionError, match=r"\[simulation\]"):
        tagger.connect()


def test_streams_the_bench_and_exposes_its_tagger():
    model = make_model(tagger={"channels": 10, "resolution_ps": 4})
    tagger = BenchTimeTagger("tagger", options(bench=model))
    tagger.connect()
    assert tagger.channel_count == 10 and tagger.resolution_ps == 4
    tagger.start_stream()
    batches = [tagger.read(1.0) for _ in range(20)]
    assert all(b.t_end - b.t_begin == 5_000_000_000 for b in batches)
    for b in batches:
        b.check_order()
        assert b.flags == TagFlags.NONE
    ts = np.concatenate([b.timestamps for b in batches])
    assert len(ts) > 20_000 and np.all(ts % 4 == 0)
    status = tagger.status()
    assert status["input_delays_ps"] == [0] * 10 and status["channels"] == 10
    tagger.close()


def test_set_input_delay_reaches_the_model_and_refuses_nonsense():
    model = make_model()
    tagger = BenchTimeTagger("tagger", options(bench=model))
    tagger.connect()
    tagger.set_input_delay(2, 1500)
    assert model.input_delays_ps[2] == 1500 and tagger.status()["input_delays_ps"][2] == 1500
    with pytest.raises(DeviceError):
        tagger.set_input_delay(2, -1)
    with pytest.raises(DeviceError):
        tagger.set_input_delay(8, 0)


def test_overflow_is_flagged_on_the_batch():
    model = make_model(tagger={"max_rate_hz": 1e5})
    tagger = BenchTimeTagger("tagger", options(bench=model, batch_ms=20.0))
    tagger.connect()
    tagger.start_stream()
    batch = tagger.read(1.0)
    assert batch.overflow and batch.missed_events > 0
