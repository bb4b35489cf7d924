"""ID Quantique ID900 Time Controller: the real driver against the protocol-level simulator over ZeroMQ (SCPI
REQ/REP, DLT REQ/REP, PAIR timestamp streams), plus exact exchanges with the simulator's sockets."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import zmq

from daemon.supervisor import check_limits
from drivers.base import DeviceError, TagBatch, TagFlags, exposed_methods
from drivers.idq_id900 import IDQTimeController, is_scpi_error, parse_endpoint, parse_quantity
from drivers.sim.bench.config import default_config
from drivers.sim.bench.model import BenchModel
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments import load_model
from drivers.sim.instruments.id900 import STREAM_RECORD, SimID900

SUB_MS = 10.0  # sub-acquisition length in these tests
PPER = int(SUB_MS * 1e9) + 40_000


def make_sim(**options: Any) -> SimID900:
    opts = {"source": "poisson", "singles_hz": 4000.0, "pair_rate_hz": 8000.0, "seed": 5}
    opts.update(options)
    sim = SimID900("tc", BenchState(), opts)
    sim.record_sent = True
    sim.start()
    return sim


@pytest.fixture
def sim():
    s = make_sim()
    yield s
    s.stop()


@pytest.fixture
def make_driver(sim: SimID900):
    made: list[IDQTimeController] = []

    def make(target: SimID900 | None = None, **options: Any) -> IDQTimeController:
        s = target or sim
        opts = dict(s.driver_options, sub_acquisition_ms=SUB_MS, timeout_s=0.5)
        opts.update(options)
        d = IDQTimeController("tc", opts)
        made.append(d)
        d.connect()
        return d

    yield make
    for d in made:
        d.close()


def collect(drv: IDQTimeController, seconds: float, timeout: float = 0.1) -> list[TagBatch]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        b = drv.read(timeout)
        assert b is not None
        out.append(b)
    return out


def check_stream(batches: list[TagBatch], t0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous, sorted, inside their intervals; returns all tags."""
    assert batches
    assert batches[0].t_begin == t0
    for a, b in zip(batches, batches[1:]):
        assert a.t_end == b.t_begin
    for b in batches:
        b.check_order()
        assert b.timestamps.dtype == np.int64 and b.channels.dtype == np.uint8
    return np.concatenate([b.timestamps for b in batches]), np.concatenate([b.channels for b in batches])


def assert_matches_truth(sim: SimID900, ts: np.ndarray, ch: np.ndarray, inputs: list[int], t0: int = 0) -> None:
    """The driver's tags of channel i are exactly the simulator's records of input inputs[i] (a prefix)."""
    for i, n in enumerate(inputs):
        mine = ts[ch == i] - t0
        truth = sim.sent_times(n)
        assert mine.shape[0] > 0
        assert truth.shape[0] >= mine.shape[0]
        np.testing.assert_array_equal(mine, truth[: mine.shape[0]])


# ------------------------------------------------------------------------------------------------------------
# connect and settings


def test_model_registry_and_address(sim: SimID900) -> None:
    assert load_model("idq_id900") is SimID900
    assert sim.address.startswith("tcp://127.0.0.1:")
    assert sim.driver_options["dlt_address"] == sim.dlt_address
    assert sim.driver_options["stream_port_base"] == 0


def test_address_before_start_is_an_error() -> None:
    s = SimID900("tc", BenchState(), {"source": "poisson"})
    with pytest.raises(RuntimeError, match="start"):
        _ = s.address


def test_connect_configures_inputs(sim: SimID900, make_driver) -> None:
    drv = make_driver(thresholds_v=[0.25], edge="falling", input_delays_ps=[0, 1000, 2000, 3000])
    st = sim.settings()
    assert st["enabled"] == [True] * 4
    assert st["threshold_v"] == [0.25] * 4
    assert st["edge"] == ["FALLING"] * 4
    assert st["delay_ps"] == [0, 1000, 2000, 3000]
    assert st["delay_link"] == ["INPU1", "INPU2", "INPU3", "INPU4"]
    assert st["raw_stop"] == ["DELA1", "DELA2", "DELA3", "DELA4"]
    d = drv.describe()
    assert d["vendor"] == "ID Quantique" and d["model"] == "ID900 (simulated)" and d["serial"] == "SIM-ID900-0001"
    assert drv.channel_count == 4 and drv.resolution_ps == 1
    assert drv.status()["input_delays_ps"] == [0, 1000, 2000, 3000]
    assert any(line == "DELA2:VALU 1000" for line in sim.received_scpi)


def test_setting_outside_the_device_range_is_a_device_error_naming_the_command(sim, make_driver) -> None:
    with pytest.raises(DeviceError) as e:
        make_driver(thresholds_v=[3.0])
    assert e.value.command == "INPU1:THRE 3.0000V"
    assert "Error" in str(e.value)
    drv = make_driver()
    with pytest.raises(DeviceError) as e:
        drv.set_input_delay(1, 2_000_000_000)
    assert e.value.command == "DELA2:VALU 2000000000"
    with pytest.raises(DeviceError, match="does not exist"):
        drv.set_input_delay(7, 10)
    drv.set_input_delay(2, 1234)
    assert sim.settings()["delay_ps"][2] == 1234
    assert drv.status()["input_delays_ps"][2] == 1234


def test_set_input_delay_carries_the_limit() -> None:
    spec = exposed_methods(IDQTimeController)["set_input_delay"]
    from daemon.api.errors import RpcError

    with pytest.raises(RpcError, match="limit"):
        check_limits(spec, {"channel": 0, "picoseconds": 5_000}, {"input_delay_ps": (0.0, 1000.0)})


def test_check_options() -> None:
    base = {k: f.default for k, f in IDQTimeController.options.items() if k != "address"}
    base["address"] = "tcp://10.0.0.2:5555"
    assert IDQTimeController.check_options(base) == []
    bad = dict(base, channels=[1, 1], input_delays_ps=[1, 2, 3], address="tcp://host:port")
    paths = {e.path for e in IDQTimeController.check_options(bad)}
    assert {"channels", "input_delays_ps", "address"} <= paths
    assert parse_endpoint("10.0.0.2", 5555) == ("10.0.0.2", 5555)
    assert parse_endpoint("tcp://h:6060", 1) == ("h", 6060)
    assert parse_quantity("1000TB", {"": 1, "TB": 1}) == 1000
    assert parse_quantity("100mV", {"V": 1.0, "MV": 1e-3}) == pytest.approx(0.1)
    assert is_scpi_error('Error: -113,"Undefined header"') and is_scpi_error('-222,"Data out of range"')
    assert not is_scpi_error("ON") and not is_scpi_error("-5")


# ------------------------------------------------------------------------------------------------------------
# streaming


def test_stream_is_contiguous_sorted_and_exact(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    drv.start_stream()
    batches = collect(drv, 0.35)
    drv.stop_stream()
    ts, ch = check_stream(batches)
    assert batches[-1].t_end >= 10 * PPER
    assert all(b.flags == TagFlags.NONE for b in batches)
    # batch edges are whole sub-acquisitions
    assert all(b.t_end % PPER == 0 for b in batches)
    assert_matches_truth(sim, ts, ch, [1, 2, 3, 4])
    assert drv.read(0.05) is None  # stopped
    assert sim.acquisition_ids() == []  # every DLT acquisition was closed
    st = sim.settings()
    assert st["raw_ref"] == ["NONE"] * 4 and st["raw_send"] == [False] * 4
    assert st["pwid_ps"] == int(SUB_MS * 1e9) and st["pper_ps"] == PPER and st["rec_num"] == 0


def test_channel_mapping_follows_the_channels_option(sim: SimID900, make_driver) -> None:
    drv = make_driver(channels=[3, 1])
    assert drv.channel_count == 2
    drv.start_stream()
    batches = collect(drv, 0.2)
    drv.stop_stream()
    ts, ch = check_stream(batches)
    assert set(np.unique(ch).tolist()) == {0, 1}
    assert_matches_truth(sim, ts, ch, [3, 1])
    assert sim.sent_times(2).shape[0] == 0  # not streamed


def test_restarted_stream_continues_the_timeline(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    drv.start_stream()
    first = collect(drv, 0.1)
    drv.stop_stream()
    end = first[-1].t_end
    drv.start_stream()
    second = collect(drv, 0.1)
    drv.stop_stream()
    check_stream(first)
    check_stream(second, t0=end)
    assert len(second[-1]) >= 0 and second[-1].t_end > end


def test_unwrap_across_reference_index_wraps() -> None:
    sim = make_sim(ref_index_bits=4)  # the index wraps every 16 sub-acquisitions
    drv = IDQTimeController("tc", dict(sim.driver_options, sub_acquisition_ms=5.0, timeout_s=0.5, ref_index_bits=4))
    try:
        drv.connect()
        drv.start_stream()
        batches = collect(drv, 0.45)
        drv.stop_stream()
        ts, ch = check_stream(batches)
        period = int(5e9) + 40_000
        assert batches[-1].t_end > 3 * 16 * period  # at least three wraps
        assert_matches_truth(sim, ts, ch, [1, 2, 3, 4])
        assert np.all(np.diff(ts) >= 0)
    finally:
        drv.close()
        sim.stop()


def test_a_narrower_counter_than_configured_is_reported() -> None:
    sim = make_sim(ref_index_bits=3)
    drv = IDQTimeController("tc", dict(sim.driver_options, sub_acquisition_ms=5.0, timeout_s=0.5))
    try:
        drv.connect()
        drv.start_stream()
        with pytest.raises(DeviceError) as e:
            collect(drv, 0.5)
        assert "went backwards" in str(e.value) and e.value.command.startswith("DLT stream of input")
    finally:
        drv.close()
        sim.stop()


def test_lost_timestamps_flag_overflow(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    drv.start_stream()
    before = collect(drv, 0.06)
    sim.lose_data(1, [2])
    after = collect(drv, 0.15)
    drv.stop_stream()
    batches = before + after
    ts, ch = check_stream(batches)
    # the sub-acquisition where input 2 has no tags (~80 expected in each) is the lost one
    per_sub = np.bincount(ts[ch == 1] // PPER, minlength=batches[-1].t_end // PPER)
    lost = np.flatnonzero(per_sub == 0)
    assert lost.shape[0] == 1
    t_lost = int(lost[0]) * PPER
    holder = next(b for b in batches if b.t_begin <= t_lost < b.t_end)
    assert holder.flags & TagFlags.OVERFLOW  # the incomplete interval is flagged ...
    flagged = [b for b in batches if b.flags & TagFlags.OVERFLOW]
    assert len(flagged) <= 3 and not any(b.flags & TagFlags.OVERFLOW for b in before)  # ... and little else
    assert drv.status()["overflow_batches"] == len(flagged)


def test_rate_limit_loses_tags_and_flags_every_batch() -> None:
    sim = make_sim(max_rate_hz=10_000.0)  # far below the source's ~50 k/s
    drv = IDQTimeController("tc", dict(sim.driver_options, sub_acquisition_ms=SUB_MS, timeout_s=0.5))
    try:
        drv.connect()
        drv.start_stream()
        batches = [b for b in collect(drv, 0.15) if b.t_end > b.t_begin]
        drv.stop_stream()
        assert batches and all(b.flags & TagFlags.OVERFLOW for b in batches)
        assert all(len(b) <= 100 * ((b.t_end - b.t_begin) // PPER) for b in batches)  # 100 per sub-acquisition
    finally:
        drv.close()
        sim.stop()


def test_late_records_are_dropped_and_flagged(sim: SimID900, make_driver) -> None:
    drv = make_driver(thresholds_v=[0.1, 0.1, 0.1, 1.5])  # input 4 sees nothing
    drv.start_stream()
    collect(drv, 0.06)
    rec = np.zeros(1, STREAM_RECORD)  # input 4's first record, of sub-acquisition 0: long since promised
    sim.send_raw(4, rec.tobytes())
    batches = collect(drv, 0.06)
    drv.stop_stream()
    late = [b for b in batches if b.flags & TagFlags.MISSED_EVENTS]
    assert len(late) == 1 and late[0].missed_events == 1
    check_stream(batches, t0=batches[0].t_begin)


def test_malformed_stream_message_is_a_device_error(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    drv.start_stream()
    collect(drv, 0.03)
    sim.send_raw(2, b"\x01\x02\x03\x04\x05")
    with pytest.raises(DeviceError) as e:
        collect(drv, 0.2)
    assert e.value.command == "DLT stream of input 2" and "16-byte" in str(e.value)


def test_end_of_stream_is_a_device_error(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    drv.start_stream()
    sim.end_stream(1)
    with pytest.raises(DeviceError, match="ended the stream"):
        collect(drv, 0.2)


def test_quiet_inputs_still_advance_time(sim: SimID900, make_driver) -> None:
    drv = make_driver(thresholds_v=[1.5])  # above the pulse height: no tags at all
    drv.start_stream()
    batches = collect(drv, 0.8, timeout=0.2)
    drv.stop_stream()
    check_stream(batches)
    assert sum(len(b) for b in batches) == 0
    assert batches[-1].t_end >= 20 * PPER  # from the DLT's acquisitions_count, polled after 0.5 s of silence


# ------------------------------------------------------------------------------------------------------------
# malformed replies, timeouts, unplug


def test_malformed_scpi_reply_names_the_command(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    sim.reply_hook = lambda line: "lots of counts" if line == "INPU1:COUN?" else None
    with pytest.raises(DeviceError) as e:
        drv.status()
    assert e.value.command == "INPU1:COUN?"
    sim.reply_hook = lambda line: "banana" if line == "DELA1:VALU?" else None
    with pytest.raises(DeviceError) as e:
        drv.set_input_delay(0, 500)
    assert e.value.command == "DELA1:VALU 500" and "banana" in str(e.value)
    sim.reply_hook = None
    drv.set_input_delay(0, 500)


def test_dlt_errors_and_malformed_answers_name_the_command(sim: SimID900, make_driver) -> None:
    drv = make_driver()
    sim.dlt_hook = lambda line: "<html>" if line.startswith("start-stream") else None
    with pytest.raises(DeviceError) as e:
        drv.start_stream()
    assert e.value.command.startswith("start-stream --address 127.0.0.1 --channel 1")
    assert "not JSON" in str(e.value)
    sim.dlt_hook = lambda line: json.dumps({"error": {"description": "unrecognised option '--stream-port'"}}) \
        if line.startswith("start-stream") else None
    with pytest.raises(DeviceError, match="unrecognised option"):
        drv.start_stream()
    sim.dlt_hook = None
    assert sim.acquisition_ids() == []
    drv.start_stream()  # nothing left behind by the failed attempts
    assert len(collect(drv, 0.05)) > 0
    drv.stop_stream()


def test_stalled_scpi_times_out_and_the_req_socket_is_recreated(sim: SimID900, make_driver) -> None:
    drv = make_driver(timeout_s=0.2)
    sim.stall_scpi = True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.status()
    assert time.monotonic() - t0 < 0.6
    sim.stall_scpi = False
    st = drv.status()  # a fresh REQ socket; the old one would raise EFSM
    assert st["req_sockets_recreated"] == 1


def test_unplug_then_a_new_driver_works(sim: SimID900, make_driver) -> None:
    drv = make_driver(timeout_s=0.3)
    drv.start_stream()
    collect(drv, 0.05)
    sim.stop()
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        collect(drv, 2.0, timeout=0.1)
    assert not isinstance(e.value, DeviceError) and isinstance(e.value, (TimeoutError, ConnectionError))
    assert time.monotonic() - t0 < 0.1 + 0.5 + 0.3 + 0.5  # read timeout + stall period + exchange timeout + slack
    drv.close()
    sim.start()
    fresh = make_driver()
    fresh.start_stream()
    batches = collect(fresh, 0.1)
    while sum(len(b) for b in batches) == 0 and batches[-1].t_end < 50 * PPER:
        batches += collect(fresh, 0.05)
    fresh.stop_stream()
    check_stream(batches)
    assert sum(len(b) for b in batches) > 0


def test_unreachable_time_controller_fails_connect_within_timeout() -> None:
    drv = IDQTimeController("tc", {"address": "tcp://127.0.0.1:9", "dlt_address": "tcp://127.0.0.1:9",
                                   "timeout_s": 0.2})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.connect()
    assert time.monotonic() - t0 < 0.6
    drv.close()


def test_bench_source_shares_the_daemon_bench_state() -> None:
    host = BenchModel(default_config(seed=2))
    sim = SimID900("tc", host.state, {"source": "bench", "bench_channels": [0, 1, 4, 5]})
    sim.start()
    drv = IDQTimeController("tc", dict(sim.driver_options, sub_acquisition_ms=SUB_MS, timeout_s=0.5))
    try:
        drv.connect()
        drv.start_stream()
        batches: list[TagBatch] = []
        while not batches or batches[-1].t_end < 15 * PPER:
            batches += collect(drv, 0.05)
        on = check_stream(batches)[0]
        host.state.update_laser(output_on=False)  # what the pump laser simulator does on OUTP OFF
        t_mid = collect(drv, 0.08)[-1].t_end  # sub-acquisitions already generated or in flight
        off = collect(drv, 0.15)
        drv.stop_stream()
        rate_on = on.shape[0] / (t_mid / 1e12)
        rate_off = sum(len(b) for b in off) / ((off[-1].t_end - off[0].t_begin) / 1e12)
        assert rate_on > 20 * max(rate_off, 1.0)  # only dark counts remain
    finally:
        drv.close()
        sim.stop()


# ------------------------------------------------------------------------------------------------------------
# exact exchanges with the simulator's sockets (protocol tests)


@pytest.fixture
def raw(sim: SimID900):
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def req(address: str) -> Any:
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 2000)
        s.connect(address)
        socks.append(s)

        def ask(text: str) -> str:
            s.send_string(text)
            return s.recv_string()

        return ask

    yield req
    for s in socks:
        s.close(linger=0)
    ctx.term()


def test_scpi_syntax(sim: SimID900, raw) -> None:
    ask = raw(sim.address)
    assert ask("input2:enable on") == ""
    assert ask("INPU2:ENAB?") == "ON"
    assert ask("INPUt2:THREshold 150mV;EDGE FALL") == ""  # ';' chaining relative to INPUT2
    assert ask("INPU2:THRE?;EDGE?") == "0.15V;FALLING"
    assert ask("REC:DUR 3000 GTB") == ""  # the manual's example: 3 s
    assert ask("REC:PWID?") == "3000000000000TB"
    assert ask("*IDN?") == "ID Quantique,ID900 (simulated),SIM-ID900-0001,1.0"
    assert ask("FOO:BAR 1").startswith('Error: -113,"Undefined header')
    assert ask("INPU9:ENAB ON").startswith("Error: -114")
    assert ask("DELA1:VALU -5").startswith('Error: -222,"Data out of range')
    assert ask("RAW1:ERRORS?") == "0"
    assert ask("REC:STAGe?") == "STOPPED"


def test_dlt_commands(sim: SimID900, raw) -> None:
    ask = raw(sim.dlt_address)
    assert json.loads(ask("list")) == []
    assert json.loads(ask("start-stream --xyz")) == {"error": {"description": "unrecognised option '--xyz'"}}
    assert json.loads(ask("start-stream --channel 1 --stream-port 5")) == {
        "error": {"description": "the option '--address' is required but missing"}}
    assert "error" in json.loads(ask("status --id nope"))
    port = parse_endpoint(sim.dlt_address, 0)[1] + 1
    while True:  # a free port for the stream
        answer = json.loads(ask(f"start-stream --address 127.0.0.1 --channel 2 --stream-port {port} "
                                "--with-ref-index"))
        if "id" in answer:
            break
        port += 1
    acq = answer["id"]
    assert json.loads(ask("list")) == [acq]
    status = json.loads(ask(f"status --id {acq}"))
    assert set(status) == {"acquisitions_count", "errors", "inactivity", "timestamps_count"}
    # the stream: one message per sub-acquisition of (uint64 timestamp, uint64 ref index) records
    ctx = zmq.Context.instance()
    pair = ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.RCVTIMEO, 2000)
    pair.connect(f"tcp://127.0.0.1:{port}")
    scpi = raw(sim.address)
    for cmd in ("INPU2:ENAB ON", "RAW2:SEND ON", "REC:ENAB ON", "REC:NUM 3", "REC:PWID 5000000000;PPER 5000040000",
                "REC:PLAY"):
        assert scpi(cmd) == ""
    try:
        msgs = [pair.recv() for _ in range(2)]
        recs = [np.frombuffer(m, STREAM_RECORD) for m in msgs]
        assert [int(r["ref_index"][0]) for r in recs] == [0, 1]
        for r in recs:
            assert np.all(r["timestamp"] < 5_000_000_000) and np.all(np.diff(r["timestamp"].astype(np.int64)) >= 0)
        time.sleep(0.05)
        stopped = json.loads(ask(f"stop --id {acq}"))
        assert stopped["status"]["acquisitions_count"] == 3
        assert pair.recv() != b""  # the third sub-acquisition
        assert pair.recv() == b""  # end of stream
    finally:
        pair.close(linger=0)
    assert json.loads(ask("list")) == []
