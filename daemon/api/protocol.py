"""Wire encoding shared by the daemon and clients: JSON, published messages, endpoint checks.

Published message: multipart ``[topic, header, *frames]``. ``header`` is UTF-8 JSON with ``version``,
``topic``, ``seq`` (per topic, from 0), ``host_time`` (Unix seconds), optional ``t_begin_ps``/``t_end_ps``,
``frames`` (for each binary frame: name, dtype as a little-endian numpy type string, shape) and the
topic's own fields. Each binary frame is the raw C-ordered little-endian buffer of a numpy array.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import numpy as np

from daemon.api import PROTOCOL_VERSION


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), (str, int)):  # enums
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; numpy scalars/arrays and enums become plain JSON; NaN/inf are refused."""
    return json.dumps(obj, default=_default, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------------------
# published messages


@dataclass
class Message:
    """A received publication: topic, header fields and the decoded binary frames by name."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


def encode_message(
    topic: str,
    seq: int,
    fields: dict[str, Any],
    arrays: Sequence[tuple[str, np.ndarray]] = (),
    t_begin_ps: int | None = None,
    t_end_ps: int | None = None,
) -> list[bytes | memoryview]:
    header: dict[str, Any] = {"version": PROTOCOL_VERSION, "topic": topic, "seq": seq, "host_time": time.time()}
    if t_begin_ps is not None:
        header["t_begin_ps"] = int(t_begin_ps)
    if t_end_ps is not None:
        header["t_end_ps"] = int(t_end_ps)
    frames: list[bytes | memoryview] = []
    descr = []
    for name, arr in arrays:
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        descr.append({"name": name, "dtype": arr.dtype.newbyteorder("<").str, "shape": list(arr.shape)})
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
    header["frames"] = descr
    for key in fields:
        if key in header:
            raise ValueError(f"topic field {key!r} clashes with a header key")
    header.update(fields)
    return [topic.encode(), dumps(header), *frames]


def decode_message(parts: Iterable[bytes]) -> Message:
    """Inverse of encode_message; raises ValueError on a malformed message."""
    parts = list(parts)
    if len(parts) < 2:
        raise ValueError(f"a published message has at least 2 frames, got {len(parts)}")
    topic = bytes(parts[0]).decode()
    header = json.loads(bytes(parts[1]))
    if not isinstance(header, dict):
        raise ValueError(f"the header of a published message must be a JSON object, got {type(header).__name__}")
    descr = header.get("frames", [])
    if len(descr) != len(parts) - 2:
        raise ValueError(f"header describes {len(descr)} frames, message has {len(parts) - 2}")
    arrays = {}
    for d, buf in zip(descr, parts[2:]):
        arr = np.frombuffer(bytes(buf), dtype=np.dtype(d["dtype"]))
        arrays[d["name"]] = arr.reshape(d["shape"])
    return Message(topic, header, arrays)


# ---------------------------------------------------------------------------------------------------------
# endpoints


class EndpointError(ValueError):
    pass


_LOOPBACK_NAMES = {"localhost"}


def check_endpoint(endpoint: str, *, allow_remote: bool = False) -> str:
    """Validate a ZeroMQ bind endpoint and return it; raise EndpointError saying what is wrong.

    Allowed without authentication: ``tcp://`` on a loopback address (127.0.0.0/8, ::1, localhost) with an
    explicit port, ``ipc://`` and ``inproc://``. Anything else would expose an unauthenticated control or
    data port to the network; it needs CURVE authentication (``[daemon.curve]``), which the caller says
    with ``allow_remote``.
    """
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise EndpointError(f"{endpoint!r} is not a ZeroMQ endpoint (tcp://127.0.0.1:PORT, ipc://PATH)")
    scheme, rest = endpoint.split("://", 1)
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise EndpointError(f"{endpoint!r} has no path")
        return endpoint
    if scheme != "tcp":
        raise EndpointError(f"{endpoint!r}: transport {scheme!r} is not supported (tcp, ipc, inproc)")
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname
    if not host or port is None or not (0 < port < 65536):
        raise EndpointError(f"{endpoint!r} needs a host and a port 1-65535, e.g. tcp://127.0.0.1:5555")
    if allow_remote:
        return endpoint
    loopback = host in _LOOPBACK_NAMES
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise EndpointError(
            f"{endpoint!r} is not a loopback address: an unauthenticated qnetd endpoint may only bind to "
            "127.0.0.1, ::1 or localhost (or ipc://), because anyone who reaches it can drive the lab's "
            "instruments. Configure CURVE authentication ([daemon.curve], see docs/operations.md) to bind "
            "other addresses, or use an SSH tunnel."
        )
    return endpoint
