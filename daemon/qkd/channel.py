"""The classical channel between Alice and Bob, and the messages that travel on it.

Both parties of a post-processing protocol (reconciliation, verification) are *sans-IO* state machines: they
consume a :class:`Message` and return the next one (or ``None``). They never share objects: every message is
serialised to ``bytes`` by the sending :class:`Channel` end and parsed afresh by the receiving end, so the only
thing one side learns about the other is what went over the wire. A ZeroMQ channel between two daemons
implements the same two methods (``send``/``recv``) with the same wire format.

Wire format of one message (little endian)::

    u32 header_length | header (JSON, UTF-8) | array payloads (raw) | disclosed bits (np.packbits, little)

The JSON header holds ``kind`` (e.g. ``"cascade.query"``), ``meta`` (small public values), the name, dtype and
shape of each public array, and ``nbits``, the number of *disclosed* bits. Public arrays carry data that does not
depend on the sender's key (query coordinates, hash seeds). Disclosed bits are key-dependent (parities, hash
tags); the channel counts them as leak when it sends them, so the leak is measured from what was actually sent,
never from a formula.
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Message", "ChannelStats", "Channel", "LoopbackEnd", "loopback_pair", "encode", "decode", "Party", "pump"]

_ALLOWED_DTYPES = {"uint8", "int8", "uint16", "uint32", "int32", "int64", "uint64"}


@dataclass
class Message:
    """One protocol message: ``kind``, public ``meta`` (JSON-able), public ``arrays`` and ``disclosed`` bits."""

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    disclosed: np.ndarray | None = None  # uint8 0/1 per bit, key-dependent: counted as leak

    @property
    def nbits(self) -> int:
        return 0 if self.disclosed is None else int(self.disclosed.size)


_WIRE_DTYPES = {np.dtype(name): (name, np.dtype(name).newbyteorder("<")) for name in _ALLOWED_DTYPES}
_BY_NAME = {name: (np.dtype(name), np.dtype(name).newbyteorder("<")) for name in _ALLOWED_DTYPES}
_LITTLE = np.little_endian
_UNPACK = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # byte -> 8 bits
_BITS01 = bytes(range(2))  # the only byte values a disclosed-bit array may hold


_JSTR: dict[str, str] = {}


def _jstr(s: str) -> str:
    """JSON literal of a string (cached: kinds and array names repeat)."""
    out = _JSTR.get(s)
    if out is None:
        out = json.dumps(str(s))
        if len(_JSTR) < 1024:
            _JSTR[s] = out
    return out


def encode(msg: Message) -> bytes:
    specs = []
    chunks = []
    for name, arr in msg.arrays.items():
        a = np.ascontiguousarray(arr)
        wire = _WIRE_DTYPES.get(a.dtype)
        if wire is None:
            raise TypeError(f"array {name!r}: dtype {a.dtype} not allowed on the wire")
        sh = a.shape
        dims = str(sh[0]) if len(sh) == 1 else ",".join([str(int(x)) for x in sh])
        specs.append(f'[{_jstr(name)},"{wire[0]}",[{dims}]]')
        chunks.append(a.tobytes() if _LITTLE or a.dtype.itemsize == 1 else a.astype(wire[1]).tobytes())
    bits = b""
    nbits = 0
    d = msg.disclosed
    if d is not None:
        if not (isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 1):
            d = np.asarray(d, dtype=np.uint8).ravel()
        nbits = d.size
        if nbits and d.tobytes().translate(None, _BITS01):
            raise ValueError("disclosed bits must be 0/1")
        bits = np.packbits(d, bitorder="little").tobytes()
    meta = json.dumps(msg.meta, separators=(",", ":")) if msg.meta else "{}"
    header = f'{{"kind":{_jstr(msg.kind)},"meta":{meta},"arrays":[{",".join(specs)}],"nbits":{nbits}}}'.encode()
    return b"".join([len(header).to_bytes(4, "little"), header, *chunks, bits])


_HEADERS: dict[bytes, dict] = {}  # parsed meta-less headers (they repeat: same kinds, counts and shapes)


def decode(data: bytes) -> Message:
    """Parse one message; any malformed input raises ValueError."""
    try:
        (hlen,) = struct.unpack_from("<I", data, 0)
        raw = bytes(data[4:4 + hlen])
        header = _HEADERS.get(raw)
        if header is None:
            header = json.loads(raw.decode())
            if not isinstance(header, dict) or not isinstance(header["kind"], str) \
                    or not isinstance(header["meta"], dict) or not isinstance(header["nbits"], int) \
                    or header["nbits"] < 0:
                raise ValueError("bad header")
            if not header["meta"] and len(_HEADERS) < 4096:
                _HEADERS[raw] = header
        off = 4 + hlen
        arrays = {}
        for name, dtype, shape in header["arrays"]:
            if dtype not in _BY_NAME:
                raise ValueError(f"array {name!r}: dtype {dtype!r} not allowed on the wire")
            native, dt = _BY_NAME[dtype]
            count = math.prod(shape) if shape else 1
            if count < 0 or off + count * dt.itemsize > len(data):
                raise ValueError(f"message {header['kind']!r}: array {name!r} runs past the end")
            a = np.frombuffer(data, dtype=dt, count=count, offset=off)
            arrays[name] = (a.copy() if _LITTLE else a.astype(native)).reshape(shape)
            off += count * dt.itemsize
        nbits = header["nbits"]
        meta = dict(header["meta"]) if header["meta"] else {}
    except (KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"malformed message: {e!r}") from None
    disclosed = None
    nbytes = (nbits + 7) // 8
    if len(data) - off != nbytes:
        raise ValueError(f"message {header['kind']!r}: {len(data) - off} payload bytes left, expected {nbytes}")
    if nbits:
        packed = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=off)
        disclosed = _UNPACK[packed].reshape(-1)[:nbits].copy()
    return Message(header["kind"], meta, arrays, disclosed)


@dataclass
class ChannelStats:
    """Traffic of one direction of a channel (the sender's view)."""

    messages: int = 0
    bytes: int = 0
    leak_bits: int = 0  # disclosed (key-dependent) bits sent


class Channel(Protocol):
    """One party's end of a bidirectional, ordered, reliable message channel."""

    sent: ChannelStats

    def send(self, msg: Message) -> None: ...

    def recv(self) -> Message: ...


class _Wire:
    """The shared medium of a loopback pair: two queues of bytes and the turn counter for round trips."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[bytes]] = {"alice": deque(), "bob": deque()}
        self.last_sender: str | None = None
        self.turns = 0  # maximal runs of messages in the same direction

    @property
    def round_trips(self) -> int:
        return (self.turns + 1) // 2


class LoopbackEnd:
    """In-process channel end: messages are encoded to bytes on send and decoded on receive."""

    def __init__(self, wire: _Wire, me: str, peer: str) -> None:
        self._wire = wire
        self.me = me
        self.peer = peer
        self.sent = ChannelStats()

    def send(self, msg: Message) -> None:
        data = encode(msg)
        self.sent.messages += 1
        self.sent.bytes += len(data)
        self.sent.leak_bits += msg.nbits
        if self._wire.last_sender != self.me:
            self._wire.turns += 1
            self._wire.last_sender = self.me
        self._wire.queues[self.peer].append(data)

    def recv(self) -> Message:
        q = self._wire.queues[self.me]
        if not q:
            raise LookupError(f"{self.me}: no message waiting")
        return decode(q.popleft())

    def pending(self) -> int:
        return len(self._wire.queues[self.me])

    @property
    def round_trips(self) -> int:
        return self._wire.round_trips


def loopback_pair() -> tuple[LoopbackEnd, LoopbackEnd]:
    """(Alice's end, Bob's end) of one in-process channel."""
    wire = _Wire()
    return LoopbackEnd(wire, "alice", "bob"), LoopbackEnd(wire, "bob", "alice")


class Party(Protocol):
    """A sans-IO protocol side: ``start()`` may return the opening message; ``on_message`` returns the reply."""

    done: bool

    def start(self) -> Message | None: ...

    def on_message(self, msg: Message) -> Message | None: ...


def pump(alice: Party, bob: Party, a_end: LoopbackEnd, b_end: LoopbackEnd, max_messages: int = 100_000) -> None:
    """Run two parties to completion over a loopback pair (synchronous; the asyncio/ZeroMQ driver is the same
    loop with awaits). Either side may open."""
    for party, end in ((alice, a_end), (bob, b_end)):
        first = party.start()
        if first is not None:
            end.send(first)
    for _ in range(max_messages):
        moved = False
        for party, end in ((alice, a_end), (bob, b_end)):
            while end.pending():
                reply = party.on_message(end.recv())
                moved = True
                if reply is not None:
                    end.send(reply)
        if not moved:
            if alice.done and bob.done:
                return
            raise RuntimeError("protocol stalled: no message in flight and a party not done")
    raise RuntimeError("protocol did not finish within max_messages")
