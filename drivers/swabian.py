"""Swabian Instruments Time Tagger (20, Ultra, X) through the vendor's Python API and a TimeTagStream.

Entry point ``swabian.timetagger``. The vendor library is imported lazily, at connect, from the module
named by option ``api_module`` (default ``Swabian.TimeTagger``, the PyPI package ``Swabian-TimeTagger``;
falling back to ``TimeTagger``, the name older installers use). A missing library fails connect with an
ImportError that says what to install; the daemon keeps retrying with backoff.

**Tested against a stand-in, not the vendor library.** The Swabian library cannot run here (no device, no
licence), so this driver is tested against drivers/sim/vendor/swabian.py, a stand-in of the API built from
its documented behaviour (same names, signatures, dtypes, event types, buffer truncation, int64 wrap). The
simulated testbed uses the same stand-in (``api_module = "drivers.sim.vendor.swabian"``). What the stand-in
does not cover is listed in docs/hardware/swabian.md.

What the driver does:

* connect: ``createTimeTagger(serial)``; checks the configured inputs exist (``getChannelList``); applies
  trigger levels (V), dead times and input delays (integer ps); ``sync()``.
* ``start_stream``: ``TimeTagStream(tagger, stream_buffer_events, channels)`` (a restart: ``clear()`` and
  ``start()``); ``stop_stream`` stops it.
* ``read``: one ``getData()`` per call (paced by ``read_interval_ms``), converted with numpy (no per-tag
  Python loop): TimeTag events become tags; physical inputs (1-based, negative = falling edge) map to the
  0-based TagBatch channels in the order of option ``channels``; OverflowBegin/OverflowEnd set
  ``OVERFLOW`` on every batch that overlaps the overflow (the state carries across batches until the
  OverflowEnd); MissedEvents set ``MISSED_EVENTS`` and add their counts to ``missed_events``; Error events
  set ``OVERFLOW`` (the data path failed: the interval is not trustworthy) and are logged; a buffer that
  came back full (``size == stream_buffer_events``: the library discarded what came after) sets
  ``OVERFLOW`` and is logged.
* time: the tagger counts int64 ps from its start-up and wraps after about 106.75 days (to -2^63). The
  driver unwraps by modular (two's-complement) differences from a reference that moves with every batch,
  and reports time relative to the first time the stream reported after connect (so a tagger that has been
  up for 106 days does not run out of int64 range). One driver instance can stream for about 106 days;
  after that read raises OverflowError and the daemon reconnects a fresh instance (a new time origin).
* interval: ``[t_begin, t_end)`` is contiguous while the stream runs. ``t_end`` is the buffer's
  ``tGetData`` (the tagger time up to which the engine has delivered) when the API provides it
  (``use_buffer_times``), never before the last event + 1 ps. Without buffer times the watermark is the
  last event + 1 ps, so a stream with no events does not advance ``t_end``. After a (re)start the first
  batch begins at the buffer's ``tStart`` (or the first event), so the stopped time is a visible gap.
* order: the tagger delivers a time-sorted stream; the driver checks and sorts (stable) if it is not, and a
  tag earlier than the previous batch's ``t_end`` is dropped, counted (``late_tags``) and flags
  ``OVERFLOW``, so ``t_end`` stays a promise.
* errors: a ValueError/TypeError/OverflowError from a setting is the library refusing it -> DeviceError
  naming the call (device stays ready); anything else (RuntimeError from a lost USB link, ...) propagates and
  the daemon reconnects. A running stream whose ``tGetData`` does not advance for ``timeout_s`` is a lost
  link: read raises TimeoutError.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger
from drivers.params import Field, ParamError
from drivers.tagger_stream import drop_late, import_api, pace, sort_by_time

__all__ = ["SwabianTimeTagger"]

DEFAULT_API = "Swabian.TimeTagger"
FALLBACK_APIS = ("TimeTagger",)
INT64_MAX = (1 << 63) - 1
_U64 = 1 << 64
TAG, ERROR, OVERFLOW_BEGIN, OVERFLOW_END, MISSED_EVENTS = 0, 1, 2, 3, 4  # TimeTagStreamBuffer.getEventTypes()
REFUSED = (ValueError, TypeError, OverflowError)  # the library refusing an argument: the link is fine


def _wrap_diff(a: int, b: int) -> int:
    """a - b in two's-complement int64 arithmetic (the tagger's clock wraps like an int64)."""
    d = (int(a) - int(b)) % _U64
    return d - _U64 if d > INT64_MAX else d


def _number_or_list(name: str, value: Any, n: int, integer: bool) -> list[ParamError]:
    if value is None:
        return []
    kind = "integer" if integer else "number"
    items = value if isinstance(value, list) else [value]
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and (not integer or float(v).is_integer()) for v in items)
    if not ok:
        return [ParamError(name, f"expected a {kind} or an array of them, got {value!r}",
                           f"a {kind} for every channel, or an array of one {kind} per channel")]
    if isinstance(value, list) and n and len(value) not in (1, n):
        return [ParamError(name, f"has {len(value)} entries for {n} channels", f"one {kind} or {n} of them")]
    return []


class SwabianTimeTagger(TimeTagger):
    """Swabian Time Tagger via its Python API (tested against the stand-in drivers/sim/vendor/swabian.py)."""

    options = {
        "api_module": Field(str, DEFAULT_API, doc="module of the vendor API; the default falls back to 'TimeTagger' "
                            "(older installs); 'drivers.sim.vendor.swabian' is the stand-in (tests, simulated "
                            "testbed)"),
        "serial": Field(str, "", doc="serial number of the tagger to open; empty: the first one found. In the "
                        "simulated testbed 'sim://bench' (the stand-in accepts the bench in place of a serial)"),
        "channels": Field(list[int], [], doc="physical inputs to stream (1-based, negative = falling edge), in "
                          "the order of the 0-based TagBatch channels; empty: every rising-edge input"),
        "trigger_level_v": Field(Any, None, unit="V", doc="trigger level: one number for every channel, or an "
                                 "array of one per channel; absent: leave the tagger's setting"),
        "dead_time_ps": Field(Any, None, unit="ps", doc="dead time (integer ps): one for every channel or an "
                              "array of one per channel; absent: leave the tagger's setting"),
        "input_delays_ps": Field(list[int], [], unit="ps", doc="input delays applied at connect, one per channel "
                                 "(empty: leave them); a reconnect re-applies these, not later RPC changes"),
        "stream_buffer_events": Field(int, 1_000_000, min=1, max=1_000_000_000,
                                      doc="TimeTagStream n_max_events: events held between two reads; a read "
                                          "that finds it full flags OVERFLOW (events after it were discarded)"),
        "read_interval_ms": Field(float, 20.0, unit="ms", min=0, max=10_000,
                                  doc="read() calls getData at most this often (it waits out the rest)"),
        "timeout_s": Field(float, 10.0, unit="s", min=0.1, max=3600,
                           doc="a running stream whose tagger time (tGetData) stands still this long is a lost "
                               "link: read raises TimeoutError and the daemon reconnects"),
        "use_buffer_times": Field(bool, True, doc="take the batch interval from the buffer's tStart/tGetData "
                                  "when the API has them; false: the watermark is the last event + 1 ps"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors: list[ParamError] = []
        chans = opts["channels"]
        if any(c == 0 for c in chans):
            errors.append(ParamError("channels", "0 is not an input",
                                     "inputs numbered from 1 (negative: falling edge)"))
        if len(set(chans)) != len(chans):
            errors.append(ParamError("channels", "lists an input twice", "each input at most once"))
        if len(chans) > 255:
            errors.append(ParamError("channels", f"{len(chans)} inputs", "at most 255 (uint8 channel indices)"))
        n = len(chans)
        errors += _number_or_list("trigger_level_v", opts["trigger_level_v"], n, integer=False)
        errors += _number_or_list("dead_time_ps", opts["dead_time_ps"], n, integer=True)
        if opts["input_delays_ps"] and n and len(opts["input_delays_ps"]) != n:
            errors.append(ParamError("input_delays_ps", f"has {len(opts['input_delays_ps'])} entries for {n} "
                                     "channels", f"empty or {n} delays in ps"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        opts.update(options)
        super().__init__(name, opts, log)
        self._api: Any = None
        self._api_name = ""
        self._tagger: Any = None
        self._stream: Any = None
        self._streaming = False
        self._phys: list[int] = list(self.opts["channels"])
        self._delays: list[int] = [0] * len(self._phys)
        self._reset_timeline()
        self._stats = {"tags": 0, "batches": 0, "overflow_batches": 0, "missed_events": 0, "errors": 0,
                       "buffer_full": 0, "late_tags": 0, "unknown_channel_tags": 0}

    def _reset_timeline(self) -> None:
        self._ref_raw: int | None = None  # a raw tagger time ...
        self._ref_rel = 0  # ... and the driver time it corresponds to
        self._t_end: int | None = None
        self._restarted = True
        self._in_overflow = False
        self._last_get = 0.0
        self._stall_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _import_api(self) -> Any:
        mod, self._api_name = import_api(
            self.name, self.opts["api_module"], DEFAULT_API, FALLBACK_APIS, "Swabian Time Tagger API",
            "Install the Time Tagger software: `pip install Swabian-TimeTagger` (module Swabian.TimeTagger) or the "
            "vendor installer (older versions: module TimeTagger), in the Python environment the daemon runs in; or "
            "set option api_module to the stand-in 'drivers.sim.vendor.swabian' for a simulated testbed"
        )
        return mod

    def connect(self) -> None:
        self._api = api = self._import_api()
        serial = self.opts["serial"]
        self._tagger = t = api.createTimeTagger(serial)  # RuntimeError when no device: a connect failure
        edge = getattr(api, "ChannelEdge", None)
        rising = list(t.getChannelList(edge.Rising)) if edge is not None else list(t.getChannelList())
        rising = [c for c in rising if c > 0] or rising
        available = set(rising)
        if edge is not None and hasattr(edge, "Falling"):
            available |= set(t.getChannelList(edge.Falling))
        if not self._phys:
            self._phys = sorted(rising)
        missing = [c for c in self._phys if c not in available]
        if missing:
            raise DeviceError(f"input(s) {missing} do not exist on this tagger (it has {sorted(available)})",
                              "getChannelList")
        if len(self._phys) > 255:
            raise DeviceError(f"{len(self._phys)} inputs do not fit uint8 channel indices", "getChannelList")
        n = len(self._phys)
        self._delays = [0] * n
        self._sorted_phys = np.array(sorted(self._phys), np.int64)
        self._sorted_index = np.array([self._phys.index(c) for c in sorted(self._phys)], np.uint8)
        levels = self._per_channel(self.opts["trigger_level_v"], float)
        for ch, v in zip(self._phys, levels or []):
            self._call("setTriggerLevel", t.setTriggerLevel, ch, v)
        deads = self._per_channel(self.opts["dead_time_ps"], int)
        for ch, ps in zip(self._phys, deads or []):
            self._call("setDeadtime", t.setDeadtime, ch, ps)
        for i, ps in enumerate(self.opts["input_delays_ps"][:n]):
            self._call("setInputDelay", t.setInputDelay, self._phys[i], int(ps))
            self._delays[i] = int(ps)
        if hasattr(t, "sync"):
            t.sync()  # settings are in effect for every tag after this
        self._reset_timeline()
        self.log.info("Swabian Time Tagger connected", api=self._api_name, channels=self._phys,
                      model=str(t.getModel()))

    def _per_channel(self, value: Any, cast: type) -> list | None:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        if len(items) == 1:
            items = items * len(self._phys)
        if len(items) != len(self._phys):
            raise DeviceError(f"{len(items)} values for {len(self._phys)} channels", "connect")
        return [cast(v) for v in items]

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except REFUSED as e:
            raise DeviceError(f"refused {args!r}: {e}", what) from None

    def close(self) -> None:
        self._streaming = False
        stream, self._stream = self._stream, None
        tagger, self._tagger = self._tagger, None
        if stream is not None:
            try:
                stream.stop()
            except Exception as e:  # noqa: BLE001 - the link may be gone; close must not raise
                self.log.info("stream stop on close failed", error=f"{type(e).__name__}: {e}")
        if tagger is not None and self._api is not None:
            try:
                self._api.freeTimeTagger(tagger)
            except Exception as e:  # noqa: BLE001
                self.log.info("freeTimeTagger failed", error=f"{type(e).__name__}: {e}")

    def describe(self) -> dict[str, Any]:
        t = self._require()
        out = {"vendor": "Swabian Instruments", "model": str(t.getModel()), "serial": str(t.getSerial()),
               "api_module": self._api_name}
        version = getattr(self._api, "getVersion", None)
        if callable(version):
            out["api_version"] = str(version())
        return out

    def _require(self) -> Any:
        if self._tagger is None:
            raise ConnectionError(f"{self.name}: the Time Tagger is not open (connect first)")
        return self._tagger

    @property
    def channel_count(self) -> int:
        return len(self._phys)

    @property
    def resolution_ps(self) -> int:
        return 1  # timestamps are integer ps; the timing jitter depends on the model

    # -- streaming ---------------------------------------------------------------------------------------
    def start_stream(self) -> None:
        t = self._require()
        if self._streaming:
            return
        if self._stream is None:
            self._stream = self._api.TimeTagStream(t, int(self.opts["stream_buffer_events"]), list(self._phys))
        else:
            self._stream.clear()  # what was left from before the stop is stale: the restart is a gap
            self._stream.start()
        self._streaming = True
        self._restarted = True
        self._in_overflow = False
        self._stall_since = None
        self._last_get = 0.0

    def stop_stream(self) -> None:
        was, self._streaming = self._streaming, False
        if was and self._stream is not None:
            self._stream.stop()

    def read(self, timeout_s: float) -> TagBatch | None:
        stream = self._stream  # close() may run concurrently (from the daemon's closer thread)
        if not self._streaming or stream is None:
            return None
        pace(self._last_get, self.opts["read_interval_ms"], timeout_s)
        buf = stream.getData()
        self._last_get = time.monotonic()
        return self._convert(buf)

    # -- conversion (numpy only) -------------------------------------------------------------------------
    def _unwrap(self, raw: np.ndarray) -> np.ndarray:
        """Raw tagger times -> driver times (int64), by wrapping differences from the reference."""
        assert self._ref_raw is not None
        d = (raw.view(np.uint64) - np.uint64(self._ref_raw % _U64)).view(np.int64)
        if self._ref_rel + int(d.max()) > INT64_MAX:
            raise OverflowError(f"{self.name}: tagger time left the int64 range of this driver instance (about 106 "
                                "days of streaming); reconnect for a new time origin")
        return d + np.int64(self._ref_rel)

    def _rel(self, raw: int) -> int:
        assert self._ref_raw is not None
        rel = self._ref_rel + _wrap_diff(raw, self._ref_raw)
        if rel > INT64_MAX:
            raise OverflowError(f"{self.name}: tagger time left the int64 range of this driver instance")
        return rel

    def _convert(self, buf: Any) -> TagBatch:
        n = int(_attr(buf, "size"))
        raw = np.asarray(buf.getTimestamps(), dtype=np.int64)
        chan = np.asarray(buf.getChannels())
        types = np.asarray(buf.getEventTypes())
        missed = np.asarray(buf.getMissedEvents())
        if not (len(raw) == len(chan) == len(types) == len(missed) == n):
            raise DeviceError(f"buffer arrays disagree in length (size {n}: {len(raw)} timestamps, {len(chan)} "
                              f"channels, {len(types)} types, {len(missed)} missed)", "TimeTagStream.getData")
        t_start = t_get = None
        if self.opts["use_buffer_times"]:
            t_start, t_get = getattr(buf, "tStart", None), getattr(buf, "tGetData", None)
            if t_start is None or t_get is None:
                t_start = t_get = None
        if self._ref_raw is None:  # the time origin: the first time the stream reports
            origin = t_start if t_start is not None else (int(raw[0]) if n else None)
            if origin is None:
                return self._batch_empty()
            self._ref_raw, self._ref_rel = int(origin), 0

        flags = TagFlags.NONE
        missed_total = 0
        rel = self._unwrap(raw) if n else np.empty(0, np.int64)
        end_rel = self._rel(t_get) if t_get is not None else None
        begin_rel = self._rel(t_start) if t_start is not None else None
        # the reference follows the stream, so the wrap arithmetic never spans more than one batch
        if end_rel is not None:
            self._ref_raw, self._ref_rel = int(t_get), end_rel
        elif n:
            self._ref_raw, self._ref_rel = int(raw[-1]), int(rel[-1])

        # event types
        is_tag = types == TAG
        overflow = self._in_overflow
        if n and not is_tag.all():
            marker = (types == OVERFLOW_BEGIN) | (types == OVERFLOW_END)
            idx = np.flatnonzero(marker)
            if idx.size:
                overflow = True
                self._in_overflow = bool(types[idx[-1]] == OVERFLOW_BEGIN)
            me = types == MISSED_EVENTS
            if me.any():
                missed_total = int(missed[me].astype(np.int64).sum())
                flags |= TagFlags.MISSED_EVENTS
            bad = (types == ERROR) | (types > MISSED_EVENTS)
            if bad.any():
                overflow = True
                self._stats["errors"] += int(bad.sum())
                self.log.warning("tagger reported error events in the stream; batch flagged overflow",
                                 errors=int(bad.sum()), at_ps=int(rel[np.flatnonzero(bad)[0]]))
        if bool(_attr(buf, "hasOverflows")):
            overflow = True
        if n >= int(self.opts["stream_buffer_events"]):
            overflow = True
            self._stats["buffer_full"] += 1
            self.log.warning("TimeTagStream buffer came back full: events after it were discarded; batch flagged "
                             "overflow (raise stream_buffer_events or read more often)", size=n)

        ts = rel[is_tag] if n else rel
        ch = np.empty(0, np.uint8)
        if len(ts):
            phys = chan[is_tag].astype(np.int64)
            pos = np.searchsorted(self._sorted_phys, phys)
            pos = np.minimum(pos, len(self._sorted_phys) - 1)
            known = self._sorted_phys[pos] == phys
            if not known.all():
                self._stats["unknown_channel_tags"] += int((~known).sum())
                ts, pos = ts[known], pos[known]
            ch = self._sorted_index[pos]
            ts, ch = sort_by_time(ts, ch)

        # the interval
        if self._restarted:
            if begin_rel is not None:
                t_begin = begin_rel
            elif n:
                t_begin = int(rel.min())
            else:
                return self._batch_empty()
            if self._t_end is not None:
                t_begin = max(t_begin, self._t_end)
            self._restarted = False
        else:
            t_begin = self._t_end if self._t_end is not None else 0
            if begin_rel is not None and begin_rel > t_begin:
                t_begin = begin_rel  # the tagger says data between was not delivered: a visible gap
        ts, ch, late = drop_late(ts, ch, t_begin, self.log)
        if late:
            self._stats["late_tags"] += late
            overflow = True
        t_end = t_begin
        if end_rel is not None:
            t_end = max(t_end, end_rel)
        if n:
            t_end = max(t_end, int(rel.max()) + 1)
        if end_rel is not None:
            self._watch_stall(t_end)
        self._t_end = t_end
        if overflow:
            flags |= TagFlags.OVERFLOW
            self._stats["overflow_batches"] += 1
        self._stats["tags"] += len(ts)
        self._stats["batches"] += 1
        self._stats["missed_events"] += missed_total
        return TagBatch(np.ascontiguousarray(ts), np.ascontiguousarray(ch), t_begin, t_end, flags, missed_total)

    def _batch_empty(self) -> TagBatch:
        t = self._t_end if self._t_end is not None else 0
        self._stats["batches"] += 1
        return TagBatch.empty(t, t)

    def _watch_stall(self, t_end: int) -> None:
        """With buffer times, tagger time must advance; a frozen clock means the link is gone."""
        now = time.monotonic()
        if self._t_end is None or t_end > self._t_end:
            self._stall_since = None
            return
        if self._stall_since is None:
            self._stall_since = now
        elif now - self._stall_since > self.opts["timeout_s"]:
            raise TimeoutError(f"{self.name}: tagger time has not advanced for {self.opts['timeout_s']:g} s while "
                               "streaming: link lost")

    # -- RPC ---------------------------------------------------------------------------------------------
    def set_input_delay(self, channel: int, picoseconds: int) -> None:
        t = self._require()
        if not 0 <= channel < len(self._phys):
            raise DeviceError(f"channel {channel} does not exist (0..{len(self._phys) - 1})", "set_input_delay")
        self._call("setInputDelay", t.setInputDelay, self._phys[channel], int(picoseconds))
        self._delays[channel] = int(picoseconds)

    def status(self) -> dict:
        t = self._require()
        delays = []
        for i, ch in enumerate(self._phys):
            get = getattr(t, "getInputDelay", None)
            delays.append(int(get(ch)) if callable(get) else self._delays[i])
        out: dict[str, Any] = {
            "channels": len(self._phys),
            "inputs": list(self._phys),
            "resolution_ps": 1,
            "input_delays_ps": delays,
            "streaming": self._streaming,
            "time_ps": self._t_end,
            "in_overflow": self._in_overflow,
            **self._stats,
        }
        if hasattr(t, "getOverflows"):
            out["tagger_overflows"] = int(t.getOverflows())
        return out


def _attr(obj: Any, name: str) -> Any:
    """A buffer attribute that some API versions expose as a method."""
    value = getattr(obj, name)
    return value() if callable(value) else value
