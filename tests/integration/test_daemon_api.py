"""The real daemon, as a subprocess: describe, status, counts, RPC errors, concurrency, faults."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import zmq

from daemon.api import errors
from tests.integration.conftest import PUMP, config_text

pytestmark = pytest.mark.integration


def wait_state(d, device: str, state: str, timeout: float = 10.0) -> dict:
    """Poll daemon.status until the device is in ``state`` (published messages may predate a subscription)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = d.client.status()["devices"][device]
        if status["state"] == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"{device} never reached {state}: {status}")


def raw_request(endpoint: str, payload: bytes, sock_type: int = zmq.DEALER, timeout_ms: int = 5000):
    ctx = zmq.Context.instance()
    s = ctx.socket(sock_type)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(payload)
        assert s.poll(timeout_ms), "no reply"
        return json.loads(s.recv())
    finally:
        s.close()


def test_describe_lists_methods_topics_devices(start_daemon):
    d = start_daemon(config_text(PUMP))
    desc = d.client.describe()
    methods = {m["name"]: m for m in desc["methods"]}
    for name in ("daemon.describe", "daemon.status", "daemon.shutdown", "pump.set_current", "pump.set_output",
                 "pump.status", "pump.safe_state", "pump.reconnect", "tagger.set_input_delay", "tagger.status"):
        assert name in methods, name
    (milliamps,) = methods["pump.set_current"]["params"]
    assert milliamps["name"] == "milliamps" and milliamps["unit"] == "mA" and milliamps["type"] == "number"
    assert milliamps["limit"] == "current_ma" and milliamps["required"] is True
    assert methods["pump.set_current"]["doc"]
    topics = {t["name"]: t for t in desc["topics"]}
    assert {"counts", "device.<name>", "daemon"} <= set(topics)
    assert {"channels", "counts", "rates_hz", "interval_ps", "seq"} <= set(topics["counts"]["fields"])
    devices = {x["name"]: x for x in desc["devices"]}
    assert devices["pump"]["driver"] == "sim.laser" and devices["pump"]["state"] == "ready"
    assert devices["pump"]["limits"] == {"current_ma": [0.0, 60.0]}
    assert desc["errors"]["LimitExceeded"]["code"] == errors.LIMIT_EXCEEDED

    status = d.client.status()
    assert status["state"] == "running"
    assert {n: s["state"] for n, s in status["devices"].items()} == {"tagger": "ready", "pump": "ready"}


def test_counts_rates_agree_with_simulation(start_daemon):
    d = start_daemon(config_text(speed=10.0, interval=1.0))
    msgs = list(d.client.subscribe("counts", count=3, timeout=10))
    assert len(msgs) == 3
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    background, pair_rate, n_pair_channels = 2000.0, 40000.0, 4
    expected = background + pair_rate / n_pair_channels  # every channel belongs to one pair
    for m in msgs:
        assert m["channels"] == list(range(8))
        assert m["interval_ps"] == m["t_end_ps"] - m["t_begin_ps"] == 1_000_000_000_000
        assert m["overflow"] is False
        seconds = m["interval_ps"] * 1e-12
        for count, rate in zip(m["counts"], m["rates_hz"]):
            assert rate == pytest.approx(count / seconds)
            mean = expected * seconds
            assert abs(count - mean) < 5 * math.sqrt(mean), (count, mean)
    # consecutive intervals tile tagger time
    for a, b in zip(msgs, msgs[1:]):
        assert b["t_begin_ps"] == a["t_end_ps"]


def test_limit_exceeded_and_nothing_sent(start_daemon):
    d = start_daemon(config_text(PUMP))
    d.client.call("pump.set_current", milliamps=30.0)
    with pytest.raises(errors.LimitExceeded) as e:
        d.client.call("pump.set_current", milliamps=61.0)
    assert e.value.code == errors.LIMIT_EXCEEDED
    assert e.value.data["limit"] == "current_ma" and e.value.data["max"] == 60.0
    assert d.client.call("pump.status")["current_setpoint_ma"] == 30.0


@pytest.mark.parametrize("sock_type", [zmq.DEALER, zmq.REQ])
def test_bad_requests_get_right_codes_and_daemon_keeps_serving(start_daemon, sock_type):
    d = start_daemon(config_text(PUMP))
    cases = [
        (b"{not json", errors.PARSE_ERROR),
        (b"\xff\xfe", errors.PARSE_ERROR),
        (b"[1, 2]", errors.INVALID_REQUEST),
        (json.dumps({"jsonrpc": "2.0", "id": 1}).encode(), errors.INVALID_REQUEST),
        (json.dumps({"jsonrpc": "1.0", "id": 1, "method": "daemon.status"}).encode(), errors.INVALID_REQUEST),
        (json.dumps({"jsonrpc": "2.0", "id": 2, "method": "no.such"}).encode(), errors.METHOD_NOT_FOUND),
        (json.dumps({"jsonrpc": "2.0", "id": 3, "method": "pump.set_current",
                     "params": {"milliamps": "forty"}}).encode(), errors.INVALID_PARAMS),
        (json.dumps({"jsonrpc": "2.0", "id": 4, "method": "pump.set_current",
                     "params": {"amps": 1}}).encode(), errors.INVALID_PARAMS),
        (json.dumps({"jsonrpc": "2.0", "id": 5, "method": "pump.set_output",
                     "params": {"on": 1}}).encode(), errors.INVALID_PARAMS),
        (json.dumps({"jsonrpc": "2.0", "id": 6, "method": "daemon.status",
                     "params": {"pad": "x" * 2_000_000}}).encode(), errors.INVALID_REQUEST),
    ]
    for payload, code in cases:
        reply = raw_request(d.control, payload, sock_type)
        if isinstance(reply, list):  # "[1, 2]" is a batch of two invalid requests
            assert [r["error"]["code"] for r in reply] == [code, code]
            continue
        assert reply["error"]["code"] == code, (payload[:60], reply)
        assert reply["jsonrpc"] == "2.0"
    bad_param = raw_request(d.control, cases[6][0], sock_type)["error"]
    assert "milliamps" in bad_param["message"] and bad_param["data"]["param"] == "milliamps"
    assert "mA" in bad_param["message"]
    unknown = raw_request(d.control, cases[7][0], sock_type)["error"]
    assert "amps" in unknown["message"] and "milliamps" in unknown["message"]
    assert raw_request(d.control, cases[-1][0], sock_type)["error"]["data"]["limit"] == 1_048_576
    # still serving, and a good request through the same kind of socket works
    ok = raw_request(d.control, json.dumps({"jsonrpc": "2.0", "id": 9, "method": "daemon.status"}).encode(), sock_type)
    assert ok["id"] == 9 and ok["result"]["state"] == "running"


def test_slow_device_call_does_not_block_others(start_daemon):
    slow_pc = """
[devices.pc]
driver = "sim.polarization"
call_timeout_s = 10.0
[devices.pc.options]
move_time_s = 1.5
"""
    d = start_daemon(config_text(PUMP, slow_pc))
    order: list[str] = []
    done = threading.Event()

    def slow_move():
        from daemon.client import Client

        with Client(d.control, d.publish, timeout=10) as c:
            c.call("pc.move", paddle=0, degrees=100.0)  # 1.5 s of simulated travel
        order.append("move")
        done.set()

    t = threading.Thread(target=slow_move)
    t.start()
    wait_state(d, "pc", "busy")  # the move is in progress; now ask others
    assert d.client.call("pump.status")["output"] is False
    assert d.client.status()["devices"]["pc"]["state"] == "busy"
    order.append("others")
    t.join(10)
    assert done.is_set()
    assert order == ["others", "move"]
    assert d.client.call("pc.positions")[0] == 100.0


def test_faulted_device_does_not_stop_the_others(start_daemon):
    broken = """
[devices.broken]
driver = "sim.laser"
[devices.broken.options]
fail_connect = true
[devices.broken.limits]
current_ma = [0.0, 10.0]
"""
    d = start_daemon(config_text(PUMP, broken))
    # the broken device is retried with backoff and published as faulted
    seen = []
    for msg in d.client.subscribe("device.broken", timeout=5):
        seen.append(msg)
        if msg["state"] == "faulted" and msg["attempt"] >= 2:
            break
    assert "ConnectionRefusedError" in seen[-1]["error"]
    assert seen[-1]["retry_in_s"] is not None
    with pytest.raises(errors.DeviceUnavailable) as e:
        d.client.call("broken.status")
    assert e.value.data["device"] == "broken"
    assert e.value.data["state"] in ("faulted", "connecting")
    # the others run
    status = d.client.status()
    assert status["devices"]["pump"]["state"] == "ready"
    assert status["devices"]["tagger"]["state"] == "ready"
    assert next(iter(d.client.subscribe("counts", count=1, timeout=10)))["counts"]
    d.client.call("pump.set_output", on=True)


def test_device_timeout_faults_then_reconnects(start_daemon):
    hanging_pc = """
[devices.pc]
driver = "sim.polarization"
call_timeout_s = 0.3
[devices.pc.options]
move_time_s = 5.0
"""
    d = start_daemon(config_text(hanging_pc))
    with pytest.raises(errors.Timeout) as e:
        d.client.call("pc.move", paddle=1, degrees=50.0)
    assert e.value.data["device"] == "pc"
    with pytest.raises(errors.DeviceUnavailable):
        d.client.call("pc.positions")
    wait_state(d, "pc", "ready")  # a fresh driver instance is connected after the backoff
    assert d.client.call("pc.positions") == [0.0, 0.0, 0.0]
    assert d.client.status()["devices"]["tagger"]["state"] == "ready"


def test_device_error_keeps_device_ready(start_daemon):
    d = start_daemon(config_text("""
[devices.pc]
driver = "sim.polarization"
"""))
    with pytest.raises(errors.DeviceFailure) as e:
        d.client.call("pc.move", paddle=7, degrees=10.0)  # no paddle 7: the device says so
    assert e.value.data["command"] == "move"
    assert d.client.status()["devices"]["pc"]["state"] == "ready"


def test_shutdown_rpc_exits_zero_after_safe_states(start_daemon):
    d = start_daemon(config_text(PUMP))
    d.client.call("pump.set_current", milliamps=40.0)
    d.client.call("pump.set_output", on=True)
    assert d.client.call("daemon.shutdown") == {"stopping": True}
    assert d.proc.wait(15) == 0
    events = [(r.get("device"), r["event"]) for r in d.logs()]
    assert ("pump", "safe state reached") in events
    assert ("tagger", "safe state reached") in events
    assert events.index(("pump", "safe state reached")) < events.index(("pump", "close done"))


def test_recording_the_stream_to_ptu(start_daemon, tmp_path):
    from drivers.ptu.decoder import KIND_PHOTON, read_ptu

    rec_dir = tmp_path / "recordings"
    text = config_text().replace("[acquisition]\n", f'[acquisition]\nrecord_dir = "{rec_dir}"\n')
    d = start_daemon(text)
    for bad in ("../escape.ptu", "sub/dir.ptu", "no_suffix", ".hidden.ptu"):
        with pytest.raises(errors.InvalidParams):
            d.client.call("acquisition.record_start", file_name=bad)
    started = d.client.call("acquisition.record_start", file_name="run1.ptu")
    assert started["path"] == str(rec_dir / "run1.ptu")
    with pytest.raises(errors.Busy):
        d.client.call("acquisition.record_start", file_name="run2.ptu")
    list(d.client.subscribe("counts", count=2, timeout=20))
    summary = d.client.call("acquisition.record_stop")
    assert summary["tags"] > 0 and summary["error"] is None
    header, decoded, times_ps = read_ptu(rec_dir / "run1.ptu")
    photons = decoded.kind == KIND_PHOTON
    assert int(photons.sum()) == summary["tags"]
    assert np.all(np.diff(times_ps[photons]) >= 0)
    assert set(np.unique(decoded.channel[photons]).tolist()) <= set(range(8))
    with pytest.raises(errors.InvalidParams):  # never overwrite a recording
        d.client.call("acquisition.record_start", file_name="run1.ptu")


def test_recording_disabled_without_record_dir(start_daemon):
    d = start_daemon(config_text())
    with pytest.raises(errors.InvalidParams) as e:
        d.client.call("acquisition.record_start", file_name="x.ptu")
    assert "record_dir" in e.value.message


def test_concurrent_acquisition_stops_leave_one_loop(start_daemon):
    d = start_daemon(config_text(speed=20.0, interval=0.5))
    batch = [{"jsonrpc": "2.0", "id": i, "method": "acquisition.stop"} for i in (1, 2)]
    replies = raw_request(d.control, json.dumps(batch).encode())
    assert sorted(r["id"] for r in replies) == [1, 2] and all("result" in r for r in replies)
    assert d.client.call("acquisition.status")["running"] is False
    d.client.call("acquisition.start")
    msgs = list(d.client.subscribe("counts", count=6, timeout=20))
    begins = [m["t_begin_ps"] for m in msgs]
    assert len(set(begins)) == len(begins)  # one loop: each interval published once
    assert all(b2 - b1 == 500_000_000_000 for b1, b2 in zip(begins, begins[1:]))
    assert not any(m["overflow"] for m in msgs[1:])
