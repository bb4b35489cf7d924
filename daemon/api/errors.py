"""JSON-RPC error codes and the exceptions that carry them, shared by the daemon and its clients.

Standard codes come from JSON-RPC 2.0; the server codes -32000..-32006 are qnetd's (docs/protocol.md).
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
DEVICE_UNAVAILABLE = -32000
LIMIT_EXCEEDED = -32001
TIMEOUT = -32002
BUSY = -32003
DEVICE_ERROR = -32004
KEY_UNAVAILABLE = -32005
DELIVERY_REFUSED = -32006


class RpcError(Exception):
    """An error with a JSON-RPC code. On the client side: what the daemon answered."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, data: Any = None, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ParseError(RpcError):
    """The message is not valid JSON (UTF-8, no NaN/Infinity)."""

    code = PARSE_ERROR


class InvalidRequest(RpcError):
    """Valid JSON but not a JSON-RPC 2.0 request (or larger than the daemon accepts)."""

    code = INVALID_REQUEST


class MethodNotFound(RpcError):
    """No such method; data.similar lists methods with the same prefix."""

    code = METHOD_NOT_FOUND


class InvalidParams(RpcError):
    """A parameter is missing, unknown, of the wrong type or out of range; data.param names it."""

    code = INVALID_PARAMS


class InternalError(RpcError):
    """A bug in the daemon or a driver; the daemon keeps serving."""

    code = INTERNAL_ERROR


class DeviceUnavailable(RpcError):
    """The device is faulted, connecting, disconnected or the daemon is stopping (nothing was sent), or it
    faulted during this call (the link failed while the command was in flight)."""

    code = DEVICE_UNAVAILABLE


class LimitExceeded(RpcError):
    """A parameter is outside a configured safety limit: nothing was sent to the device."""

    code = LIMIT_EXCEEDED


class Timeout(RpcError):
    """The device did not answer in time; it is marked faulted and will be reconnected."""

    code = TIMEOUT


class Busy(RpcError):
    """Too many requests in flight; try again."""

    code = BUSY


class DeviceFailure(RpcError):
    """The device answered with an error (it stays ready)."""

    code = DEVICE_ERROR


class KeyUnavailable(RpcError):
    """Keys cannot be delivered as asked: not enough keys, an unknown or already consumed key ID (nothing was
    consumed), or the key store failed."""

    code = KEY_UNAVAILABLE


class DeliveryRefused(RpcError):
    """Key delivery on an endpoint that authenticates nobody: configure [daemon.curve]."""

    code = DELIVERY_REFUSED


BY_CODE: dict[int, type[RpcError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        DeviceUnavailable,
        LimitExceeded,
        Timeout,
        Busy,
        DeviceFailure,
        KeyUnavailable,
        DeliveryRefused,
    )
}


def from_json(err: dict[str, Any]) -> RpcError:
    """The typed exception for an error object received from the daemon."""
    code = err.get("code", INTERNAL_ERROR)
    cls = BY_CODE.get(code, RpcError)
    return cls(str(err.get("message", "")), err.get("data"), code=code)
