"""Write PicoQuant PTU files: header tags and T2/T3 records of every supported family.

Used by the tests (files with known content for the decoder and for ptufile) and by the recorder. The record
formats are those of :mod:`drivers.ptu.decoder`. Events are given as arrays (one entry per event, sorted by
time): ``kind`` (KIND_PHOTON, KIND_MARKER, KIND_SYNC), ``time`` (T2: units of the global resolution; T3: sync
count), ``channel`` (photon: 0-based input; marker: the marker bits 1..15), ``dtime`` (T3). Overflow records are
inserted as needed; :class:`RecordEncoder` carries the overflow state from chunk to chunk.

Lossy corners of the formats (not of this encoder): a PicoHarp T2 marker keeps only the upper 24 bits of its
28-bit time field (the low 4 bits carry the marker), so marker times are rounded down to a multiple of 16
units.
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
import uuid
from typing import Any, BinaryIO

import numpy as np
from numba import njit

from drivers.ptu.decoder import (FAM_HYDRA, FAM_HYDRA_V1, FAM_PICOHARP, KIND_MARKER, KIND_PHOTON, KIND_SYNC,
                                 MAGIC, RecordType, TagType)

__all__ = ["PtuFileWriter", "RecordEncoder", "encode_tag", "header_bytes", "standard_tags", "write_ptu"]

_EPOCH = _dt.datetime(1899, 12, 30, tzinfo=_dt.timezone.utc)


def _tdatetime(when: _dt.datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return (when - _EPOCH).total_seconds() / 86400.0


def _guess_type(value: Any) -> TagType:
    if value is None:
        return TagType.EMPTY8
    if isinstance(value, bool):
        return TagType.BOOL8
    if isinstance(value, (int, np.integer)):
        return TagType.INT8
    if isinstance(value, (float, np.floating)):
        return TagType.FLOAT8
    if isinstance(value, _dt.datetime):
        return TagType.DATETIME
    if isinstance(value, str):
        return TagType.ANSI_STRING
    if isinstance(value, (bytes, bytearray)):
        return TagType.BINARY_BLOB
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return TagType.FLOAT8_ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in a PTU tag")


def encode_tag(ident: str, value: Any, ttype: TagType | None = None, index: int = -1) -> bytes:
    """One 48-byte tag, followed by its data for strings, float arrays and blobs (padded to 8 bytes)."""
    name = ident.encode("ascii")
    if len(name) > 31:
        raise ValueError(f"tag identifier {ident!r} is longer than 31 characters")
    ttype = _guess_type(value) if ttype is None else ttype
    head = struct.pack("<32siI", name, index, int(ttype))
    if ttype == TagType.EMPTY8:
        return head + bytes(8)
    if ttype in (TagType.BOOL8, TagType.INT8, TagType.BITSET64, TagType.COLOR8):
        return head + struct.pack("<q", int(value))
    if ttype == TagType.FLOAT8:
        return head + struct.pack("<d", float(value))
    if ttype == TagType.DATETIME:
        v = _tdatetime(value) if isinstance(value, _dt.datetime) else float(value)
        return head + struct.pack("<d", v)
    if ttype == TagType.ANSI_STRING:
        data = value.encode("latin-1") + b"\x00"
    elif ttype == TagType.WIDE_STRING:
        data = value.encode("utf-16-le") + b"\x00\x00"
    elif ttype == TagType.FLOAT8_ARRAY:
        data = np.asarray(value, "<f8").tobytes()
    else:
        data = bytes(value)
    data += bytes(-len(data) % 8)
    return head + struct.pack("<q", len(data)) + data


def header_bytes(tags: list[tuple[str, Any] | tuple[str, Any, TagType] | tuple[str, Any, TagType, int]],
                 version: str = "1.0.00") -> bytes:
    """Magic, version and the given tags, then ``Header_End``."""
    out = [MAGIC, version.encode("ascii")[:8].ljust(8, b"\x00")]
    for t in tags:
        ident, value, *rest = t
        ttype = rest[0] if rest else None
        index = rest[1] if len(rest) > 1 else -1
        out.append(encode_tag(ident, value, ttype, index))
    out.append(encode_tag("Header_End", None, TagType.EMPTY8))
    return b"".join(out)


def standard_tags(record_type: RecordType, global_resolution_s: float, resolution_s: float | None = None,
                  number_of_records: int = 0, input_channels: int | None = None, comment: str = "",
                  creator: str = "qnetd", acquisition_time_ms: int = 0) -> list[tuple]:
    """The tags a PTU reader expects, in PicoQuant's usual order."""
    rt = RecordType(record_type)
    res = global_resolution_s if resolution_s is None else resolution_s
    tags: list[tuple] = [
        ("File_GUID", "{" + str(uuid.uuid4()).upper() + "}"),
        ("File_CreatingTime", _dt.datetime.now(_dt.timezone.utc), TagType.DATETIME),
        ("File_Comment", comment),
        ("CreatorSW_Name", creator),
        ("CreatorSW_Version", "1.0"),
        ("Measurement_Mode", 3 if rt.is_t3 else 2),
        ("Measurement_SubMode", 0),
        ("MeasDesc_AcquisitionTime", int(acquisition_time_ms)),
        ("MeasDesc_GlobalResolution", float(global_resolution_s)),
        ("MeasDesc_Resolution", float(res)),
        ("TTResult_SyncRate", int(round(1.0 / global_resolution_s)) if rt.is_t3 else 0),
        ("TTResult_NumberOfRecords", int(number_of_records)),
        ("TTResultFormat_TTTRRecType", int(rt)),
        ("TTResultFormat_BitsPerRecord", 32),
    ]
    if input_channels is not None:
        tags.append(("HW_InpChannels", int(input_channels)))
    return tags


# ------------------------------------------------------------------------------------------------------------
# records


@njit(cache=True, nogil=True)
def _plan(time, family, t3, base, maxcount):  # pragma: no cover - jit
    """Number of overflow records needed before each event; -1-i if event i goes back before the base."""
    n = time.shape[0]
    if t3:
        wrap = 65536 if family == 0 else 1024
    else:
        wrap = 210698240 if family == 0 else (33552000 if family == 1 else 33554432)
    total = 0
    b = base
    for i in range(n):
        t = time[i]
        if t < b:
            return -1 - i
        need = (t - b) // wrap
        if need > 0:
            total += (need + maxcount - 1) // maxcount
            b += need * wrap
    return total


@njit(cache=True, nogil=True)
def _encode(time, kind, chan, dtime, family, t3, base, maxcount, out):  # pragma: no cover - jit
    """Write records (overflows inserted). Returns (new base, records written, bad index or -1, code)."""
    if t3:
        wrap = 65536 if family == 0 else 1024
    else:
        wrap = 210698240 if family == 0 else (33552000 if family == 1 else 33554432)
    k = 0
    b = base
    for i in range(time.shape[0]):
        t = time[i]
        need = (t - b) // wrap
        while need > 0:
            cnt = need if need < maxcount else maxcount
            if family == 0:
                out[k] = np.uint32(0xF0000000)
            else:
                out[k] = np.uint32(0x80000000 | (63 << 25) | (cnt if family == 2 else 1))
            k += 1
            b += cnt * wrap
            need -= cnt
        f = t - b
        kd = kind[i]
        c = np.int64(chan[i])
        if family == 0:
            if not t3:
                if kd == 0:
                    if c < 0 or c > 4:
                        return b, k, i, 1
                    out[k] = np.uint32((c << 28) | f)
                elif kd == 2:
                    if c < 1 or c > 15:
                        return b, k, i, 2
                    out[k] = np.uint32((15 << 28) | (f & 0x0FFFFFF0) | c)
                else:
                    return b, k, i, 3
            else:
                if kd == 0:
                    d = np.int64(dtime[i])
                    if c < 0 or c > 3:
                        return b, k, i, 1
                    if d < 0 or d > 4095:
                        return b, k, i, 4
                    out[k] = np.uint32(((c + 1) << 28) | (d << 16) | f)
                elif kd == 2:
                    if c < 1 or c > 15:
                        return b, k, i, 2
                    out[k] = np.uint32((15 << 28) | (c << 16) | f)
                else:
                    return b, k, i, 3
        else:
            if kd == 0:
                if c < 0 or c > 63:
                    return b, k, i, 1
                if t3:
                    d = np.int64(dtime[i])
                    if d < 0 or d > 32767:
                        return b, k, i, 4
                    out[k] = np.uint32((c << 25) | (d << 10) | f)
                else:
                    out[k] = np.uint32((c << 25) | f)
            elif kd == 2:
                if c < 1 or c > 15:
                    return b, k, i, 2
                out[k] = np.uint32(0x80000000 | (c << 25) | f)
            elif kd == 3 and not t3:
                out[k] = np.uint32(0x80000000 | f)
            else:
                return b, k, i, 3
        k += 1
    return b, k, -1, 0


_ENC_ERR = {1: "photon channel out of range for this record type", 2: "marker bits must be 1..15",
            3: "event kind not representable in this record type", 4: "dtime out of range for this record type"}


class RecordEncoder:
    """Events to 32-bit records of one record type, overflow state carried from call to call.

    ``max_overflow_count`` caps the wrap count an overflow record of HydraHarp v2-type formats carries (the
    field allows 2**25 - 1 in T2, 1023 in T3). Some readers multiply the count in 32 bits (ptufile 2026.2.6
    decodes T2 counts >= 128 wrongly); a cap of 127 keeps files readable by them at the cost of one record per
    4.3 ms of silence.
    """

    def __init__(self, record_type: RecordType | int, max_overflow_count: int | None = None) -> None:
        self.record_type = RecordType(record_type)
        self.family = self.record_type.family
        self.t3 = self.record_type.is_t3
        full = 1 if self.family != FAM_HYDRA else (1023 if self.t3 else 33554431)
        cap = full if max_overflow_count is None else max(1, min(int(max_overflow_count), full))
        self.max_overflow_count = cap
        self.base = 0  # time (units) reached by the overflow records written so far
        self.records = 0

    def encode(self, time: np.ndarray, kind: np.ndarray | None = None, channel: np.ndarray | None = None,
               dtime: np.ndarray | None = None) -> np.ndarray:
        t = np.ascontiguousarray(time, np.int64)
        n = t.shape[0]
        kd = np.zeros(n, np.uint8) if kind is None else np.ascontiguousarray(kind, np.uint8)
        ch = np.zeros(n, np.int16) if channel is None else np.ascontiguousarray(channel, np.int16)
        dt = np.zeros(n, np.int32) if dtime is None else np.ascontiguousarray(dtime, np.int32)
        extra = _plan(t, self.family, self.t3, np.int64(self.base), np.int64(self.max_overflow_count))
        if extra < 0:
            i = -1 - extra
            raise ValueError(f"event {i}: time {int(t[i])} is before the encoder's overflow base {self.base} "
                             "(events must be sorted by time)")
        out = np.empty(n + extra, np.uint32)
        b, k, bad, code = _encode(t, kd, ch, dt, self.family, self.t3, np.int64(self.base),
                                  np.int64(self.max_overflow_count), out)
        if bad >= 0:
            raise ValueError(f"event {bad} (kind {int(kd[bad])}, channel {int(ch[bad])}, dtime {int(dt[bad])}): "
                             f"{_ENC_ERR[code]} {self.record_type.name}")
        self.base = int(b)
        self.records += int(k)
        return out[:k]


def write_ptu(path: str | os.PathLike[str] | BinaryIO, record_type: RecordType | int, time: np.ndarray,
              kind: np.ndarray | None = None, channel: np.ndarray | None = None, dtime: np.ndarray | None = None, *,
              global_resolution_s: float, resolution_s: float | None = None, input_channels: int | None = None,
              extra_tags: list[tuple] | None = None, comment: str = "", max_overflow_count: int | None = None) -> int:
    """Write a whole PTU file from event arrays; returns the number of records written."""
    rt = RecordType(record_type)
    records = RecordEncoder(rt, max_overflow_count).encode(time, kind, channel, dtime)
    tags = standard_tags(rt, global_resolution_s, resolution_s, records.shape[0], input_channels, comment)
    data = header_bytes(tags + list(extra_tags or [])) + records.astype("<u4").tobytes()
    if hasattr(path, "write"):
        path.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)
    return int(records.shape[0])


class PtuFileWriter:
    """Append records to a PTU file whose header has fixed-size placeholder tags patched at :meth:`close`.

    ``tags`` are written as given; the ``patchable`` ones (name, index) may be changed later with :meth:`patch`
    (8-byte values only: Int8/Float8/Bool8). ``TTResult_NumberOfRecords`` is patched automatically.
    """

    def __init__(self, path: str | os.PathLike[str], tags: list[tuple], version: str = "1.0.00") -> None:
        self.path = str(path)
        self._fh: BinaryIO | None = open(self.path, "wb")
        self.records = 0
        self._value_offsets: dict[tuple[str, int], tuple[int, TagType]] = {}
        off = 16
        chunks = [MAGIC, version.encode("ascii")[:8].ljust(8, b"\x00")]
        for t in tags + [("Header_End", None, TagType.EMPTY8)]:
            ident, value, *rest = t
            ttype = rest[0] if rest else _guess_type(value)
            index = rest[1] if len(rest) > 1 else -1
            b = encode_tag(ident, value, ttype, index)
            self._value_offsets[(ident, index)] = (off + 40, ttype)
            off += len(b)
            chunks.append(b)
        self._fh.write(b"".join(chunks))
        self.data_offset = off

    def write(self, records: np.ndarray) -> None:
        if self._fh is None:
            raise ValueError(f"{self.path}: writer is closed")
        if records.shape[0]:
            self._fh.write(np.ascontiguousarray(records, "<u4").tobytes())
            self.records += int(records.shape[0])

    def patch(self, ident: str, value: Any, index: int = -1) -> None:
        if self._fh is None:
            raise ValueError(f"{self.path}: writer is closed")
        off, ttype = self._value_offsets[(ident, index)]
        if ttype in (TagType.FLOAT8, TagType.DATETIME):
            b = struct.pack("<d", float(value))
        elif ttype in (TagType.INT8, TagType.BOOL8, TagType.BITSET64, TagType.COLOR8):
            b = struct.pack("<q", int(value))
        else:
            raise ValueError(f"tag {ident} ({ttype.name}) cannot be patched")
        pos = self._fh.tell()
        self._fh.seek(off)
        self._fh.write(b)
        self._fh.seek(pos)

    def flush(self, fsync: bool = False) -> None:
        """Push written records to the OS. The header's record count stays 0 ("as many as the file holds")
        until :meth:`close`, so a file read while it is being written is consistent at record granularity."""
        if self._fh is not None:
            self._fh.flush()
            if fsync:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            if ("TTResult_NumberOfRecords", -1) in self._value_offsets:
                self.patch("TTResult_NumberOfRecords", self.records)
            self.flush(fsync=True)
        finally:
            self._fh.close()
            self._fh = None

    @property
    def closed(self) -> bool:
        return self._fh is None


__all__ += ["FAM_HYDRA", "FAM_HYDRA_V1", "FAM_PICOHARP", "KIND_MARKER", "KIND_PHOTON", "KIND_SYNC"]
