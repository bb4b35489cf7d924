"""Single Quantum Eos: the real driver against the protocol-level simulator over TCP, plus framing and
malformed-reply cases against raw sockets and a tiny scripted fake controller."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from typing import Any, Callable

import pytest

from daemon.supervisor import check_limits
from drivers.base import DeviceError, exposed_methods
from drivers.sim.bench.state import BenchState, DetectorState
from drivers.sim.instruments import load_model
from drivers.sim.instruments.eos import SimEos, split_messages
from drivers.singlequantum_eos import JsonFramer, Malformed, SingleQuantumEos, parse_address

N = 4  # channels of the simulated controller in these tests
PERIOD_MS = 20.0


def make_state() -> BenchState:
    return BenchState(detector=DetectorState(critical_bias_ua=20.0, bias_ua=15.0))


@pytest.fixture
def state() -> BenchState:
    return make_state()


@pytest.fixture
def sim(state: BenchState):
    s = SimEos("snspd", state, {"detectors": [0, 1, 2, 3], "measurement_period_ms": PERIOD_MS, "counts_noise": "round"})
    s.start()
    yield s
    s.stop()


def driver_for(address: str, **options: Any) -> SingleQuantumEos:
    opts = {k: f.default for k, f in SingleQuantumEos.options.items() if k != "address"}
    opts.update({"address": address, "timeout_s": 1.0, "latch_settle_s": 0.01}, **options)
    return SingleQuantumEos("snspd", opts)


@pytest.fixture
def make_driver(sim: SimEos):
    made: list[SingleQuantumEos] = []

    def make(**options: Any) -> SingleQuantumEos:
        d = driver_for(sim.address, counts_port=sim.counts_port, **options)
        made.append(d)
        d.connect()
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def drv(make_driver) -> SingleQuantumEos:
    return make_driver(latch_recovery=False)


def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def status_until(drv: SingleQuantumEos, pred: Callable[[dict], bool], timeout: float = 2.0) -> dict:
    """Poll status() until ``pred`` holds (counts lines arrive once per period)."""
    deadline = time.monotonic() + timeout
    while True:
        st = drv.status()
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"status never satisfied the condition: {st}")
        time.sleep(PERIOD_MS / 1000)


def bias_commands(sim: SimEos) -> list[list[float]]:
    return [m["value"] for m in list(sim.received) if isinstance(m, dict) and m.get("command") == "SetAllBiasCurrents"]


# --------------------------------------------------------------------------------------------------------
# driver against the simulator


def test_model_registered_and_address_format(sim: SimEos) -> None:
    assert load_model("singlequantum_eos") is SimEos
    host, port = parse_address(sim.address)
    assert host == "127.0.0.1" and port > 0 and port != sim.counts_port
    assert sim.driver_options == {"address": sim.address, "counts_port": sim.counts_port}
    assert sim.running


def test_connect_identifies(drv: SingleQuantumEos, sim: SimEos) -> None:
    info = drv.describe()
    assert info["vendor"] == "Single Quantum" and info["model"] == "Eos"
    assert info["channels"] == N == drv.channel_count
    assert info["serial"] == "SIM-EOS-0001"
    assert info["bounds"]["bias_ua"] == [0.0, 50.0]
    assert {"request": "labelProps", "value": "None"} in list(sim.received)


def test_channel_count_is_checked_against_the_controller(sim: SimEos) -> None:
    d = driver_for(sim.address, counts_port=0, channels=8)
    with pytest.raises(DeviceError, match="4 channels"):
        d.connect()
    d.close()
    d = driver_for(sim.address, counts_port=0, channels=4)
    d.connect()
    d.close()


def test_set_bias_per_channel_and_read_back(drv: SingleQuantumEos, state: BenchState, sim: SimEos) -> None:
    drv.set_bias_currents([10.0, 11.5, 12.0, 13.25])
    assert [state.detector(i).bias_ua for i in range(N)] == [10.0, 11.5, 12.0, 13.25]
    assert state.detector(4).bias_ua == 15.0  # not this controller's detector
    st = drv.status()
    assert st["bias_ua"] == [10.0, 11.5, 12.0, 13.25]
    assert st["bias_voltage_mv"] == pytest.approx([1.0, 1.15, 1.2, 1.325])  # superconducting: ~mV
    assert st["latched"] == [False] * N
    drv.set_bias(14.0)
    assert [state.detector(i).bias_ua for i in range(N)] == [14.0] * N
    assert bias_commands(sim)[-1] == [14.0] * N
    with pytest.raises(DeviceError, match="expected 4 values"):
        drv.set_bias_currents([1.0, 2.0])


def test_bias_outside_controller_range_is_a_device_error_and_changes_nothing(drv: SingleQuantumEos,
                                                                            state: BenchState) -> None:
    with pytest.raises(DeviceError) as e:
        drv.set_bias_currents([10.0, 60.0, 10.0, 10.0])
    assert e.value.command == "SetAllBiasCurrents" and "out of range" in str(e.value)
    assert [state.detector(i).bias_ua for i in range(N)] == [15.0] * N
    drv.set_bias(12.0)  # the device is still usable
    assert state.detector(3).bias_ua == 12.0


def test_bias_limit_is_enforced_by_the_daemon_on_each_element() -> None:
    methods = exposed_methods(SingleQuantumEos)
    assert methods["set_bias_currents"].params[0].field.limit == "bias_ua"
    assert methods["set_bias"].params[0].field.limit == "bias_ua"
    assert {"recover_latched", "set_trigger_levels", "set_measurement_period", "status", "set_enabled"} <= set(methods)
    limits = {"bias_ua": (0.0, 25.0)}
    check_limits(methods["set_bias_currents"], {"microamps": [10.0, 25.0]}, limits)
    with pytest.raises(Exception, match="outside the configured limit"):
        check_limits(methods["set_bias_currents"], {"microamps": [10.0, 25.5]}, limits)


def test_enable_disable_updates_bench(drv: SingleQuantumEos, state: BenchState) -> None:
    drv.set_enabled(False)
    assert not any(state.detector(i).enabled for i in range(N))
    assert state.detector(4).enabled  # another controller's detector
    st = drv.status()
    assert st["enabled"] is False and st["bias_voltage_mv"] == [0.0] * N
    drv.set_enabled(True)
    assert all(state.detector(i).enabled for i in range(N))
    assert drv.status()["enabled"] is True


def test_bias_above_critical_latches_and_shows_in_bias_voltage_and_counts(drv: SingleQuantumEos,
                                                                         state: BenchState) -> None:
    state.rates_hz[:N] = [1000.0] * N
    drv.set_bias_currents([25.0, 15.0, 15.0, 15.0])
    assert state.detector(0).latched and not state.detector(0).counting
    assert not state.detector(1).latched
    st = drv.status()
    assert st["latched"] == [True, False, False, False]
    assert st["bias_voltage_mv"][0] > 500 and st["bias_voltage_mv"][1] < 10
    st = status_until(drv, lambda st: st["count_rate_hz"][1] == pytest.approx(1000.0))
    assert st["count_rate_hz"][0] == 0.0  # latched: no counts although light arrives
    # lowering the setpoint below critical does not unlatch: the nanowire stays resistive
    drv.set_bias_currents([18.0, 15.0, 15.0, 15.0])
    assert state.detector(0).latched
    assert drv.status()["latched"][0]


def test_recover_latched_cycles_bias_and_clears(drv: SingleQuantumEos, state: BenchState, sim: SimEos) -> None:
    assert drv.recover_latched() == {"latched": [], "attempts": 0, "recovered": [], "still_latched": [],
                                     "restored_bias_ua": [15.0] * N}
    drv.set_bias_currents([25.0, 15.0, 15.0, 15.0])
    drv.set_bias_currents([18.0, 15.0, 15.0, 15.0])
    assert state.detector(0).latched
    n_before = len(bias_commands(sim))
    report = drv.recover_latched()
    assert report["latched"] == [0] and report["recovered"] == [0] and report["attempts"] == 1
    assert report["still_latched"] == []
    assert not state.detector(0).latched and state.detector(0).counting
    assert state.detector(0).bias_ua == 18.0  # setpoint restored
    cycle = bias_commands(sim)[n_before:]
    assert cycle == [[0.0, 15.0, 15.0, 15.0], [18.0, 15.0, 15.0, 15.0]]  # only the latched channel was cycled
    assert drv.status()["latched"] == [False] * N


def test_recover_latched_respects_retry_limit(make_driver, state: BenchState, sim: SimEos) -> None:
    drv = make_driver(latch_recovery=False, latch_retry_limit=2)
    drv.set_bias_currents([25.0, 25.0, 15.0, 15.0])
    n_before = len(bias_commands(sim))
    with pytest.raises(DeviceError) as e:
        drv.recover_latched()
    assert e.value.command == "recover_latched"
    assert "still latched after 2" in str(e.value) and "[0, 1]" in str(e.value)
    zeroings = [v for v in bias_commands(sim)[n_before:] if v[0] == 0.0]
    assert len(zeroings) == 2
    assert state.detector(0).latched and state.detector(0).bias_ua == 25.0  # setpoint left as commanded


def test_status_recovers_latched_channels_automatically(make_driver, state: BenchState) -> None:
    drv = make_driver(latch_recovery=True)
    drv.set_bias_currents([25.0, 15.0, 15.0, 15.0])
    drv.set_bias_currents([18.0, 15.0, 15.0, 15.0])
    st = drv.status()
    assert st["latched"] == [False] * N
    assert st["latch_recovery"]["actions"] == [{"channels": [0], "attempts": [1], "cleared": [0],
                                                "restored_bias_ua": [18.0, 15.0, 15.0, 15.0]}]
    assert not state.detector(0).latched and state.detector(0).bias_ua == 18.0


def test_status_auto_recovery_gives_up_after_the_limit(make_driver, state: BenchState, sim: SimEos) -> None:
    drv = make_driver(latch_recovery=True, latch_retry_limit=3)
    drv.set_bias_currents([15.0, 15.0, 25.0, 15.0])
    n_before = len(bias_commands(sim))
    for attempt in (1, 2):
        st = drv.status()  # one cycle per poll
        assert st["latched"][2] and st["latch_recovery"]["attempts"][2] == attempt
    with pytest.raises(DeviceError, match=r"channel\(s\) \[2\] still latched after 3") as e:
        drv.status()
    assert e.value.command == "status"
    st = drv.status()  # episode exhausted: no more cycles, reported
    assert st["latched"][2] and st["latch_recovery"]["gave_up"] == [2] and st["latch_recovery"]["actions"] == []
    assert len([v for v in bias_commands(sim)[n_before:] if v[2] == 0.0]) == 3
    # a new setpoint starts a new episode, and a setpoint below critical recovers on the next poll
    drv.set_bias_currents([15.0, 15.0, 18.0, 15.0])
    st = drv.status()
    assert st["latched"] == [False] * N and st["latch_recovery"]["gave_up"] == []


def test_trigger_levels(drv: SingleQuantumEos, state: BenchState) -> None:
    drv.set_trigger_levels([50.0, 60.0, 70.0, 80.0])
    assert [state.detector(i).trigger_level_mv for i in range(N)] == [50.0, 60.0, 70.0, 80.0]
    assert drv.status()["trigger_level_mv"] == [50.0, 60.0, 70.0, 80.0]
    with pytest.raises(DeviceError) as e:
        drv.set_trigger_levels([50.0, 60.0, 70.0, 5000.0])
    assert e.value.command == "SetAllTriggerLevels"
    assert state.detector(3).trigger_level_mv == 80.0


def test_measurement_period(drv: SingleQuantumEos, sim: SimEos) -> None:
    drv.set_measurement_period(50.0)
    assert sim.measurement_period_ms == 50.0 and drv.status()["measurement_period_ms"] == 50.0
    with pytest.raises(DeviceError) as e:
        drv.set_measurement_period(1.0)  # below the controller's range
    assert e.value.command == "SetMeasurementPeriod"
    assert sim.measurement_period_ms == 50.0


def test_counts_stream(drv: SingleQuantumEos, state: BenchState) -> None:
    state.rates_hz[:N] = [1000.0, 2000.0, 0.0, 500.0]
    st = status_until(drv, lambda st: st["counts"] == [20.0, 40.0, 0.0, 10.0])  # rate * 20 ms, rounded
    assert st["count_rate_hz"] == pytest.approx([1000.0, 2000.0, 0.0, 500.0])
    t0 = st["counts_timestamp"]
    status_until(drv, lambda st: st["counts_timestamp"] > t0)
    drv.set_enabled(False)  # not counting: zero whatever the physics wrote
    status_until(drv, lambda st: st["count_rate_hz"] == [0.0] * N)
    state.rates_hz[:N] = [0.0] * N
    drv.set_enabled(True)
    state.rates_hz[:N] = [3000.0] * N
    status_until(drv, lambda st: st["count_rate_hz"] == pytest.approx([3000.0] * N))


def test_counts_port_lines_and_poisson_option(state: BenchState) -> None:
    sim = SimEos("eos2", state, {"detectors": [4, 5], "measurement_period_ms": 10.0, "seed": 3})
    sim.start()
    try:
        state.rates_hz[4:6] = [100_000.0, 0.0]
        with socket.create_connection(("127.0.0.1", sim.counts_port), timeout=2) as s:
            buf = b""
            while buf.count(b"\n") < 3:
                buf += s.recv(4096)
        lines = [ln.split(",") for ln in buf.decode().splitlines()[:3]]
        assert all(len(f) == 3 for f in lines)
        stamps = [int(f[0]) for f in lines]
        assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
        first = [int(f[1]) for f in lines]
        assert all(800 < c < 1200 for c in first)  # Poisson around 1000 per 10 ms
        assert {int(f[2]) for f in lines} == {0}
    finally:
        sim.stop()


def test_stale_error_broadcast_is_not_blamed_on_the_next_call(drv: SingleQuantumEos, sim: SimEos) -> None:
    sim.broadcast({"label": "Error", "value": "overheated amplifier (test)"})
    ready, _, _ = select.select([drv._sock], [], [], 2.0)  # the broadcast has reached the driver's socket
    assert ready
    st = drv.status()
    assert st["controller_errors"] == ["Error: overheated amplifier (test)"]


def test_safe_state_disables_and_zeroes_bias(drv: SingleQuantumEos, state: BenchState) -> None:
    drv.set_bias_currents([25.0, 15.0, 15.0, 15.0])
    assert state.detector(0).latched
    drv.safe_state()
    for i in range(N):
        d = state.detector(i)
        assert not d.enabled and d.bias_ua == 0.0 and not d.latched
    st = drv.status()
    assert st["enabled"] is False and st["bias_ua"] == [0.0] * N


def test_enable_restores_nominal_bias_after_safe_state(make_driver, state: BenchState) -> None:
    drv = make_driver(nominal_bias_ua=[16.0, 17.0, 0.0, 18.0])
    drv.safe_state()
    drv.set_enabled(True)
    assert [state.detector(i).bias_ua for i in range(N)] == [16.0, 17.0, 0.0, 18.0]
    assert all(state.detector(i).enabled for i in range(N))
    drv.set_bias_currents([12.0, 12.0, 12.0, 12.0])
    drv.set_enabled(True)  # non-zero setpoints are left alone
    assert state.detector(0).bias_ua == 12.0


def test_unplug_then_replug_with_a_new_driver(make_driver, sim: SimEos, state: BenchState) -> None:
    drv = make_driver()
    drv.set_bias(14.0)
    control_port, counts_port = sim.address, sim.counts_port
    sim.stop()
    assert not sim.running
    with pytest.raises(Exception) as e:
        drv.status()
    assert not isinstance(e.value, DeviceError) and isinstance(e.value, OSError)
    with pytest.raises(OSError):
        make_driver()  # nothing listening
    sim.start()
    assert sim.address == control_port and sim.counts_port == counts_port
    fresh = make_driver()
    st = fresh.status()
    assert st["bias_ua"] == [14.0] * N  # the controller kept its settings
    fresh.set_bias(13.0)
    assert state.detector(0).bias_ua == 13.0


def test_stalled_controller_times_out_without_hanging(make_driver, sim: SimEos) -> None:
    drv = make_driver(timeout_s=0.3)
    sim.stall = True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.set_bias(12.0)
    assert time.monotonic() - t0 < 0.3 + 0.5


def test_fragmented_controller_output(make_driver, sim: SimEos, state: BenchState) -> None:
    sim.fragment_writes(7, gap_s=0.0005)
    drv = make_driver()
    drv.set_bias_currents([11.0, 12.0, 13.0, 14.0])
    assert drv.status()["bias_ua"] == [11.0, 12.0, 13.0, 14.0]


def test_sim_rejects_unknown_options_and_detectors(state: BenchState) -> None:
    with pytest.raises(ValueError, match="unknown option"):
        SimEos("x", state, {"bogus": 1})
    with pytest.raises(ValueError, match="not on the bench"):
        SimEos("x", state, {"detectors": [0, 99]})
    with pytest.raises(RuntimeError, match="start"):
        _ = SimEos("x", state, {}).address


# --------------------------------------------------------------------------------------------------------
# framing against the simulator (raw client)


class RawClient:
    def __init__(self, address: str) -> None:
        host, port = parse_address(address)
        self.sock = socket.create_connection((host, port), timeout=2)
        self.framer = JsonFramer()
        self.items: list[Any] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait(self, pred: Callable[[Any], bool], timeout: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for i, item in enumerate(self.items):
                if pred(item):
                    return self.items.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message; got {self.items}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            assert data, "simulator closed the connection"
            self.items.extend(self.framer.feed(data))

    def close(self) -> None:
        self.sock.close()


def label_is(name: str) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, dict) and m.get("label") == name


def is_error(m: Any) -> bool:
    return isinstance(m, dict) and "Error" in str(m.get("label"))


@pytest.fixture
def raw(sim: SimEos):
    c = RawClient(sim.address)
    yield c
    c.close()


def test_sim_two_objects_in_one_packet(raw: RawClient) -> None:
    raw.send(b'{"request":"BiasVoltage"}{"request":"NumberOfDetectors"}')
    assert raw.wait(label_is("BiasVoltage"))["value"] == [1.5] * N
    assert raw.wait(label_is("NumberOfDetectors"))["value"] == N
    raw.send(b'{"request":"TriggerLevel"}\x17{"request":"DetectorEnable"}\x17')  # ETB-separated too
    assert raw.wait(label_is("TriggerLevel"))["value"] == [100.0] * N
    assert raw.wait(label_is("DetectorEnable"))["value"] is True


def test_sim_object_split_across_packets(raw: RawClient, state: BenchState) -> None:
    msg = json.dumps({"command": "SetAllBiasCurrents", "label": "BiasCurrent", "value": [1.0, 2.0, 3.0, 4.0]}).encode()
    for k in range(0, len(msg), 5):
        raw.send(msg[k:k + 5])
        time.sleep(0.002)
    assert raw.wait(label_is("BiasCurrent"))["value"] == [1.0, 2.0, 3.0, 4.0]  # the broadcast of the new value
    assert state.detector(3).bias_ua == 4.0


def test_sim_garbage_gives_error_broadcast_and_connection_survives(raw: RawClient, sim: SimEos) -> None:
    raw.send(b"garbage\x17")
    assert "could not parse" in raw.wait(is_error)["value"]
    raw.send(b'{"request": not json}')
    assert raw.wait(is_error)
    raw.send(b'{"request":"NoSuchLabel"}{"command":"Explode","value":1}{"hello":1}')
    assert "unknown request" in raw.wait(is_error)["value"]
    assert "unknown command" in raw.wait(is_error)["value"]
    assert "neither" in raw.wait(is_error)["value"]
    raw.send(b'{"command":"SetAllBiasCurrents","label":"BiasCurrent","value":[1,2]}')
    assert "list of 4 numbers" in raw.wait(is_error)["value"]
    raw.send(b'{"command":"DetectorEnable","label":"DetectorEnable","value":"yes"}')
    assert raw.wait(is_error)
    raw.send(b'{"request":"NumberOfDetectors"}')
    assert raw.wait(label_is("NumberOfDetectors"))["value"] == N


def test_sim_labelprops_shape(raw: RawClient) -> None:
    raw.send(b'{"request":"labelProps","value":"None"}')
    props = {}
    for name in ("NumberOfDetectors", "BiasCurrent", "TriggerLevel", "DetectorEnable", "InptMeasurementPeriod",
                 "BiasVoltage"):
        props[name] = raw.wait(label_is(name))["value"]
    assert props["BiasCurrent"] == {"value": [15.0] * N, "bounds": [0.0, 50.0], "units": "uA"}
    assert props["TriggerLevel"]["units"] == "mV" and props["InptMeasurementPeriod"]["value"] == PERIOD_MS


def test_sim_error_broadcast_reaches_every_client(sim: SimEos) -> None:
    a, b = RawClient(sim.address), RawClient(sim.address)
    try:
        wait_for(lambda: sim.control_clients == 2)
        a.send(b"junk\x17")
        assert b.wait(is_error)
        assert a.wait(is_error)
    finally:
        a.close()
        b.close()


def test_split_messages_keeps_incomplete_tail() -> None:
    items, rest = split_messages('{"a":1}\x17{"b":"}{"}{"c":')
    assert items == [(True, '{"a":1}'), (True, '{"b":"}{"}')] and rest == '{"c":'
    items, rest = split_messages('xx{"a":\x17{"b":2}')
    assert items == [(False, "xx"), (False, '{"a":'), (True, '{"b":2}')] and rest == ""


# --------------------------------------------------------------------------------------------------------
# the driver's framing and malformed replies (scripted fake controller)


def test_framer_handles_etb_concatenation_and_partial_packets() -> None:
    f = JsonFramer()
    data = '{"label":"A","value":1}{"label":"B","value":"x}{y"}\x17{"label":"C","value":[1,2]}\x17'.encode()
    out: list[Any] = []
    for k in range(0, len(data), 3):
        out.extend(f.feed(data[k:k + 3]))
    assert out == [{"label": "A", "value": 1}, {"label": "B", "value": "x}{y"}, {"label": "C", "value": [1, 2]}]
    assert f.pending == ""
    out = f.feed(b'junk\x17{"label": "D", "va\x17{not json}{"label":"E","value":"\xc3')
    assert out[:3] == [Malformed("junk"), Malformed('{"label": "D", "va'), Malformed("{not json}")]
    assert f.pending.startswith('{"label":"E"')
    assert f.feed(b'\xa9"}') == [{"label": "E", "value": "\u00e9"}]  # a UTF-8 character split across packets


def test_parse_address() -> None:
    assert parse_address("192.168.1.50:12000") == ("192.168.1.50", 12000)
    assert parse_address("eos.lab") == ("eos.lab", 12000)
    assert parse_address("[::1]:12001") == ("::1", 12001)
    assert parse_address("tcp://10.0.0.2:4000") == ("10.0.0.2", 4000)
    assert parse_address("fe80::1") == ("fe80::1", 12000)
    for bad in ("host:port", "host:0", ":12000", "host:", "a:b:c:d]", "[::1"):
        with pytest.raises(ValueError):
            parse_address(bad)
    errors = SingleQuantumEos.check_options({"address": "x:99999", "nominal_bias_ua": [1.0, -2.0]})
    assert {e.path for e in errors} == {"address", "nominal_bias_ua"}
    assert SingleQuantumEos.check_options({"address": "sim://snspd", "nominal_bias_ua": 15.0}) == []


def good_props(n: int = 2) -> bytes:
    props = {
        "NumberOfDetectors": {"value": n, "bounds": [n, n], "units": ""},
        "BiasCurrent": {"value": [10.0] * n, "bounds": [0, 50], "units": "uA"},
        "TriggerLevel": {"value": [100.0] * n, "bounds": [0, 1000], "units": "mV"},
        "DetectorEnable": {"value": True, "bounds": None, "units": ""},
        "InptMeasurementPeriod": {"value": 100, "bounds": [10, 10000], "units": "ms"},
    }
    return "".join(json.dumps({"label": k, "value": v}) for k, v in props.items()).encode() + b"\x17"


class FakeEos:
    """A scripted controller: ``script(message) -> bytes`` answers each JSON object the driver sends."""

    def __init__(self, script: Callable[[dict[str, Any]], bytes], chunk: int | None = None) -> None:
        self.script = script
        self.chunk = chunk
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        dec, buf = json.JSONDecoder(), ""
        try:
            while data := conn.recv(4096):
                buf += data.decode()
                while buf.strip():
                    buf = buf.lstrip()
                    try:
                        msg, end = dec.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    out = self.script(msg)
                    step = self.chunk or max(1, len(out))
                    for k in range(0, len(out), step):
                        conn.sendall(out[k:k + step])
                        if self.chunk:
                            time.sleep(0.001)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


def scripted(voltage_reply: bytes | None, props: bytes | None = None) -> Callable[[dict[str, Any]], bytes]:
    def script(msg: dict[str, Any]) -> bytes:
        if msg.get("request") == "labelProps":
            return props if props is not None else good_props()
        if msg.get("request") == "BiasVoltage":
            return voltage_reply or b""
        return b""

    return script


@pytest.fixture
def fake_factory():
    made: list[FakeEos] = []

    def make(*args: Any, **kwargs: Any) -> tuple[FakeEos, SingleQuantumEos]:
        fake = FakeEos(*args, **kwargs)
        made.append(fake)
        drv = driver_for(fake.address, counts_port=0, timeout_s=0.5, latch_recovery=False)
        return fake, drv

    yield make
    for f in made:
        f.close()


def test_driver_reads_byte_by_byte_replies(fake_factory) -> None:
    _, drv = fake_factory(scripted(b'{"label":"BiasVoltage","value":[1.0, 1200.0]}\x17'), chunk=3)
    drv.connect()
    st = drv.status()
    assert st["latched"] == [False, True] and st["count_rate_hz"] is None
    drv.close()


@pytest.mark.parametrize("reply, match", [
    (b"not json at all\x17", "malformed reply"),
    (b'{"label":"BiasVoltage","value":"abc"}\x17', "malformed reply: BiasVoltage"),
    (b'{"label":"BiasVoltage","value":[1.0]}\x17', "list of 2 numbers"),
    (b'{"label":"BiasVoltage","val\x17', "malformed reply"),
    (b'[1, 2]\x17', "malformed reply"),
    (b'{"label":"SystemError","value":"bias source fault"}\x17', "controller error: bias source fault"),
])
def test_malformed_or_error_reply_is_a_device_error_naming_the_command(fake_factory, reply: bytes,
                                                                       match: str) -> None:
    _, drv = fake_factory(scripted(reply))
    drv.connect()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=match) as e:
        drv.status()
    assert e.value.command == "BiasVoltage"
    assert time.monotonic() - t0 < 0.5 + 0.5
    drv.close()


def test_malformed_labelprops_fails_connect_with_device_error(fake_factory) -> None:
    bad = b'{"label":"NumberOfDetectors","value":{"units":""}}\x17'
    _, drv = fake_factory(scripted(None, props=bad))
    with pytest.raises(DeviceError) as e:
        drv.connect()
    assert e.value.command == "labelProps"
    drv.close()


def test_no_reply_times_out_within_timeout(fake_factory) -> None:
    _, drv = fake_factory(scripted(None))  # never answers BiasVoltage
    drv.connect()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="BiasVoltage"):
        drv.status()
    assert 0.45 < time.monotonic() - t0 < 0.5 + 0.5
    drv.close()


def test_config_example_validates() -> None:
    from daemon import config

    text = """
[devices.snspd]
driver = "singlequantum.eos"
[devices.snspd.options]
address = "192.168.1.50:12000"
counts_port = 12345
nominal_bias_ua = [15.0, 15.0, 14.5, 15.5]
latch_retry_limit = 3
[devices.snspd.limits]
bias_ua = [0.0, 25.0]
"""
    cfg = config.validate(config.parse(text))
    dev = cfg.devices["snspd"]
    assert dev.driver_cls is SingleQuantumEos and dev.limits == {"bias_ua": (0.0, 25.0)}
    assert dev.options["latch_recovery"] is True and dev.options["timeout_s"] == 2.0
