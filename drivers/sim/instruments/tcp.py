"""A small threaded TCP server for simulated instruments: stoppable (unplug) and restartable (same port)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

Handler = Callable[[socket.socket], None]


class TcpServer:
    """Accepts connections on ``host:port`` (port 0: pick a free one, then keep it across restarts) and runs
    ``handler(conn)`` in a thread per connection. ``stop()`` closes the listener and every open connection,
    so a connected driver sees the link drop, as when an instrument is switched off."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "sim") -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        if self._listener is not None:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(8)
        self.port = s.getsockname()[1]
        self._listener = s
        self._thread = threading.Thread(target=self._accept, args=(s,), name=f"sim-{self.name}-accept", daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"sim-{self.name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass  # the peer went away, or stop() closed the connection
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


class Client:
    """One connection: its socket and a lock so replies and broadcasts do not interleave."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, data: bytes, fragment: tuple[int, float] | None = None) -> None:
        """Send ``data``, with ``fragment = (size, gap_s)`` in pieces of ``size`` bytes ``gap_s`` apart. A
        client that has gone away (or that stop() closed) is ignored: its reader thread ends on its own."""
        try:
            with self.lock:
                if fragment is None:
                    self.conn.sendall(data)
                    return
                size, gap = fragment
                for i in range(0, len(data), size):
                    self.conn.sendall(data[i:i + size])
                    time.sleep(gap)
        except OSError:
            pass


def read_lines(conn: socket.socket, terminator: bytes = b"\n", max_line: int = 65536):
    """Yield terminator-delimited messages from a connection (without the terminator) until it closes."""
    buf = b""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buf += data
        while terminator in buf:
            line, buf = buf.split(terminator, 1)
            yield line
        if len(buf) > max_line:
            buf = b""  # garbage without a terminator: drop it, as an instrument's input buffer would
