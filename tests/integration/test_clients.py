"""qnetctl exit codes and the asyncio client against the real daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from daemon.api import errors
from daemon.client import AsyncClient, NoReply
from tests.integration.conftest import PUMP, config_text, free_port

pytestmark = pytest.mark.integration


def qnetctl(d, *args: str, timeout: str = "5") -> subprocess.CompletedProcess:
    control = d.control if d is not None else f"tcp://127.0.0.1:{free_port()}"
    publish = d.publish if d is not None else f"tcp://127.0.0.1:{free_port()}"
    return subprocess.run([sys.executable, "-m", "daemon.qnetctl", "--control", control, "--publish", publish,
                           "--timeout", timeout, *args], capture_output=True, text=True, timeout=60)


def test_qnetctl_exit_codes(start_daemon):
    d = start_daemon(config_text(PUMP))
    r = qnetctl(d, "status")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running"
    r = qnetctl(d, "call", "pump.set_current", "milliamps=42.5")
    assert r.returncode == 0
    r = qnetctl(d, "call", "pump.status")
    assert json.loads(r.stdout)["current_setpoint_ma"] == 42.5
    r = qnetctl(d, "call", "pump.set_current", "milliamps=600")
    assert r.returncode == 2 and str(errors.LIMIT_EXCEEDED) in r.stderr
    r = qnetctl(d, "call", "pump.set_current", "oops")
    assert r.returncode == 1
    r = qnetctl(d, "frobnicate")
    assert r.returncode == 1
    r = qnetctl(d, "watch", "counts", "--count", "2")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and [m["topic"] for m in lines] == ["counts", "counts"]
    r = qnetctl(d, "describe")
    assert r.returncode == 0 and "pump.set_current" in r.stdout


def test_qnetctl_no_daemon_exits_3():
    r = qnetctl(None, "status", timeout="0.5")
    assert r.returncode == 3 and "no reply" in r.stderr


def test_async_client_concurrent_calls_and_subscribe(start_daemon):
    d = start_daemon(config_text(PUMP))

    async def main():
        async with AsyncClient(d.control, d.publish, timeout=5) as c:
            results = await asyncio.gather(c.call("daemon.status"), c.call("pump.status"),
                                           c.call("tagger.status"))
            assert results[0]["state"] == "running"
            assert results[1]["output"] is False and results[2]["channels"] == 8
            with pytest.raises(errors.InvalidParams):
                await c.call("pump.set_current", milliamps=True)
            msgs = [m async for m in c.subscribe("counts", count=2, timeout=10)]
            assert [m.topic for m in msgs] == ["counts", "counts"]
            assert isinstance(msgs[0]["counts"], list)
            with pytest.raises(NoReply):
                await AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.3).call("daemon.status")

    asyncio.run(main())
