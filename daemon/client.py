"""Python client for experiment scripts: blocking :class:`Client` and :class:`AsyncClient`.

    from daemon.client import Client

    with Client() as qnet:                                  # tcp://127.0.0.1:5555 / :5556
        qnet.call("pump.set_current", milliamps=40.0)
        for msg in qnet.subscribe("counts", count=3):
            print(msg["rates_hz"])

A daemon with CURVE authentication (``[daemon.curve]``) needs the server's public key and the client's key
pair (files written by ``qnetd keygen``)::

    Client("tcp://lab-pc:5555", "tcp://lab-pc:5556",
           curve_server_key="keys/qnetd.key", curve_client_keys="keys/alice.key_secret")

or ``QNETD_SERVER_KEY`` / ``QNETD_CLIENT_KEY`` in the environment. An unauthorized client gets no answer at
all (:class:`NoReply`), never an error message.

A daemon error is raised as a subclass of :class:`~daemon.api.errors.RpcError` (``LimitExceeded``,
``DeviceUnavailable``, ``InvalidParams``, ...) carrying ``code``, ``message`` and ``data``. No answer within
the timeout raises :class:`NoReply`. A client object is not thread-safe: use one per thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio

from daemon.api import errors
from daemon.api.errors import RpcError
from daemon.api.protocol import Message, decode_message, dumps

DEFAULT_CONTROL = "tcp://127.0.0.1:5555"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"

__all__ = ["AsyncClient", "Client", "Message", "NoReply", "RpcError", "errors"]


class NoReply(TimeoutError):
    """No daemon answered within the timeout (not running, wrong endpoint, or overloaded)."""


KeySource = str | os.PathLike[str] | bytes


def _curve_keys(server_key: KeySource | None, client_keys: KeySource | tuple[bytes, bytes] | None
                ) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) Z85 keys, or None without CURVE.

    ``server_key``: the server's public key file, or its 40-byte Z85 key as bytes. ``client_keys``: the
    client's secret key file (NAME.key_secret), or a (public, secret) pair of Z85 bytes. Defaults come from
    QNETD_SERVER_KEY / QNETD_CLIENT_KEY (file paths). Both or neither.
    """
    from daemon.api.security import load_public_key, load_secret_key

    server_key = server_key or os.environ.get("QNETD_SERVER_KEY") or None
    client_keys = client_keys or os.environ.get("QNETD_CLIENT_KEY") or None
    if server_key is None and client_keys is None:
        return None
    if server_key is None or client_keys is None:
        raise ValueError("CURVE needs both the server's public key (curve_server_key, QNETD_SERVER_KEY) and the "
                         "client's secret key file (curve_client_keys, QNETD_CLIENT_KEY)")
    if isinstance(server_key, bytes):
        if len(server_key) != 40:
            raise ValueError("curve_server_key as bytes must be the 40-character Z85 public key")
        server = server_key
    else:
        server = load_public_key(os.path.expanduser(server_key))
    if isinstance(client_keys, tuple):
        public, secret = client_keys
    elif isinstance(client_keys, bytes):
        raise ValueError("curve_client_keys must be the path of the client's .key_secret file, or a "
                         "(public, secret) pair of Z85 keys")
    else:
        public, secret = load_secret_key(os.path.expanduser(client_keys))
    return server, public, secret


class _Common:
    _ctx: Any  # zmq.Context or zmq.asyncio.Context, set by the subclass

    def __init__(self, control: str | None, publish: str | None, timeout: float,
                 curve_server_key: KeySource | None = None,
                 curve_client_keys: KeySource | tuple[bytes, bytes] | None = None) -> None:
        self.control = control or os.environ.get("QNETD_CONTROL", DEFAULT_CONTROL)
        self.publish = publish or os.environ.get("QNETD_PUBLISH", DEFAULT_PUBLISH)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._curve = _curve_keys(curve_server_key, curve_client_keys)

    def _secure(self, sock: Any) -> None:
        """Make ``sock`` (not yet connected) a CURVE client when keys were given."""
        if self._curve is not None:
            server, public, secret = self._curve
            sock.curve_serverkey = server
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    def _request(self, method: str, params: dict[str, Any] | None) -> tuple[int, bytes]:
        rid = next(self._ids)
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params:
            req["params"] = params
        return rid, dumps(req)

    @staticmethod
    def _match(data: bytes, rid: int) -> tuple[bool, Any]:
        """(True, result) for the reply to ``rid``; raises its error; (False, None) for a stale reply."""
        try:
            reply = json.loads(data)
        except ValueError:
            return False, None
        if not isinstance(reply, dict):
            return False, None
        if reply.get("id") != rid:
            # a reply to an earlier request that timed out, or an error the daemon could not tie to an id
            if reply.get("id") is None and "error" in reply:
                raise errors.from_json(reply["error"])
            return False, None
        if "error" in reply:
            raise errors.from_json(reply["error"])
        return True, reply.get("result")

    @staticmethod
    def _wanted(topics: tuple[str, ...], topic: str) -> bool:
        """Exact topics, or prefixes written ``device.*``; nothing given: everything."""
        if not topics:
            return True
        for t in topics:
            if t.endswith("*") and topic.startswith(t[:-1]):
                return True
            if topic == t:
                return True
        return False

    def _subscriber(self, topics: tuple[str, ...]) -> Any:
        """A SUB socket on the publish endpoint, subscribed to ``topics`` (prefixes; none: everything)."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        try:
            self._secure(sub)
            for p in [t.rstrip("*").encode() for t in topics] or [b""]:
                sub.setsockopt(zmq.SUBSCRIBE, p)
            sub.connect(self.publish)
        except BaseException:
            sub.close()
            raise
        return sub


class Client(_Common):
    """Blocking client. ``timeout`` (s) bounds every call unless the call gives its own."""

    def __init__(self, control: str | None = None, publish: str | None = None, timeout: float = 10.0,
                 context: zmq.Context | None = None, *, curve_server_key: KeySource | None = None,
                 curve_client_keys: KeySource | tuple[bytes, bytes] | None = None) -> None:
        super().__init__(control, publish, timeout, curve_server_key, curve_client_keys)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            self._secure(s)
            s.connect(self.control)
            self._sock = s
        return self._sock

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with keyword parameters; return its result or raise its RpcError."""
        return self.call_with(method, params)

    def call_with(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """As :meth:`call`, with params as a dict (for names that clash with Python) and a per-call timeout."""
        sock = self._socket()
        rid, data = self._request(method, params)
        sock.send(data)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                # drop the socket: a late reply must not be read as the answer to the next call
                self._sock.close()
                self._sock = None
                raise NoReply(f"no reply from qnetd at {self.control} within {timeout or self.timeout:g} s ({method})")
            done, result = self._match(sock.recv(), rid)
            if done:
                return result

    def describe(self) -> dict[str, Any]:
        return self.call("daemon.describe")

    def status(self) -> dict[str, Any]:
        return self.call("daemon.status")

    def subscribe(self, *topics: str, count: int | None = None, timeout: float | None = None) -> Iterator[Message]:
        """Yield published messages of ``topics`` (exact, or ``prefix*``; none: all).

        Stops after ``count`` messages if given; raises NoReply if nothing arrives for ``timeout`` seconds.
        The socket connects when this is called, so subscribe first, then act. ZeroMQ still needs a few
        milliseconds to set up a new subscription: for state that may already have been published, ask
        over RPC (``daemon.status``) rather than wait for a message.
        """
        sub = self._subscriber(topics)  # now, not at the first next(): messages from here on are queued for us
        return self._receive(sub, topics, count, timeout)

    def _receive(self, sub: zmq.Socket, topics: tuple[str, ...], count: int | None,
                 timeout: float | None) -> Iterator[Message]:
        try:
            seen = 0
            while count is None or seen < count:
                if timeout is not None and not sub.poll(int(timeout * 1000)):
                    raise NoReply(f"no message on {', '.join(topics) or 'any topic'} from {self.publish} in {timeout:g} s")
                msg = decode_message(sub.recv_multipart())
                if self._wanted(topics, msg.topic):
                    seen += 1
                    yield msg
        finally:
            sub.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Common):
    """asyncio client: ``await call(...)``, ``async for msg in subscribe(...)``. Calls may run concurrently."""

    def __init__(self, control: str | None = None, publish: str | None = None, timeout: float = 10.0,
                 context: zmq.asyncio.Context | None = None, *, curve_server_key: KeySource | None = None,
                 curve_client_keys: KeySource | tuple[bytes, bytes] | None = None) -> None:
        super().__init__(control, publish, timeout, curve_server_key, curve_client_keys)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[int, Any] = {}
        self._reader: Any = None

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            self._secure(s)
            s.connect(self.control)
            self._sock = s
        return self._sock

    async def _read_replies(self) -> None:
        sock = self._socket()
        while self._pending:
            data = await sock.recv()
            try:
                reply = json.loads(data)
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            rid = reply.get("id")
            if rid is None and "error" in reply and self._pending:
                rid = next(iter(self._pending))  # an error the daemon could not tie to an id: the oldest call
                data = dumps({**reply, "id": rid})
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def call(self, method: str, /, **params: Any) -> Any:
        return await self.call_with(method, params)

    async def call_with(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        sock = self._socket()
        rid, data = self._request(method, params)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await sock.send(data)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies())
        t = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(t):
                raw = await fut
        except TimeoutError:
            raise NoReply(f"no reply from qnetd at {self.control} within {t:g} s ({method})") from None
        finally:
            self._pending.pop(rid, None)
        return self._match(raw, rid)[1]

    async def subscribe(self, *topics: str, count: int | None = None,
                        timeout: float | None = None) -> AsyncIterator[Message]:
        sub = self._subscriber(topics)
        try:
            seen = 0
            while count is None or seen < count:
                try:
                    async with asyncio.timeout(timeout):
                        parts = await sub.recv_multipart()
                except TimeoutError:
                    raise NoReply(f"no message on {', '.join(topics) or 'any topic'} in {timeout:g} s") from None
                msg = decode_message(parts)
                if self._wanted(topics, msg.topic):
                    seen += 1
                    yield msg
        finally:
            sub.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
