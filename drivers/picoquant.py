"""PicoQuant MultiHarp / HydraHarp time taggers through the vendor C library (MHLib / HHLib) via ctypes.

Entry point ``picoquant.harp``. **The real libraries cannot run here** (they need the instrument on USB), so this
driver is tested against :mod:`drivers.sim.vendor.picoquant`, a stand-in of the vendor API built from its
documented behaviour (``mhlib.h``, ``mhdefin.h``, ``hhlib.h``, ``errorcodes.h``): same function names, argument
conventions, return codes, ``TTREADMAX``, flags and T2 records. docs/hardware/picoquant.md has the options, a lab
and a simulated config, and what the stand-in models.

Which library: option ``library``
---------------------------------
The library is loaded lazily, at :meth:`connect` (importing this module needs no PicoQuant software), and a
missing library fails the connect with :class:`LibraryNotFound` saying what was tried. The option is read as:

* a **shared library** if it contains a path separator or ends in ``.so``, ``.so.<N>``, ``.dll`` or ``.dylib``
  (``/opt/picoquant/mhlib/libmhlib.so``, ``libhhlib.so``): loaded with ``ctypes.CDLL`` (``WinDLL`` on Windows,
  the libraries are stdcall there) and its functions get their C signatures (``argtypes``/``restype``);
* otherwise a **Python module** name (``drivers.sim.vendor.picoquant``): imported, and its
  ``load_library(family)`` returns the library object. This is how tests and the simulated testbed use the
  stand-in; the driver code after loading is the same for both.

Empty selects the vendor's default name for the family and platform (``libmhlib.so`` / ``libhhlib.so`` on Linux,
``mhlib64.dll`` / ``hhlib64.dll`` on Windows).

Calls and errors
----------------
Connect: ``OpenDevice``, ``Initialize(dev, MODE_T2, refsource)`` (HydraHarp: ``Calibrate``), ``GetHardwareInfo``,
``GetSerialNumber``, ``GetNumOfInputChannels``, ``SetSyncDiv``, ``SetSyncEdgeTrg`` (HydraHarp 400: ``SetSyncCFD``),
per input ``SetInputEdgeTrg`` (``SetInputCFD``), ``SetInputChannelOffset``, ``SetInputChannelEnable``, then
``GetResolution``. ``start_stream``: ``StartMeas(dev, acquisition_time_ms)``. ``read``: ``ReadFiFo`` into one
preallocated ``uint32[TTREADMAX]`` buffer and ``GetFlags``. ``stop_stream``: ``StopMeas``. ``close``:
``CloseDevice``.

Every call's return code is checked. A code that means the USB link or the device is gone (open failed,
device busy, not open, DMA and USB errors) raises ``ConnectionError``: the daemon faults the device and
reconnects a fresh driver. Any other non-zero code raises :class:`~drivers.base.DeviceError` naming the call and
the library's error string (``MH_SetInputChannelOffset: MH_ERROR_INVALID_ARGUMENT (-17)``). A library call
cannot be interrupted; the vendor's calls return promptly (``ReadFiFo`` included), and ``timeout_s`` bounds how
long :meth:`read` keeps polling an empty FIFO.

Records
-------
FIFO records are T2 records of the HydraHarp-v2 / "Generic" family (bit 31 special, bits 30-25 channel, 24-0
time; special channel 63 = overflow with a count), decoded by the *same* decoder as the PTU replay
(:class:`drivers.ptu.decoder.RecordDecoder`, ``decode_tags``), which carries the overflow sum from read to read.
Times are in units of ``GetResolution``; input channels are the API's 0..N-1 and become TagBatch channels
0..N-1; SYNC records become ``sync_channel`` and marker bit k ``marker_channel + k`` (-1: dropped).

Watermark: T2 records are time-ordered, so every tag before the newest decoded time (the last record, or the
overflow sum, which grows even without events) is final, less the spread of the input offsets (in case the
hardware applies them after sorting). Flags: ``FIFOFULL`` (data lost; the hardware stops) ends the stream: the
batch holding what was read is flagged ``OVERFLOW`` and the next :meth:`read` returns None (the daemon's
acquisition then waits for ``acquisition.start``). ``CNTS_DROPPED`` flags the batch ``MISSED_EVENTS``. ``SYSERROR``
raises :class:`HardwareFault` (fault and reconnect). When ``acquisition_time_ms`` runs out the driver starts a
new measurement and continues the timeline where it was; the seam batch is flagged ``OVERFLOW``.
"""

from __future__ import annotations

import ctypes
import importlib
import re
import sys
import threading
import time
from typing import Annotated, Any

import numpy as np

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger, exposed
from drivers.params import REQUIRED, Field, ParamError
from drivers.ptu.decoder import PtuError, PtuHeader, RecordDecoder, RecordType

__all__ = ["HardwareFault", "LibraryNotFound", "PicoQuantHarp", "fifo_decoder", "is_shared_library", "load_library"]

MODE_T2 = 2
EDGE_RISING, EDGE_FALLING = 1, 0
FLAG_FIFOFULL = 0x0002
FLAG_SYNC_LOST = 0x0004
FLAG_REF_LOST = 0x0008
FLAG_SYSERROR = 0x0010
FLAG_ACTIVE = 0x0020
FLAG_CNTS_DROPPED = 0x0040
ACQTMAX = 360_000_000  # ms (100 h)
CHANOFFSMIN, CHANOFFSMAX = -99999, 99999
# Codes meaning the link is gone or the device is unusable from here: fault and reconnect, not a device error.
LINK_ERRORS = {-1, -2, -10, -24} | set(range(-38, -31))


class _Family:
    def __init__(self, prefix: str, ttreadmax: int, record_type: RecordType, default_lib: tuple[str, str],
                 cfd: bool) -> None:
        self.prefix, self.ttreadmax, self.record_type, self.default_lib, self.cfd = (prefix, ttreadmax, record_type,
                                                                                   default_lib, cfd)


FAMILIES = {
    "multiharp": _Family("MH", 1048576, RecordType.GENERIC_T2, ("libmhlib.so", "mhlib64.dll"), cfd=False),
    "hydraharp": _Family("HH", 131072, RecordType.HYDRAHARP2_T2, ("libhhlib.so", "hhlib64.dll"), cfd=True),
}


class LibraryNotFound(OSError):
    """The vendor library (or the named stand-in module) could not be loaded."""


class HardwareFault(RuntimeError):
    """The instrument reports FLAG_SYSERROR: not a refused command but a broken device. Raised as a fault so the
    daemon reconnects (OpenDevice + Initialize re-initialise the hardware), with backoff if it persists."""


_SHARED_RE = re.compile(r"\.(so(\.\d+)*|dll|dylib)$", re.IGNORECASE)


def is_shared_library(spec: str) -> bool:
    """A path or a file name of a shared library (else: a Python module name)."""
    return "/" in spec or "\\" in spec or bool(_SHARED_RE.search(spec))


def _declare(lib: Any, fam: _Family) -> None:
    """C signatures of the functions the driver calls (mhlib.h / hhlib.h)."""
    c_int, c_char_p, c_double = ctypes.c_int, ctypes.c_char_p, ctypes.c_double
    p_int, p_double, p_uint = ctypes.POINTER(c_int), ctypes.POINTER(c_double), ctypes.POINTER(ctypes.c_uint)
    p = fam.prefix
    sigs: dict[str, list[Any]] = {
        "GetLibraryVersion": [c_char_p], "GetErrorString": [c_char_p, c_int], "OpenDevice": [c_int, c_char_p],
        "CloseDevice": [c_int], "Initialize": [c_int, c_int, c_int],
        "GetHardwareInfo": [c_int, c_char_p, c_char_p, c_char_p], "GetSerialNumber": [c_int, c_char_p],
        "GetNumOfInputChannels": [c_int, p_int], "SetSyncDiv": [c_int, c_int],
        "SetSyncChannelOffset": [c_int, c_int], "SetInputChannelOffset": [c_int, c_int, c_int],
        "SetInputChannelEnable": [c_int, c_int, c_int], "StartMeas": [c_int, c_int], "StopMeas": [c_int],
        "CTCStatus": [c_int, p_int], "GetResolution": [c_int, p_double], "GetSyncRate": [c_int, p_int],
        "GetCountRate": [c_int, c_int, p_int], "GetFlags": [c_int, p_int], "GetWarnings": [c_int, p_int],
    }
    if fam.cfd:
        sigs.update({"Calibrate": [c_int], "SetSyncCFD": [c_int, c_int, c_int], "SetInputCFD": [c_int] * 4,
                     "ReadFiFo": [c_int, p_uint, c_int, p_int]})
    else:
        sigs.update({"SetSyncEdgeTrg": [c_int] * 3, "SetInputEdgeTrg": [c_int] * 4, "ReadFiFo": [c_int, p_uint, p_int]})
    for name, argtypes in sigs.items():
        fn = getattr(lib, f"{p}_{name}")
        fn.argtypes = argtypes
        fn.restype = c_int


def load_library(spec: str, family: str) -> Any:
    """Load the library named by the ``library`` option (see the module docstring)."""
    fam = FAMILIES[family]
    if not spec:
        spec = fam.default_lib[1 if sys.platform == "win32" else 0]
    if is_shared_library(spec):
        loader = ctypes.WinDLL if sys.platform == "win32" else ctypes.CDLL  # type: ignore[attr-defined]
        try:
            lib = loader(spec)
        except OSError as e:
            raise LibraryNotFound(f"PicoQuant {family} library {spec!r} could not be loaded ({e}). Install "
                                  f"{fam.prefix}Lib from PicoQuant, or set the driver option 'library' to its "
                                  "path") from None
        try:
            _declare(lib, fam)
        except AttributeError as e:
            raise LibraryNotFound(f"{spec!r} is not the {fam.prefix}Lib library: {e}") from None
        return lib
    try:
        module = importlib.import_module(spec)
    except ImportError as e:
        raise LibraryNotFound(f"PicoQuant library stand-in module {spec!r} could not be imported ({e}); a shared "
                              "library must be given as a path or a name ending in .so/.dll/.dylib") from None
    factory = getattr(module, "load_library", None)
    if factory is None:
        raise LibraryNotFound(f"module {spec!r} has no load_library(family): not a PicoQuant library stand-in")
    return factory(family)


def fifo_decoder(record_type: RecordType, resolution_ps: float, inputs: int) -> RecordDecoder:
    """The PTU record decoder set up for a live FIFO stream instead of a file.

    Thin adapter: :class:`~drivers.ptu.decoder.RecordDecoder` takes its record type and time unit from a
    :class:`~drivers.ptu.decoder.PtuHeader`, so this builds the header a file of this stream would have.
    """
    res_s = float(resolution_ps) * 1e-12
    tags = {"MeasDesc_GlobalResolution": res_s, "MeasDesc_Resolution": res_s,
            "TTResultFormat_TTTRRecType": int(record_type), "HW_InpChannels": int(inputs) + 1}
    header = PtuHeader(version="FIFO", tags=tags, tag_offsets={}, data_offset=0, record_type=record_type,
                       number_of_records=0, file_size=0, path=None)
    return RecordDecoder(header, max_channel=int(inputs) - 1)


class PicoQuantHarp(TimeTagger):
    """PicoQuant MultiHarp 150/160 or HydraHarp 400 in T2 mode (see the module docstring).

    Tested only against the stand-in :mod:`drivers.sim.vendor.picoquant`: the vendor library cannot run here.
    """

    options = {
        "library": Field(str, "", doc="shared library path/name (libmhlib.so, libhhlib.so) or a Python stand-in "
                                      "module name (drivers.sim.vendor.picoquant); empty = the family's default"),
        "family": Field(str, "multiharp", choices=tuple(FAMILIES), doc="MHLib (MultiHarp) or HHLib (HydraHarp)"),
        "device_index": Field(int, 0, min=0, max=7, doc="USB device index (0..7)"),
        "serial": Field(str, "", doc="if set, the opened device must have this serial number"),
        "mode": Field(str, "T2", choices=("T2",), doc="measurement mode (T2 only)"),
        "refsource": Field(int, 0, min=0, max=9, doc="reference clock: 0 internal, 1 external 10 MHz, ..."),
        "sync_divider": Field(int, 1, min=1, max=16, doc="SYNC input divider"),
        "sync_level_mv": Field(int, -50, unit="mV", min=-1200, max=1200,
                               doc="SYNC trigger level (HydraHarp 400: CFD level, 0..1000)"),
        "sync_edge": Field(str, "falling", choices=("rising", "falling"), doc="SYNC trigger edge (MultiHarp)"),
        "input_levels_mv": Field(list[int], [-50], unit="mV", min=-1200, max=1200,
                                 doc="input trigger levels: one for all inputs or one per input (HydraHarp 400: "
                                     "CFD levels, 0..1000)"),
        "input_edge": Field(str, "falling", choices=("rising", "falling"), doc="input trigger edge (MultiHarp)"),
        "cfd_zero_cross_mv": Field(int, 10, unit="mV", min=0, max=40, doc="HydraHarp 400 CFD zero cross"),
        "input_offsets_ps": Field(list[int], [], unit="ps", min=CHANOFFSMIN, max=CHANOFFSMAX,
                                  doc="initial input channel offsets (empty = all 0)"),
        "disabled_inputs": Field(list[int], [], min=0, max=63, doc="inputs to switch off (0-based)"),
        "sync_channel": Field(int, -1, min=-1, max=255, doc="T2 SYNC events as this TagBatch channel; -1 = dropped"),
        "marker_channel": Field(int, -1, min=-1, max=252,
                                doc="marker bit k as channel marker_channel + k; -1 = dropped"),
        "acquisition_time_ms": Field(int, ACQTMAX, unit="ms", min=1, max=ACQTMAX,
                                     doc="StartMeas acquisition time; the driver starts a new measurement when it "
                                         "ends"),
        "min_batch_ms": Field(float, 10.0, unit="ms", min=0.0, max=10_000.0,
                              doc="read() gathers at least this much tagger time per batch (within its timeout)"),
        "poll_interval_s": Field(float, 0.005, unit="s", min=0.0005, max=1.0, doc="pause between empty FIFO reads"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors = []
        fam = opts.get("family", "multiharp")
        if fam == "hydraharp":
            levels = opts.get("input_levels_mv") or []
            if any(not 0 <= v <= 1000 for v in levels):
                errors.append(ParamError("input_levels_mv", "HydraHarp 400 CFD levels are 0..1000 mV",
                                         "integers 0..1000"))
            if not 0 <= int(opts.get("sync_level_mv", 0)) <= 1000:
                errors.append(ParamError("sync_level_mv", "HydraHarp 400 CFD levels are 0..1000 mV", "0..1000"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: f.default for k, f in self.options.items() if f.default is not REQUIRED}
        opts.update(options)
        super().__init__(name, opts, log)
        self._fam = FAMILIES[opts["family"]]
        self._lock = threading.RLock()
        self._lib: Any = None
        self._dev = int(opts["device_index"])
        self._open = False
        self._inputs = 0
        self._resolution = 1.0
        self._offsets: list[int] = []
        self._identity: dict[str, str] = {}
        self._streaming = False
        self._ended = False
        self._t_end = 0
        self._base = 0
        self._stats = {"tags": 0, "batches": 0, "records": 0, "late_dropped": 0, "overflow_batches": 0,
                       "fifo_full": 0, "counts_dropped": 0, "measurements": 0}
        self._flags_seen = 0
        self._buf = np.empty(0, np.uint32)

    # -- library calls -------------------------------------------------------------------------------------
    def _fn(self, name: str) -> Any:
        return getattr(self._lib, f"{self._fam.prefix}_{name}")

    def _error_text(self, code: int) -> str:
        buf = ctypes.create_string_buffer(64)
        try:
            self._fn("GetErrorString")(buf, code)
            text = buf.value.decode("ascii", errors="replace")
        except Exception:  # noqa: BLE001 - the error string is only decoration
            text = ""
        return f"{text or 'error'} ({code})"

    def _call(self, name: str, *args: Any) -> None:
        """Call ``<prefix>_<name>(*args)``; raise on a non-zero return code."""
        if self._lib is None:
            raise ConnectionError(f"PicoQuant {self.name} is not connected")
        code = int(self._fn(name)(*args))
        if code == 0:
            return
        call = f"{self._fam.prefix}_{name}"
        text = self._error_text(code)
        if code in LINK_ERRORS:
            raise ConnectionError(f"{call}: {text}")
        raise DeviceError(text, call)

    def _get_int(self, name: str, *args: Any) -> int:
        out = ctypes.c_int()
        self._call(name, self._dev, *args, ctypes.byref(out))
        return int(out.value)

    def _get_double(self, name: str) -> float:
        out = ctypes.c_double()
        self._call(name, self._dev, ctypes.byref(out))
        return float(out.value)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        with self._lock:
            opts = self.opts
            self._lib = load_library(opts["library"], opts["family"])
            ver = ctypes.create_string_buffer(16)
            self._call("GetLibraryVersion", ver)
            serial = ctypes.create_string_buffer(16)
            self._call("OpenDevice", self._dev, serial)
            self._open = True
            try:
                self._setup(ver.value.decode("ascii", "replace"), serial.value.decode("ascii", "replace"))
            except BaseException:
                self._close_device()
                raise

    def _setup(self, lib_version: str, serial: str) -> None:
        opts, dev, fam = self.opts, self._dev, self._fam
        self._call("Initialize", dev, MODE_T2, int(opts["refsource"]))
        if fam.cfd:
            self._call("Calibrate", dev)
        model, partno, version = (ctypes.create_string_buffer(32) for _ in range(3))
        self._call("GetHardwareInfo", dev, model, partno, version)
        sn = ctypes.create_string_buffer(16)
        self._call("GetSerialNumber", dev, sn)
        serial = sn.value.decode("ascii", "replace") or serial
        if opts["serial"] and serial != opts["serial"]:
            raise DeviceError(f"device {dev} has serial {serial!r}, not {opts['serial']!r}", f"{fam.prefix}_OpenDevice")
        text = {k: b.value.decode("ascii", "replace") for k, b in (("model", model), ("partno", partno),
                                                                    ("version", version))}
        self._identity = {**text, "serial": serial, "library_version": lib_version}
        n = self._get_int("GetNumOfInputChannels")
        if not 0 < n <= 64:
            raise DeviceError(f"implausible number of input channels {n}", f"{fam.prefix}_GetNumOfInputChannels")
        self._inputs = n
        levels = list(opts["input_levels_mv"]) or [-50]
        if len(levels) == 1:
            levels = levels * n
        if len(levels) != n:
            raise DeviceError(f"input_levels_mv has {len(levels)} values for {n} inputs", "connect")
        offsets = list(opts["input_offsets_ps"]) or [0] * n
        if len(offsets) != n:
            raise DeviceError(f"input_offsets_ps has {len(offsets)} values for {n} inputs", "connect")
        self._call("SetSyncDiv", dev, int(opts["sync_divider"]))
        zc = int(opts["cfd_zero_cross_mv"])
        if fam.cfd:
            self._call("SetSyncCFD", dev, int(opts["sync_level_mv"]), zc)
        else:
            self._call("SetSyncEdgeTrg", dev, int(opts["sync_level_mv"]), _edge(opts["sync_edge"]))
        disabled = set(int(c) for c in opts["disabled_inputs"])
        for ch in range(n):
            if fam.cfd:
                self._call("SetInputCFD", dev, ch, int(levels[ch]), zc)
            else:
                self._call("SetInputEdgeTrg", dev, ch, int(levels[ch]), _edge(opts["input_edge"]))
            self._call("SetInputChannelOffset", dev, ch, int(offsets[ch]))
            self._call("SetInputChannelEnable", dev, ch, 0 if ch in disabled else 1)
        self._offsets = [int(o) for o in offsets]
        self._resolution = self._get_double("GetResolution")
        if not 0 < self._resolution < 1e6:
            raise DeviceError(f"implausible resolution {self._resolution!r} ps", f"{fam.prefix}_GetResolution")
        self._buf = np.zeros(fam.ttreadmax, np.uint32)  # preallocated once: ReadFiFo fills it in place
        self._buf_ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint))
        self._decoder = fifo_decoder(fam.record_type, self._resolution, n)
        self.log.info("PicoQuant connected", family=opts["family"], device_index=dev, inputs=n,
                      resolution_ps=self._resolution, **self._identity)

    def _close_device(self) -> None:
        if self._lib is not None and self._open:
            try:
                self._fn("CloseDevice")(self._dev)
            except Exception:  # noqa: BLE001 - closing: nothing more to do
                pass
        self._open = False

    def close(self) -> None:
        with self._lock:
            if self._lib is not None and self._open and self._streaming:
                try:
                    self._fn("StopMeas")(self._dev)
                except Exception:  # noqa: BLE001
                    pass
            self._streaming = False
            self._close_device()
            self._lib = None

    def describe(self) -> dict[str, Any]:
        return {"vendor": "PicoQuant", "model": self._identity.get("model", self.opts["family"]),
                "serial": self._identity.get("serial", ""), "firmware": self._identity.get("version", ""),
                "library": self.opts["library"] or "(default)",
                "library_version": self._identity.get("library_version", "")}

    @property
    def channel_count(self) -> int:
        extra = [self.opts["sync_channel"] + 1]
        if self.opts["marker_channel"] >= 0:
            extra.append(self.opts["marker_channel"] + 4)
        return int(min(256, max([self._inputs or 1, *extra])))

    @property
    def resolution_ps(self) -> int:
        return max(1, int(round(self._resolution)))

    # -- streaming ---------------------------------------------------------------------------------------
    def start_stream(self) -> None:
        with self._lock:
            if self._lib is None or not self._open:
                raise ConnectionError(f"PicoQuant {self.name} is not connected")
            if self._streaming:
                return
            self._start_measurement()
            self._streaming = True
            self._ended = False
            self._pend_flags = TagFlags.NONE

    def _start_measurement(self) -> None:
        self._decoder.reset()
        self._base = self._t_end
        self._pend_t: list[np.ndarray] = []
        self._pend_c: list[np.ndarray] = []
        self._max_t = self._t_end - 1
        self._last_units = 0
        self._call("StartMeas", self._dev, int(self.opts["acquisition_time_ms"]))
        self._stats["measurements"] += 1

    def stop_stream(self) -> None:
        with self._lock:
            if not self._streaming:
                return
            self._streaming = False
            self._pend_t, self._pend_c = [], []
            self._call("StopMeas", self._dev)

    def _units_to_ps(self, units: int) -> int:
        fs = self._decoder.header.global_resolution_fs
        return (units // 1000) * fs + ((units % 1000) * fs) // 1000

    def _fetch(self) -> tuple[int, int]:
        """One ReadFiFo + GetFlags; decoded tags go to pending. Returns (records read, flags)."""
        n = ctypes.c_int(0)
        if self._fam.cfd:
            self._call("ReadFiFo", self._dev, self._buf_ptr, self._fam.ttreadmax, ctypes.byref(n))
        else:
            self._call("ReadFiFo", self._dev, self._buf_ptr, ctypes.byref(n))
        count = int(n.value)
        if not 0 <= count <= self._fam.ttreadmax:
            raise DeviceError(f"returned {count} records (buffer holds {self._fam.ttreadmax})",
                              f"{self._fam.prefix}_ReadFiFo")
        flags = self._get_int("GetFlags")
        if count:
            self._stats["records"] += count
            try:
                t, c, last, ok = self._decoder.decode_tags(self._buf[:count], int(self.opts["sync_channel"]),
                                                            int(self.opts["marker_channel"]))
            except PtuError as e:
                raise DeviceError(f"corrupt FIFO data: {e}", f"{self._fam.prefix}_ReadFiFo") from None
            self._last_units = max(self._last_units, last)
            if t.shape[0]:
                t = t + self._base
                if not ok:
                    order = np.argsort(t, kind="stable")
                    t, c = t[order], c[order]
                self._pend_t.append(t)
                self._pend_c.append(c)
                self._max_t = max(self._max_t, int(t[-1]))
        return count, flags

    def _horizon(self) -> int:
        """Tagger time before which every tag has been decoded (ps): T2 records are time-ordered, so nothing
        later comes before the newest record's time or the overflow sum, less the input offsets' spread."""
        units = max(self._decoder.overflow, self._last_units)
        spread = (max(self._offsets) - min(self._offsets)) if self._offsets else 0
        return self._base + self._units_to_ps(units) - spread

    def read(self, timeout_s: float) -> TagBatch | None:
        with self._lock:
            if not self._streaming or self._lib is None:
                return None
            deadline = time.monotonic() + max(0.0, float(timeout_s))
            min_ps = int(float(self.opts["min_batch_ms"]) * 1e9)
            poll = float(self.opts["poll_interval_s"])
            flags_out = self._pend_flags
            while True:
                count, flags = self._fetch()
                if flags & FLAG_SYSERROR:
                    raise HardwareFault(f"{self._fam.prefix}_GetFlags: the hardware reports a system error "
                                        "(FLAG_SYSERROR); PicoQuant asks to contact support with the debug info")
                if flags & FLAG_CNTS_DROPPED:
                    flags_out |= TagFlags.MISSED_EVENTS
                    self._stats["counts_dropped"] += 1
                if flags & FLAG_FIFOFULL:
                    while self._fetch()[0]:  # what is still in the FIFO before the loss is valid
                        pass
                    self._stats["fifo_full"] += 1
                    self.log.warning("PicoQuant FIFO full: data lost, measurement stopped", t_ps=self._t_end)
                    self._streaming = False
                    self._ended = True
                    try:
                        self._call("StopMeas", self._dev)
                    finally:
                        batch = self._emit(max(self._horizon(), self._max_t + 1), flags_out | TagFlags.OVERFLOW)
                    return batch
                if not flags & FLAG_ACTIVE and count == 0:
                    status = self._get_int("CTCStatus")
                    if status:  # the acquisition time ran out: continue with a new measurement
                        while self._fetch()[0]:
                            pass
                        batch = self._emit(max(self._horizon(), self._max_t + 1), flags_out | TagFlags.OVERFLOW)
                        self.log.info("PicoQuant measurement ended; starting the next one", t_ps=self._t_end)
                        self._start_measurement()
                        self._pend_flags = TagFlags.NONE
                        return batch
                horizon = self._horizon()
                now = time.monotonic()
                if horizon > self._t_end and (horizon - self._t_end >= min_ps or now >= deadline):
                    self._pend_flags = TagFlags.NONE
                    return self._emit(horizon, flags_out)
                if now >= deadline:
                    self._pend_flags = flags_out  # flags seen now belong to data not yet emitted
                    return TagBatch.empty(self._t_end, self._t_end)
                if count < self._fam.ttreadmax:
                    time.sleep(min(poll, max(0.0, deadline - now)))

    def _emit(self, end: int, flags: TagFlags) -> TagBatch:
        begin = self._t_end
        end = max(end, begin)
        ts = np.concatenate(self._pend_t) if self._pend_t else np.empty(0, np.int64)
        ch = np.concatenate(self._pend_c) if self._pend_c else np.empty(0, np.uint8)
        if len(self._pend_t) > 1 and ts.shape[0] > 1 and np.any(ts[1:] < ts[:-1]):
            order = np.argsort(ts, kind="stable")
            ts, ch = ts[order], ch[order]
        cut = int(np.searchsorted(ts, end, side="left"))
        out_t, out_c = ts[:cut], ch[:cut]
        self._pend_t, self._pend_c = ([ts[cut:]], [ch[cut:]]) if cut < ts.shape[0] else ([], [])
        low = int(np.searchsorted(out_t, begin, side="left"))
        if low:
            out_t, out_c = out_t[low:], out_c[low:]
            self._stats["late_dropped"] += low
            flags |= TagFlags.MISSED_EVENTS
        if flags & TagFlags.OVERFLOW:
            self._stats["overflow_batches"] += 1
        self._t_end = end
        self._stats["tags"] += int(out_t.shape[0])
        self._stats["batches"] += 1
        return TagBatch(np.ascontiguousarray(out_t), np.ascontiguousarray(out_c), begin, end, flags, low)

    # -- RPC ---------------------------------------------------------------------------------------------
    @exposed
    def set_input_delay(
        self,
        channel: Annotated[int, Field(min=0, doc="0-based input channel")],
        picoseconds: Annotated[int, Field(unit="ps", limit="input_delay_ps")],
    ) -> None:
        """Set the input channel offset (SetInputChannelOffset; the hardware allows -99999..99999 ps)."""
        with self._lock:
            if self._lib is None or not self._open:
                raise ConnectionError(f"PicoQuant {self.name} is not connected")
            if not 0 <= channel < self._inputs:
                raise DeviceError(f"channel {channel} does not exist (0..{self._inputs - 1})", "set_input_delay")
            self._call("SetInputChannelOffset", self._dev, int(channel), int(picoseconds))
            self._offsets[channel] = int(picoseconds)

    @exposed
    def status(self) -> dict:
        """Channels, resolution_ps, input_delays_ps, streaming, count rates, flags and stream statistics."""
        with self._lock:
            if self._lib is None or not self._open:
                raise ConnectionError(f"PicoQuant {self.name} is not connected")
            rates = [self._get_int("GetCountRate", ch) for ch in range(self._inputs)]
            flags = self._get_int("GetFlags")
            warnings = self._get_int("GetWarnings")
            return {
                "channels": self.channel_count,
                "inputs": self._inputs,
                "resolution_ps": self.resolution_ps,
                "resolution_exact_ps": self._resolution,
                "input_delays_ps": list(self._offsets),
                "streaming": self._streaming,
                "stream_ended_by_fifo_full": self._ended,
                "count_rates_hz": rates,
                "sync_rate_hz": self._get_int("GetSyncRate"),
                "flags": flags,
                "warnings": warnings,
                "t_end_ps": self._t_end,
                **self._stats,
            }


def _edge(word: str) -> int:
    return EDGE_RISING if word == "rising" else EDGE_FALLING
