"""CURVE authentication end to end: a real daemon subprocess with [daemon.curve]."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from daemon import qnetctl
from daemon.api.security import load_secret_key
from daemon.client import AsyncClient, Client, NoReply
from tests.integration.conftest import PUMP, DaemonProc, config_text, daemon_cmd, free_port


def curve_config(keys) -> str:
    return config_text(PUMP) + (f'\n[daemon.curve]\nserver_secret_key = "{keys["server"]["secret"]}"\n'
                                f'authorized_clients = "{keys["authorized"]}"\n')


@pytest.fixture
def curve_daemon(tmp_path, keys):
    """start(bind_host): a CURVE daemon bound on bind_host (clients always connect to 127.0.0.1)."""
    started: list[DaemonProc] = []

    def start(bind_host: str = "127.0.0.1") -> DaemonProc:
        cfg = tmp_path / f"curve-{len(started)}.toml"
        cfg.write_text(curve_config(keys))
        cport, pport = free_port(), free_port()
        log_path = tmp_path / f"curve-{len(started)}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                daemon_cmd("run", "--config", str(cfg), "--control", f"tcp://{bind_host}:{cport}",
                           "--publish", f"tcp://{bind_host}:{pport}"),
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        d = DaemonProc(proc, f"tcp://127.0.0.1:{cport}", f"tcp://127.0.0.1:{pport}", log_path)
        d.client.close()
        d.client = authorized_client(d, keys)
        started.append(d)
        d.wait_running()
        return d

    yield start
    for d in started:
        d.client.close()
        if d.proc.poll() is None:
            d.stop()


def authorized_client(d: DaemonProc, keys, timeout: float = 5.0) -> Client:
    return Client(d.control, d.publish, timeout=timeout, curve_server_key=keys["server"]["public"],
                  curve_client_keys=keys["alice"]["secret"])


def test_authorized_client_can_call_and_subscribe(curve_daemon, keys):
    d = curve_daemon()
    status = d.client.status()
    assert status["state"] == "running"
    assert status["curve"]["authorized_clients"] == 1
    assert d.client.call("pump.describe")["state"] == "ready"
    msgs = list(d.client.subscribe("daemon", count=1, timeout=5.0))
    assert msgs[0].topic == "daemon"

    async def run_async() -> tuple[dict, str]:
        async with AsyncClient(d.control, d.publish, timeout=5.0, curve_server_key=keys["server"]["public"],
                               curve_client_keys=keys["alice"]["secret"]) as c:
            st = await c.call("daemon.status")
            async for msg in c.subscribe("daemon", count=1, timeout=5.0):
                return st, msg.topic
        raise AssertionError("no message")

    st, topic = asyncio.run(run_async())
    assert st["state"] == "running" and topic == "daemon"
    assert d.stop() == 0


def test_unauthorized_and_plain_clients_get_nothing(curve_daemon, keys):
    d = curve_daemon()
    mallory = Client(d.control, d.publish, timeout=1.0, curve_server_key=keys["server"]["public"],
                     curve_client_keys=keys["mallory"]["secret"])
    plain = Client(d.control, d.publish, timeout=1.0)
    # right client keys, wrong server key: the handshake fails on the client side
    impostor = Client(d.control, d.publish, timeout=1.0, curve_server_key=keys["mallory"]["public"],
                      curve_client_keys=keys["alice"]["secret"])
    try:
        for c in (mallory, plain, impostor):
            with pytest.raises(NoReply):
                c.call("daemon.status")
            with pytest.raises(NoReply):  # health messages go out every 0.5 s: none may reach them
                next(c.subscribe(timeout=1.5))
    finally:
        for c in (mallory, plain, impostor):
            c.close()
    assert d.client.status()["curve"]["denied"] >= 2  # mallory's two sockets at least
    assert d.stop() == 0


def test_non_loopback_bind_is_accepted_with_curve(curve_daemon, keys):
    d = curve_daemon("0.0.0.0")  # every interface; traffic only to 127.0.0.1
    assert d.client.status()["state"] == "running"
    plain = Client(d.control, d.publish, timeout=1.0)
    try:
        with pytest.raises(NoReply):
            plain.call("daemon.status")
    finally:
        plain.close()
    assert d.stop() == 0


def test_non_loopback_bind_is_refused_without_curve(tmp_path):
    cfg = tmp_path / "open.toml"
    cfg.write_text(config_text(PUMP))
    r = subprocess.run(daemon_cmd("run", "--config", str(cfg), "--control", f"tcp://0.0.0.0:{free_port()}"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78
    assert "daemon.control" in r.stderr and "not a loopback address" in r.stderr and "[daemon.curve]" in r.stderr


def test_secret_keys_never_logged(curve_daemon, keys):
    d = curve_daemon()
    mallory = Client(d.control, d.publish, timeout=0.5, curve_server_key=keys["server"]["public"],
                     curve_client_keys=keys["mallory"]["secret"])
    with pytest.raises(NoReply):
        mallory.call("daemon.status")
    mallory.close()
    d.client.status()
    assert d.stop() == 0
    text = d.log_path.read_text()
    assert "CURVE authentication on" in text and "key not authorized" in text  # debug logs were on
    for who in ("server", "alice", "mallory"):
        _, secret = load_secret_key(keys[who]["secret"])
        assert secret.decode() not in text


def test_qnetctl_with_keys(curve_daemon, keys, capsys):
    d = curve_daemon()
    base = ["--control", d.control, "--publish", d.publish, "--timeout", "5"]
    assert qnetctl.main([*base, "--server-key", str(keys["server"]["public"]),
                         "--client-key", str(keys["alice"]["secret"]), "status"]) == qnetctl.EXIT_OK
    assert '"running"' in capsys.readouterr().out
    assert qnetctl.main(["--control", d.control, "--timeout", "1", "status"]) == qnetctl.EXIT_NO_DAEMON
    assert qnetctl.main([*base, "--server-key", str(keys["server"]["public"]), "status"]) == qnetctl.EXIT_USAGE
    assert "both" in capsys.readouterr().err
    assert d.stop() == 0
