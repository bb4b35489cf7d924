"""Start the real daemon as a subprocess on free loopback ports, with a config written for the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.client import Client, NoReply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST_TAGGER = """
[devices.tagger]
driver = "sim.tagger"
[devices.tagger.options]
channels = 8
background_hz = 2000.0
pair_rate_hz = 40000.0
jitter_ps = 30.0
seed = 7
speed = {speed}
"""

BASE = """
[daemon]
log_format = "json"
log_level = "debug"
health_interval_s = 0.5
shutdown_timeout_s = 5.0

[supervisor]
connect_timeout_s = 2.0
call_timeout_s = 2.0
backoff_initial_s = 0.2
backoff_factor = 2.0
backoff_max_s = 1.0

[acquisition]
counts_interval_s = {interval}
"""

PUMP = """
[devices.pump]
driver = "sim.laser"
[devices.pump.limits]
current_ma = [0.0, 60.0]
"""


def config_text(*extra: str, speed: float = 10.0, interval: float = 1.0) -> str:
    return BASE.format(interval=interval) + FAST_TAGGER.format(speed=speed) + "".join(extra)


@dataclass
class DaemonProc:
    proc: subprocess.Popen
    control: str
    publish: str
    log_path: Path
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = Client(self.control, self.publish, timeout=5.0)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line, "raw": True})
        return out

    def wait_running(self, timeout: float = 90.0) -> dict:  # a cold numba cache compiles the bench (~20 s)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                status = self.client.call_with("daemon.status", timeout=0.5)
                if status["state"] == "running":
                    return status
            except NoReply:
                pass
            time.sleep(0.05)
        raise AssertionError("daemon did not reach running:\n" + self.log_path.read_text())

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon did not exit after SIGTERM:\n" + self.log_path.read_text()) from None


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon.cli", *args]


@pytest.fixture
def start_daemon(tmp_path):
    started: list[DaemonProc] = []

    def start(text: str, env: dict | None = None, wait: bool = True) -> DaemonProc:
        cfg = tmp_path / f"qnetd-{len(started)}.toml"
        cfg.write_text(text)
        control = f"tcp://127.0.0.1:{free_port()}"
        publish = f"tcp://127.0.0.1:{free_port()}"
        log_path = tmp_path / f"qnetd-{len(started)}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            daemon_cmd("run", "--config", str(cfg), "--control", control, "--publish", publish),
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / f"state-{len(started)}"), **(env or {})},
        )
        d = DaemonProc(proc, control, publish, log_path)
        started.append(d)
        if wait:
            d.wait_running()
        return d

    yield start
    for d in started:
        d.client.close()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def keys(tmp_path):
    """CURVE key pairs server, alice (authorized) and mallory (a valid key, not authorized)."""
    from daemon.api.security import keygen

    d = tmp_path / "curve-keys"
    out = {name: keygen(d, name) for name in ("server", "alice", "mallory")}
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(out["alice"][0], authorized / "alice.key")
    return {"dir": d, "authorized": authorized, **{k: {"public": v[0], "secret": v[1]} for k, v in out.items()}}
