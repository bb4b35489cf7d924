"""AnalysisPipeline: config validation with key paths, messages matching the topic schemas, runtime setters,
restarts, and the analysis.* RPC methods on a real MethodTable (calibration with progress)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from daemon.analysis.coincidences import CoincidenceEngine
from daemon.analysis.pipeline import (ANALYSIS_FIELDS, PROGRESS_TOPIC, TOPICS, AnalysisPipeline, register,
                                      rpc_handlers, validate)
from daemon.api.errors import InvalidParams, Timeout
from daemon.api.methods import MethodTable
from daemon.api.protocol import dumps
from drivers.base import TagBatch, TagFlags

from .test_calibration import stream


def bbm92_stream(T=3 * 10**10, seed=0):
    return stream({4: 0, 5: 0, 6: 0, 7: 0}, [(0, 4), (1, 5), (2, 6), (3, 7)], n_pairs=3000, bg=10_000, T=T, seed=seed)


def batches_of(ts, ch, t0, t1, n):
    bounds = np.linspace(t0, t1, n + 1).astype(np.int64)
    for x, y in zip(bounds[:-1], bounds[1:]):
        lo, hi = np.searchsorted(ts, [x, y])
        yield TagBatch(ts[lo:hi], ch[lo:hi], int(x), int(y))


FULL = {"window_ps": 800, "integration_s": 0.01, "accidental_offset_ps": 50_000,
        "histograms": [{"name": "g2", "pair": [0, 4], "bin_ps": 50, "range_ps": 5000},
                       {"name": "sum", "pair": [1, 5], "bin_ps": 100, "range_ps": 2000, "accumulate": True}],
        "links": [{"name": "ab"}]}


def test_defaults_validate():
    cfg, errors = validate({})
    assert errors == []
    assert cfg["window_ps"] == 1000 and cfg["matrix"] == {"alice": [0, 1, 2, 3], "bob": [4, 5, 6, 7]}
    assert set(cfg) == set(ANALYSIS_FIELDS)


def test_every_problem_with_its_key_path():
    raw = {
        "window_ps": -1,
        "foo": 1,
        "pairs": [[1, 1], [2, 3]],
        "accidental_offset_ps": 10,
        "delays_ps": [0, 1.5],
        "histograms": [{"name": "Bad Name", "pair": [0], "bin_ps": 7, "range_ps": 10, "colour": "red"},
                       {"name": "g", "pair": [0, 4], "bin_ps": 3, "range_ps": 10}],
        "links": [{"name": "ab", "alice": [0, 1, 2], "bell_state": "phi0"}, {"name": "ab", "bob": [0, 1, 2, 3]}],
    }
    cfg, errors = validate(raw, path="analysis", channel_count=4)
    assert cfg is None
    paths = {e.path for e in errors}
    for want in ["analysis.window_ps", "analysis.foo", "analysis.pairs[0]", "analysis.delays_ps[1]",
                 "analysis.histograms[0].name", "analysis.histograms[0].pair", "analysis.histograms[0].colour",
                 "analysis.histograms[1].range_ps", "analysis.links[0].alice", "analysis.links[0].bell_state",
                 "analysis.links[1].name", "analysis.links[1]", "analysis.histograms[1].pair"]:
        assert want in paths, (want, sorted(paths))
    assert all(str(e).startswith(e.path) for e in errors)
    cfg, errors = validate({"window_ps": 1000, "accidental_offset_ps": 10})
    assert [e.path for e in errors] == ["analysis.accidental_offset_ps"]


def test_messages_follow_the_topic_schemas():
    cfg, _ = validate(FULL)
    p = AnalysisPipeline(cfg, device="tagger")
    ts, ch = bbm92_stream()
    msgs = []
    for b in batches_of(ts, ch, 0, 3 * 10**10, 17):
        msgs += p.feed(b)
    topics = {m[0] for m in msgs}
    assert topics == {"coincidences", "histogram.g2", "histogram.sum", "qkd.ab"}
    n_int = sum(1 for m in msgs if m[0] == "coincidences")
    assert n_int >= 2
    for topic, fields, arrays, t0, t1 in msgs:
        pattern = topic if topic in TOPICS else topic.split(".")[0] + (".<name>" if topic.startswith("histogram")
                                                                        else ".<link>")
        schema = TOPICS[pattern]
        assert set(fields) | {"t_begin_ps", "t_end_ps"} == set(schema["fields"]), topic
        assert [a[0] for a in arrays] == [f["name"] for f in schema["frames"]]
        for _, arr in arrays:
            assert arr.dtype == np.dtype("<i8")
        assert t1 - t0 == fields["interval_ps"] == 10**10
        dumps(fields)  # JSON with NaN refused: every undefined value must be null
        assert fields["device"] == "tagger"
    q = [m[1] for m in msgs if m[0] == "qkd.ab"]
    assert all(x["qber"]["Z"] < 0.2 for x in q)  # pairs on the matching channels: a low QBER
    acc = [m for m in msgs if m[0] == "histogram.sum"]
    assert [m[1]["intervals"] for m in acc] == list(range(1, len(acc) + 1))
    assert json.loads(json.dumps(PROGRESS_TOPIC))


def test_coincidences_equal_the_engine_and_matrix_layout():
    cfg, _ = validate({"integration_s": 0.01, "accidental_offset_ps": 50_000})
    p = AnalysisPipeline(cfg)
    ts, ch = bbm92_stream()
    msgs = [m for b in batches_of(ts, ch, 0, 3 * 10**10, 5) for m in p.feed(b) if m[0] == "coincidences"]
    eng = CoincidenceEngine(p._spec)
    ivs = [iv for b in batches_of(ts, ch, 0, 3 * 10**10, 3) for iv in eng.feed(b)]
    assert [m[1]["counts"] for m in msgs] == [iv.counts.tolist() for iv in ivs]
    m = msgs[0][1]
    assert m["mode"] == "matrix" and np.array(m["matrix"]).shape == (4, 4)
    diag = np.diag(np.array(m["matrix"]))
    assert diag.min() > 10 * np.array(m["matrix"]).sum(axis=1).min() / 100


def test_setters_take_effect_at_the_next_batch():
    cfg, _ = validate({"integration_s": 0.01, "pairs": [[0, 4]]})
    p = AnalysisPipeline(cfg)
    ts, ch = bbm92_stream()
    bs = list(batches_of(ts, ch, 0, 3 * 10**10, 30))
    for b in bs[:7]:
        p.feed(b)
    p.set_window(300)
    p.set_delays({4: 12})
    p.set_integration(0.005)
    assert p.status()["pending_config"]["window_ps"] == 300
    out = [m for b in bs[7:] for m in p.feed(b) if m[0] == "coincidences"]
    assert p.status()["discarded_intervals"] == 1
    assert out[0][3] == bs[7].t_begin  # a new grid from that batch
    assert all(m[1]["window_ps"] == 300 and m[1]["interval_ps"] == 5 * 10**9 for m in out)
    assert out[0][1]["delays_ps"] == {"4": 12}
    fresh = CoincidenceEngine(p._spec)
    ivs = [iv for b in bs[7:] for iv in fresh.feed(b)]
    assert [m[1]["counts"] for m in out] == [iv.counts.tolist() for iv in ivs]
    with pytest.raises(ValueError):
        p.set_window(0)
    with pytest.raises(ValueError):
        p.set_delays({4: 1.5})
    p.set_pairs(alice=[0, 1], bob=[4])
    assert p.config["pairs"] == [] and p.config["matrix"] == {"alice": [0, 1], "bob": [4]}


def test_restart_resets():
    cfg, _ = validate({"integration_s": 0.01, "pairs": [[0, 4]]})
    p = AnalysisPipeline(cfg)
    ts, ch = bbm92_stream()
    bs = list(batches_of(ts, ch, 0, 3 * 10**10, 10))
    for b in bs[:5]:
        p.feed(b)
    out = p.feed(bs[1])  # time went backwards: a restart the caller did not report
    assert p.status()["restarts"] == 1 and out == []
    p.reset()
    assert p.status()["t0_ps"] is None


def test_overflow_flags_reach_the_topics():
    cfg, _ = validate({"integration_s": 0.01, "links": [{"name": "ab"}]})
    p = AnalysisPipeline(cfg)
    ts, ch = bbm92_stream()
    msgs = []
    for i, b in enumerate(batches_of(ts, ch, 0, 3 * 10**10, 6)):
        if i == 3:  # [1.5e10, 2e10): inside interval 1 only
            b = TagBatch(b.timestamps, b.channels, b.t_begin, b.t_end, TagFlags.OVERFLOW, 42)
        msgs += p.feed(b)
    flags = [(m[0], m[1]["overflow"]) for m in msgs]
    assert flags == [("coincidences", False), ("qkd.ab", False), ("coincidences", True), ("qkd.ab", True)]
    assert sum(m[1]["missed_events"] for m in msgs if m[0] == "coincidences") == 42


def test_disabled_publishes_nothing():
    cfg, _ = validate({"enabled": False, "integration_s": 0.01})
    p = AnalysisPipeline(cfg)
    ts, ch = bbm92_stream()
    assert [m for b in batches_of(ts, ch, 0, 3 * 10**10, 3) for m in p.feed(b)] == []


# ---------------------------------------------------------------------------------------------------------
# RPC


def test_rpc_methods_register_and_validate():
    cfg, _ = validate({"integration_s": 0.01})
    p = AnalysisPipeline(cfg)
    table = MethodTable()
    register(table, p)
    names = [n for n in table.names() if n.startswith("analysis.")]
    assert set(names) == {"analysis.set_window", "analysis.set_delays", "analysis.set_pairs",
                          "analysis.set_integration", "analysis.set_accidental_offset", "analysis.calibrate_delays",
                          "analysis.status"}
    described = {d["name"]: d for d in table.describe()}
    assert {x["name"] for x in described["analysis.calibrate_delays"]["params"]} >= {"pairs", "duration_s", "apply"}

    async def go():
        r = await table.call("analysis.set_window", {"window_ps": 500})
        assert r["window_ps"] == 500
        with pytest.raises(InvalidParams):
            await table.call("analysis.set_window", {"window_ps": 0})
        r = await table.call("analysis.set_delays", {"delays_ps": {"5": 120, "2": -7}})
        assert r["delays_ps"][:6] == [0, 0, -7, 0, 0, 120]
        with pytest.raises(InvalidParams):
            await table.call("analysis.set_delays", {"delays_ps": {"x": 1}})
        with pytest.raises(InvalidParams):
            await table.call("analysis.set_delays", {"delays_ps": {"3": 0.5}})
        r = await table.call("analysis.set_pairs", {"pairs": [[0, 4], [1, 5]]})
        assert r["pairs"] == [[0, 4], [1, 5]]
        with pytest.raises(InvalidParams):
            await table.call("analysis.set_pairs", {"pairs": [[0, 0]]})
        await table.call("analysis.set_integration", {"seconds": 0.02})
        st = await table.call("analysis.status", {})
        assert st["config"]["integration_s"] == 0.02
        json.dumps(st)

    asyncio.run(go())


def test_rpc_calibrate_delays_with_progress_and_apply():
    true = {4: 3100, 5: -800, 6: 2200, 7: 0}
    pairs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    ts, ch = stream(true, pairs, n_pairs=4000, bg=10_000, T=2 * 10**10)
    cfg, _ = validate({"integration_s": 0.01})
    p = AnalysisPipeline(cfg)
    progress = []
    handlers = dict(rpc_handlers(p, progress=progress.append))

    async def feeder():
        for b in batches_of(ts, ch, 0, 2 * 10**10, 40):
            await asyncio.sleep(0.002)
            p.feed(b)

    async def go():
        task = asyncio.create_task(feeder())
        result = await handlers["analysis.calibrate_delays"](duration_s=0.012, apply=True, timeout_s=30.0)
        await task
        return result

    r = asyncio.run(go())
    assert r["applied"] and r["all_found"]
    for x in r["pairs"]:
        assert abs(x["delay_ps"] + true[x["pair"][1]]) <= 5
        assert x["peak_width_ps"] > 0 and x["signal_to_background"] > 1
    assert p.config["delays_ps"][4:8] == [r["delays_ps"][str(c)] for c in (4, 5, 6, 7)]
    phases = [x["phase"] for x in progress]
    assert phases[0] == "started" and phases[-1] == "done" and "collecting" in phases
    json.dumps(r)


def test_rpc_calibration_times_out_without_data():
    cfg, _ = validate({})
    p = AnalysisPipeline(cfg)
    handlers = dict(rpc_handlers(p))

    async def go():
        with pytest.raises(Timeout, match="acquisition"):
            await handlers["analysis.calibrate_delays"](duration_s=1.0, timeout_s=0.05)
        # the slot is free again
        with pytest.raises(Timeout):
            await handlers["analysis.calibrate_delays"](duration_s=1.0, timeout_s=0.05)

    asyncio.run(go())


def test_warm_up_compiles_every_kernel_path():
    from daemon.analysis.pipeline import warm_up

    assert warm_up() < 60.0
