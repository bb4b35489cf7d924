"""The daemon's life cycle: bind, start devices, serve, and stop safely.

Start: bind the control (ROUTER) and publish (PUB) sockets, serve RPC at once (clients can watch the
start-up), start every device under its supervisor concurrently, tell systemd READY=1 once each device has
had its first connect attempt. Stop (SIGINT, SIGTERM or ``daemon.shutdown``): STOPPING=1, stop the stream,
put every device in its safe state and close it (bounded by ``daemon.shutdown_timeout_s``), publish the
final health message, close the sockets, exit 0.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from dataclasses import replace
import signal
import time
from typing import Any

import structlog
import zmq
import zmq.asyncio

from daemon import __version__
from daemon.acquisition import Acquisition
from daemon.api import PROTOCOL_VERSION
from daemon.api import errors as rpc_errors
from daemon.api.methods import MethodTable
from daemon.api.publish import Publisher
from daemon.api.rpc import RpcServer
from daemon.api.security import ZapHandler, fingerprint
from daemon.api.topics import describe_topics
from daemon.config import Config
from daemon.sdnotify import Notifier, watchdog_interval_s
from daemon.simulation import SimulationHost
from daemon.supervisor import DeviceSupervisor
from drivers.base import DeviceState

EX_UNAVAILABLE = 69  # sysexits.h: an endpoint could not be bound

log = structlog.get_logger("qnetd")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = "starting"
        self.started = time.monotonic()
        self.supervisors: dict[str, DeviceSupervisor] = {}
        self.table = MethodTable()
        self.acquisition: Acquisition | None = None
        self.control: Any = None  # daemon.control.polarization.ControlHost with [control.polarization.*]
        self.keys: Any = None  # daemon.qkd.service.KeyService with [qkd.links.*]
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._loop_lag_ms = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        self.publisher: Publisher | None = None
        self.rpc: RpcServer | None = None
        self.simulation: SimulationHost | None = None
        self.zap: ZapHandler | None = None

    # -- entry ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.notifier.notify(STATUS="starting")
        d = self.cfg.daemon
        ctx = zmq.asyncio.Context()
        sync_ctx = zmq.Context.shadow(ctx.underlying)
        curve = self.cfg.curve
        try:
            if curve is not None:
                # the ZAP handler first: a CURVE socket without one on its context accepts every client
                self.zap = ZapHandler(ctx, curve.authorized, curve.authorized_clients)
                self._tasks.append(asyncio.create_task(self.zap.serve(), name="zap"))
                loop.add_signal_handler(signal.SIGHUP, self.zap.reload)
            self.publisher = Publisher(sync_ctx, d["publish"], curve=curve)
            self.rpc = RpcServer(ctx, d["control"], self.table, max_request_bytes=d["max_request_bytes"],
                                 max_in_flight=d["max_requests_in_flight"], curve=curve)
        except zmq.ZMQError as e:
            log.error("cannot bind endpoint", error=str(e), control=d["control"], publish=d["publish"])
            if self.publisher is not None:
                self.publisher.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.zap is not None:
                self.zap.close()
            ctx.destroy(linger=0)
            self.notifier.notify(STATUS=f"cannot bind: {e}", ERRNO=e.errno or 1)
            return EX_UNAVAILABLE
        log.info("qnetd starting", version=__version__, config=self.cfg.source, control=d["control"],
                 publish=d["publish"], pid=os.getpid())
        if curve is not None:
            log.info("CURVE authentication on", server_key=fingerprint(curve.public),
                     authorized_clients=curve.authorized_clients, clients=len(curve.authorized))
        self._publish_health()  # state "starting"
        self._register_daemon_methods()
        self._tasks.append(asyncio.create_task(self.rpc.serve(), name="rpc"))
        self._tasks.append(asyncio.create_task(self._health(), name="health"))
        wd = watchdog_interval_s()
        if wd is not None and self.notifier.enabled:
            self._tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
        if self.cfg.simulation is not None:
            try:
                self.simulation = SimulationHost(self.cfg.simulation)
                self.simulation.start()
                self.notifier.notify(STATUS="starting: compiling the simulation kernels (first run only)")
                seconds = await asyncio.to_thread(self.simulation.warm_up)
                log.info("simulation ready", warm_up_s=round(seconds, 3))
            except Exception as e:  # noqa: BLE001 - e.g. a simulator port in use
                log.error("cannot start the simulated testbed", error=f"{type(e).__name__}: {e}")
                if self.simulation is not None:
                    self.simulation.stop()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                self.rpc.close()
                self.publisher.close()
                if self.zap is not None:
                    self.zap.close()
                ctx.destroy(linger=0)
                return EX_UNAVAILABLE
            self.simulation.register(self.table)
        if self._stop.is_set():  # stopped during the warm-up: connect nothing, go straight to shutdown
            await self._shutdown(ctx)
            return 0
        for name, dev in self.cfg.devices.items():
            if not dev.enabled:
                continue
            if self.simulation is not None:
                dev = replace(dev, options=self.simulation.resolve_options(dev.options))
            sup = DeviceSupervisor(dev, self._on_device_state)
            self.supervisors[name] = sup
            self._register_device_methods(sup)
        for sup in self.supervisors.values():
            self._publish_device(sup, None)
            self._tasks.append(sup.start())
        await self._first_attempts()
        tagger = self.cfg.tagger
        if tagger is not None and tagger in self.supervisors and not self._stop.is_set():
            acq = self.cfg.acquisition
            pipeline = await self._analysis_pipeline(tagger)
            self.acquisition = Acquisition(self.supervisors[tagger], self.publisher,
                                           interval_s=acq["counts_interval_s"], read_timeout_s=acq["read_timeout_s"],
                                           pipeline=pipeline, record_dir=acq["record_dir"])
            self.acquisition.register(self.table)
            if self.cfg.control and pipeline is not None:
                from daemon.control.polarization import ControlHost

                self.control = ControlHost(self.cfg.control, self.supervisors, self.publisher, self.acquisition)
                self.control.register(self.table)
            if self.cfg.qkd is not None and pipeline is not None:
                await self._key_service(pipeline)
            self.acquisition.start()
        if self._stop.is_set():  # stopped while starting: no READY=1, straight to the safe shutdown
            await self._shutdown(ctx)
            return 0
        self.state = "running"
        ready = sum(s.available for s in self.supervisors.values())
        status = f"running: {ready}/{len(self.supervisors)} devices ready"
        self.notifier.notify(READY=1, STATUS=status)
        log.info("qnetd running", devices_ready=ready, devices=len(self.supervisors))
        self._publish_health()
        if not self._stop.is_set():
            await self._stop.wait()
        await self._shutdown(ctx)
        return 0

    async def _analysis_pipeline(self, tagger: str) -> Any:
        """The coincidence pipeline of [analysis] (None if the config has none), its kernels warmed up in a
        thread and its analysis.* RPC methods registered; calibration progress goes to analysis.calibration."""
        if self.cfg.analysis is None:
            return None
        from daemon.analysis import pipeline as analysis

        pipeline = analysis.AnalysisPipeline(self.cfg.analysis, device=tagger)
        seconds = await asyncio.to_thread(analysis.warm_up)
        log.info("analysis ready", warm_up_s=round(seconds, 3))

        def progress(fields: dict[str, Any]) -> None:
            if self.publisher is not None:
                self.publisher.publish("analysis.calibration", fields)

        analysis.register(self.table, pipeline, progress)
        return pipeline

    async def _key_service(self, pipeline: Any) -> None:
        """The key pipeline of [qkd] ([qkd.links.NAME]): stores opened and recovered, kernels warmed, fed by
        the acquisition. A store that cannot be opened disables key production (logged); the rest runs."""
        from daemon.qkd.service import KeyService, warm_up

        keys = KeyService(self.cfg.qkd, self.cfg.analysis, pipeline, self.publisher, curve=self.cfg.curve is not None,
                          adjusting=self.control.adjusting if self.control is not None else None)
        try:
            self.notifier.notify(STATUS="starting: compiling the key pipeline kernels (first run only)")
            seconds = await asyncio.to_thread(warm_up)
            await keys.start()
        except Exception as e:  # noqa: BLE001 - e.g. a damaged key store: no keys, but the lab keeps running
            log.error("key pipeline disabled", error=f"{type(e).__name__}: {e}")
            await keys.stop()
            return
        log.info("key pipeline ready", links=list(keys.links), store_dir=str(keys.store_dir),
                 warm_up_s=round(seconds, 3))
        self.keys = keys
        self.acquisition.consumers.append(keys)
        keys.register(self.table)

    def request_stop(self, reason: str = "request") -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            log.info("stop requested", reason=reason)
            self._stop.set()

    async def _first_attempts(self) -> None:
        """Wait until every device has finished its first connect attempt (each bounded by its timeout)."""
        deadline = max((s.cfg.supervisor.connect_timeout_s for s in self.supervisors.values()), default=0) + 1.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline and not self._stop.is_set():
            if all(s.state not in (DeviceState.CONNECTING, DeviceState.DISCONNECTED) or s.attempt > 0
                   for s in self.supervisors.values()):
                return
            await asyncio.sleep(0.02)

    async def _shutdown(self, ctx: zmq.asyncio.Context) -> None:
        self.state = "stopping"
        self.notifier.notify(STOPPING=1, STATUS=f"stopping ({self._stop_reason})")
        self._publish_health()
        # the budget covers everything: stream, safe states and closes, then up to ~1 s for sockets
        budget = max(0.5, self.cfg.daemon["shutdown_timeout_s"] - 1.0)
        t0 = time.monotonic()
        if self.control is not None:
            await self.control.stop()
        if self.acquisition is not None:
            await self.acquisition.stop(timeout=min(2.0, budget / 3))
        if self.keys is not None:  # after the stream: the block in progress is committed on both sides or not at all
            await self.keys.stop()
        left = max(0.2, budget - (time.monotonic() - t0))
        results = await asyncio.gather(*(s.stop(left) for s in self.supervisors.values()))
        failed = [name for name, ok in zip(self.supervisors, results) if not ok]
        if failed:
            log.error("shutdown incomplete: safe state not confirmed", devices=failed)
        if self.simulation is not None:
            self.simulation.stop()  # after the devices: their safe states reach the simulators
        self.state = "stopped"
        self._publish_health()
        if self.rpc is not None:
            await self.rpc.drain(0.3)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.rpc is not None:
            self.rpc.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.zap is not None:
            self.zap.close()
        ctx.destroy(linger=300)
        self.notifier.notify(STATUS="stopped")
        self.notifier.close()
        log.info("qnetd stopped", seconds=round(time.monotonic() - t0, 3))

    # -- background tasks -------------------------------------------------------------------------------
    async def _health(self) -> None:
        interval = self.cfg.daemon["health_interval_s"]
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(interval)
            self._loop_lag_ms = max(0.0, (time.monotonic() - t0 - interval) * 1000)
            self._publish_health()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from a task on the loop: it is only sent while the loop runs tasks."""
        while True:
            self.notifier.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    # -- publishing -------------------------------------------------------------------------------------
    def _publish_health(self) -> None:
        if self.publisher is None:
            return
        self.publisher.publish("daemon", {
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "devices": {n: s.state.value for n, s in self.supervisors.items()},
            "loop_lag_ms": round(self._loop_lag_ms, 3),
            "requests_in_flight": self.rpc.in_flight if self.rpc else 0,
        })

    def _on_device_state(self, sup: DeviceSupervisor, previous: DeviceState) -> None:
        self._publish_device(sup, previous)
        if self.state == "running" and self.notifier.enabled:
            ready = sum(s.available for s in self.supervisors.values())
            self.notifier.notify(STATUS=f"running: {ready}/{len(self.supervisors)} devices ready")

    def _publish_device(self, sup: DeviceSupervisor, previous: DeviceState | None) -> None:
        if self.publisher is None:
            return
        self.publisher.publish(f"device.{sup.name}", {
            "device": sup.name,
            "driver": sup.cfg.driver,
            "state": sup.state.value,
            "previous": previous.value if previous is not None else None,
            "error": sup.error,
            "retry_in_s": sup.retry_in_s(),
            "attempt": sup.attempt,
        })

    # -- RPC methods ------------------------------------------------------------------------------------
    def _register_daemon_methods(self) -> None:
        self.table.add("daemon.describe", self.rpc_describe)
        self.table.add("daemon.status", self.rpc_status)
        self.table.add("daemon.shutdown", self.rpc_shutdown)

    def _register_device_methods(self, sup: DeviceSupervisor) -> None:
        for mname, spec in sup.methods.items():
            async def handler(_m: str = mname, **params: Any) -> Any:
                return await sup.call(_m, params, user=True)
            self.table.add(f"{sup.name}.{mname}", handler, spec, group=sup.name)

        async def describe() -> dict:
            """This device: driver, kind, state, last error, identity and configured limits."""
            return sup.status()

        async def safe_state() -> None:
            """Put the device in its safe state now (laser output off, detectors disabled, stream stopped)."""
            await sup.call("safe_state", user=True)

        async def reconnect() -> None:
            """Reconnect now: skips the backoff of a faulted device; a ready one is cycled (safe state, close,
            connect a fresh driver instance)."""
            sup.reconnect()

        for fn in (describe, safe_state, reconnect):
            self.table.add(f"{sup.name}.{fn.__name__}", fn, group=sup.name)

    async def rpc_describe(self) -> dict:
        """Every method with its parameters, types, units and docstring; every topic with its fields; every
        device with its driver and state; the error codes. Enough for a generic client to need no code."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "version": __version__,
            "methods": self.table.describe(),
            "topics": describe_topics(),
            "devices": [
                {"name": n, "driver": s.cfg.driver, "kind": s.cfg.driver_cls.kind, "state": s.state.value,
                 "limits": {k: list(v) for k, v in s.cfg.limits.items()}}
                for n, s in self.supervisors.items()
            ],
            "errors": {cls.__name__: {"code": code, "doc": inspect.cleandoc(cls.__doc__ or "")}
                       for code, cls in rpc_errors.BY_CODE.items()},
        }

    async def rpc_status(self) -> dict:
        """Daemon state, uptime, every device's state and last error, acquisition counters, RPC and publish
        statistics."""
        status = {
            "state": self.state,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "config": self.cfg.source,
            "control": self.cfg.daemon["control"],
            "publish": self.cfg.daemon["publish"],
            "devices": {n: s.status() for n, s in self.supervisors.items()},
            "acquisition": self.acquisition.status() if self.acquisition else None,
            "keys": self.keys.status() if self.keys else None,
            "rpc": {"in_flight": self.rpc.in_flight if self.rpc else 0, "served": self.rpc.served if self.rpc else 0},
            "published": {
                "sent": self.publisher.sent if self.publisher else 0,
                "dropped": self.publisher.dropped if self.publisher else 0,
                "seq": self.publisher.sequences() if self.publisher else {},
            },
            "loop_lag_ms": round(self._loop_lag_ms, 3),
        }
        if self.zap is not None:  # only with [daemon.curve]: without it the status is unchanged
            status["curve"] = {"authorized_clients": len(self.zap.authorized), "accepted": self.zap.accepted,
                               "denied": self.zap.denied}
        return status

    async def rpc_shutdown(self) -> dict:
        """Stop the daemon cleanly: stream stopped, every device in its safe state, sockets closed."""
        asyncio.get_running_loop().call_soon(self.request_stop, "daemon.shutdown")
        return {"stopping": True}
