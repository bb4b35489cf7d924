"""Device supervision: connect with a timeout, serve calls, fault, back off, reconnect.

Each configured device runs under one :class:`DeviceSupervisor`. It owns the driver instance and its worker
thread. A connect that fails or times out, and a call that raises anything but :class:`DeviceError` or times
out, marks the device ``faulted``: calls fail at once with "device unavailable" while the supervisor closes
the driver, waits a capped exponential backoff and connects a fresh driver instance. No failure of one
device reaches the daemon or another device.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog

from daemon.api.errors import DeviceFailure, DeviceUnavailable, LimitExceeded, Timeout
from daemon.config import DeviceConfig, SupervisorConfig
from daemon.worker import CallTimeout, Worker, WorkerClosed
from drivers.base import Device, DeviceError, DeviceState, MethodSpec, exposed_methods
from drivers.params import num

StateCallback = Callable[["DeviceSupervisor", DeviceState], None]


def backoff_delay(attempt: int, cfg: SupervisorConfig) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (attempt >= 1): capped exponential."""
    if attempt < 1:
        return 0.0
    return min(cfg.backoff_max_s, cfg.backoff_initial_s * cfg.backoff_factor ** min(attempt - 1, 64))


def check_limits(spec: MethodSpec, params: dict[str, Any], limits: dict[str, tuple[float, float]]) -> None:
    """Raise LimitExceeded if a parameter bound to a configured limit is outside [min, max]."""
    for p in spec.params:
        name = p.field.limit
        if name is None or name not in limits or p.name not in params:
            continue
        lo, hi = limits[name]
        value = params[p.name]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, (int, float)) and not lo <= v <= hi:
                unit = f" {p.field.unit}" if p.field.unit else ""
                raise LimitExceeded(
                    f"{p.name}={num(v)}{unit} is outside the configured limit {name} = [{num(lo)}, {num(hi)}]{unit}; "
                    "nothing was sent",
                    data={"param": p.name, "value": v, "limit": name, "min": lo, "max": hi, "unit": p.field.unit},
                )


class DeviceSupervisor:
    def __init__(self, cfg: DeviceConfig, on_state: StateCallback | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.methods: dict[str, MethodSpec] = exposed_methods(cfg.driver_cls)
        self.log = structlog.get_logger("qnetd.supervisor").bind(device=cfg.name)
        self.state = DeviceState.DISCONNECTED
        self.error: str | None = None
        self.attempt = 0  # consecutive failures since the last successful connect
        self.retry_at: float | None = None
        self.identity: dict[str, Any] = {}
        self.connected_since: float | None = None
        self.driver: Device | None = None
        self._worker: Worker | None = None
        self._generation = 0
        self._hung = False  # the current worker is stuck in a call that timed out
        self._user_calls = 0
        self._on_state = on_state
        self._ready = asyncio.Event()
        self._fault_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- state ------------------------------------------------------------------------------------------
    def _set_state(self, state: DeviceState) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state in (DeviceState.READY, DeviceState.BUSY):
            self._ready.set()
        else:
            self._ready.clear()
        if self._on_state is not None:
            self._on_state(self, previous)

    @property
    def available(self) -> bool:
        return self.state in (DeviceState.READY, DeviceState.BUSY)

    def retry_in_s(self) -> float | None:
        if self.state != DeviceState.FAULTED or self.retry_at is None:
            return None
        return max(0.0, self.retry_at - time.monotonic())

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "driver": self.cfg.driver,
            "kind": self.cfg.driver_cls.kind,
            "state": self.state.value,
            "error": self.error,
            "attempt": self.attempt,
            "retry_in_s": self.retry_in_s(),
            "identity": self.identity,
            "limits": {k: list(v) for k, v in self.cfg.limits.items()},
            "connected_since": self.connected_since,
        }

    async def wait_ready(self) -> None:
        await self._ready.wait()

    # -- supervision loop -------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"supervisor-{self.name}")
        return self._task

    async def _run(self) -> None:
        while not self._stopping:
            self._set_state(DeviceState.CONNECTING)
            if await self._connect():
                self._fault_event.clear()
                await self._fault_event.wait()
                await self._teardown(safe=True)
            if self._stopping:
                break
            delay = self.retry_in_s() or 0.0
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _connect(self) -> bool:
        cfg = self.cfg.supervisor
        self._generation += 1
        self._worker = Worker(self.name)
        log = structlog.get_logger("qnetd.driver").bind(device=self.name)
        self.log.info("connecting", driver=self.cfg.driver, attempt=self.attempt + 1)

        made: list[Device] = []  # the instance, even if connect() then fails, so it can be closed

        def connect() -> tuple[Device, dict[str, Any]]:
            driver = self.cfg.driver_cls(self.name, dict(self.cfg.options), log)
            made.append(driver)
            driver.connect()
            return driver, driver.describe() or {}

        try:
            self.driver, self.identity = await self._worker.call(connect, cfg.connect_timeout_s)
        except CallTimeout:
            self._fault(f"connect timed out after {cfg.connect_timeout_s:g} s")
            self.driver = made[0] if made else None
            self._hung = True  # its thread is stuck in connect(): close from another thread, then abandon it
            await self._teardown()
            return False
        except Exception as e:  # noqa: BLE001 - any connect failure is a fault, never a crash
            self._fault(f"connect failed: {type(e).__name__}: {e}")
            self.driver = made[0] if made else None
            await self._teardown()
            return False
        self.attempt = 0
        self.error = None
        self.retry_at = None
        self.connected_since = time.time()
        self._set_state(DeviceState.READY)
        self.log.info("ready", **{k: v for k, v in self.identity.items() if isinstance(v, (str, int, float))})
        return True

    def _fault(self, reason: str, *, count: bool = True) -> None:
        """Mark the device faulted now (calls fail at once) and schedule the reconnect."""
        if count:
            self.attempt += 1
        delay = backoff_delay(self.attempt, self.cfg.supervisor) if count else 0.0
        self.error = reason
        self.retry_at = time.monotonic() + delay
        self.connected_since = None
        self.log.warning("device faulted", error=reason, retry_in_s=round(delay, 3), attempt=self.attempt)
        self._set_state(DeviceState.FAULTED)
        self._fault_event.set()

    async def _teardown(self, safe: bool = False) -> None:
        """Safe state (best effort) and close of the faulted driver, bounded; retire its worker thread.

        The safe state is tried only on a worker that is not stuck: the link may still carry it (a laser
        left on because one query failed must go off). If the worker is stuck in a call that timed out,
        close() runs in a throwaway thread instead of queueing behind the stuck call: it frees the port for
        the fresh driver (and often unblocks the stuck call).
        """
        worker, driver = self._worker, self.driver
        if worker is None:
            return
        if driver is not None:
            timeout = self.cfg.supervisor.call_timeout_s
            closer = Worker(f"{self.name}-close") if self._hung else worker
            steps = ("safe_state", "close") if safe and not self._hung else ("close",)
            for step in steps:
                try:
                    await closer.call(getattr(driver, step), timeout)
                except Exception as e:  # noqa: BLE001
                    self.log.info(f"{step} after fault failed", error=f"{type(e).__name__}: {e}")
            if closer is not worker:
                closer.close()
        worker.close()
        self._worker = None
        self._hung = False
        self.driver = None

    def reconnect(self) -> None:
        """Reconnect now: skip the backoff of a faulted device, or cycle a ready one."""
        if self.available:
            self._fault("reconnect requested", count=False)
        self.retry_at = time.monotonic()
        self._wake.set()

    # -- calls ------------------------------------------------------------------------------------------
    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
                   user: bool = False) -> Any:
        """Call a driver method in the worker thread, enforcing limits, timeout and fault policy.

        ``user`` marks calls from RPC clients (they make the device ``busy`` while they run).
        """
        params = params or {}
        if self._stopping or not self.available or self._worker is None or self.driver is None:
            raise self.unavailable()
        spec = self.methods.get(method)
        if spec is not None:
            check_limits(spec, params, self.cfg.limits)
        timeout = self.cfg.supervisor.call_timeout_s if timeout is None else timeout
        worker, generation = self._worker, self._generation
        fn = getattr(self.driver, method)
        if user:
            self._user_calls += 1
            self._set_state(DeviceState.BUSY)
        try:
            return await worker.call(lambda: fn(**params), timeout)
        except CallTimeout:
            msg = f"{self.name}.{method} did not complete within {timeout:g} s"
            if generation == self._generation and self.available:
                self._hung = True
                self._fault(msg)
            raise Timeout(msg + "; the device is marked faulted and will be reconnected",
                          data={"device": self.name, "timeout_s": timeout}) from None
        except DeviceError as e:
            raise DeviceFailure(f"{self.name}: {e}", data={"device": self.name, "command": e.command}) from None
        except WorkerClosed:
            raise self.unavailable() from None
        except Exception as e:  # noqa: BLE001
            reason = f"{method} raised {type(e).__name__}: {e}"
            if generation == self._generation and self.available:
                self._fault(reason)
            raise DeviceUnavailable(f"{self.name} faulted: {reason}", data={"device": self.name}) from None
        finally:
            if user:
                self._user_calls -= 1
                if self._user_calls == 0 and self.state == DeviceState.BUSY:
                    self._set_state(DeviceState.READY)

    def unavailable(self) -> DeviceUnavailable:
        retry = self.retry_in_s()
        text = f"device {self.name} is {'stopping' if self._stopping else self.state.value}"
        if self.error:
            text += f": {self.error}"
        if retry is not None:
            text += f"; next connect attempt in {retry:.1f} s"
        return DeviceUnavailable(text, data={"device": self.name, "state": self.state.value, "retry_in_s": retry})

    # -- shutdown ---------------------------------------------------------------------------------------
    async def stop(self, timeout: float) -> bool:
        """Safe state, close, stop supervising. Bounded by ``timeout``; never raises.

        Returns False if the device was connected and its safe state could not be confirmed."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        worker, driver = self._worker, self.driver
        ok = True
        if worker is not None and driver is not None and self.available:
            deadline = time.monotonic() + timeout
            for step in ("safe_state", "close"):
                left = deadline - time.monotonic()
                try:
                    await worker.call(getattr(driver, step), max(0.05, left))
                    self.log.info(f"{step} done" if step == "close" else "safe state reached")
                except Exception as e:  # noqa: BLE001
                    ok = ok and step != "safe_state"
                    self.log.error(f"{step} failed on shutdown", error=f"{type(e).__name__}: {e}")
        if worker is not None:
            worker.close()
        self._worker = None
        self.driver = None
        self._set_state(DeviceState.DISCONNECTED)
        return ok
