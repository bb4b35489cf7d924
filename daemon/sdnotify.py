"""systemd notification protocol (sd_notify), without libsystemd: one datagram per state change.

When ``NOTIFY_SOCKET`` is unset (not under systemd Type=notify) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. READY=1, STATUS=... ; True if sent. Never raises: systemd going away is not our fault."""
        if self._sock is None or self._address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self._address)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asks for (WATCHDOG_USEC, for this PID), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return max(0.01, value / 2e6) if value > 0 else None  # a floor: never spin the loop on a tiny value
