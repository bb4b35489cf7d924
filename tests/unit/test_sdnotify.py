"""daemon.sdnotify (Notifier, watchdog_interval_s) and qnetctl.parse_params."""

from __future__ import annotations

import json
import os
import socket
import uuid

import pytest

from daemon.api.protocol import dumps
from daemon.qnetctl import parse_params
from daemon.sdnotify import Notifier, watchdog_interval_s


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def test_notify_to_socket_path(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    rx = receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    try:
        assert n.enabled
        assert n.notify(READY=1, STATUS="x") is True
        assert rx.recv(4096) == b"READY=1\nSTATUS=x"
        assert n.notify(STATUS="running: 3/5 devices ready") is True
        assert rx.recv(4096) == b"STATUS=running: 3/5 devices ready"
    finally:
        n.close()
        rx.close()
    assert not n.enabled
    assert n.notify(READY=1) is False


@pytest.mark.skipif(not os.path.exists("/proc/net/unix"), reason="abstract sockets are Linux only")
def test_notify_to_abstract_socket():
    name = f"qnetd-test-{uuid.uuid4().hex}"
    rx = receiver("\0" + name)
    n = Notifier("@" + name)
    try:
        assert n.notify(READY=1, STATUS="x") is True
        assert rx.recv(4096) == b"READY=1\nSTATUS=x"
    finally:
        n.close()
        rx.close()


def test_explicit_address_wins_over_environment(tmp_path, monkeypatch):
    path = str(tmp_path / "explicit.sock")
    rx = receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "other.sock"))
    n = Notifier(path)
    try:
        assert n.notify(WATCHDOG=1)
        assert rx.recv(4096) == b"WATCHDOG=1"
    finally:
        n.close()
        rx.close()


def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.notify(READY=1, STATUS="x") is False
    n.close()
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert Notifier().notify(READY=1) is False


def test_vanished_socket_does_not_raise(tmp_path):
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    try:
        assert n.enabled
        assert n.notify(READY=1) is False
    finally:
        n.close()


# -- watchdog --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("usec", [5_000_000, 30_000_000, 1_500_000])
def test_watchdog_interval_is_half_the_period(monkeypatch, usec):
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == pytest.approx(usec / 1e6 / 2)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == pytest.approx(usec / 1e6 / 2)


def test_watchdog_for_another_pid_is_none(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None


def test_watchdog_unset_or_invalid(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "")
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "five")
    assert watchdog_interval_s() is None


def test_watchdog_interval_has_a_floor(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2")
    interval = watchdog_interval_s()
    assert interval is not None and interval > 2 / 1e6 / 2


# -- qnetctl.parse_params --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["40", "40.5", "-3", "true", "false", "null", "[1, 2]", '"text"', '{"a": 1}',
                                  "[[0, 4], [1, 5]]"])
def test_parse_params_json_values(text):
    assert parse_params([f"key={text}"]) == {"key": json.loads(text)}


@pytest.mark.parametrize("text", ["hello", "tcp://127.0.0.1:5555", "", "a b", "[1, 2", "True", "40mA"])
def test_parse_params_plain_strings(text):
    assert parse_params([f"key={text}"]) == {"key": text}


def test_parse_params_several_and_value_with_equals():
    assert parse_params(["milliamps=40", "name=pump", "expr=a=b"]) == {"milliamps": 40, "name": "pump", "expr": "a=b"}
    assert parse_params([]) == {}
    assert parse_params(["x=1", "x=2"]) == {"x": 2}


@pytest.mark.parametrize("item", ["milliamps", "=40", ""])
def test_parse_params_without_key_value(item):
    with pytest.raises(ValueError) as exc:
        parse_params(["ok=1", item])
    assert repr(item) in str(exc.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_parse_params_values_can_be_sent(text):
    params = parse_params([f"x={text}"])
    dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": params})  # what qnetctl's client sends
