"""Stand-in of PicoQuant's MHLib (MultiHarp) and HHLib (HydraHarp) C libraries, for tests and the simulated testbed.

The real libraries (``libmhlib.so`` / ``libhhlib.so``) need the instruments' USB hardware and cannot run here.
This module imitates their *documented* API closely enough that :class:`drivers.picoquant.PicoQuantHarp` runs
its real code path against it: the same function names (``MH_*`` / ``HH_*``), the same argument conventions
(integers by value; out-parameters as ``ctypes.byref(c_int())`` / ``byref(c_double())`` or ctypes pointers;
``char*`` buffers from ``ctypes.create_string_buffer``; the FIFO buffer as a ``POINTER(c_uint)`` into the
caller's memory), the same integer return codes (0 or a negative error code, values of HHLib's
``errorcodes.h``; MHLib's are assumed to be the same), the constants of ``mhdefin.h`` (``TTREADMAX``, modes,
flags, limits) and real T2 records.

Sources: ``mhlib.h`` / ``mhdefin.h`` (MHLib 1.0, in antoniopifferi/TRS ``LIBRARY/``), ``hhlib.h`` (HHLib 3.0.0.2),
``errorcodes.h`` (HHLib), protocols.md 4.3 and timetags.md (record formats).

How a driver gets it: ``load_library(family)`` returns a library object for ``"multiharp"`` (``MH_`` functions,
``TTREADMAX`` 1048576, ``MH_SetSyncEdgeTrg``/``MH_SetInputEdgeTrg``, ``MH_ReadFiFo(dev, buf, &n)``) or
``"hydraharp"`` (``HH_`` functions, ``TTREADMAX`` 131072, ``HH_Calibrate``, ``HH_SetSyncCFD``/``HH_SetInputCFD``,
``HH_ReadFiFo(dev, buf, count, &n)``). The driver's option ``library = "drivers.sim.vendor.picoquant"`` selects
it (a dotted module name, not a shared-library path).

What the simulated instruments do
---------------------------------
:data:`BUS` models the USB bus: up to 8 devices per family (``MAXDEVNUM``). It is module-level state on purpose:
a vendor library is process-global, and so are the devices it sees. Unless a test plugged its own
(:meth:`Bus.plug`), opening index 0 of an empty bus plugs a default device: a MultiHarp 150 8N (8 inputs, 5 ps)
or a HydraHarp 400 (8 inputs, 1 ps) whose inputs 0-7 see the bench tagger channels 0-7 of a private
:class:`~drivers.sim.bench.model.BenchModel` built from ``default_config(seed=1)``. (The stand-in is not a
daemon simulator: it cannot see the daemon's bench; see docs/hardware/picoquant.md.)

A measurement (``StartMeas``) runs in wall-clock time scaled by ``speed``: each ``ReadFiFo`` turns the tags of
the time elapsed since the previous call into T2 records (:class:`drivers.ptu.encoder.RecordEncoder`, the
record format of the PTU files) and puts them in the FIFO, followed by overflow records up to the present, as
the hardware's time-tag counter wraps even with no events (the combined overflow count of the v2 formats is
assumed to be flushed at least once per read). Tags are floored to the resolution; input channel offsets
(``SetInputChannelOffset``) and the sync divider act on them; disabled inputs record nothing; the SYNC input
(``sync_rate_hz`` > 0) gives SYNC records (special channel 0). The FIFO holds ``fifo_records`` records: more
and the device sets ``FLAG_FIFOFULL`` and stops, as the hardware does. Tags the bench tagger dropped, or
:meth:`SimHarp.drop_counts`, set ``FLAG_CNTS_DROPPED`` (cleared when read: assumed). The acquisition time
``tacq`` ends the measurement (``FLAG_ACTIVE`` off, ``CTCStatus`` 1). Only T2 measurements are modelled
(``StartMeas`` in T3 or histogram mode returns ``ERROR_INVALID_MODE``).

Test controls on :class:`SimHarp`: :meth:`~SimHarp.fill_fifo`, :meth:`~SimHarp.drop_counts`,
:meth:`~SimHarp.fail_next` (a function returns a given code once), :meth:`~SimHarp.inject_records` (raw
records into the FIFO), :meth:`~SimHarp.unplug` /
:meth:`~SimHarp.replug` (USB errors until replugged), :attr:`~SimHarp.extra_flags` (e.g. ``FLAG_SYSERROR``),
:attr:`~SimHarp.record_sent` with :meth:`~SimHarp.sent` (the tags put in the FIFO, as ground truth),
:attr:`~SimHarp.calls` (function names called).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from drivers.ptu.decoder import KIND_PHOTON, KIND_SYNC, RecordType
from drivers.ptu.encoder import RecordEncoder

__all__ = ["BUS", "Bus", "FAMILIES", "HarpLibrary", "SimHarp", "load_library"]

# mhdefin.h / hhdefin.h
MAXDEVNUM = 8
MODE_HIST, MODE_T2, MODE_T3 = 0, 2, 3
EDGE_RISING, EDGE_FALLING = 1, 0
FLAG_OVERFLOW = 0x0001
FLAG_FIFOFULL = 0x0002
FLAG_SYNC_LOST = 0x0004
FLAG_REF_LOST = 0x0008
FLAG_SYSERROR = 0x0010
FLAG_ACTIVE = 0x0020
FLAG_CNTS_DROPPED = 0x0040
WARNING_COUNTS_DROPPED = 0x2000
SYNCDIVMIN, SYNCDIVMAX = 1, 16
TRGLVLMIN, TRGLVLMAX = -1200, 1200  # mV (MultiHarp edge triggers)
CFDLVLMIN, CFDLVLMAX = 0, 1000  # mV (HydraHarp 400 CFD)
CFDZCMIN, CFDZCMAX = 0, 40  # mV
CHANOFFSMIN, CHANOFFSMAX = -99999, 99999  # ps
ACQTMIN, ACQTMAX = 1, 360000000  # ms

# errorcodes.h (HHLib; the MH_ERROR_* values are assumed identical)
ERRORS = {
    0: "ERROR_NONE", -1: "ERROR_DEVICE_OPEN_FAIL", -2: "ERROR_DEVICE_BUSY", -3: "ERROR_DEVICE_HEVENT_FAIL",
    -4: "ERROR_DEVICE_CALLBSET_FAIL", -5: "ERROR_DEVICE_BARMAP_FAIL", -6: "ERROR_DEVICE_CLOSE_FAIL",
    -7: "ERROR_DEVICE_RESET_FAIL", -8: "ERROR_DEVICE_GETVERSION_FAIL", -9: "ERROR_DEVICE_VERSION_MISMATCH",
    -10: "ERROR_DEVICE_NOT_OPEN", -16: "ERROR_INSTANCE_RUNNING", -17: "ERROR_INVALID_ARGUMENT",
    -18: "ERROR_INVALID_MODE", -19: "ERROR_INVALID_OPTION", -20: "ERROR_INVALID_MEMORY", -21: "ERROR_INVALID_RDATA",
    -22: "ERROR_NOT_INITIALIZED", -23: "ERROR_NOT_CALIBRATED", -24: "ERROR_DMA_FAIL", -25: "ERROR_XTDEVICE_FAIL",
    -26: "ERROR_FPGACONF_FAIL", -27: "ERROR_IFCONF_FAIL", -28: "ERROR_FIFORESET_FAIL",
    -32: "ERROR_USB_GETDRIVERVER_FAIL", -33: "ERROR_USB_DRIVERVER_MISMATCH", -34: "ERROR_USB_GETIFINFO_FAIL",
    -35: "ERROR_USB_HISPEED_FAIL", -36: "ERROR_USB_VCMD_FAIL", -37: "ERROR_USB_BULKRD_FAIL",
}
OK = 0
E_OPEN_FAIL, E_BUSY, E_NOT_OPEN = -1, -2, -10
E_RUNNING, E_ARG, E_MODE, E_NOT_INIT = -16, -17, -18, -22
E_USB_VCMD, E_USB_BULKRD = -36, -37

PS_PER_S = 1_000_000_000_000
T2_WRAP = 33554432  # HydraHarp v2 / Generic T2 overflow period in units
T2_MAX_OVERFLOW_COUNT = (1 << 25) - 1


class _Family:
    def __init__(self, name: str, prefix: str, ttreadmax: int, record_type: RecordType, model: str, partno: str,
                 resolution_ps: float, lib_version: str) -> None:
        self.name, self.prefix, self.ttreadmax, self.record_type = name, prefix, ttreadmax, record_type
        self.model, self.partno, self.resolution_ps, self.lib_version = model, partno, resolution_ps, lib_version


FAMILIES = {
    "multiharp": _Family("multiharp", "MH", 1048576, RecordType.GENERIC_T2, "MultiHarp 150 8N", "930041", 5.0, "3.1"),
    "hydraharp": _Family("hydraharp", "HH", 131072, RecordType.HYDRAHARP2_T2, "HydraHarp 400", "930004", 1.0, "3.0"),
}


# --------------------------------------------------------------------------------------------------------
# ctypes argument conventions


def _val(x: Any) -> int:
    """An integer argument, given as a Python int or a ctypes scalar."""
    return int(getattr(x, "value", x))


def _out(ref: Any) -> Any:
    """The ctypes object behind an out-parameter: ``byref(obj)`` or ``pointer(obj)``."""
    obj = getattr(ref, "_obj", None)
    if obj is not None:
        return obj
    if hasattr(ref, "contents"):
        return ref.contents
    raise TypeError(f"expected byref(...) or a ctypes pointer, got {type(ref).__name__}")


def _put_str(buf: Any, text: str) -> None:
    """Write a NUL-terminated string into a ``create_string_buffer`` (truncated to fit, as C code would)."""
    raw = text.encode("ascii", errors="replace")[: max(0, len(buf) - 1)]
    buf.value = raw


# --------------------------------------------------------------------------------------------------------
# The simulated instrument


class SimHarp:
    """One simulated MultiHarp or HydraHarp on the USB bus (see the module docstring).

    ``source``: ``"bench"`` (a BenchModel from ``default_config(seed=seed)``), ``"poisson"`` (a seeded
    :class:`~drivers.sim.tagstream.PoissonPairSource` with ``singles_hz``/``pair_rate_hz``), or any object with
    the BlockSource protocol. Input ``i`` sees source channel ``input_channels[i]`` (default: channel i).
    """

    def __init__(self, family: str = "multiharp", *, serial: str = "", channels: int = 8,
                 resolution_ps: float | None = None, source: Any = "bench", seed: int = 1, speed: float = 1.0,
                 fifo_records: int = 1 << 24, input_channels: list[int] | None = None, singles_hz: float = 5000.0,
                 pair_rate_hz: float = 20000.0, sync_rate_hz: float = 0.0) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}")
        fam = FAMILIES[family]
        self.family = fam
        self.serial = serial or ("1045" if family == "multiharp" else "1001") + f"{seed % 10000:04d}"
        self.channels = int(channels)
        self.resolution_ps = float(resolution_ps if resolution_ps is not None else fam.resolution_ps)
        self._res_fs = int(round(self.resolution_ps * 1000))
        self._source_spec = source
        self.seed = int(seed)
        self.speed = float(speed)
        self.fifo_records = int(fifo_records)
        self.input_channels = list(input_channels) if input_channels is not None else list(range(self.channels))
        self.singles_hz = float(singles_hz)
        self.pair_rate_hz = float(pair_rate_hz)
        self.sync_rate_hz = float(sync_rate_hz)
        self.lock = threading.RLock()
        self.plugged = True
        self.opened = False
        self.mode: int | None = None
        self.calibrated = False
        self.sync_div = 1
        self.sync_level: tuple[int, int] = (-50, EDGE_FALLING)
        self.sync_offset = 0
        self.levels = [(-50, EDGE_FALLING)] * self.channels
        self.offsets = [0] * self.channels
        self.enabled = [True] * self.channels
        self.extra_flags = 0
        self.record_sent = False
        self.calls: deque[str] = deque(maxlen=5000)
        self._fail: dict[str, deque[int]] = {}
        self._stream: Any = None
        self._stream_time = 0
        self._running = False
        self._done = False
        self._fifo: deque[np.ndarray] = deque()
        self._fifo_n = 0
        self._fifo_full = False
        self._force_full = False
        self._dropped = 0
        self._drop_next = 0
        self._sent: list[tuple[np.ndarray, np.ndarray]] = []
        self._rates = np.zeros(self.channels + 1)

    # -- test controls ------------------------------------------------------------------------------------
    def fill_fifo(self) -> None:
        """The FIFO overflows at the next read: FLAG_FIFOFULL, the new data are lost, the measurement stops."""
        with self.lock:
            self._force_full = True

    def drop_counts(self, n: int = 1) -> None:
        """The hardware drops the next ``n`` tags: FLAG_CNTS_DROPPED at the next GetFlags."""
        with self.lock:
            self._drop_next += int(n)

    def fail_next(self, function: str, code: int) -> None:
        """The next call of ``function`` (without prefix, e.g. ``"ReadFiFo"``) returns ``code``."""
        with self.lock:
            self._fail.setdefault(function, deque()).append(int(code))

    def unplug(self) -> None:
        """Pull the USB cable: every call fails with a USB error; the device must be opened again after replug."""
        with self.lock:
            self.plugged = False
            self.opened = False
            self._running = False

    def replug(self) -> None:
        with self.lock:
            self.plugged = True
            self.mode = None

    def inject_records(self, records: Any) -> None:
        """Put raw 32-bit records into the FIFO after what is there (e.g. a corrupt record)."""
        rec = np.asarray(records, np.uint32).ravel()
        with self.lock:
            self._fifo.append(rec)
            self._fifo_n += rec.shape[0]

    def sent(self) -> tuple[np.ndarray, np.ndarray]:
        """(times ps since StartMeas, as the records encode them; channels) of every photon and SYNC put in the
        FIFO since the last StartMeas (SYNC as channel -1 = 255 in uint8)."""
        with self.lock:
            if not self._sent:
                return np.empty(0, np.int64), np.empty(0, np.uint8)
            return (np.concatenate([s[0] for s in self._sent]), np.concatenate([s[1] for s in self._sent]))

    # -- helpers for the library --------------------------------------------------------------------------
    def failure(self, function: str) -> int | None:
        q = self._fail.get(function)
        return q.popleft() if q else None

    def _ensure_source(self) -> None:
        if self._stream is not None:
            return
        from drivers.sim.tagstream import BlockStream, PoissonPairSource

        spec = self._source_spec
        if spec == "bench":
            from drivers.sim.bench.config import default_config
            from drivers.sim.bench.model import BenchModel

            src: Any = BenchModel(default_config(seed=self.seed))
        elif spec == "poisson":
            n = max(self.input_channels + [1]) + 1
            pairs = [[i, i + 1] for i in range(0, n - 1, 2)]
            src = PoissonPairSource(channel_count=n, singles_hz=[self.singles_hz] * n, pair_rate_hz=self.pair_rate_hz,
                                    pair_channels=pairs or [[0, 0]], jitter_ps=50.0, delays_ps=[0] * n,
                                    resolution_ps=1, seed=self.seed, block_ps=5_000_000_000)
        else:
            src = spec
        self._stream = BlockStream(src)
        lut = np.full(256, -1, np.int64)
        for i, c in enumerate(self.input_channels):
            if 0 <= c < 256:
                lut[c] = i
        self._input_of = lut

    def start(self, tacq_ms: int) -> None:
        self._ensure_source()
        self._t0 = time.monotonic()
        self._tacq_ps = int(tacq_ms) * 1_000_000_000
        self._offset = self._stream_time
        self._gen_until = 0  # device ps: tags before this are in the FIFO
        self._pend_t = np.empty(0, np.int64)
        self._pend_c = np.empty(0, np.int64)
        self._encoder = RecordEncoder(self.family.record_type, T2_MAX_OVERFLOW_COUNT)
        self._fifo.clear()
        self._fifo_n = 0
        self._fifo_full = False
        self._sent = []
        self._running = True
        self._done = False

    def stop(self) -> None:
        self._running = False

    def elapsed_ps(self) -> int:
        return min(int((time.monotonic() - self._t0) * self.speed * PS_PER_S), self._tacq_ps)

    def generate(self) -> None:
        """Put the records of the device time elapsed since the last call into the FIFO."""
        if not self._running:
            return
        target = self.elapsed_ps()
        ts, ch, overflow, dropped = self._stream.take(self._offset + target)
        self._stream_time = self._offset + target
        if overflow:
            self._dropped += max(1, dropped)
        dev = ts - self._offset
        inp = self._input_of[ch]
        keep = inp >= 0
        dev, inp = dev[keep], inp[keep]
        enabled = np.asarray(self.enabled, bool)
        keep = enabled[inp]
        dev, inp = dev[keep], inp[keep]
        if self._drop_next and dev.shape[0]:
            k = min(self._drop_next, dev.shape[0])
            dev, inp = dev[k:], inp[k:]
            self._drop_next -= k
            self._dropped += k
        t = dev + np.asarray(self.offsets, np.int64)[inp]
        c = inp
        if self.sync_rate_hz > 0:  # the SYNC input after the divider: a periodic signal from t = 0
            period = int(round(PS_PER_S / self.sync_rate_hz)) * self.sync_div
            first = -(-self._gen_until // period) * period
            sync = np.arange(first, target, period, dtype=np.int64) + self.sync_offset
            t = np.concatenate((t, sync))
            c = np.concatenate((c, np.full(sync.shape[0], -1, np.int64)))
        # tags are final below target - max |offset| (a later source tag lands at >= target - 99999 ps)
        t_all = np.concatenate((self._pend_t, t))
        c_all = np.concatenate((self._pend_c, c))
        order = np.argsort(t_all, kind="stable")
        t_all, c_all = t_all[order], c_all[order]
        final = target if target >= self._tacq_ps else target - (CHANOFFSMAX + 1)
        cut = int(np.searchsorted(t_all, final, side="left"))
        out_t, out_c = t_all[:cut], c_all[:cut]
        self._pend_t, self._pend_c = t_all[cut:], c_all[cut:]
        ok = out_t >= 0
        out_t, out_c = out_t[ok], out_c[ok]
        units = (out_t * 1000) // self._res_fs
        kind = np.where(out_c < 0, KIND_SYNC, KIND_PHOTON).astype(np.uint8)
        rec = self._encoder.encode(units, kind, np.where(out_c < 0, 0, out_c))
        # the time-tag counter wraps even without events: overflow records up to the present
        now_units = (max(final, 0) * 1000) // self._res_fs
        need = (now_units - self._encoder.base) // T2_WRAP
        if need > 0:
            counts = []
            while need > 0:
                n = min(need, T2_MAX_OVERFLOW_COUNT)
                counts.append(0x80000000 | (63 << 25) | n)
                need -= n
                self._encoder.base += n * T2_WRAP
            rec = np.concatenate((rec, np.asarray(counts, np.uint32)))
        self._gen_until = target
        if self.record_sent and out_t.shape[0]:
            self._sent.append(((units * self._res_fs) // 1000, out_c.astype(np.uint8)))
        span = max(1, target - getattr(self, "_rate_t", 0))
        counts_per = np.bincount(out_c + 1, minlength=self.channels + 1)[: self.channels + 1]
        self._rates = counts_per * (PS_PER_S / span)
        self._rate_t = target
        if self._force_full or self._fifo_n + rec.shape[0] > self.fifo_records:
            room = 0 if self._force_full else max(0, self.fifo_records - self._fifo_n)
            rec = rec[:room]
            self._force_full = False
            self._fifo_full = True
            self._running = False  # the hardware stops on a full FIFO
        if rec.shape[0]:
            self._fifo.append(rec)
            self._fifo_n += rec.shape[0]
        if target >= self._tacq_ps:
            self._running = False
            self._done = True

    def read_fifo(self, max_records: int) -> np.ndarray:
        out, n = [], 0
        while self._fifo and n < max_records:
            head = self._fifo[0]
            take = min(head.shape[0], max_records - n)
            out.append(head[:take])
            n += take
            if take == head.shape[0]:
                self._fifo.popleft()
            else:
                self._fifo[0] = head[take:]
        self._fifo_n -= n
        return np.concatenate(out) if out else np.empty(0, np.uint32)

    def flags(self) -> int:
        f = self.extra_flags
        if self._running:
            f |= FLAG_ACTIVE
        if self._fifo_full:
            f |= FLAG_FIFOFULL
        if self._dropped:
            f |= FLAG_CNTS_DROPPED
            self._dropped = 0
        return f


# --------------------------------------------------------------------------------------------------------
# The bus


class Bus:
    """Devices per family and index (the USB bus of this process). ``auto_default``: plug a default device at
    index 0 when an empty slot 0 is opened."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self, auto_default: bool = True) -> None:
        """Unplug every device (tests start from an empty bus with ``auto_default=False``)."""
        with self.lock:
            self.devices: dict[tuple[str, int], SimHarp] = {}
            self.auto_default = auto_default

    def plug(self, device: SimHarp, index: int = 0) -> SimHarp:
        if not 0 <= index < MAXDEVNUM:
            raise ValueError(f"device index must be 0..{MAXDEVNUM - 1}")
        with self.lock:
            self.devices[(device.family.name, index)] = device
        return device

    def remove(self, family: str, index: int = 0) -> None:
        with self.lock:
            self.devices.pop((family, index), None)

    def get(self, family: str, index: int) -> SimHarp | None:
        with self.lock:
            dev = self.devices.get((family, index))
            if dev is None and index == 0 and self.auto_default:
                dev = self.devices[(family, 0)] = SimHarp(family)
            return dev


BUS = Bus()


# --------------------------------------------------------------------------------------------------------
# The library


class HarpLibrary:
    """What ``ctypes.CDLL("libmhlib.so")`` would give: ``MH_*`` (or ``HH_*``) functions returning int codes."""

    def __init__(self, family: str, bus: Bus = BUS) -> None:
        self.family = FAMILIES[family]
        self.bus = bus
        self.TTREADMAX = self.family.ttreadmax
        p = self.family.prefix
        names = ["GetLibraryVersion", "GetErrorString", "OpenDevice", "CloseDevice", "Initialize",
                 "GetHardwareInfo", "GetSerialNumber", "GetBaseResolution", "GetNumOfInputChannels", "SetSyncDiv",
                 "SetSyncChannelOffset", "SetInputChannelOffset", "SetInputChannelEnable", "StartMeas", "StopMeas",
                 "CTCStatus", "GetResolution", "GetSyncRate", "GetCountRate", "GetFlags", "GetWarnings",
                 "GetElapsedMeasTime", "ReadFiFo"]
        names += ["SetSyncEdgeTrg", "SetInputEdgeTrg"] if p == "MH" else ["Calibrate", "SetSyncCFD", "SetInputCFD"]
        for name in names:
            setattr(self, f"{p}_{name}", self._wrap(name, getattr(self, f"_{name}")))

    def _wrap(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            return int(fn(*args))

        call.__name__ = f"{self.family.prefix}_{name}"
        return call

    # -- device access ------------------------------------------------------------------------------------
    def _dev(self, name: str, devidx: Any, *, initialized: bool = True) -> tuple[SimHarp | None, int]:
        idx = _val(devidx)
        if not 0 <= idx < MAXDEVNUM:
            return None, E_ARG
        dev = self.bus.get(self.family.name, idx)
        if dev is None:
            return None, E_NOT_OPEN
        dev.calls.append(name)
        code = dev.failure(name)
        if code is not None:
            return None, code
        if not dev.plugged:
            return None, E_USB_BULKRD if name == "ReadFiFo" else E_USB_VCMD
        if not dev.opened:
            return None, E_NOT_OPEN
        if initialized and dev.mode is None:
            return None, E_NOT_INIT
        return dev, OK

    def _channel(self, dev: SimHarp, channel: Any) -> int | None:
        ch = _val(channel)
        return ch if 0 <= ch < dev.channels else None

    # -- functions ----------------------------------------------------------------------------------------
    def _GetLibraryVersion(self, vers: Any) -> int:
        _put_str(vers, self.family.lib_version)
        return OK

    def _GetErrorString(self, errstring: Any, errcode: Any) -> int:
        code = _val(errcode)
        _put_str(errstring, f"{self.family.prefix}_{ERRORS.get(code, 'ERROR_UNKNOWN')}")
        return OK

    def _OpenDevice(self, devidx: Any, serial: Any) -> int:
        idx = _val(devidx)
        if not 0 <= idx < MAXDEVNUM:
            return E_ARG
        dev = self.bus.get(self.family.name, idx)
        if dev is None:
            return E_OPEN_FAIL
        with dev.lock:
            dev.calls.append("OpenDevice")
            code = dev.failure("OpenDevice")
            if code is not None:
                return code
            if not dev.plugged:
                return E_OPEN_FAIL
            if dev.opened:
                return E_BUSY
            dev.opened = True
            dev.mode = None
            _put_str(serial, dev.serial)
            return OK

    def _CloseDevice(self, devidx: Any) -> int:
        dev, code = self._dev("CloseDevice", devidx, initialized=False)
        if dev is None:
            return code
        with dev.lock:
            dev.stop()
            dev.opened = False
            dev.mode = None
            return OK

    def _Initialize(self, devidx: Any, mode: Any, refsource: Any) -> int:
        dev, code = self._dev("Initialize", devidx, initialized=False)
        if dev is None:
            return code
        m, ref = _val(mode), _val(refsource)
        if m not in (MODE_HIST, MODE_T2, MODE_T3):
            return E_MODE
        if not 0 <= ref <= (9 if self.family.prefix == "MH" else 1):
            return E_ARG
        with dev.lock:
            dev.stop()
            dev.mode = m
            dev.calibrated = self.family.prefix == "MH"
            return OK

    def _Calibrate(self, devidx: Any) -> int:
        dev, code = self._dev("Calibrate", devidx)
        if dev is None:
            return code
        dev.calibrated = True
        return OK

    def _GetHardwareInfo(self, devidx: Any, model: Any, partno: Any, version: Any) -> int:
        dev, code = self._dev("GetHardwareInfo", devidx)
        if dev is None:
            return code
        _put_str(model, dev.family.model)
        _put_str(partno, dev.family.partno)
        _put_str(version, "2.0")
        return OK

    def _GetSerialNumber(self, devidx: Any, serial: Any) -> int:
        dev, code = self._dev("GetSerialNumber", devidx)
        if dev is None:
            return code
        _put_str(serial, dev.serial)
        return OK

    def _GetBaseResolution(self, devidx: Any, resolution: Any, binsteps: Any) -> int:
        dev, code = self._dev("GetBaseResolution", devidx)
        if dev is None:
            return code
        _out(resolution).value = dev.resolution_ps
        _out(binsteps).value = 23 if self.family.prefix == "MH" else 26
        return OK

    def _GetNumOfInputChannels(self, devidx: Any, nchannels: Any) -> int:
        dev, code = self._dev("GetNumOfInputChannels", devidx)
        if dev is None:
            return code
        _out(nchannels).value = dev.channels
        return OK

    def _SetSyncDiv(self, devidx: Any, div: Any) -> int:
        dev, code = self._dev("SetSyncDiv", devidx)
        if dev is None:
            return code
        d = _val(div)
        if not SYNCDIVMIN <= d <= SYNCDIVMAX:
            return E_ARG
        dev.sync_div = d
        return OK

    def _level(self, level: int, edge: int) -> bool:
        return TRGLVLMIN <= level <= TRGLVLMAX and edge in (EDGE_RISING, EDGE_FALLING)

    def _cfd(self, level: int, zc: int) -> bool:
        return CFDLVLMIN <= level <= CFDLVLMAX and CFDZCMIN <= zc <= CFDZCMAX

    def _SetSyncEdgeTrg(self, devidx: Any, level: Any, edge: Any) -> int:
        dev, code = self._dev("SetSyncEdgeTrg", devidx)
        if dev is None:
            return code
        if not self._level(_val(level), _val(edge)):
            return E_ARG
        dev.sync_level = (_val(level), _val(edge))
        return OK

    def _SetSyncCFD(self, devidx: Any, level: Any, zc: Any) -> int:
        dev, code = self._dev("SetSyncCFD", devidx)
        if dev is None:
            return code
        if not self._cfd(_val(level), _val(zc)):
            return E_ARG
        dev.sync_level = (_val(level), _val(zc))
        return OK

    def _SetSyncChannelOffset(self, devidx: Any, value: Any) -> int:
        dev, code = self._dev("SetSyncChannelOffset", devidx)
        if dev is None:
            return code
        v = _val(value)
        if not CHANOFFSMIN <= v <= CHANOFFSMAX:
            return E_ARG
        dev.sync_offset = v
        return OK

    def _SetInputEdgeTrg(self, devidx: Any, channel: Any, level: Any, edge: Any) -> int:
        dev, code = self._dev("SetInputEdgeTrg", devidx)
        if dev is None:
            return code
        ch = self._channel(dev, channel)
        if ch is None or not self._level(_val(level), _val(edge)):
            return E_ARG
        dev.levels[ch] = (_val(level), _val(edge))
        return OK

    def _SetInputCFD(self, devidx: Any, channel: Any, level: Any, zc: Any) -> int:
        dev, code = self._dev("SetInputCFD", devidx)
        if dev is None:
            return code
        ch = self._channel(dev, channel)
        if ch is None or not self._cfd(_val(level), _val(zc)):
            return E_ARG
        dev.levels[ch] = (_val(level), _val(zc))
        return OK

    def _SetInputChannelOffset(self, devidx: Any, channel: Any, value: Any) -> int:
        dev, code = self._dev("SetInputChannelOffset", devidx)
        if dev is None:
            return code
        ch, v = self._channel(dev, channel), _val(value)
        if ch is None or not CHANOFFSMIN <= v <= CHANOFFSMAX:
            return E_ARG
        with dev.lock:
            dev.offsets[ch] = v
        return OK

    def _SetInputChannelEnable(self, devidx: Any, channel: Any, enable: Any) -> int:
        dev, code = self._dev("SetInputChannelEnable", devidx)
        if dev is None:
            return code
        ch, en = self._channel(dev, channel), _val(enable)
        if ch is None or en not in (0, 1):
            return E_ARG
        with dev.lock:
            dev.enabled[ch] = bool(en)
        return OK

    def _StartMeas(self, devidx: Any, tacq: Any) -> int:
        dev, code = self._dev("StartMeas", devidx)
        if dev is None:
            return code
        t = _val(tacq)
        if not ACQTMIN <= t <= ACQTMAX:
            return E_ARG
        if dev.mode != MODE_T2:
            return E_MODE  # only T2 is modelled
        if not dev.calibrated:
            return -23  # ERROR_NOT_CALIBRATED
        with dev.lock:
            if dev._running:
                return E_RUNNING
            dev.start(t)
        return OK

    def _StopMeas(self, devidx: Any) -> int:
        dev, code = self._dev("StopMeas", devidx)
        if dev is None:
            return code
        with dev.lock:
            dev.stop()
        return OK

    def _CTCStatus(self, devidx: Any, ctcstatus: Any) -> int:
        dev, code = self._dev("CTCStatus", devidx)
        if dev is None:
            return code
        with dev.lock:
            dev.generate()
            _out(ctcstatus).value = 0 if dev._running else 1
        return OK

    def _GetResolution(self, devidx: Any, resolution: Any) -> int:
        dev, code = self._dev("GetResolution", devidx)
        if dev is None:
            return code
        _out(resolution).value = dev.resolution_ps
        return OK

    def _GetSyncRate(self, devidx: Any, syncrate: Any) -> int:
        dev, code = self._dev("GetSyncRate", devidx)
        if dev is None:
            return code
        _out(syncrate).value = int(round(dev.sync_rate_hz))
        return OK

    def _GetCountRate(self, devidx: Any, channel: Any, cntrate: Any) -> int:
        dev, code = self._dev("GetCountRate", devidx)
        if dev is None:
            return code
        ch = self._channel(dev, channel)
        if ch is None:
            return E_ARG
        _out(cntrate).value = int(round(dev._rates[ch + 1]))
        return OK

    def _GetFlags(self, devidx: Any, flags: Any) -> int:
        dev, code = self._dev("GetFlags", devidx)
        if dev is None:
            return code
        with dev.lock:
            _out(flags).value = dev.flags()
        return OK

    def _GetWarnings(self, devidx: Any, warnings: Any) -> int:
        dev, code = self._dev("GetWarnings", devidx)
        if dev is None:
            return code
        _out(warnings).value = WARNING_COUNTS_DROPPED if dev._dropped else 0
        return OK

    def _GetElapsedMeasTime(self, devidx: Any, elapsed: Any) -> int:
        dev, code = self._dev("GetElapsedMeasTime", devidx)
        if dev is None:
            return code
        _out(elapsed).value = dev.elapsed_ps() / 1e9 if hasattr(dev, "_t0") else 0.0
        return OK

    def _ReadFiFo(self, devidx: Any, buffer: Any, *rest: Any) -> int:
        if self.family.prefix == "HH":  # HH_ReadFiFo(dev, buffer, count, &nactual)
            if len(rest) != 2:
                return E_ARG
            capacity, nactual = _val(rest[0]), rest[1]
            if capacity <= 0:
                return E_ARG
        else:  # MH_ReadFiFo(dev, buffer, &nactual): the buffer holds TTREADMAX records
            if len(rest) != 1:
                return E_ARG
            capacity, nactual = self.TTREADMAX, rest[0]
        dev, code = self._dev("ReadFiFo", devidx)
        if dev is None:
            return code
        if dev.mode not in (MODE_T2, MODE_T3):
            return E_MODE
        with dev.lock:
            dev.generate()
            rec = dev.read_fifo(min(capacity, self.TTREADMAX))
        n = int(rec.shape[0])
        if n:
            ctypes.memmove(buffer, rec.ctypes.data, 4 * n)
        _out(nactual).value = n
        return OK


def load_library(family: str = "multiharp") -> HarpLibrary:
    """The stand-in library of a family (``"multiharp"`` -> MHLib, ``"hydraharp"`` -> HHLib)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown PicoQuant family {family!r}; allowed: {', '.join(sorted(FAMILIES))}")
    return HarpLibrary(family)
