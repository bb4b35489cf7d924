"""Serving a serial-port simulator on a pseudo-terminal, behind a stable address.

:class:`PtySimulator` is the plumbing the serial simulators (EPC-04, MPC320) share: :attr:`address` is a
symlink ``<tmpdir>/<name>`` to the current pty slave (as ``/dev/serial/by-id/...`` is a symlink to
``/dev/ttyUSBn``), so a driver opens it with pyserial exactly as it opens a real port. ``stop()`` (unplug)
closes the pty, so an open driver's next read or write fails, and removes the symlink; ``start()`` makes a
new pty behind the same symlink. One thread per pty reads what the host writes and writes :attr:`_out`,
optionally in small delayed pieces (:meth:`fragment_writes`).

A subclass implements :meth:`_on_data` (bytes from the host, under the lock) and may override
:meth:`_tick` (timed work; returns how long the thread may sleep), :meth:`_on_plug` and :meth:`_on_unplug`.
"""

from __future__ import annotations

import os
import select
import tempfile
import threading
import time
import tty

__all__ = ["PtySimulator"]


class PtySimulator:
    """A device on a pseudo-terminal; ``tag`` names its temp dir and thread, ``default_link`` the symlink
    when ``name`` is empty."""

    def __init__(self, name: str, tag: str, default_link: str) -> None:
        self.name = name
        self._tag = tag
        self._lock = threading.RLock()
        self._dir = tempfile.mkdtemp(prefix=f"qnetd-{tag}-")
        self._link = os.path.join(self._dir, name.replace("/", "_") or default_link)
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._out = bytearray()  # bytes waiting to be written to the master
        self._fragment: tuple[int, float] | None = None
        self._next_write = 0.0

    # -- hooks ------------------------------------------------------------------------------------------
    def _on_data(self, data: bytes, now: float) -> None:
        """Bytes the host wrote (called under the lock)."""
        raise NotImplementedError

    def _tick(self, now: float) -> float:
        """Timed work before each wait (under the lock); return the longest wait before the next."""
        return 1.0

    def _on_plug(self) -> None:
        """A new pty is up, the serving thread not yet started (under the lock)."""

    def _on_unplug(self, now: float) -> None:
        """The serving thread has ended, the pty is still open (under the lock)."""

    # -- SimInstrument ----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """Stable path of the port (a symlink to the current pty slave); open it with pyserial."""
        return self._link

    @property
    def tty_path(self) -> str | None:
        """The pty slave the address currently points at (None while stopped)."""
        return os.ttyname(self._slave) if self._slave is not None else None

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo or newline translation before (or without) pyserial configuring it
            os.set_blocking(master, False)
            self._master, self._slave = master, slave
            self._wake_r, self._wake_w = os.pipe()
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            tmp = self._link + ".new"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(os.ttyname(slave), tmp)
            os.replace(tmp, self._link)
            self._out.clear()
            self._on_plug()
            self._running = True
            self._thread = threading.Thread(target=self._serve, name=f"sim-{self.name}-{self._tag}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Unplug: the pty closes (an open driver's I/O fails) and the address disappears."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._poke()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        with self._lock:
            self._on_unplug(time.monotonic())
            for fd in (self._master, self._slave, self._wake_r, self._wake_w):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._master = self._slave = self._wake_r = self._wake_w = None
            self._thread = None
            try:
                os.unlink(self._link)
            except FileNotFoundError:
                pass
            try:
                os.rmdir(self._dir)
            except OSError:
                pass

    # -- test controls ----------------------------------------------------------------------------------
    def inject(self, data: bytes) -> None:
        """Write raw bytes to the host now."""
        with self._lock:
            self._out += data
            self._poke()

    def fragment_writes(self, size: int | None, gap_s: float = 0.002) -> None:
        """Write output ``size`` bytes at a time with ``gap_s`` between writes (None: at once)."""
        with self._lock:
            self._fragment = None if size is None else (max(1, int(size)), float(gap_s))

    # -- serving thread ---------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _serve(self) -> None:
        master, wake = self._master, self._wake_r
        assert master is not None and wake is not None
        while True:
            with self._lock:
                if not self._running:
                    return
                now = time.monotonic()
                timeout = self._tick(now)
                want_write = bool(self._out) and now >= self._next_write
                if self._out and not want_write:
                    timeout = min(timeout, max(0.0, self._next_write - now))
            try:
                readable, writable, _ = select.select([master, wake], [master] if want_write else [], [], timeout)
            except (OSError, ValueError):
                return
            if wake in readable:
                try:
                    os.read(wake, 4096)
                except OSError:
                    pass
            if master in readable:
                try:
                    data = os.read(master, 4096)
                except BlockingIOError:
                    data = b""
                except OSError:
                    data = b""  # no process has the slave open right now (EIO on some systems): wait for one
                    time.sleep(0.01)
                if data:
                    with self._lock:
                        self._on_data(data, time.monotonic())
            if master in writable:
                with self._lock:
                    self._flush(master)

    def _flush(self, master: int) -> None:
        if not self._out:
            return
        chunk = self._out if self._fragment is None else self._out[: self._fragment[0]]
        try:
            n = os.write(master, chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._out.clear()
            return
        del self._out[:n]
        if self._fragment is not None:
            self._next_write = time.monotonic() + self._fragment[1]
