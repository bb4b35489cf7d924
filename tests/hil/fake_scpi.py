"""A scriptable SCPI-over-TCP instrument for the VISA driver tests (test_cld1015, test_id120): it answers
what a test tells it to, so the driver's handling of malformed replies can be checked."""

from __future__ import annotations

from typing import Callable

import pytest

from drivers.sim.instruments.tcp import TcpServer, read_lines

Reply = Callable[[str], object]


class FakeInstrument:
    """A TCP server answering each line with ``reply(line)`` (None: stay silent; bytes: sent verbatim)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.server = TcpServer(self._serve, name="fake-scpi")
        self.server.start()
        self.address = f"TCPIP::127.0.0.1::{self.server.port}::SOCKET"

    def _serve(self, conn) -> None:
        for raw in read_lines(conn):
            out = self.reply(raw.decode(errors="replace").strip())
            if out is not None:
                conn.sendall(out if isinstance(out, bytes) else (str(out) + "\n").encode())

    def stop(self) -> None:
        self.server.stop()


def answering(normal: dict[str, object], overrides: dict[str, object]) -> Reply:
    """Replies from ``overrides``, else ``normal``, else ``0`` to any other query; commands get no reply."""

    def reply(line: str) -> object:
        if line in overrides:
            return overrides[line]
        if line in normal:
            return normal[line]
        return "0" if line.endswith("?") else None

    return reply


@pytest.fixture
def fake_factory():
    """``fake_factory(reply)`` starts a FakeInstrument; all are stopped after the test."""
    fakes: list[FakeInstrument] = []

    def make(reply: Reply) -> FakeInstrument:
        f = FakeInstrument(reply)
        fakes.append(f)
        return f

    yield make
    for f in fakes:
        f.stop()
