"""JSON-RPC 2.0 over a ZeroMQ ROUTER socket.

One request (or batch) per message. REQ clients send ``[identity, "", payload]`` as seen by ROUTER, DEALER
clients ``[identity, payload]`` (or with the empty delimiter): the reply goes back with the same envelope,
so both work. Each request runs in its own task, so a slow device call never holds up the others; each
device still serializes its own calls in its worker thread. Nothing a client sends can stop the loop:
every failure becomes an error reply.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
import zmq
import zmq.asyncio

from daemon.api.errors import Busy, InternalError, InvalidRequest, ParseError, RpcError
from daemon.api.methods import MethodTable
from daemon.api.protocol import dumps
from daemon.api.security import CurveConfig, make_server

log = structlog.get_logger("qnetd.rpc")

HARD_LIMIT_FACTOR = 16  # libzmq drops (and disconnects) messages above max_request_bytes * this


def _error(id_: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": err.to_json()}


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


class RpcServer:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, table: MethodTable, *,
                 max_request_bytes: int = 1_048_576, max_in_flight: int = 256,
                 curve: CurveConfig | None = None) -> None:
        self.table = table
        self.endpoint = endpoint
        self.max_request_bytes = max_request_bytes
        self.max_in_flight = max_in_flight
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_request_bytes * HARD_LIMIT_FACTOR)
        if "[" in endpoint:
            self.socket.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            make_server(self.socket, curve)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        self._tasks: set[asyncio.Task[None]] = set()
        self.served = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def serve(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            if len(frames) < 2:
                continue  # not a routable request
            identity, rest = frames[0], frames[1:]
            if len(rest) >= 2 and rest[0] == b"":
                envelope, body = [identity, b""], rest[1:]
            else:
                envelope, body = [identity], rest
            if len(body) != 1:
                await self._send(envelope, _error(None, InvalidRequest(
                    f"one JSON-RPC message per ZeroMQ message; got {len(body)} frames")))
                continue
            if len(self._tasks) >= self.max_in_flight:
                await self._send(envelope, _error(_peek_id(body[0]), Busy(
                    f"{len(self._tasks)} requests in flight (limit {self.max_in_flight}); retry later")))
                continue
            task = asyncio.create_task(self._serve_one(envelope, body[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            reply = await self.handle(payload)
        except Exception:  # noqa: BLE001 - defence in depth: handle() already turns errors into replies
            log.exception("unhandled error serving a request")
            reply = _error(None, InternalError("internal error"))
        if reply is not None:
            await self._send(envelope, reply)

    async def _send(self, envelope: list[bytes], reply: Any) -> None:
        try:
            data = dumps(reply)
        except (TypeError, ValueError, RecursionError) as e:
            log.error("reply not serializable", error=str(e))
            rid = reply.get("id") if isinstance(reply, dict) else None
            data = dumps(_error(rid, InternalError(f"the result could not be encoded as JSON: {e}")))
        try:
            await self.socket.send_multipart([*envelope, data])
            self.served += 1
        except zmq.ZMQError as e:
            log.warning("reply not sent", error=str(e))

    async def handle(self, payload: bytes) -> Any:
        """Answer one message: a request object, a batch, or garbage. None when nothing is to be sent."""
        if len(payload) > self.max_request_bytes:
            return _error(None, InvalidRequest(
                f"request of {len(payload)} bytes exceeds the limit of {self.max_request_bytes} bytes",
                data={"size": len(payload), "limit": self.max_request_bytes}))
        try:
            obj = json.loads(payload, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(None, ParseError(f"not valid JSON: {e}"))
        except RecursionError:
            return _error(None, ParseError("not valid JSON: nested too deeply"))
        if isinstance(obj, list):
            if not obj:
                return _error(None, InvalidRequest("empty batch"))
            replies = await asyncio.gather(*(self.handle_request(o) for o in obj))
            replies = [r for r in replies if r is not None]
            return replies or None
        return await self.handle_request(obj)

    async def handle_request(self, obj: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict):
            return _error(None, InvalidRequest("a request must be a JSON object"))
        id_ = obj.get("id")
        if not _valid_id(id_):
            return _error(None, InvalidRequest("id must be a string, an integer or null"))
        problems = []
        if obj.get("jsonrpc") != "2.0":
            problems.append('"jsonrpc" must be "2.0"')
        if not isinstance(obj.get("method"), str):
            problems.append('"method" must be a string')
        if "params" in obj and not isinstance(obj["params"], (dict, list)):
            problems.append('"params" must be an object or an array')
        extra = set(obj) - {"jsonrpc", "id", "method", "params"}
        if extra:
            problems.append(f"unknown member(s) {', '.join(sorted(extra))}")
        if problems:
            return _error(id_, InvalidRequest("invalid request: " + "; ".join(problems)))
        method = obj["method"]
        notification = "id" not in obj
        bound = log.bind(method=method, id=id_)
        try:
            result = await self.table.call(method, obj.get("params"))
        except RpcError as e:
            bound.info("request failed", code=e.code, error=e.message)
            return None if notification else _error(id_, e)
        except Exception as e:  # noqa: BLE001
            bound.exception("handler crashed")
            return None if notification else _error(id_, InternalError(f"internal error in {method}: {type(e).__name__}: {e}"))
        if notification:
            return None
        try:
            dumps(result)  # fail here, per request, so one bad result cannot spoil a batch reply
        except (TypeError, ValueError, RecursionError) as e:
            bound.error("result not serializable", error=str(e))
            return _error(id_, InternalError(f"the result of {method} could not be encoded as JSON: {e}"))
        return {"jsonrpc": "2.0", "id": id_, "result": result}

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for requests in flight, e.g. the reply to daemon.shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.socket.close()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _peek_id(payload: bytes) -> Any:
    try:
        obj = json.loads(payload)
        return obj.get("id") if isinstance(obj, dict) and _valid_id(obj.get("id")) else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
