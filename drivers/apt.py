"""Thorlabs APT / Kinesis binary protocol: message encoding, decoding and framing.

Shared by the real driver (:mod:`drivers.thorlabs_mpc`) and the protocol-level simulator
(:mod:`drivers.sim.instruments.mpc320`), so the framing is written and tested once. Only the wire format lives
here; what a device *does* with a message is in the simulator, what the host expects is in the driver.

Wire format (protocols.md 2.1; all integers little-endian):

* every message starts with a 6-byte header;
* short form (no data): ``<HBBBB`` = message id, param1, param2, dest, source;
* long form: ``<HHBB`` = message id, data length, dest | 0x80, source, then ``data length`` bytes.
  Bit 7 of the dest byte tells the two forms apart.

There are no terminators and no checksum. A reader therefore keeps in sync by construction (read the header,
then exactly the data length) and, when it meets bytes that cannot be a header addressed to it, drops one byte
at a time until a plausible header appears (:class:`FrameReader`). "Plausible" means: the dest byte is the
reader's own address (with or without the long-form bit), the source byte is the expected peer, and a long
form's data length is at most ``max_data_len``.

Payload layouts used by the paddle controllers are packed and unpacked by the small helpers at the end
(:class:`HwInfo`, :class:`StatusUpdate`, :class:`PolParams`, :func:`pack_chan_pos`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "COUNTS_PER_DEGREE",
    "DEVICE",
    "FrameReader",
    "HOST",
    "HwInfo",
    "MAX_COUNTS",
    "MAX_DEGREES",
    "Message",
    "MsgId",
    "PolParams",
    "StatusBits",
    "StatusUpdate",
    "chan_ident",
    "counts_to_degrees",
    "degrees_to_counts",
    "ident_paddle",
    "msg_name",
    "pack_chan_pos",
    "unpack_chan_pos",
]

HOST = 0x01  # the PC
DEVICE = 0x50  # a standalone USB controller ("generic USB hardware unit")
LONG_FLAG = 0x80  # set in the dest byte of a long-form header
HEADER_LEN = 6

# MPC320 / MPC220 paddle travel: 1370 encoder counts = 170 degrees (protocols.md 2.1)
MAX_COUNTS = 1370
MAX_DEGREES = 170.0
COUNTS_PER_DEGREE = MAX_COUNTS / MAX_DEGREES


class MsgId(enum.IntEnum):
    """APT message identifiers a paddle controller uses (protocols.md 2.1)."""

    HW_START_UPDATEMSGS = 0x0011
    HW_STOP_UPDATEMSGS = 0x0012
    HW_REQ_INFO = 0x0005
    HW_GET_INFO = 0x0006
    MOD_SET_CHANENABLESTATE = 0x0210
    MOD_REQ_CHANENABLESTATE = 0x0211
    MOD_GET_CHANENABLESTATE = 0x0212
    MOD_IDENTIFY = 0x0223
    MOT_SET_POSCOUNTER = 0x0410
    MOT_REQ_POSCOUNTER = 0x0411
    MOT_GET_POSCOUNTER = 0x0412
    MOT_MOVE_HOME = 0x0443
    MOT_MOVE_HOMED = 0x0444
    MOT_MOVE_ABSOLUTE = 0x0453
    MOT_MOVE_COMPLETED = 0x0464
    MOT_MOVE_STOP = 0x0465
    MOT_MOVE_STOPPED = 0x0466
    MOT_REQ_USTATUSUPDATE = 0x0490
    MOT_GET_USTATUSUPDATE = 0x0491
    POL_SET_PARAMS = 0x0530
    POL_REQ_PARAMS = 0x0531
    POL_GET_PARAMS = 0x0532


# MOD_SET/GET_CHANENABLESTATE param2
ENABLE = 0x01
DISABLE = 0x02
# MOT_MOVE_STOP param2
STOP_IMMEDIATE = 0x01
STOP_PROFILED = 0x02


class StatusBits(enum.IntFlag):
    """The u32 status word (protocols.md 2.1, pylablib's bit list)."""

    LIMIT_BACK = 1 << 0
    LIMIT_FORWARD = 1 << 1
    MOVING_FORWARD = 1 << 4
    MOVING_REVERSE = 1 << 5
    HOMING = 1 << 9
    HOMED = 1 << 10
    MOTION_ERROR = 1 << 14
    INTERLOCK = 1 << 16
    OVER_TEMPERATURE = 1 << 17
    CURRENT_LIMIT = 1 << 24
    ACTIVE = 1 << 29
    ERROR = 1 << 30
    ENABLED = 1 << 31


MOVING = StatusBits.MOVING_FORWARD | StatusBits.MOVING_REVERSE


def msg_name(msg_id: int) -> str:
    """``MOT_MOVE_COMPLETED`` for a known id, ``0x1234`` otherwise."""
    try:
        return MsgId(msg_id).name
    except ValueError:
        return f"0x{msg_id:04X}"


def chan_ident(paddle: int) -> int:
    """Channel ident of a 0-based paddle index: 0, 1, 2, 3 -> 0x01, 0x02, 0x04, 0x08 (a bitmask)."""
    if not 0 <= paddle < 8:
        raise ValueError(f"paddle index {paddle} out of range")
    return 1 << paddle


def ident_paddle(ident: int) -> int | None:
    """0-based paddle index of a single-bit channel ident, None if ``ident`` is not exactly one bit."""
    if ident <= 0 or ident & (ident - 1):
        return None
    return ident.bit_length() - 1


def degrees_to_counts(degrees: float) -> int:
    """Nearest encoder count for an angle (45 deg -> 363)."""
    return int(round(degrees * COUNTS_PER_DEGREE))


def counts_to_degrees(counts: int) -> float:
    return counts / COUNTS_PER_DEGREE


# --------------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Message:
    """One APT message. ``data is None`` means the short form (param1/param2 carry the arguments);
    ``data`` (bytes, possibly empty) means the long form (param1/param2 are not on the wire and are 0)."""

    msg_id: int
    param1: int = 0
    param2: int = 0
    data: bytes | None = None
    dest: int = DEVICE
    source: int = HOST

    def __post_init__(self) -> None:
        if not 0 <= self.msg_id <= 0xFFFF:
            raise ValueError(f"message id {self.msg_id!r} out of range")
        if not (0 <= self.param1 <= 0xFF and 0 <= self.param2 <= 0xFF):
            raise ValueError("param1/param2 must be bytes")
        if not (0 <= self.dest <= 0x7F and 0 <= self.source <= 0xFF):
            raise ValueError("dest must be 0..0x7F (bit 7 is the long-form flag), source 0..0xFF")
        if self.data is not None and len(self.data) > 0xFFFF:
            raise ValueError("data too long")

    @property
    def is_long(self) -> bool:
        return self.data is not None

    @property
    def name(self) -> str:
        return msg_name(self.msg_id)

    def encode(self) -> bytes:
        if self.data is None:
            return struct.pack("<HBBBB", self.msg_id, self.param1, self.param2, self.dest, self.source)
        return struct.pack("<HHBB", self.msg_id, len(self.data), self.dest | LONG_FLAG, self.source) + self.data

    def __bytes__(self) -> bytes:
        return self.encode()

    def __str__(self) -> str:
        if self.data is None:
            return f"{self.name}(p1=0x{self.param1:02X}, p2=0x{self.param2:02X})"
        return f"{self.name}(data={self.data.hex(' ')})"

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def short(cls, msg_id: int, param1: int = 0, param2: int = 0, *, dest: int = DEVICE,
              source: int = HOST) -> Message:
        return cls(int(msg_id), param1, param2, None, dest, source)

    @classmethod
    def long(cls, msg_id: int, data: bytes, *, dest: int = DEVICE, source: int = HOST) -> Message:
        return cls(int(msg_id), 0, 0, bytes(data), dest, source)

    def reply(self, msg_id: int, param1: int = 0, param2: int = 0, data: bytes | None = None) -> Message:
        """A message back to the sender of this one (source and dest swapped)."""
        return Message(int(msg_id), param1, param2, data, self.source & 0x7F, self.dest)


def decode(frame: bytes) -> Message:
    """Decode exactly one complete message (header plus data). ValueError if ``frame`` is not one."""
    if len(frame) < HEADER_LEN:
        raise ValueError(f"APT frame too short: {len(frame)} bytes")
    msg_id, p1, p2, dest, source = struct.unpack_from("<HBBBB", frame)
    if dest & LONG_FLAG:
        (length,) = struct.unpack_from("<H", frame, 2)
        if len(frame) != HEADER_LEN + length:
            raise ValueError(f"APT long frame {msg_name(msg_id)}: header says {length} data bytes, "
                             f"got {len(frame) - HEADER_LEN}")
        return Message(msg_id, 0, 0, bytes(frame[HEADER_LEN:]), dest & 0x7F, source)
    if len(frame) != HEADER_LEN:
        raise ValueError(f"APT short frame {msg_name(msg_id)} has {len(frame) - HEADER_LEN} trailing bytes")
    return Message(msg_id, p1, p2, None, dest, source)


class FrameReader:
    """Incremental APT deframer: feed it whatever a read returned, get complete messages back.

    Handles messages split across reads and several messages in one read. Bytes that cannot start a message
    addressed to ``own_address`` from ``peer_address`` are dropped one at a time (counted in
    :attr:`garbage_bytes`) until the stream resynchronizes on a plausible header. ``peer_address=None``
    accepts any source. A long header's length above ``max_data_len`` is not plausible either (the longest
    paddle-controller message, HW_GET_INFO, has 84 data bytes).
    """

    def __init__(self, own_address: int = HOST, peer_address: int | None = DEVICE, max_data_len: int = 255) -> None:
        self.own_address = own_address
        self.peer_address = peer_address
        self.max_data_len = max_data_len
        self._buf = bytearray()
        self.garbage_bytes = 0  # total bytes dropped while resynchronizing
        self.messages = 0  # total messages decoded

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete message."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def _plausible(self, header: bytes | bytearray) -> int | None:
        """Total frame length if ``header`` (6 bytes) can start a message for us, else None."""
        dest, source = header[4], header[5]
        if self.peer_address is not None and source != self.peer_address:
            return None
        if dest == self.own_address:
            return HEADER_LEN
        if dest == self.own_address | LONG_FLAG:
            length = header[2] | (header[3] << 8)
            if length <= self.max_data_len:
                return HEADER_LEN + length
        return None

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while len(buf) >= HEADER_LEN:
            total = self._plausible(buf[:HEADER_LEN])
            if total is None:
                del buf[0]
                self.garbage_bytes += 1
                continue
            if len(buf) < total:
                break  # wait for the rest of the data
            out.append(decode(bytes(buf[:total])))
            del buf[:total]
            self.messages += 1
        return out


# --------------------------------------------------------------------------------------------------------
# Payloads


def pack_chan_pos(ident: int, counts: int) -> bytes:
    """``<Hi`` = channel ident, position in encoder counts (MOVE_ABSOLUTE, GET/SET_POSCOUNTER)."""
    return struct.pack("<Hi", ident, counts)


def unpack_chan_pos(data: bytes) -> tuple[int, int]:
    if len(data) < 6:
        raise ValueError(f"expected 6 data bytes (<Hi chan, counts), got {len(data)}")
    ident, counts = struct.unpack_from("<Hi", data)
    return ident, counts


@dataclass(frozen=True)
class HwInfo:
    """HW_GET_INFO payload (84 bytes).

    Layout: serial u32 [0:4], model char[8] [4:12], hardware type u16 [12:14], firmware version [14:18]
    (minor, interim, major, unused), notes char[48] [18:66], empty [66:78], hardware version u16 [78:80],
    modification state u16 [80:82], number of channels u16 [82:84].
    """

    serial: int
    model: str
    hw_type: int = 0
    firmware: tuple[int, int, int] = (1, 0, 0)  # major, interim, minor
    notes: str = ""
    hw_version: int = 1
    mod_state: int = 0
    channels: int = 1

    SIZE = 84

    def pack(self) -> bytes:
        major, interim, minor = self.firmware
        return (
            struct.pack("<I8sH4B48s12x", self.serial, self.model.encode("ascii")[:8], self.hw_type,
                        minor, interim, major, 0, self.notes.encode("ascii")[:48])
            + struct.pack("<HHH", self.hw_version, self.mod_state, self.channels)
        )

    @classmethod
    def unpack(cls, data: bytes) -> HwInfo:
        if len(data) != cls.SIZE:
            raise ValueError(f"HW_GET_INFO must carry {cls.SIZE} data bytes, got {len(data)}")
        serial, model, hw_type, minor, interim, major, _, notes = struct.unpack_from("<I8sH4B48s", data)
        hw_version, mod_state, channels = struct.unpack_from("<HHH", data, 78)
        return cls(serial, _cstr(model), hw_type, (major, interim, minor), _cstr(notes), hw_version, mod_state,
                   channels)

    @property
    def firmware_str(self) -> str:
        return ".".join(str(v) for v in self.firmware)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace").strip()


@dataclass(frozen=True)
class StatusUpdate:
    """Status structure of GET_USTATUSUPDATE, MOVE_COMPLETED and MOVE_STOPPED (14 data bytes).

    Layout used here: ``<HiHHI`` = channel ident, position (counts), velocity (%, nonzero while moving),
    motor current (mA), status bits (u32, :class:`StatusBits`). The parts protocols.md vouches for are the
    channel ident first, the position in [2:6] and the status word as the *last four bytes*; :meth:`unpack`
    reads only those, so a longer or shorter middle section still parses.
    """

    ident: int
    position: int
    status: int
    velocity: int = 0
    current_ma: int = 0

    SIZE = 14

    def pack(self) -> bytes:
        return struct.pack("<HiHHI", self.ident, self.position, self.velocity, self.current_ma, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> StatusUpdate:
        if len(data) < 10:
            raise ValueError(f"status structure needs at least 10 data bytes, got {len(data)}")
        ident, position = struct.unpack_from("<Hi", data)
        (status,) = struct.unpack_from("<I", data, len(data) - 4)
        velocity = current = 0
        if len(data) == cls.SIZE:
            velocity, current = struct.unpack_from("<HH", data, 6)
        return cls(ident, position, status, velocity, current)


@dataclass(frozen=True)
class PolParams:
    """POL_SET/GET_PARAMS payload (12 bytes): ``<6H`` = 0 pad, velocity (%), home position, jog steps 1..3.

    Home position and jog steps are in encoder counts.
    """

    velocity: int
    home_position: int = 0
    jog1: int = 0
    jog2: int = 0
    jog3: int = 0

    SIZE = 12

    def pack(self) -> bytes:
        return struct.pack("<6H", 0, self.velocity, self.home_position, self.jog1, self.jog2, self.jog3)

    @classmethod
    def unpack(cls, data: bytes) -> PolParams:
        if len(data) != cls.SIZE:
            raise ValueError(f"POL params must carry {cls.SIZE} data bytes, got {len(data)}")
        _, velocity, home, j1, j2, j3 = struct.unpack("<6H", data)
        return cls(velocity, home, j1, j2, j3)
