"""PicoQuant PTU (TTTR) files: header tags and T2/T3 records, decoded with numpy/numba.

Written from the published format facts (docs/ptu.md), not from vendor or third-party code.

File layout
-----------
``PQTTTR\\0\\0`` magic, an 8-byte version string, then 48-byte tags ``<32s i I 8s>`` (identifier, index -- -1 for a
plain tag, >= 0 for an element of an array -- type code, value) up to the tag ``Header_End``. Strings, float
arrays and blobs store their byte length as the value and follow the tag. Records (32-bit little-endian
words) start right after ``Header_End``; ``TTResult_NumberOfRecords`` says how many (0 or absent: as many as
the file holds, which is how a recording still being written looks).

Records
-------
============================  ==========================================================================
PicoHarp T2 (0x00010203)      time 28 bit, channel 4 bit; ch 15: overflow (low 4 bits 0, +210698240) or
                              marker (low 4 bits = marker bits, time = the upper 24 bits of the field)
PicoHarp T3 (0x00010303)      nsync 16, dtime 12, channel 4 (1..4 = inputs 0..3); ch 15: overflow (dtime 0,
                              nsync += 65536) or marker (dtime = marker bits)
HydraHarp v1 T2 (0x00010204)  time 25, channel 6, special 1; special+ch 63: overflow (+33552000 each);
                              special+ch 0: SYNC; special+ch 1..15: markers; else a photon on input ch
HydraHarp v2, TimeHarp 260    as v1 but an overflow record adds 33554432 x max(time field, 1)
N/P, Generic/MultiHarp T2
HydraHarp-type T3             nsync 10, dtime 15, channel 6, special 1; overflow adds 1024 (v1) or
                              1024 x max(nsync field, 1); special+ch 1..15: markers
============================  ==========================================================================

Decoding is chunked (:class:`RecordDecoder` carries the overflow sum from chunk to chunk) and gives, per
record: ``kind`` (PHOTON, OVERFLOW, MARKER, SYNC), ``time`` (T2: units of the global resolution; T3: sync
periods, overflows included), ``dtime`` (T3), ``channel`` (photons: 0-based input; markers: the marker bits).
:func:`t2_to_ps` / :func:`t3_to_ps` convert to int64 picoseconds exactly (floor): resolutions are taken in
whole femtoseconds. A corrupt or truncated file raises :class:`PtuError` naming the byte offset.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from numba import njit

__all__ = [
    "KIND_MARKER",
    "KIND_OVERFLOW",
    "KIND_PHOTON",
    "KIND_SYNC",
    "Decoded",
    "header_summary",
    "PtuError",
    "PtuHeader",
    "PtuReader",
    "RecordDecoder",
    "RecordType",
    "TagType",
    "parse_header",
    "read_ptu",
    "t2_to_ps",
    "t3_to_ps",
]

MAGIC = b"PQTTTR\x00\x00"
TAG_SIZE = 48
MAX_HEADER_BYTES = 64 * 1024 * 1024

KIND_PHOTON = 0
KIND_OVERFLOW = 1
KIND_MARKER = 2
KIND_SYNC = 3

# record families of the kernels
FAM_PICOHARP = 0
FAM_HYDRA_V1 = 1
FAM_HYDRA = 2  # HydraHarp v2, TimeHarp 260 N/P, Generic (MultiHarp, PicoHarp 330)

PICOHARP_T2_WRAP = 210698240
PICOHARP_T3_WRAP = 65536
HYDRA_T2_WRAP = 33554432
HYDRA_V1_T2_WRAP = 33552000
HYDRA_T3_WRAP = 1024


class PtuError(ValueError):
    """A corrupt, truncated or unsupported PTU file; ``offset`` is the byte offset where the problem is."""

    def __init__(self, message: str, offset: int, path: str | None = None) -> None:
        self.offset = int(offset)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}byte offset {self.offset}: {message}")


class TagType(enum.IntEnum):
    EMPTY8 = 0xFFFF0008
    BOOL8 = 0x00000008
    INT8 = 0x10000008
    BITSET64 = 0x11000008
    COLOR8 = 0x12000008
    FLOAT8 = 0x20000008
    DATETIME = 0x21000008
    FLOAT8_ARRAY = 0x2001FFFF
    ANSI_STRING = 0x4001FFFF
    WIDE_STRING = 0x4002FFFF
    BINARY_BLOB = 0xFFFFFFFF


class RecordType(enum.IntEnum):
    PICOHARP_T2 = 0x00010203
    PICOHARP_T3 = 0x00010303
    HYDRAHARP_T2 = 0x00010204
    HYDRAHARP_T3 = 0x00010304
    HYDRAHARP2_T2 = 0x01010204
    HYDRAHARP2_T3 = 0x01010304
    TIMEHARP260N_T2 = 0x00010205
    TIMEHARP260N_T3 = 0x00010305
    TIMEHARP260P_T2 = 0x00010206
    TIMEHARP260P_T3 = 0x00010306
    GENERIC_T2 = 0x00010207
    GENERIC_T3 = 0x00010307

    @property
    def is_t3(self) -> bool:
        return (self.value >> 8) & 0xFF == 0x03

    @property
    def family(self) -> int:
        if self in (RecordType.PICOHARP_T2, RecordType.PICOHARP_T3):
            return FAM_PICOHARP
        if self in (RecordType.HYDRAHARP_T2, RecordType.HYDRAHARP_T3):
            return FAM_HYDRA_V1
        return FAM_HYDRA


_VARLEN = {TagType.FLOAT8_ARRAY, TagType.ANSI_STRING, TagType.WIDE_STRING, TagType.BINARY_BLOB}


@dataclass
class PtuHeader:
    """Parsed header. ``tags``: name -> value, or name -> {index: value} for array tags."""

    version: str
    tags: dict[str, Any]
    tag_offsets: dict[tuple[str, int], int]  # (name, index) -> byte offset of the tag's 8-byte value
    data_offset: int
    record_type: RecordType
    number_of_records: int  # from the file size if the header says 0 or nothing
    file_size: int
    path: str | None = None
    declared_records: int | None = None

    @property
    def is_t3(self) -> bool:
        return self.record_type.is_t3

    @property
    def global_resolution_s(self) -> float:
        """T2: the time unit of records; T3: the sync period."""
        return float(self.tags["MeasDesc_GlobalResolution"])

    @property
    def resolution_s(self) -> float:
        """T3: the dtime unit; T2: the global resolution."""
        return float(self.tags.get("MeasDesc_Resolution", self.global_resolution_s))

    @property
    def global_resolution_fs(self) -> int:
        return int(round(self.global_resolution_s * 1e15))

    @property
    def resolution_fs(self) -> int:
        return int(round(self.resolution_s * 1e15))

    @property
    def resolution_ps(self) -> int:
        """Timestamp resolution, rounded to whole ps (at least 1)."""
        fs = self.resolution_fs if self.is_t3 else self.global_resolution_fs
        return max(1, int(round(fs / 1000)))

    def get(self, name: str, default: Any = None) -> Any:
        return self.tags.get(name, default)


def _read_exact(buf: memoryview, offset: int, n: int, what: str, path: str | None) -> bytes:
    if offset + n > len(buf):
        raise PtuError(f"file truncated in {what} (needs {n} bytes, {len(buf) - offset} left)", offset, path)
    return bytes(buf[offset:offset + n])


def parse_header(data: bytes | memoryview, path: str | None = None, file_size: int | None = None) -> PtuHeader:
    """Parse a PTU header from the start of a file's bytes (the whole file or at least its header)."""
    buf = memoryview(data)
    size = len(buf) if file_size is None else file_size
    magic = _read_exact(buf, 0, 8, "the magic", path)
    if magic != MAGIC:
        raise PtuError(f"not a PTU file: magic {magic!r}, expected {MAGIC!r}", 0, path)
    version = _read_exact(buf, 8, 8, "the version", path).split(b"\x00", 1)[0].decode("ascii", "replace")
    tags: dict[str, Any] = {}
    offsets: dict[tuple[str, int], int] = {}
    off = 16
    while True:
        if off > MAX_HEADER_BYTES:
            raise PtuError(f"no Header_End within {MAX_HEADER_BYTES} bytes", off, path)
        raw = _read_exact(buf, off, TAG_SIZE, "a header tag (no Header_End)", path)
        ident_b, idx, typ, value = struct.unpack("<32siI8s", raw)
        ident_b = ident_b.split(b"\x00", 1)[0]
        try:
            ident = ident_b.decode("ascii")
        except UnicodeDecodeError:
            raise PtuError(f"corrupt header tag: identifier {ident_b!r} is not ASCII", off, path) from None
        if not ident or not ident.isprintable():
            raise PtuError(f"corrupt header tag: identifier {ident!r}", off, path)
        try:
            ttype = TagType(typ)
        except ValueError:
            raise PtuError(f"corrupt header tag {ident!r}: unknown type code 0x{typ:08X}", off, path) from None
        value_off = off + 40
        off += TAG_SIZE
        if ttype in _VARLEN:
            (length,) = struct.unpack("<q", value)
            if length < 0 or off + length > size:
                raise PtuError(f"header tag {ident!r}: {length} bytes of data do not fit in the file", value_off, path)
            blob = _read_exact(buf, off, length, f"the data of tag {ident!r}", path)
            off += length
            if ttype == TagType.ANSI_STRING:
                v: Any = blob.split(b"\x00", 1)[0].decode("latin-1")
            elif ttype == TagType.WIDE_STRING:
                v = blob.decode("utf-16-le", "replace").split("\x00", 1)[0]
            elif ttype == TagType.FLOAT8_ARRAY:
                if length % 8:
                    raise PtuError(f"header tag {ident!r}: float array of {length} bytes", value_off, path)
                v = np.frombuffer(blob, "<f8").copy()
            else:
                v = blob
        elif ttype == TagType.EMPTY8:
            v = None
        elif ttype in (TagType.FLOAT8, TagType.DATETIME):
            (v,) = struct.unpack("<d", value)
        elif ttype == TagType.BOOL8:
            v = struct.unpack("<q", value)[0] != 0
        else:
            (v,) = struct.unpack("<q", value)
        offsets[(ident, idx)] = value_off
        if idx < 0:
            tags[ident] = v
        else:
            slot = tags.setdefault(ident, {})
            if not isinstance(slot, dict):
                slot = tags[ident] = {-1: slot}
            slot[idx] = v
        if ident == "Header_End":
            break
    data_offset = off

    def scalar(name: str, kind: type | tuple[type, ...]) -> Any:
        """A plain (non-array) tag of the given Python type, or None if absent."""
        if name not in tags:
            return None
        v = tags[name]
        at = min((o for (n_, _), o in offsets.items() if n_ == name), default=data_offset)
        if isinstance(v, dict) or not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise PtuError(f"header tag {name} has an unexpected type or index ({type(v).__name__})", at, path)
        return v

    rt_raw = scalar("TTResultFormat_TTTRRecType", int)
    if rt_raw is None:
        raise PtuError("header has no TTResultFormat_TTTRRecType", data_offset, path)
    try:
        rtype = RecordType(int(rt_raw))
    except ValueError:
        at = offsets.get(("TTResultFormat_TTTRRecType", -1), data_offset)
        raise PtuError(f"unsupported record type 0x{int(rt_raw):08X}", at, path) from None
    bits = scalar("TTResultFormat_BitsPerRecord", int)
    bits = 32 if bits is None else bits
    if int(bits) != 32:
        raise PtuError(f"unsupported {bits} bits per record (expected 32)",
                       offsets.get(("TTResultFormat_BitsPerRecord", -1), data_offset), path)
    needed = ("MeasDesc_GlobalResolution",) + (("MeasDesc_Resolution",) if rtype.is_t3 or
                                               "MeasDesc_Resolution" in tags else ())
    for name in needed:
        val = scalar(name, float)
        at = offsets.get((name, -1), data_offset)
        if not isinstance(val, float):
            raise PtuError(f"header tag {name} is missing or not a number ({val!r})", at, path)
        if not 1e-15 <= val <= 10.0:  # also rejects NaN and inf
            raise PtuError(f"header tag {name} = {val!r} s is not a plausible resolution (1 fs .. 10 s)", at, path)
    available = (size - data_offset) // 4
    declared = scalar("TTResult_NumberOfRecords", int)
    if declared is not None and declared < 0:
        raise PtuError(f"TTResult_NumberOfRecords is negative ({declared})",
                       offsets.get(("TTResult_NumberOfRecords", -1), data_offset), path)
    if declared:
        if declared > available:
            end = data_offset + 4 * available
            raise PtuError(f"file truncated: the header announces {declared} records ({4 * declared} bytes from "
                           f"byte {data_offset}) but the file ends after {available} complete records",
                           end, path)
        n = declared
    else:
        n = available
        if (size - data_offset) % 4:
            end = data_offset + 4 * available
            raise PtuError(f"file truncated inside a record ({(size - data_offset) % 4} trailing bytes)", end, path)
    return PtuHeader(version, tags, offsets, data_offset, rtype, n, size, path, declared)


# ------------------------------------------------------------------------------------------------------------
# record kernels

ERR_NONE = 0
ERR_CHANNEL = 1
ERR_SPECIAL = 2
_ERR_TEXT = {ERR_CHANNEL: "illegal photon channel", ERR_SPECIAL: "illegal special record"}


@njit(cache=True, nogil=True)
def _decode(rec, family, t3, ovfl, max_channel, kind, time, dtime, chan):  # pragma: no cover - jit
    """Decode 32-bit records. Returns (overflow sum after the chunk, index of the first bad record or -1, code)."""
    n = rec.shape[0]
    for i in range(n):
        r = np.int64(rec[i])
        if family == 0:  # PicoHarp
            ch = (r >> 28) & 0xF
            if not t3:
                t = r & 0x0FFFFFFF
                if ch == 0xF:
                    m = r & 0xF
                    if m == 0:
                        ovfl += 210698240
                        kind[i] = 1
                        time[i] = ovfl
                        chan[i] = 0
                    else:
                        kind[i] = 2
                        time[i] = ovfl + (t & 0x0FFFFFF0)
                        chan[i] = m
                    dtime[i] = 0
                    continue
                if ch > 4:
                    return ovfl, i, 1
                kind[i] = 0
                time[i] = ovfl + t
                chan[i] = ch
                dtime[i] = 0
            else:
                nsync = r & 0xFFFF
                dt = (r >> 16) & 0xFFF
                if ch == 0xF:
                    if dt == 0:
                        ovfl += 65536
                        kind[i] = 1
                        time[i] = ovfl
                        chan[i] = 0
                    else:
                        kind[i] = 2
                        time[i] = ovfl + nsync
                        chan[i] = dt & 0xF
                    dtime[i] = 0
                    continue
                if ch < 1 or ch > 4:
                    return ovfl, i, 1
                kind[i] = 0
                time[i] = ovfl + nsync
                dtime[i] = dt
                chan[i] = ch - 1
        else:  # HydraHarp-type
            special = (r >> 31) & 1
            ch = (r >> 25) & 0x3F
            if not t3:
                t = r & 0x1FFFFFF
                dt = 0
            else:
                t = r & 0x3FF
                dt = (r >> 10) & 0x7FFF
            if special:
                if ch == 0x3F:
                    if t3:
                        ovfl += 1024 if family == 1 else 1024 * (t if t > 0 else 1)
                    else:
                        ovfl += 33552000 if family == 1 else 33554432 * (t if t > 0 else 1)
                    kind[i] = 1
                    time[i] = ovfl
                    chan[i] = 0
                    dtime[i] = 0
                    continue
                if ch == 0:
                    if t3:
                        return ovfl, i, 2
                    kind[i] = 3
                    time[i] = ovfl + t
                    chan[i] = 0
                    dtime[i] = 0
                    continue
                if ch <= 15:
                    kind[i] = 2
                    time[i] = ovfl + t
                    chan[i] = ch
                    dtime[i] = 0
                    continue
                return ovfl, i, 2
            if max_channel >= 0 and ch > max_channel:
                return ovfl, i, 1
            kind[i] = 0
            time[i] = ovfl + t
            dtime[i] = dt
            chan[i] = ch
    return ovfl, -1, 0


@njit(cache=True, nogil=True)
def _decode_tags(rec, family, t3, ovfl, max_channel, unit_fs, res_fs, sync_ch, marker_ch, delays, out_t,
                 out_c):  # pragma: no cover - jit
    """Records straight to (ps + delay, channel) tags: photons, SYNC as ``sync_ch`` (if >= 0), marker bit k as
    ``marker_ch + k`` (if >= 0). ``out_*`` need 4 entries per record. Returns (overflow sum, tags written, index
    of the first bad record or -1, error code, time of the last record in record units or -1, sorted)."""
    n = rec.shape[0]
    k = 0
    last = -1
    prev = np.int64(-(2 ** 62))
    ok = True
    whole = unit_fs % 1000 == 0
    unit_ps = unit_fs // 1000
    for i in range(n):
        r = np.int64(rec[i])
        kind = 0
        t = np.int64(0)
        dt = np.int64(0)
        ch = np.int64(0)
        if family == 0:
            ch = (r >> 28) & 0xF
            if not t3:
                t = r & 0x0FFFFFFF
                if ch == 0xF:
                    m = r & 0xF
                    if m == 0:
                        ovfl += 210698240
                        kind = 1
                    else:
                        kind = 2
                        t = t & 0x0FFFFFF0
                        ch = m
                elif ch > 4:
                    return ovfl, k, i, 1, last, ok
            else:
                t = r & 0xFFFF
                dt = (r >> 16) & 0xFFF
                if ch == 0xF:
                    if dt == 0:
                        ovfl += 65536
                        kind = 1
                    else:
                        kind = 2
                        ch = dt & 0xF
                        dt = 0
                elif ch < 1 or ch > 4:
                    return ovfl, k, i, 1, last, ok
                else:
                    ch -= 1
        else:
            special = (r >> 31) & 1
            ch = (r >> 25) & 0x3F
            if not t3:
                t = r & 0x1FFFFFF
            else:
                t = r & 0x3FF
                dt = (r >> 10) & 0x7FFF
            if special:
                if ch == 0x3F:
                    if t3:
                        ovfl += 1024 if family == 1 else 1024 * (t if t > 0 else 1)
                    else:
                        ovfl += 33552000 if family == 1 else 33554432 * (t if t > 0 else 1)
                    kind = 1
                elif ch == 0:
                    if t3:
                        return ovfl, k, i, 2, last, ok
                    kind = 3
                elif ch <= 15:
                    kind = 2
                    dt = 0
                else:
                    return ovfl, k, i, 2, last, ok
            elif max_channel >= 0 and ch > max_channel:
                return ovfl, k, i, 1, last, ok
        if kind == 1:
            continue
        units = ovfl + t
        last = units
        if t3:
            q = units // 1000
            rr = units - q * 1000
            ps = q * unit_fs + (rr * unit_fs + dt * res_fs) // 1000
        elif whole:
            ps = units * unit_ps
        else:
            q = units // 1000
            rr = units - q * 1000
            ps = q * unit_fs + (rr * unit_fs) // 1000
        if kind == 0:
            v = ps + delays[ch]
            out_t[k] = v
            out_c[k] = ch
            ok = ok & (v >= prev)
            prev = v
            k += 1
        elif kind == 3:
            if sync_ch >= 0:
                v = ps + delays[sync_ch]
                out_t[k] = v
                out_c[k] = sync_ch
                ok = ok & (v >= prev)
                prev = v
                k += 1
        elif marker_ch >= 0:
            for bit in range(4):
                if (ch >> bit) & 1:
                    c2 = marker_ch + bit
                    v = ps + delays[c2]
                    out_t[k] = v
                    out_c[k] = c2
                    ok = ok & (v >= prev)
                    prev = v
                    k += 1
    return ovfl, k, -1, 0, last, ok


@njit(cache=True, nogil=True)
def _t3_ps(nsync, dtime, period_fs, res_fs, out):  # pragma: no cover - jit
    """floor((nsync*period_fs + dtime*res_fs) / 1000) exactly in int64 (nsync split by 1000)."""
    for i in range(nsync.shape[0]):
        q = nsync[i] // 1000
        r = nsync[i] - q * 1000
        out[i] = q * period_fs + (r * period_fs + np.int64(dtime[i]) * res_fs) // 1000


def t2_to_ps(time: np.ndarray, global_resolution_fs: int) -> np.ndarray:
    """T2 record times (units of the global resolution) to int64 ps (floor when the unit is not whole ps)."""
    t = np.asarray(time, np.int64)
    if global_resolution_fs % 1000 == 0:
        return t * np.int64(global_resolution_fs // 1000)
    q, r = np.divmod(t, 1000)
    return q * np.int64(global_resolution_fs) + (r * np.int64(global_resolution_fs)) // 1000


def t3_to_ps(nsync: np.ndarray, dtime: np.ndarray, period_fs: int, resolution_fs: int) -> np.ndarray:
    """T3 (sync count, dtime) to int64 ps: ``floor((nsync*period + dtime*resolution) / 1 ps)`` exactly."""
    nsync = np.ascontiguousarray(nsync, np.int64)
    out = np.empty(nsync.shape[0], np.int64)
    _t3_ps(nsync, np.ascontiguousarray(dtime, np.int32), np.int64(period_fs), np.int64(resolution_fs), out)
    return out


@dataclass
class Decoded:
    """Decoded records (one entry per record, in file order)."""

    kind: np.ndarray  # uint8: KIND_PHOTON / KIND_OVERFLOW / KIND_MARKER / KIND_SYNC
    time: np.ndarray  # int64: T2 units of the global resolution; T3 sync periods (overflows included)
    dtime: np.ndarray  # int32: T3 micro time (0 in T2)
    channel: np.ndarray  # int16: photons: 0-based input; markers: marker bits; else 0

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @classmethod
    def concat(cls, parts: list[Decoded]) -> Decoded:
        if not parts:
            return cls(np.empty(0, np.uint8), np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int16))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("kind", "time", "dtime", "channel")))


class RecordDecoder:
    """Chunked decoder carrying the overflow sum (and record index, for error offsets) across chunks."""

    def __init__(self, header: PtuHeader, max_channel: int | None = None) -> None:
        self.header = header
        self.family = header.record_type.family
        self.t3 = header.is_t3
        self.max_channel = -1 if max_channel is None else int(max_channel)
        self.reset()

    def reset(self) -> None:
        self.overflow = 0
        self.index = 0  # records decoded so far

    def decode(self, records: np.ndarray) -> Decoded:
        rec = np.ascontiguousarray(records, np.uint32)
        n = rec.shape[0]
        kind = np.empty(n, np.uint8)
        time = np.empty(n, np.int64)
        dtime = np.empty(n, np.int32)
        chan = np.empty(n, np.int16)
        ovfl, bad, code = _decode(rec, self.family, self.t3, np.int64(self.overflow), self.max_channel, kind, time,
                                  dtime, chan)
        if bad >= 0:
            h = self.header
            off = h.data_offset + 4 * (self.index + int(bad))
            raise PtuError(f"corrupt record {self.index + int(bad)} (0x{int(rec[bad]):08X}): {_ERR_TEXT[code]} for "
                           f"{h.record_type.name}", off, h.path)
        self.overflow = int(ovfl)
        self.index += n
        return Decoded(kind, time, dtime, chan)

    def decode_tags(self, records: np.ndarray, sync_channel: int = -1, marker_channel: int = -1,
                    delays: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Records to tags in one pass: ``(times ps + delay, channels uint8, last record time in units or -1,
        sorted)``. SYNC events become ``sync_channel`` and marker bit k ``marker_channel + k`` (-1: dropped)."""
        rec = np.ascontiguousarray(records, np.uint32)
        n = rec.shape[0]
        out_t = np.empty(4 * n, np.int64)
        out_c = np.empty(4 * n, np.uint8)
        d = np.zeros(256, np.int64) if delays is None else delays
        h = self.header
        unit = h.global_resolution_fs
        ovfl, k, bad, code, last, ok = _decode_tags(rec, self.family, self.t3, np.int64(self.overflow),
                                                    self.max_channel, np.int64(unit), np.int64(h.resolution_fs),
                                                    int(sync_channel), int(marker_channel), d, out_t, out_c)
        if bad >= 0:
            off = h.data_offset + 4 * (self.index + int(bad))
            raise PtuError(f"corrupt record {self.index + int(bad)} (0x{int(rec[bad]):08X}): {_ERR_TEXT[code]} for "
                           f"{h.record_type.name}", off, h.path)
        self.overflow = int(ovfl)
        self.index += n
        return out_t[:k], out_c[:k], int(last), bool(ok)

    def to_ps(self, d: Decoded) -> np.ndarray:
        """Times of decoded records in int64 ps."""
        h = self.header
        if self.t3:
            return t3_to_ps(d.time, d.dtime, h.global_resolution_fs, h.resolution_fs)
        return t2_to_ps(d.time, h.global_resolution_fs)


def _max_channel(header: PtuHeader) -> int | None:
    """Highest photon channel the hardware has, when the header says (HW_InpChannels counts the sync input)."""
    n = header.get("HW_InpChannels")
    if isinstance(n, int) and n > 0 and header.record_type.family != FAM_PICOHARP:
        return n - 1
    return None


class PtuReader:
    """A PTU file opened for reading: header parsed and checked, records memory-mapped (read-only).

    ``check_channels``: treat a photon channel beyond ``HW_InpChannels`` as corruption (when the header has it).
    """

    def __init__(self, path: str | os.PathLike[str], check_channels: bool = True) -> None:
        self.path = str(path)
        self._fh: BinaryIO = open(self.path, "rb")
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self.header = parse_header(self._mm if self._mm is not None else b"", self.path, size)
        except BaseException:
            self.close()
            raise
        self._check = check_channels
        h = self.header
        self._records = np.frombuffer(self._mm, np.uint32, count=h.number_of_records, offset=h.data_offset) \
            if h.number_of_records else np.empty(0, np.uint32)

    def __enter__(self) -> PtuReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._records = np.empty(0, np.uint32)
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view of the records; the OS unmaps with the process
                pass
            self._mm = None
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None

    @property
    def number_of_records(self) -> int:
        return self.header.number_of_records

    def records(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A read-only view of raw records ``[start, stop)``."""
        return self._records[start:stop]

    def decoder(self) -> RecordDecoder:
        return RecordDecoder(self.header, _max_channel(self.header) if self._check else None)


def read_ptu(path: str | os.PathLike[str], chunk: int = 1 << 22) -> tuple[PtuHeader, Decoded, np.ndarray]:
    """Whole file: ``(header, decoded records, times in ps)``."""
    with PtuReader(path) as r:
        dec = r.decoder()
        parts = [dec.decode(r.records(i, i + chunk)) for i in range(0, r.number_of_records, chunk)]
        d = Decoded.concat(parts)
        return r.header, d, dec.to_ps(d)


def header_summary(h: PtuHeader) -> dict[str, Any]:
    """A JSON-able description of a file (for status and docs)."""
    return {
        "record_type": h.record_type.name,
        "t3": h.is_t3,
        "records": h.number_of_records,
        "global_resolution_s": h.global_resolution_s,
        "resolution_s": h.resolution_s,
        "resolution_ps": h.resolution_ps,
        "creator": h.get("CreatorSW_Name"),
        "hardware": h.get("HW_Type"),
        "serial": h.get("HW_SerialNo"),
    }

