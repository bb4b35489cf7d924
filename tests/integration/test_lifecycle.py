"""Start-up and shutdown of the real daemon: config errors, bind safety, SIGTERM, systemd notify."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from daemon.config import EX_CONFIG
from tests.integration.conftest import PUMP, config_text, daemon_cmd, free_port

pytestmark = pytest.mark.integration


def test_sigterm_exits_zero_after_safe_states(start_daemon):
    d = start_daemon(config_text(PUMP, """
[devices.pc]
driver = "sim.polarization"
[devices.det]
driver = "sim.detector"
"""))
    d.client.call("pump.set_current", milliamps=40.0)
    d.client.call("pump.set_output", on=True)
    d.client.call("det.set_enabled", on=True)
    health = d.client.subscribe("daemon", timeout=5)
    next(health)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    logs = d.logs()
    events = [(r.get("device"), r["event"]) for r in logs]
    for dev in ("tagger", "pump", "pc", "det"):
        assert (dev, "safe state reached") in events, dev
        assert (dev, "close done") in events, dev
    assert ("tagger", "stream stopped") in events
    assert logs[-1]["event"] == "qnetd stopped"
    # the final health messages say stopping, then stopped
    states = []
    for msg in health:
        states.append(msg["state"])
        if msg["state"] == "stopped":
            break
    assert states[-2:] == ["stopping", "stopped"] or states == ["stopped"]


def test_bad_config_is_refused_before_any_device(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(config_text(PUMP).replace("pair_rate_hz = 40000.0", "pair_rate_hz = -5.0")
                   + '\n[devices.x]\ndriver = "no.such.driver"\n')
    r = subprocess.run(daemon_cmd("run", "--config", str(cfg)), capture_output=True, text=True, timeout=30)
    assert r.returncode == EX_CONFIG
    assert "devices.tagger.options.pair_rate_hz" in r.stderr
    assert "devices.x.driver" in r.stderr and "sim.tagger" in r.stderr  # lists what is installed
    assert "connecting" not in r.stderr + r.stdout


@pytest.mark.parametrize("flag", ["--control", "--publish"])
def test_non_loopback_bind_refused(tmp_path, flag):
    r = subprocess.run(daemon_cmd("run", flag, "tcp://0.0.0.0:%d" % free_port()), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == EX_CONFIG
    assert "loopback" in r.stderr and f"daemon.{flag[2:]}" in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(config_text())
        r = subprocess.run(daemon_cmd("run", "--config", str(cfg), "--control", f"tcp://127.0.0.1:{port}",
                                      "--publish", f"tcp://127.0.0.1:{free_port()}"),
                           capture_output=True, text=True, timeout=30)
    finally:
        busy.close()
    assert r.returncode == 69
    assert "cannot bind" in r.stderr and "in use" in r.stderr.lower()


def test_systemd_notify_ready_watchdog_stopping(start_daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        d = start_daemon(config_text(PUMP), env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}, wait=False)
        got: list[str] = []

        def until(pred):
            while not any(pred(m) for m in got):
                got.append(sock.recv(4096).decode())

        until(lambda m: "READY=1" in m)
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=running: 2/2 devices ready" in ready
        n = len(got)
        until(lambda m: m == "WATCHDOG=1")
        until(lambda m: got.count("WATCHDOG=1") >= 3)  # periodic, at WATCHDOG_USEC / 2
        assert len(got) > n
        d.proc.send_signal(signal.SIGTERM)
        until(lambda m: "STOPPING=1" in m)
        assert d.proc.wait(10) == 0
    finally:
        sock.close()
