"""qutools quTAG time-to-digital converter through the vendor's ctypes wrapper (``QuTAG_HR.py`` / ``QuTAG_MC.py``).

Entry point ``qutools.qutag``. The wrapper module is imported lazily, at connect, by the name in option
``api_module`` (default ``QuTAG_HR``, falling back to ``QuTAG_MC`` and ``QuTAG``); it must be on the daemon's
Python path together with the ``tdcbase`` library it loads (``libtdcbase.so`` / ``tdcbase.dll``). A
missing wrapper or library fails connect with an ImportError that says what to install.

**Tested against a stand-in, not the vendor library.** The quTAG library cannot run here (no device, and
the wrapper loads the DLL from a fixed path), so this driver is tested against drivers/sim/vendor/qutag.py,
a stand-in of the wrapper and DLL built from their documented behaviour (tdcbase.h, the demo wrapper):
buffer size 0 by default, ``valid`` counts, a latched data-lost flag, demo mode without a device, integer
error codes. The simulated testbed uses it too (``api_module = "drivers.sim.vendor.qutag"``, with
``sim_device = "sim://bench"``). What it does not cover is in docs/hardware/qutag.md.

What the driver does:

* connect: ``QuTAG()`` (``TDC_init(-1)``: the first device found). The wrapper only *prints* an init error
  and the library then runs in demo mode (every call succeeds, no timestamps), so the driver checks
  ``getDeviceType() == DEVTYPE_QUTAG`` and fails connect otherwise. It checks the timebase (seconds per
  tick; positive, 0.1 ps to 1 us, and an exact rational number of ps with a denominator <= 1000, which is
  what makes tick -> ps conversion exact in integers). It **sets the timestamp buffer size** (option
  ``buffer_size``): the DLL's default is 0, which makes ``getLastTimestamps`` return no timestamps at all;
  the demo wrapper happens to set 1 000 000 in its constructor, but a lab wrapper or a direct DLL user may
  not, so the driver never relies on it. Then enables exactly the configured inputs (start input off: in
  four-channel mode it would reset the clock), signal conditioning, exposure time, input delays, and
  freezes the buffer until ``start_stream``.
* ``start_stream``: discards what the buffer holds, unfreezes it; ``stop_stream`` freezes it.
* ``read``: ``getLastTimestamps(reset=True)`` (paced by ``read_interval_ms``); keeps the first ``valid``
  entries; maps buffer channels to 0-based TagBatch channels (option ``channels``, and ``buffer_channels``
  for the buffer's numbering); converts ticks to ps exactly in int64 (``ps = floor(ticks * n / d)`` for a
  timebase of ``n/d`` ps, split so it cannot overflow); unwraps a counter narrower than 64 bits
  (``wrap_bits``) by signed modular differences between consecutive timestamps; reports time relative to
  the first timestamp after connect. All numpy, no per-tag Python loop.
* flags: ``getDataLost`` is called twice after each read: the first call returns the loss latched since
  the previous call (or current), the second the current state. Either sets ``OVERFLOW`` on this batch and,
  because the loss may concern tags that reach the buffer after this read, on the next batch too. A read
  that returns ``valid == buffer_size`` means the ring buffer may have overwritten older events: ``OVERFLOW``.
  A clock that jumps back by more than 1 us (a reset by the start input or a re-init) is re-anchored so time
  stays monotonic, and flags ``OVERFLOW``; a tag earlier than the previous ``t_end`` is dropped and counted
  (``late_tags``), with ``OVERFLOW``.
* interval: ``[t_begin, t_end)`` is contiguous while streaming; ``t_end`` is the last tag + 1 ps (the
  buffer API carries no time without events, so idle inputs do not advance ``t_end``).
* errors: the wrapper's setters return integer codes: 0 is OK; 1 (timeout), 2 (not connected), 3 (USB
  driver) and 12 (not initialized) mean the link is gone (TimeoutError / ConnectionError: the daemon
  reconnects); every other code is a DeviceError naming the call. A read that finds no events checks
  ``getDeviceType``: a device that reads as DEVTYPE_NONE has gone away (ConnectionError).
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Any

import numpy as np

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger
from drivers.params import Field, ParamError
from drivers.tagger_stream import drop_late, import_api, pace, sort_by_time

__all__ = ["QuTAG"]

DEFAULT_API = "QuTAG_HR"
FALLBACK_APIS = ("QuTAG_MC", "QuTAG")
DEVTYPE_QUTAG = 0
SCOND = {"LVTTL": 1, "NIM": 2, "MISC": 3}
ERRORS = {-1: "unspecified error", 0: "no error", 1: "receive timed out", 2: "no connection was established",
          3: "error accessing the USB driver", 7: "device already in use", 9: "invalid device number",
          10: "parameter out of range", 11: "failed to open file", 12: "library has not been initialized",
          13: "requested feature is not enabled", 14: "requested feature is not available"}
LINK_LOST = {2, 3, 12}
INT64_MAX = (1 << 63) - 1
RESET_JUMP_PS = 1_000_000  # a backward step larger than this is a clock reset, not re-sorting (delays <= 100 ns)
MAX_DENOMINATOR = 1000


class QuTAG(TimeTagger):
    """qutools quTAG via its ctypes wrapper (tested against the stand-in drivers/sim/vendor/qutag.py)."""

    options = {
        "api_module": Field(str, DEFAULT_API, doc="wrapper module to import; the default falls back to QuTAG_MC "
                            "and QuTAG; 'drivers.sim.vendor.qutag' is the stand-in (tests, simulated testbed)"),
        "sim_device": Field(Any, None, doc="simulated testbed only: 'sim://bench' (the daemon substitutes its "
                            "bench), plugged into the stand-in's bus before connecting; must stay unset with the "
                            "vendor wrapper"),
        "channels": Field(list[int], [1, 2, 3, 4], doc="inputs to stream, as labelled on the device (1-based), in "
                          "the order of the 0-based TagBatch channels"),
        "buffer_channels": Field(list[int], [], doc="the channel number getLastTimestamps reports for each input "
                                 "in `channels`; empty: input - 1 (tdcbase.h: 0...7 for inputs 1...8)"),
        "buffer_size": Field(int, 1_000_000, min=1, max=1_000_000,
                             doc="timestamp ring buffer (events kept between two reads); set at connect because "
                                 "the DLL's default, 0, returns no timestamps"),
        "threshold_v": Field(float | None, None, unit="V", min=-2.0, max=3.0,
                             doc="trigger threshold for every streamed input; absent: leave signal conditioning "
                                 "as it is"),
        "signal_conditioning": Field(str, "MISC", choices=tuple(SCOND), doc="conditioning type when threshold_v is "
                                     "set (LVTTL and NIM fix the edge and threshold in the device)"),
        "rising_edge": Field(bool, True, doc="trigger on the rising (true) or falling edge, when threshold_v is set"),
        "exposure_ms": Field(int | None, None, unit="ms", min=0, max=65535,
                             doc="exposure time of the device's coincidence counters; absent: leave it"),
        "input_delays_ps": Field(list[int], [], unit="ps", min=-100_000, max=100_000,
                                 doc="input delays applied at connect, one per channel (empty: leave them); a "
                                     "reconnect re-applies these, not later RPC changes"),
        "wrap_bits": Field(int, 64, min=16, max=64, doc="width of the timestamp counter in bits (64: an int64 that "
                           "wraps like Swabian's); a narrower counter is unwrapped by modular differences, valid "
                           "while consecutive events are less than half its range apart"),
        "read_interval_ms": Field(float, 20.0, unit="ms", min=0, max=10_000,
                                  doc="read() polls the buffer at most this often (it waits out the rest)"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors: list[ParamError] = []
        chans = opts["channels"]
        if not chans:
            errors.append(ParamError("channels", "is empty", "at least one input (1-based)"))
        if any(c < 1 for c in chans):
            errors.append(ParamError("channels", f"{chans!r} has an input below 1", "inputs numbered from 1"))
        if len(set(chans)) != len(chans):
            errors.append(ParamError("channels", "lists an input twice", "each input at most once"))
        for key in ("buffer_channels", "input_delays_ps"):
            if opts[key] and len(opts[key]) != len(chans):
                errors.append(ParamError(key, f"has {len(opts[key])} entries for {len(chans)} channels",
                                         f"empty or {len(chans)} entries"))
        if opts["buffer_channels"] and not all(-128 <= c <= 127 for c in opts["buffer_channels"]):
            errors.append(ParamError("buffer_channels", "out of the int8 range", "-128..127"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        opts.update(options)
        super().__init__(name, opts, log)
        self._api: Any = None
        self._api_name = ""
        self._q: Any = None
        self._streaming = False
        self._inputs: list[int] = list(self.opts["channels"])
        bc = list(self.opts["buffer_channels"]) or [c - 1 for c in self._inputs]
        self._lut = np.full(256, 255, np.uint8)  # int8 buffer channel + 128 -> 0-based index (255: not ours)
        for i, c in enumerate(bc):
            self._lut[c + 128] = i
        self._delays = [0] * len(self._inputs)
        self._num = 1  # ps per tick = num / den
        self._den = 1
        self._timebase_s = 0.0
        self._buffer_size = int(self.opts["buffer_size"])
        self._ref_raw: int | None = None  # last raw tick value seen ...
        self._ref_ticks = 0  # ... and its unwrapped ticks relative to the origin
        self._t_end: int | None = None
        self._restarted = True
        self._loss_carry = False
        self._loss_now = False
        self._last_get = 0.0
        self._stats = {"tags": 0, "batches": 0, "overflow_batches": 0, "data_lost_reads": 0, "buffer_full": 0,
                       "late_tags": 0, "clock_resets": 0, "unknown_channel_tags": 0}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _import_api(self) -> Any:
        mod, self._api_name = import_api(
            self.name, self.opts["api_module"], DEFAULT_API, FALLBACK_APIS, "quTAG Python wrapper",
            "Install the qutools quTAG software and put its wrapper (QuTAG_HR.py or QuTAG_MC.py from userlib/src) "
            "and the tdcbase library (libtdcbase.so / tdcbase.dll) on the daemon's Python path; or set option "
            "api_module to the stand-in 'drivers.sim.vendor.qutag' for a simulated testbed"
        )
        return mod

    def connect(self) -> None:
        self._api = api = self._import_api()
        sim = self.opts["sim_device"]
        if sim is not None:
            plug = getattr(api, "plug", None)
            if not callable(plug):
                raise ConnectionError(f"{self.name}: option sim_device is set but {self._api_name} is not a stand-in "
                                      "(it has no plug()); remove sim_device for a real quTAG")
            plug(sim)
        try:
            self._q = q = api.QuTAG()  # loads the DLL, TDC_init(-1); init errors are only printed
        except OSError as e:
            raise ImportError(f"{self.name}: the quTAG wrapper {self._api_name} could not load the tdcbase library: "
                              f"{e}. Install the qutools software and make libtdcbase.so / tdcbase.dll loadable") from e
        dev_type = q.getDeviceType()
        if dev_type != getattr(q, "DEVTYPE_QUTAG", DEVTYPE_QUTAG):
            raise ConnectionError(f"{self.name}: no quTAG found (device type {dev_type}: TDC_init connected to nothing "
                                  "and the library runs in demo mode)")
        self._check_timebase(q.getTimebase())
        count = int(q.getChannelCount())
        too_high = [c for c in self._inputs if c > count]
        if too_high:
            raise DeviceError(f"input(s) {too_high} do not exist: the device reports {count} channels",
                              "getChannelCount")
        # the DLL default buffer size is 0, which returns no timestamps at all: always set it
        self._rc("setBufferSize", q.setBufferSize(self._buffer_size))
        mask = 0
        for c in self._inputs:
            mask |= 1 << (c - 1)
        self._rc("enableChannels", q.enableChannels(False, format(mask, "b")))
        if self.opts["threshold_v"] is not None:
            cond = SCOND[self.opts["signal_conditioning"]]
            for c in self._inputs:
                self._rc("setSignalConditioning", q.setSignalConditioning(c, cond, bool(self.opts["rising_edge"]),
                                                                         float(self.opts["threshold_v"])))
        if self.opts["exposure_ms"] is not None:
            self._rc("setExposureTime", q.setExposureTime(int(self.opts["exposure_ms"])))
        for i, ps in enumerate(self.opts["input_delays_ps"]):
            self._rc("setChannelDelay", q.setChannelDelay(self._inputs[i], int(ps)))
            self._delays[i] = int(ps)
        if hasattr(q, "freezeBuffers"):
            self._rc("freezeBuffers", q.freezeBuffers(True))  # nothing accumulates until start_stream
        self.log.info("quTAG connected", api=self._api_name, inputs=self._inputs, timebase_s=self._timebase_s,
                      buffer_size=self._buffer_size)

    def _check_timebase(self, timebase_s: Any) -> None:
        tb = float(timebase_s)
        if not math.isfinite(tb) or not 1e-13 <= tb <= 1e-6:
            raise DeviceError(f"timebase {timebase_s!r} s per tick is not plausible (0.1 ps .. 1 us)", "getTimebase")
        ps = tb * 1e12
        frac = Fraction(ps).limit_denominator(MAX_DENOMINATOR)
        if abs(float(frac) - ps) > 1e-9 * ps:
            raise DeviceError(f"timebase {ps!r} ps per tick is not a rational number of ps with a denominator <= "
                              f"{MAX_DENOMINATOR}: ticks cannot be converted to ps exactly", "getTimebase")
        self._timebase_s = tb
        self._num, self._den = frac.numerator, frac.denominator

    def _rc(self, call: str, rc: Any) -> None:
        """Map a wrapper return code: 0 (or None) fine, link codes raise connection errors, others DeviceError."""
        if rc is None or int(rc) == 0:
            return
        rc = int(rc)
        text = ERRORS.get(rc, "unknown error")
        if rc == 1:
            raise TimeoutError(f"{self.name}: {call}: error {rc} ({text})")
        if rc in LINK_LOST:
            raise ConnectionError(f"{self.name}: {call}: error {rc} ({text})")
        raise DeviceError(f"error {rc} ({text})", call)

    def close(self) -> None:
        self._streaming = False
        q, self._q = self._q, None
        if q is not None:
            try:
                q.deInitialize()
            except Exception as e:  # noqa: BLE001 - the link may be gone; close must not raise
                self.log.info("deInitialize failed", error=f"{type(e).__name__}: {e}")

    def describe(self) -> dict[str, Any]:
        q = self._require()
        out: dict[str, Any] = {"vendor": "qutools", "model": "quTAG", "api_module": self._api_name,
                               "timebase_s": self._timebase_s}
        version = getattr(q, "getVersion", None)
        if callable(version):
            out["library_version"] = str(version())
        return out

    def _require(self) -> Any:
        if self._q is None:
            raise ConnectionError(f"{self.name}: the quTAG is not open (connect first)")
        return self._q

    @property
    def channel_count(self) -> int:
        return len(self._inputs)

    @property
    def resolution_ps(self) -> int:
        return max(1, -(-self._num // self._den))  # one tick, rounded up to whole ps

    # -- streaming ---------------------------------------------------------------------------------------
    def start_stream(self) -> None:
        q = self._require()
        if self._streaming:
            return
        q.getLastTimestamps(True)  # drop what arrived before the stream (re)started
        if hasattr(q, "freezeBuffers"):
            self._rc("freezeBuffers", q.freezeBuffers(False))
        self._streaming = True
        self._restarted = True
        self._loss_carry = False
        self._last_get = 0.0

    def stop_stream(self) -> None:
        was, self._streaming = self._streaming, False
        if was and self._q is not None and hasattr(self._q, "freezeBuffers"):
            self._rc("freezeBuffers", self._q.freezeBuffers(True))

    def read(self, timeout_s: float) -> TagBatch | None:
        if not self._streaming:
            return None
        q = self._require()
        pace(self._last_get, self.opts["read_interval_ms"], timeout_s)
        ts_all, ch_all, valid = q.getLastTimestamps(True)
        self._last_get = time.monotonic()
        latched = bool(q.getDataLost())  # loss since the previous call (or now); this call clears the latch
        self._loss_now = bool(q.getDataLost())  # the current state
        valid = int(valid)
        if not 0 <= valid <= len(ts_all) or len(ch_all) < valid:
            raise DeviceError(f"valid count {valid} does not fit the returned arrays ({len(ts_all)}, {len(ch_all)})",
                              "getLastTimestamps")
        if valid == 0 and q.getDeviceType() != getattr(q, "DEVTYPE_QUTAG", DEVTYPE_QUTAG):
            raise ConnectionError(f"{self.name}: the quTAG no longer answers (device type reads as none): link lost")
        lost = latched or self._loss_now
        overflow = lost or self._loss_carry
        self._loss_carry = lost
        if lost:
            self._stats["data_lost_reads"] += 1
            self.log.warning("quTAG reports data loss (USB rate or PC too slow); batches flagged overflow")
        if valid >= self._buffer_size:
            overflow = True
            self._stats["buffer_full"] += 1
            self.log.warning("timestamp buffer came back full: older events may have been overwritten; batch flagged "
                             "overflow (raise buffer_size or read more often)", valid=valid)
        raw = np.asarray(ts_all[:valid], dtype=np.int64)
        bch = np.asarray(ch_all[:valid]).astype(np.int16)
        return self._convert(raw, bch, overflow)

    # -- conversion (numpy only) -------------------------------------------------------------------------
    def _to_ps(self, ticks: np.ndarray) -> np.ndarray:
        """floor(ticks * num / den) exactly in int64, without forming ticks * num."""
        if self._den == 1:
            if len(ticks) and int(ticks.max()) > INT64_MAX // self._num:
                raise OverflowError(f"{self.name}: tagger time left the int64 ps range of this driver instance")
            return ticks * np.int64(self._num)
        q, r = np.divmod(ticks, np.int64(self._den))
        if len(q) and int(q.max()) > INT64_MAX // self._num - 1:
            raise OverflowError(f"{self.name}: tagger time left the int64 ps range of this driver instance")
        return q * np.int64(self._num) + (r * np.int64(self._num)) // np.int64(self._den)

    def _convert(self, raw: np.ndarray, bch: np.ndarray, overflow: bool) -> TagBatch:
        n = len(raw)
        if n and self._ref_raw is None:
            self._ref_raw, self._ref_ticks = int(raw[0]), 0  # time origin: the first timestamp after connect
        ts = np.empty(0, np.int64)
        ch = np.empty(0, np.uint8)
        if n:
            bits = int(self.opts["wrap_bits"])
            prev = np.empty(n, np.int64)
            prev[0] = np.int64(self._ref_raw - (1 << 64) if self._ref_raw > INT64_MAX else self._ref_raw)
            prev[1:] = raw[:-1]
            d = (raw.view(np.uint64) - prev.view(np.uint64)).view(np.int64)  # wrapping int64 difference
            if bits < 64:
                half, mask = np.int64(1 << (bits - 1)), np.int64((1 << bits) - 1)
                d = ((d + half) & mask) - half  # signed difference modulo 2^bits
            reset_ticks = (RESET_JUMP_PS * self._den) // self._num + 1
            resets = d < -reset_ticks
            if resets.any():
                self._stats["clock_resets"] += int(resets.sum())
                overflow = True
                self.log.warning("quTAG clock jumped back (start input or re-init): time re-anchored, batch flagged "
                                 "overflow", resets=int(resets.sum()))
                d = np.where(resets, 0, d)
            ticks = np.cumsum(d) + np.int64(self._ref_ticks)
            self._ref_raw, self._ref_ticks = int(raw[-1]), int(ticks[-1])
            ts = self._to_ps(ticks)
            idx = self._lut[bch + 128]
            known = idx != 255
            if not known.all():
                self._stats["unknown_channel_tags"] += int((~known).sum())
                ts, idx = ts[known], idx[known]
            ch = idx
            ts, ch = sort_by_time(ts, ch)
        if self._restarted:
            if not len(ts):
                t = self._t_end if self._t_end is not None else 0
                self._stats["batches"] += 1
                flags = TagFlags.OVERFLOW if overflow else TagFlags.NONE
                return TagBatch.empty(t, t, flags)
            t_begin = int(ts[0]) if self._t_end is None else max(int(ts[0]), self._t_end)
            self._restarted = False
        else:
            t_begin = self._t_end if self._t_end is not None else 0
        ts, ch, late = drop_late(ts, ch, t_begin, self.log)
        if late:
            self._stats["late_tags"] += late
            overflow = True
        t_end = max(t_begin, int(ts[-1]) + 1) if len(ts) else t_begin
        self._t_end = t_end
        flags = TagFlags.OVERFLOW if overflow else TagFlags.NONE
        if overflow:
            self._stats["overflow_batches"] += 1
        self._stats["tags"] += len(ts)
        self._stats["batches"] += 1
        return TagBatch(np.ascontiguousarray(ts), np.ascontiguousarray(ch), t_begin, t_end, flags)

    # -- RPC ---------------------------------------------------------------------------------------------
    def set_input_delay(self, channel: int, picoseconds: int) -> None:
        q = self._require()
        if not 0 <= channel < len(self._inputs):
            raise DeviceError(f"channel {channel} does not exist (0..{len(self._inputs) - 1})", "set_input_delay")
        self._rc("setChannelDelay", q.setChannelDelay(self._inputs[channel], int(picoseconds)))
        self._delays[channel] = int(picoseconds)

    def status(self) -> dict:
        q = self._require()
        get = getattr(q, "getChannelDelay", None)
        delays = [int(get(c)) for c in self._inputs] if callable(get) else list(self._delays)
        return {
            "channels": len(self._inputs),
            "inputs": list(self._inputs),
            "resolution_ps": self.resolution_ps,
            "timebase_s": self._timebase_s,
            "input_delays_ps": delays,
            "streaming": self._streaming,
            "time_ps": self._t_end,
            "buffer_size": self._buffer_size,
            "data_loss_now": self._loss_now,
            **self._stats,
        }
