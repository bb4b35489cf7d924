"""ThorlabsMPC (the real driver) against SimMPC320 (APT on a pseudo-terminal): the lab code path, in CI.

Moves are configured short (0.2 s per 100 degrees at 100 % velocity) so every test takes well under a second
or two. ``BenchState`` is the virtual bench the simulator's paddles act on.
"""

from __future__ import annotations

import os
import threading
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import serial

from drivers import apt
from drivers.apt import DEVICE, HOST, Message, MsgId
from drivers.base import DeviceError, exposed_methods
from drivers.params import Field, check_value
from drivers.registry import load
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments import load_model
from drivers.sim.instruments.mpc320 import SimMPC320
from drivers.thorlabs_mpc import ThorlabsMPC

COUNT_DEG = 170 / 1370  # one encoder count in degrees
FAST = {"move_time_s_per_100deg": 0.2, "home_overhead_s": 0.01}


@pytest.fixture
def bench() -> BenchState:
    return BenchState()


@pytest.fixture
def make_sim(bench: BenchState) -> Iterator[Callable[..., SimMPC320]]:
    sims: list[SimMPC320] = []

    def make(name: str = "pc_alice", **options: Any) -> SimMPC320:
        sim = SimMPC320(name, bench, {**FAST, **options})
        sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimMPC320]) -> SimMPC320:
    return make_sim()


@pytest.fixture
def make_driver() -> Iterator[Callable[..., ThorlabsMPC]]:
    drivers: list[ThorlabsMPC] = []

    def make(address: str, connect: bool = True, **options: Any) -> ThorlabsMPC:
        opts = {name: f.default for name, f in ThorlabsMPC.options.items() if name != "resource"}
        opts.update(resource=address, timeout_s=0.5, move_timeout_s=1.5)
        opts.update(options)
        for name, f in ThorlabsMPC.options.items():  # what the daemon does with a config table
            check_value(opts[name], f, f"options.{name}")
        drv = ThorlabsMPC("pc_test", opts)
        drivers.append(drv)
        if connect:
            drv.connect()
        return drv

    yield make
    for drv in drivers:
        drv.close()


@pytest.fixture
def driver(sim: SimMPC320, make_driver: Callable[..., ThorlabsMPC]) -> ThorlabsMPC:
    return make_driver(sim.address)


def status_msg(paddle: int, counts: int, bits: int = 0) -> Message:
    return Message.long(MsgId.MOT_GET_USTATUSUPDATE, apt.StatusUpdate(apt.chan_ident(paddle), counts, bits).pack(),
                        dest=HOST, source=DEVICE)


# -- registration and options ------------------------------------------------------------------------------


def test_registered_and_described() -> None:
    assert load("thorlabs.mpc") is ThorlabsMPC
    assert load_model("thorlabs_mpc320") is SimMPC320
    assert SimMPC320.model == "thorlabs_mpc320"
    for cls in (ThorlabsMPC, SimMPC320):
        for name, f in cls.options.items():
            assert isinstance(f, Field) and f.doc, f"{cls.__name__}.{name} needs a documented Field"
    assert ThorlabsMPC.options["resource"].default is not None  # required: REQUIRED sentinel
    methods = exposed_methods(ThorlabsMPC)
    assert {"move", "home", "positions", "status", "identify"} <= set(methods)
    assert methods["move"].params[1].field.limit == "angle_deg"


# -- connect -----------------------------------------------------------------------------------------------


def test_connect_identifies_configures_and_homes(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    d = driver.describe()
    assert d["model"] == "MPC320" and d["serial"] == "38000001" and d["firmware"] == "1.0.4"
    assert d["paddles"] == 3 and driver.paddle_count == 3
    ids = sim.received_ids()
    assert ids[0] == MsgId.HW_STOP_UPDATEMSGS and MsgId.HW_REQ_INFO in ids
    assert sim.velocity_percent == 100  # the simulator powers up at 50 %; the driver sets its option
    assert ids.count(MsgId.MOT_MOVE_HOME) == 3
    assert all(sim.channel(i)["homed"] for i in range(3))
    assert driver.positions() == [0.0, 0.0, 0.0]


def test_connect_survives_update_messages_at_power_up(make_sim, make_driver) -> None:
    sim = make_sim(updates_at_power_up=True, update_period_s=0.005)
    time.sleep(0.05)  # the pty fills with status updates before anyone opens it
    drv = make_driver(sim.address)
    assert not sim.updates_on  # HW_STOP_UPDATEMSGS
    drv.move(0, 20.0)
    assert drv.positions()[0] == pytest.approx(20.0, abs=COUNT_DEG)


def test_home_on_connect_skipped_when_already_homed(sim: SimMPC320, make_driver, bench: BenchState) -> None:
    first = make_driver(sim.address)
    first.move(2, 100.0)
    first.close()
    second = make_driver(sim.address)  # a reconnect: the controller is still homed, the paddle stays put
    assert second.positions()[2] == pytest.approx(100.0, abs=COUNT_DEG)
    assert sim.received_ids().count(MsgId.MOT_MOVE_HOME) == 3  # only the first connect homed
    assert bench.paddles("alice")[2] == pytest.approx(100.0, abs=COUNT_DEG)


def test_positions_are_relative_until_homed(make_sim, make_driver, bench: BenchState) -> None:
    bench.set_paddle("alice", 0, 30.0)  # the paddle sits at 30 degrees when the controller powers up
    sim = make_sim()
    drv = make_driver(sim.address, home_on_connect=False)
    assert drv.status()["homed"] == [False, False, False]
    assert drv.positions()[0] == 0.0  # the counter starts at 0 wherever the paddle is
    drv.move(0, 10.0)
    assert bench.paddles("alice")[0] == pytest.approx(40.0, abs=COUNT_DEG)  # 10 degrees from where it was
    drv.home()
    assert bench.paddles("alice")[0] == pytest.approx(0.0, abs=1e-9)
    assert drv.status()["homed"] == [True, True, True]
    drv.move(0, 10.0)
    assert bench.paddles("alice")[0] == pytest.approx(10.0, abs=COUNT_DEG)


def test_power_cycle_then_reconnect_homes_again(sim: SimMPC320, make_driver, bench: BenchState) -> None:
    make_driver(sim.address).move(1, 60.0)
    sim.power_cycle()
    drv = make_driver(sim.address)
    assert sim.received_ids().count(MsgId.MOT_MOVE_HOME) == 6
    assert bench.paddles("alice")[1] == pytest.approx(0.0, abs=1e-9)
    assert drv.positions() == [0.0, 0.0, 0.0]


def test_mpc220_has_two_paddles(make_sim, make_driver, bench: BenchState) -> None:
    sim = make_sim(paddles=2)
    with pytest.raises(DeviceError, match="MPC220"):
        make_driver(sim.address)  # configured for three paddles
    drv = make_driver(sim.address, paddles=2)
    assert drv.describe()["model"] == "MPC220"
    drv.move(1, 90.0)
    assert drv.positions() == pytest.approx([0.0, 90.0], abs=COUNT_DEG)
    with pytest.raises(DeviceError, match="does not exist"):
        drv.move(2, 10.0)
    assert bench.paddles("alice") == pytest.approx([0.0, 90.0, 0.0], abs=COUNT_DEG)


def test_other_model_is_refused(sim: SimMPC320, make_driver) -> None:
    sim.model_name = "KDC101"  # an APT motor controller that is not a paddle controller
    with pytest.raises(DeviceError, match="KDC101"):
        make_driver(sim.address)


def test_silent_port_is_a_link_fault_not_a_device_error(make_driver) -> None:
    master, slave = os.openpty()  # a port where nothing answers
    tty.setraw(slave)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            make_driver(os.ttyname(slave), timeout_s=0.2)
        assert time.monotonic() - t0 < 2.0
    finally:
        os.close(master)
        os.close(slave)


# -- moves -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["alice", "bob"])
def test_move_each_paddle_and_bench_follows(make_sim, make_driver, bench: BenchState, arm: str) -> None:
    sim = make_sim(arm=arm)
    drv = make_driver(sim.address)
    targets = [30.0, 45.0, 170.0]
    for paddle, deg in enumerate(targets):
        drv.move(paddle, deg)
        assert sim.channel(paddle)["counts"] == apt.degrees_to_counts(deg)
    assert drv.positions() == pytest.approx(targets, abs=COUNT_DEG)
    assert bench.paddles(arm) == pytest.approx(targets, abs=COUNT_DEG)
    other = "bob" if arm == "alice" else "alice"
    assert bench.paddles(other) == [0.0, 0.0, 0.0]
    drv.move(2, 0.0)
    assert drv.positions()[2] == 0.0 and bench.paddles(arm)[2] == 0.0


def test_move_takes_time_and_bench_moves_progressively(make_sim, make_driver, bench: BenchState) -> None:
    sim = make_sim(move_time_s_per_100deg=0.5)
    drv = make_driver(sim.address)
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(bench.paddles("alice")[0])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        drv.move(0, 100.0)
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 1.2  # 100 degrees at 0.5 s per 100 degrees
    assert any(5.0 < a < 95.0 for a in seen), "the bench paddle should pass through intermediate angles"
    assert seen == sorted(seen)


def test_velocity_scales_move_time(make_sim, make_driver) -> None:
    sim = make_sim(move_time_s_per_100deg=0.1)
    drv = make_driver(sim.address, velocity_percent=25)
    assert sim.velocity_percent == 25
    t0 = time.monotonic()
    drv.move(1, 100.0)
    assert time.monotonic() - t0 >= 0.38  # 0.1 s at 100 % -> 0.4 s at 25 %
    assert drv.status()["velocity_percent"] == 25


@pytest.mark.parametrize("paddle, degrees", [(0, -0.5), (0, 170.01), (1, float("nan")), (1, float("inf")),
                                             (3, 10.0), (-1, 10.0)])
def test_move_outside_travel_is_refused_before_sending(sim: SimMPC320, driver: ThorlabsMPC, paddle: int,
                                                       degrees: float) -> None:
    with pytest.raises(DeviceError):
        driver.move(paddle, degrees)
    assert MsgId.MOT_MOVE_ABSOLUTE not in sim.received_ids()


def test_simulator_clamps_targets_outside_the_travel(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    driver._send(Message.long(MsgId.MOT_MOVE_ABSOLUTE, apt.pack_chan_pos(0x01, 5000)))
    time.sleep(0.6)
    assert sim.channel(0)["counts"] == 1370 and not sim.channel(0)["moving"]


def test_home_moves_every_paddle_to_zero(sim: SimMPC320, driver: ThorlabsMPC, bench: BenchState) -> None:
    for p in range(3):
        driver.move(p, 120.0)
    driver.home()
    assert driver.positions() == [0.0, 0.0, 0.0]
    assert bench.paddles("alice") == [0.0, 0.0, 0.0]
    assert driver.status()["homed"] == [True, True, True]


# -- unsolicited messages, garbage, partial reads ----------------------------------------------------------


def test_unsolicited_messages_interleaved_with_replies(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    driver.move(1, 45.0)
    before = driver.unsolicited_count
    # before the next reply: a status update, a stale MOVE_COMPLETED for paddle 0, a MOVE_HOMED, garbage
    stale = Message.long(MsgId.MOT_MOVE_COMPLETED, apt.StatusUpdate(0x01, 999, 0).pack(), dest=HOST, source=DEVICE)
    sim.interleave(status_msg(2, 77).encode() + stale.encode() + b"\xde\xad\xbe\xef"
                   + Message.short(MsgId.MOT_MOVE_HOMED, 0x04, dest=HOST, source=DEVICE).encode())
    assert driver.positions() == pytest.approx([0.0, 45.0, 0.0], abs=COUNT_DEG)
    assert driver.unsolicited_count - before == 3
    assert [m.msg_id for _, m in list(driver.unsolicited)[-3:]] == [
        MsgId.MOT_GET_USTATUSUPDATE, MsgId.MOT_MOVE_COMPLETED, MsgId.MOT_MOVE_HOMED]
    assert driver.status()["garbage_bytes"] >= 4


def test_unsolicited_traffic_during_moves(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    # a status update for every paddle every 5 ms while the driver moves and queries
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            for p in range(3):
                sim.send_status(p)
            time.sleep(0.005)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        for p, deg in enumerate([10.0, 80.0, 150.0]):
            driver.move(p, deg)
        assert driver.positions() == pytest.approx([10.0, 80.0, 150.0], abs=COUNT_DEG)
        st = driver.status()
        assert st["enabled"] == [True, True, True] and st["moving"] == [False, False, False]
    finally:
        stop.set()
        t.join()
    assert driver.unsolicited_count > 10


def test_replies_in_one_byte_pieces(sim: SimMPC320, make_driver) -> None:
    sim.fragment_writes(1, gap_s=0.0005)
    drv = make_driver(sim.address)  # HW_GET_INFO (90 bytes) arrives byte by byte
    drv.move(0, 33.0)
    assert drv.positions()[0] == pytest.approx(33.0, abs=COUNT_DEG)


def test_simulator_ignores_unknown_messages_and_stays_in_sync(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    driver._send(Message.short(0x0999, 1, 2))  # unknown id: no answer
    driver._send(Message.long(0x0998, b"\x01\x02\x03"))
    sim_garbage = bytes([0x11, 0x22, 0x33])
    driver._port().write(sim_garbage)  # garbage towards the device
    driver.move(0, 12.0)
    assert driver.positions()[0] == pytest.approx(12.0, abs=COUNT_DEG)


def test_malformed_reply_is_a_device_error(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    # a GET_POSCOUNTER in the short form (no data) arrives where the reply is expected
    sim.interleave(Message.short(MsgId.MOT_GET_POSCOUNTER, 0x01, dest=HOST, source=DEVICE).encode())
    with pytest.raises(DeviceError, match="GET_POSCOUNTER"):
        driver.positions()
    # a reply for another channel
    sim.interleave(Message.long(MsgId.MOT_GET_POSCOUNTER, apt.pack_chan_pos(0x04, 5), dest=HOST,
                                source=DEVICE).encode())
    with pytest.raises(DeviceError, match="channel"):
        driver.positions()
    # the link is fine: the real replies that followed are drained, the next exchange works
    time.sleep(0.05)
    assert driver.positions() == [0.0, 0.0, 0.0]


# -- timeouts, safe state, identify ------------------------------------------------------------------------


def test_move_timeout_when_the_paddle_does_not_complete(sim: SimMPC320, make_driver) -> None:
    drv = make_driver(sim.address, move_timeout_s=0.3)
    sim.stall_moves = True
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish") as err:
        drv.move(0, 90.0)
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert err.value.command == "MOT_MOVE_ABSOLUTE"
    assert MsgId.MOT_MOVE_STOP in sim.received_ids()
    assert not sim.channel(0)["moving"]
    sim.stall_moves = False
    drv.move(0, 90.0)  # the device is still usable
    assert drv.positions()[0] == pytest.approx(90.0, abs=COUNT_DEG)


def test_safe_state_disables_channels_and_paddles_hold(sim: SimMPC320, driver: ThorlabsMPC,
                                                       bench: BenchState) -> None:
    driver.move(0, 40.0)
    driver.move(2, 140.0)
    held = bench.paddles("alice")
    driver.safe_state()
    assert [sim.channel(i)["enabled"] for i in range(3)] == [False, False, False]
    sent = [m for m in sim.received_messages() if m.msg_id == MsgId.MOD_SET_CHANENABLESTATE]
    assert [(m.param1, m.param2) for m in sent[-3:]] == [(0x01, 0x02), (0x02, 0x02), (0x04, 0x02)]
    assert driver.status()["enabled"] == [False, False, False]
    assert bench.paddles("alice") == held  # the paddles keep their angle
    driver.move(0, 50.0)  # an explicit move re-enables the paddle it moves
    assert sim.channel(0)["enabled"] and not sim.channel(1)["enabled"]
    assert driver.positions()[0] == pytest.approx(50.0, abs=COUNT_DEG)


def test_simulator_ignores_moves_on_a_disabled_channel(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    driver.safe_state()
    driver._send(Message.long(MsgId.MOT_MOVE_ABSOLUTE, apt.pack_chan_pos(0x02, 500)))
    driver._send(Message.short(MsgId.MOT_MOVE_HOME, 0x02))
    time.sleep(0.2)
    assert sim.channel(1)["counts"] == 0 and not sim.channel(1)["moving"]
    driver._drain()
    assert not any(m.msg_id in (MsgId.MOT_MOVE_COMPLETED, MsgId.MOT_MOVE_HOMED) for _, m in driver.unsolicited)


def test_identify(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    driver.identify()
    time.sleep(0.05)
    assert sim.identify_count == 1


# -- unplug / replug ---------------------------------------------------------------------------------------


def test_unplug_faults_the_driver_and_a_fresh_driver_reconnects(sim: SimMPC320, make_driver,
                                                                 bench: BenchState) -> None:
    drv = make_driver(sim.address)
    drv.move(1, 70.0)
    old_tty = sim.tty_path
    sim.stop()
    for call in (drv.positions, lambda: drv.move(0, 10.0), drv.status):
        with pytest.raises(Exception) as err:
            call()
        assert not isinstance(err.value, DeviceError), err.value
        assert isinstance(err.value, (OSError, serial.SerialException))
    drv.close()  # closing a dead link does not raise
    with pytest.raises((OSError, serial.SerialException)):
        make_driver(sim.address)  # unplugged: the port is gone
    sim.start()
    assert os.path.realpath(sim.address) == sim.tty_path
    fresh = make_driver(sim.address)
    assert fresh.positions() == pytest.approx([0.0, 70.0, 0.0], abs=COUNT_DEG)  # state kept, no re-homing
    fresh.move(1, 20.0)
    assert bench.paddles("alice")[1] == pytest.approx(20.0, abs=COUNT_DEG)
    assert old_tty is not None


def test_unplug_during_a_move(make_sim, make_driver) -> None:
    sim = make_sim(move_time_s_per_100deg=2.0)
    drv = make_driver(sim.address, move_timeout_s=3.0)
    threading.Timer(0.15, sim.stop).start()
    t0 = time.monotonic()
    with pytest.raises((OSError, serial.SerialException)):
        drv.move(0, 150.0)
    assert time.monotonic() - t0 < 1.0


def test_move_stopped_before_completion_is_a_device_error(make_sim, make_driver) -> None:
    sim = make_sim(move_time_s_per_100deg=1.0)
    drv = make_driver(sim.address)
    stopped = Message.long(MsgId.MOT_MOVE_STOPPED, apt.StatusUpdate(0x01, 200, 0x80000400).pack(), dest=HOST,
                           source=DEVICE)
    # another paddle's MOVE_STOPPED first (ignored), then this paddle's: the move fails, the link is fine
    other = Message.long(MsgId.MOT_MOVE_STOPPED, apt.StatusUpdate(0x04, 0, 0).pack(), dest=HOST, source=DEVICE)
    threading.Timer(0.1, lambda: sim.inject(other.encode() + stopped.encode())).start()
    with pytest.raises(DeviceError, match="stopped before it finished: paddle 0 at 24.82 deg"):
        drv.move(0, 100.0)
    time.sleep(1.1)  # let the simulated paddle finish; its late MOVE_COMPLETED is drained as unsolicited
    drv.move(0, 100.0)
    assert drv.positions()[0] == pytest.approx(100.0, abs=COUNT_DEG)


def test_completion_for_another_paddle_does_not_end_a_move(sim: SimMPC320, driver: ThorlabsMPC) -> None:
    # paddle 1 moves 100 degrees (0.2 s); meanwhile MOVE_COMPLETED for paddle 0 and MOVE_HOMED for paddle 2
    stray = (Message.long(MsgId.MOT_MOVE_COMPLETED, apt.StatusUpdate(0x01, 0, 0x80000400).pack(), dest=HOST,
                          source=DEVICE).encode()
             + Message.short(MsgId.MOT_MOVE_HOMED, 0x04, dest=HOST, source=DEVICE).encode())
    threading.Timer(0.05, lambda: sim.inject(stray)).start()
    t0 = time.monotonic()
    driver.move(1, 100.0)
    assert time.monotonic() - t0 >= 0.18
    assert sim.channel(1)["counts"] == apt.degrees_to_counts(100.0) and not sim.channel(1)["moving"]


def test_several_messages_in_one_read_are_all_handled(make_driver) -> None:
    # deterministic: pyserial's loop:// port returns everything written as one read
    drv = make_driver("loop://", connect=False, move_timeout_s=0.3)
    drv._ser = serial.serial_for_url("loop://", timeout=0.02)
    homed = b"".join(Message.short(MsgId.MOT_MOVE_HOMED, ident, dest=HOST, source=DEVICE).encode()
                     for ident in (0x01, 0x02, 0x04))
    drv._ser.write(homed + status_msg(2, 5).encode())
    drv._wait_motion({0, 1, 2}, MsgId.MOT_MOVE_HOMED, "MOT_MOVE_HOME")
    assert drv._homed == [True, True, True]
    assert drv.unsolicited_count == 0
    drv._drain()  # the status update that came in the same read is handled, not lost
    assert drv.unsolicited_count == 1 and drv._positions[2] == 5


def test_simulator_publishes_the_paddle_count_for_the_driver(make_sim) -> None:
    assert make_sim("a").driver_options == {"paddles": 3}
    assert make_sim("b", paddles=2).driver_options == {"paddles": 2}
