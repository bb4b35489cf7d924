"""daemon.supervisor: backoff, limits, and the DeviceSupervisor life cycle with a fake laser driver.

Every async test runs under asyncio.run with an overall timeout; the fake driver records every call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Annotated, Any

import pytest

from daemon.api.errors import (
    DEVICE_ERROR,
    DEVICE_UNAVAILABLE,
    LIMIT_EXCEEDED,
    TIMEOUT,
    DeviceFailure,
    DeviceUnavailable,
    LimitExceeded,
    Timeout,
)
from daemon.config import DeviceConfig, SupervisorConfig
from daemon.supervisor import DeviceSupervisor, backoff_delay, check_limits
from drivers.base import DeviceError, DeviceState, Laser, exposed_methods, method_spec
from drivers.params import Field

# -- backoff_delay ---------------------------------------------------------------------------------------


def sup_cfg(**kw: float) -> SupervisorConfig:
    base = dict(connect_timeout_s=1.0, call_timeout_s=0.5, backoff_initial_s=0.05, backoff_factor=2.0,
                backoff_max_s=0.2)
    base.update(kw)
    return SupervisorConfig(**base)


@pytest.mark.parametrize("initial, factor, cap", [(1.0, 2.0, 60.0), (0.5, 3.0, 10.0), (2.0, 1.0, 5.0),
                                                  (0.0, 2.0, 1.0), (5.0, 2.0, 1.0)])
def test_backoff_sequence(initial, factor, cap):
    cfg = sup_cfg(backoff_initial_s=initial, backoff_factor=factor, backoff_max_s=cap)
    assert backoff_delay(0, cfg) == 0.0
    assert backoff_delay(-3, cfg) == 0.0
    uncapped = initial
    for attempt in range(1, 30):
        assert backoff_delay(attempt, cfg) == pytest.approx(min(cap, uncapped))
        uncapped *= factor


def test_backoff_is_monotonic_capped_and_survives_huge_attempts():
    cfg = sup_cfg(backoff_initial_s=1.0, backoff_factor=10.0, backoff_max_s=86400.0)
    delays = [backoff_delay(a, cfg) for a in range(1, 200)]
    assert delays == sorted(delays)
    assert max(delays) == cfg.backoff_max_s
    assert backoff_delay(10**9, cfg) == cfg.backoff_max_s


# -- check_limits ----------------------------------------------------------------------------------------

SET_CURRENT = exposed_methods(Laser)["set_current"]
LIMITS = {"current_ma": (5.0, 60.0)}


@pytest.mark.parametrize("value", [LIMITS["current_ma"][0], LIMITS["current_ma"][1], 30.0])
def test_check_limits_inside(value):
    check_limits(SET_CURRENT, {"milliamps": value}, LIMITS)


@pytest.mark.parametrize("value", [LIMITS["current_ma"][1] + 0.001, LIMITS["current_ma"][0] - 0.001, 1e9, -1.0])
def test_check_limits_outside(value):
    with pytest.raises(LimitExceeded) as exc:
        check_limits(SET_CURRENT, {"milliamps": value}, LIMITS)
    e = exc.value
    assert e.code == LIMIT_EXCEEDED == -32001
    assert "milliamps" in e.message and "current_ma" in e.message and "mA" in e.message
    lo, hi = LIMITS["current_ma"]
    assert e.data == {"param": "milliamps", "value": value, "limit": "current_ma", "min": lo, "max": hi, "unit": "mA"}


def test_check_limits_without_configured_limit_or_param():
    check_limits(SET_CURRENT, {"milliamps": 1e9}, {})
    check_limits(SET_CURRENT, {}, LIMITS)
    check_limits(SET_CURRENT, {"milliamps": 1e9}, {"other": (0.0, 1.0)})


def _many(self, values: Annotated[list[float], Field(unit="V", limit="volts")]) -> None: ...


def test_check_limits_on_list_items():
    spec = method_spec("many", _many)
    limits = {"volts": (0.0, 5.0)}
    check_limits(spec, {"values": [0.0, 2.5, 5.0]}, limits)
    with pytest.raises(LimitExceeded) as exc:
        check_limits(spec, {"values": [1.0, 5.5, 2.0]}, limits)
    assert exc.value.data["value"] == 5.5


# -- the fake driver -------------------------------------------------------------------------------------


class Control:
    """Shared between the test and every FakeLaser instance the supervisor creates (passed in options)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple] = []
        self.fail_connect = False
        self.connect_sleep = 0.0
        self.current_exc: BaseException | None = None
        self.current_sleep = 0.0
        self.sleep_done = threading.Event()

    def record(self, *item: Any) -> None:
        with self.lock:
            self.calls.append(item)

    def names(self) -> list[str]:
        with self.lock:
            return [c[0] for c in self.calls]

    def count(self, name: str) -> int:
        return self.names().count(name)


class FakeLaser(Laser):
    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self.ctl: Control = options["ctl"]

    def connect(self) -> None:
        self.ctl.record("connect", id(self))
        sleep, self.ctl.connect_sleep = self.ctl.connect_sleep, 0.0  # only the first connect is slow
        if sleep:
            time.sleep(sleep)
            self.ctl.sleep_done.set()
        if self.ctl.fail_connect:
            raise ConnectionRefusedError("fake laser is not answering")

    def close(self) -> None:
        self.ctl.record("close", id(self))

    def describe(self) -> dict[str, Any]:
        return {"vendor": "test", "model": "fake laser"}

    def set_current(self, milliamps):  # unannotated, like a real driver override
        self.ctl.record("set_current", milliamps)
        if self.ctl.current_sleep:
            time.sleep(self.ctl.current_sleep)
            self.ctl.sleep_done.set()
        if self.ctl.current_exc is not None:
            raise self.ctl.current_exc

    def set_output(self, on):
        self.ctl.record("set_output", on)

    def status(self) -> dict:
        self.ctl.record("status")
        return {"output": False}

    def safe_state(self) -> None:
        self.ctl.record("safe_state")
        super().safe_state()


LIMIT = (0.0, 50.0)


def make_sup(ctl: Control, states: list | None = None, **sup_kw: float) -> DeviceSupervisor:
    cfg = DeviceConfig(
        name="pump",
        driver="test.fake_laser",
        driver_cls=FakeLaser,
        options={"ctl": ctl},
        limits={"current_ma": LIMIT},
        supervisor=sup_cfg(**sup_kw),
    )

    def on_state(sup: DeviceSupervisor, previous: DeviceState) -> None:
        if states is not None:
            states.append((previous, sup.state))

    return DeviceSupervisor(cfg, on_state)


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qnetd-dev-") and t.is_alive()]


def run(coro, timeout: float = 8.0):
    """Run a test coroutine, then wait (inside the loop) for every device worker thread to end, so no thread
    posts a result to a closed loop after the test."""

    async def main():
        try:
            return await coro
        finally:
            await until(lambda: not _worker_threads(), timeout=3.0, what="device worker threads to end")

    return asyncio.run(asyncio.wait_for(main(), timeout))


async def until(pred, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def started(sup: DeviceSupervisor) -> DeviceSupervisor:
    sup.start()
    await asyncio.wait_for(sup.wait_ready(), 3)
    return sup


# -- life cycle ------------------------------------------------------------------------------------------


def test_connect_success_is_ready():
    ctl, states = Control(), []

    async def main():
        sup = make_sup(ctl, states)
        assert sup.state == DeviceState.DISCONNECTED
        await started(sup)
        assert sup.state == DeviceState.READY
        assert sup.available
        assert sup.attempt == 0 and sup.error is None
        assert sup.identity == {"vendor": "test", "model": "fake laser"}
        st = sup.status()
        assert st["state"] == "ready" and st["retry_in_s"] is None
        assert st["limits"] == {"current_ma": list(LIMIT)}
        assert st["kind"] == Laser.kind
        await sup.stop(1.0)

    run(main())
    assert ctl.count("connect") == 1
    assert states[:2] == [(DeviceState.DISCONNECTED, DeviceState.CONNECTING),
                          (DeviceState.CONNECTING, DeviceState.READY)]


def test_call_before_start_is_unavailable():
    ctl = Control()

    async def main():
        sup = make_sup(ctl)
        with pytest.raises(DeviceUnavailable) as exc:
            await sup.call("set_current", {"milliamps": 1.0})
        assert exc.value.code == DEVICE_UNAVAILABLE
        assert exc.value.data["state"] == "disconnected"

    run(main())
    assert "set_current" not in ctl.names()


def test_connect_failure_faults_retries_and_recovers():
    ctl, states = Control(), []
    ctl.fail_connect = True

    async def main():
        sup = make_sup(ctl, states)
        sup.start()
        await until(lambda: sup.attempt >= 3, what="three failed attempts")
        assert sup.state in (DeviceState.FAULTED, DeviceState.CONNECTING)
        assert "ConnectionRefusedError" in (sup.error or "")
        assert not sup.available
        with pytest.raises(DeviceUnavailable):
            await sup.call("set_current", {"milliamps": 1.0})
        attempts_before = sup.attempt
        ctl.fail_connect = False
        await asyncio.wait_for(sup.wait_ready(), 3)
        assert attempts_before >= 3
        assert sup.attempt == 0 and sup.error is None
        await sup.call("set_current", {"milliamps": 1.0})
        await sup.stop(1.0)

    run(main())
    seen = [new for _, new in states]
    assert DeviceState.FAULTED in seen
    assert seen.index(DeviceState.FAULTED) < seen.index(DeviceState.READY)
    # every instance whose connect failed was closed; a fresh instance each attempt
    connects = [c[1] for c in ctl.calls if c[0] == "connect"]
    closes = [c[1] for c in ctl.calls if c[0] == "close"]
    assert len(set(connects)) == len(connects) >= 4
    for inst in connects[:-1]:
        assert inst in closes


def test_retry_delay_follows_backoff():
    ctl = Control()
    ctl.fail_connect = True
    cfg_kw = dict(backoff_initial_s=0.5, backoff_factor=2.0, backoff_max_s=5.0)

    async def main():
        sup = make_sup(ctl, **cfg_kw)
        sup.start()
        await until(lambda: sup.state == DeviceState.FAULTED, what="first fault")
        expected = backoff_delay(sup.attempt, sup.cfg.supervisor)
        retry = sup.retry_in_s()
        assert retry is not None and 0 < retry <= expected
        assert sup.status()["retry_in_s"] is not None
        with pytest.raises(DeviceUnavailable) as exc:
            await sup.call("status")
        assert "next connect attempt" in exc.value.message
        # reconnect() skips the backoff
        ctl.fail_connect = False
        sup.reconnect()
        await asyncio.wait_for(sup.wait_ready(), expected / 2)
        await sup.stop(1.0)

    run(main())


def test_os_error_in_call_faults_and_later_calls_fail_fast():
    ctl, states = Control(), []

    async def main():
        sup = await started(make_sup(ctl, states, backoff_initial_s=0.4, backoff_max_s=0.4))
        first_instance = ctl.calls[-1][1]
        ctl.current_exc = OSError("link down")
        with pytest.raises(DeviceUnavailable) as exc:
            await sup.call("set_current", {"milliamps": 1.0})
        assert exc.value.code == DEVICE_UNAVAILABLE == -32000
        assert "OSError" in exc.value.message
        assert sup.state == DeviceState.FAULTED
        assert sup.attempt == 1
        n_calls = ctl.count("set_current")
        ctl.current_exc = None
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(DeviceUnavailable):
                await sup.call("set_current", {"milliamps": 2.0})
            assert time.monotonic() - t0 < 0.1
        assert ctl.count("set_current") == n_calls  # nothing reached a driver
        # the faulted instance is closed, a fresh one connects after the backoff
        await asyncio.wait_for(sup.wait_ready(), 3)
        assert ("close", first_instance) in ctl.calls
        second_instance = [c[1] for c in ctl.calls if c[0] == "connect"][-1]
        assert second_instance != first_instance
        await sup.call("set_current", {"milliamps": 3.0})
        await sup.stop(1.0)

    run(main())
    assert (DeviceState.READY, DeviceState.FAULTED) in states or (DeviceState.BUSY, DeviceState.FAULTED) in states


def test_device_error_is_device_failure_and_stays_ready():
    ctl = Control()

    async def main():
        sup = await started(make_sup(ctl))
        ctl.current_exc = DeviceError("refused", "SOUR:CURR 1")
        with pytest.raises(DeviceFailure) as exc:
            await sup.call("set_current", {"milliamps": 1.0}, user=True)
        e = exc.value
        assert e.code == DEVICE_ERROR == -32004
        assert e.data == {"device": "pump", "command": "SOUR:CURR 1"}
        assert "refused" in e.message
        assert sup.state == DeviceState.READY
        assert sup.attempt == 0
        ctl.current_exc = None
        await sup.call("set_current", {"milliamps": 2.0})
        await sup.stop(1.0)

    run(main())
    assert ctl.count("connect") == 1
    assert [c[1] for c in ctl.calls if c[0] == "set_current"] == [1.0, 2.0]


def test_call_timeout_faults_then_reconnects():
    ctl, states = Control(), []
    call_timeout = 0.1

    async def main():
        sup = await started(make_sup(ctl, states, call_timeout_s=call_timeout))
        stuck_worker = sup._worker
        ctl.current_sleep = call_timeout * 4
        t0 = time.monotonic()
        with pytest.raises(Timeout) as exc:
            await sup.call("set_current", {"milliamps": 1.0})
        elapsed = time.monotonic() - t0
        assert exc.value.code == TIMEOUT == -32002
        assert exc.value.data == {"device": "pump", "timeout_s": call_timeout}
        assert call_timeout <= elapsed < ctl.current_sleep
        assert sup.state == DeviceState.FAULTED
        ctl.current_sleep = 0.0
        with pytest.raises(DeviceUnavailable):
            await sup.call("status")
        await asyncio.wait_for(sup.wait_ready(), 3)
        assert sup._worker is not stuck_worker
        await sup.call("set_current", {"milliamps": 2.0})
        # let the abandoned thread finish before the loop goes away
        await until(lambda: ctl.sleep_done.is_set() and not stuck_worker.alive, what="stuck worker to end")
        await sup.stop(1.0)

    run(main())
    assert ctl.count("connect") == 2
    seen = [new for _, new in states]
    assert seen.count(DeviceState.READY) == 2
    assert DeviceState.FAULTED in seen


def test_connect_timeout_faults_then_reconnects():
    ctl = Control()
    connect_timeout = 0.1
    ctl.connect_sleep = connect_timeout * 3

    async def main():
        sup = make_sup(ctl, connect_timeout_s=connect_timeout)
        sup.start()
        await until(lambda: sup.state == DeviceState.FAULTED, what="connect timeout")
        assert "timed out" in sup.error
        await asyncio.wait_for(sup.wait_ready(), 3)
        await sup.stop(1.0)

    run(main())
    assert ctl.count("connect") == 2


def test_limit_violation_never_reaches_the_driver():
    ctl = Control()

    async def main():
        sup = await started(make_sup(ctl))
        for bad in (LIMIT[1] + 0.5, LIMIT[0] - 0.5):
            with pytest.raises(LimitExceeded) as exc:
                await sup.call("set_current", {"milliamps": bad}, user=True)
            assert exc.value.code == LIMIT_EXCEEDED
            assert exc.value.data["value"] == bad
        assert sup.state == DeviceState.READY
        await sup.call("set_current", {"milliamps": LIMIT[1]})
        await sup.stop(1.0)

    run(main())
    assert [c[1] for c in ctl.calls if c[0] == "set_current"] == [LIMIT[1]]


def test_user_call_makes_device_busy():
    ctl, states = Control(), []

    async def main():
        sup = await started(make_sup(ctl, states))
        ctl.current_sleep = 0.1
        task = asyncio.create_task(sup.call("set_current", {"milliamps": 1.0}, user=True))
        await until(lambda: sup.state == DeviceState.BUSY, what="busy")
        assert sup.available
        await task
        assert sup.state == DeviceState.READY
        await sup.stop(1.0)

    run(main())
    assert (DeviceState.READY, DeviceState.BUSY) in states
    assert (DeviceState.BUSY, DeviceState.READY) in states


def test_reconnect_cycles_a_ready_device_without_counting_a_failure():
    ctl = Control()

    async def main():
        sup = await started(make_sup(ctl, backoff_initial_s=5.0, backoff_max_s=5.0))
        sup.reconnect()
        assert sup.state == DeviceState.FAULTED
        await until(lambda: sup.state == DeviceState.READY, timeout=2, what="reconnect")
        assert sup.attempt == 0
        await sup.stop(1.0)

    run(main())
    connects = [c[1] for c in ctl.calls if c[0] == "connect"]
    assert len(connects) == 2
    assert ("close", connects[0]) in ctl.calls


def test_stop_calls_safe_state_then_close():
    ctl = Control()

    async def main():
        sup = await started(make_sup(ctl))
        instance = ctl.calls[-1][1]
        mark = len(ctl.calls)
        await sup.stop(1.0)
        assert sup.state == DeviceState.DISCONNECTED
        with pytest.raises(DeviceUnavailable):
            await sup.call("status")
        return instance, ctl.calls[mark:]

    instance, after = run(main())
    assert after == [("safe_state",), ("set_output", False), ("close", instance)]


def test_stop_of_a_faulted_device_does_not_touch_it():
    ctl = Control()
    ctl.fail_connect = True

    async def main():
        sup = make_sup(ctl, backoff_initial_s=5.0, backoff_max_s=5.0)
        sup.start()
        await until(lambda: sup.state == DeviceState.FAULTED, what="fault")
        mark = len(ctl.calls)
        await sup.stop(1.0)
        assert sup.state == DeviceState.DISCONNECTED
        return ctl.calls[mark:]

    assert run(main()) == []
