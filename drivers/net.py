"""Client-side TCP helpers shared by the network drivers (Toptica DLC pro, Single Quantum Eos).

:func:`parse_address` reads a configured ``host[:port]`` address, :func:`connect` opens a connection for
small request/reply exchanges, :func:`recv_some` reads once with a deadline.
"""

from __future__ import annotations

import socket

__all__ = ["connect", "parse_address", "recv_some"]


def parse_address(address: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``tcp://host:port`` -> (host, port). ValueError if invalid."""
    text = address.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {address!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text:
            raise ValueError(f"bad address {address!r}: empty port")
    else:
        host, port_text = text, ""  # a bare host name, IPv4 or IPv6 address
    if not host or any(c in host for c in "/[] "):
        raise ValueError(f"bad address {address!r}: expected host, host:port or [ipv6]:port")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in address {address!r}")
    return host, int(port_text)


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connection for request/reply exchanges: ``timeout_s`` to connect, small writes sent at once."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_some(sock: socket.socket, timeout_s: float | None) -> bytes | None:
    """Read once, waiting up to ``timeout_s`` (None: only what has already arrived).

    Returns None if nothing came, ``b""`` if the peer closed the connection.
    """
    sock.settimeout(timeout_s if timeout_s is not None else 0.0)
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError, socket.timeout):
        return None
