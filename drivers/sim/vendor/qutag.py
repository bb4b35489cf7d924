"""Stand-in of the qutools quTAG Python wrapper (``QuTAG_HR.py`` / ``QuTAG_MC.py``) over its ``tdcbase`` DLL.

The vendor library (``libtdcbase.so`` / ``tdcbase.dll``, loaded by the wrapper with ctypes) cannot run here:
there is no device, and the wrapper loads the DLL from a fixed path. drivers.qutag is therefore tested
against this module, which it imports when ``api_module = "drivers.sim.vendor.qutag"``. It is built from
the documented behaviour (/work/shared/protocols.md 4.2, /work/shared/timetags.md 3, the tdcbase.h comments
and the public demo wrapper's method list); it is not vendor code.

Two layers, as in the real thing:

* :class:`_Library` imitates the DLL (process-global: one connection per process). Its quirks, as tdcbase.h
  documents them: ``TDC_init(-1)`` connects to the first device and returns ``TDC_NotConnected`` (2) when
  there is none, after which the library is in *demo mode* (set/get calls succeed, no timestamps, the device
  type is DEVTYPE_NONE). The timestamp ring buffer has size **0 by default, which returns no timestamps**;
  ``TDC_setTimestampBufferSize`` (1..1 000 000) clears it. ``TDC_getLastTimestamps(reset, ...)`` returns the
  last ``size`` events (older ones are overwritten) and a valid count; it "never fails". Timestamps are in
  ticks of ``TDC_getTimebase`` (seconds per tick); channels are ``input - 1`` (tdcbase.h: "0...7 for
  channels 1...8"). ``TDC_getDataLost`` returns the current *or latched* loss state and clears the latch
  (call it twice for the current state). ``TDC_freezeBuffers`` stops events reaching the buffer. Channel
  delays are ps within +-100 ns, applied in the device with re-sorting. Errors are integer codes (0 OK ... 14).
* :class:`QuTAG` imitates the demo wrapper: ``QuTAG()`` loads the library and calls ``Initialize()``
  (``TDC_init(self.dev_nr = -1)``); an error code there is **printed, not raised**, so a missing device
  silently gives demo mode; the wrapper then sets the buffer size to 1 000 000 itself (class attribute
  :attr:`QuTAG.SET_BUFFER_IN_INIT`, switchable so a test can see the DLL default of 0). Setters return the
  integer code (and print it if nonzero); getters print errors and return the value only.
  ``getLastTimestamps(reset)`` returns ``(int64 timestamps[size], int8 channels[size], valid)``: arrays of
  the full buffer size, only the first ``valid`` entries meaningful. ``enableChannels(enStart, channels)``
  takes a bit string (rightmost bit = input 1), as the HR wrapper does.

Stand-in choices (not documented by the vendor; say so wherever they matter): inputs start disabled (a
driver that forgets enableChannels sees nothing); after a device is unplugged, calls return
``TDC_NotConnected`` (2) and the device type reads DEVTYPE_NONE, while getLastTimestamps still "never fails"
(valid 0); the tick counter is an int64 that does not wrap unless :attr:`QuTAGHardware.counter_bits` makes
it narrower (a test control for the driver's unwrap). Not modelled: the start input and its clock reset in
four-channel mode, markers, coincidence counters (getCoincCounters returns zeros), histograms (HBT,
lifetime), filters, signal conditioning and exposure time (recorded only), dead time, file output.

Where the data come from: each :class:`QuTAGHardware` reads a block source (the optical bench or a
PoissonPairSource; input k is the source's channel k - 1). Put it on the stand-in bus with :func:`plug`
(a block source is wrapped once per source). The simulated testbed does that through the driver's
``sim_device = "sim://bench"`` option (the driver calls this module's ``plug`` before ``QuTAG()``).

Test controls on QuTAGHardware: ``advance(ps)``, ``unplug()`` / ``replug()``, ``inject_data_loss(duration_ps)``
(tags lost from now for that long, loss latched), ``data_loss_active`` (current-state flag),
``counter_bits`` / ``start_ticks`` (counter wrap), ``overwritten`` (events the ring buffer lost), ``calls``;
``BUS`` / :func:`unplug_all` for cleanup.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any

import numpy as np

from drivers.sim.vendor._hardware import Bus, SimInputs

__all__ = ["BUS", "QuTAG", "QuTAGHardware", "plug", "unplug_all"]

# tdcdecl.h return codes (the wrapper's err_dict)
TDC_Ok, TDC_Timeout, TDC_NotConnected, TDC_DriverError = 0, 1, 2, 3
TDC_DeviceLocked, TDC_Unknown, TDC_NoSuchDev, TDC_OutOfRange = 7, 8, 9, 10
TDC_FileError, TDC_NotInitialized, TDC_NotEnabled, TDC_NotAvailable = 11, 12, 13, 14
DEVTYPE_QUTAG, DEVTYPE_NONE = 0, 1
MAX_BUFFER = 1_000_000
MAX_DELAY_PS = 100_000  # +-100 ns (tdcbase.h, TDC_setChannelDelays)
TDC_QUTAG_CHANNELS = 5

BUS = Bus()


class QuTAGHardware:
    """One simulated quTAG on the stand-in bus.

    ``timebase_ps``: ps per tick as an exact fraction (the device reports ``float(timebase_ps) * 1e-12`` s).
    ``channels``: number of inputs (default: the source's channel count). ``speed``/``step_ps``: see
    drivers/sim/vendor/_hardware.py. ``device_id``: the user-programmed ID TDC_init matches (-1 matches all).
    """

    def __init__(self, source: Any, *, serial: str = "QT-SIM-0001", device_id: int = 0, timebase_ps: Any = 1,
                 channels: int | None = None, speed: float = 0.0, step_ps: int = 0, counter_bits: int = 64,
                 start_ticks: int = 0) -> None:
        self.inputs = SimInputs(source, channel_count=channels, speed=speed, step_ps=step_ps, latency_ps=MAX_DELAY_PS)
        self.serial = serial
        self.device_id = int(device_id)
        self.timebase_ps = Fraction(timebase_ps)
        if self.timebase_ps <= 0:
            raise ValueError("timebase_ps must be positive")
        if not 2 <= counter_bits <= 64:
            raise ValueError("counter_bits must be within 2..64")
        self.counter_bits = int(counter_bits)
        self.start_ticks = int(start_ticks)
        self.calls: list[tuple[str, tuple]] = []
        self.data_loss_active = False
        self.overwritten = 0  # events the ring buffer dropped because nobody read them in time
        self.lost = 0  # events lost to injected data loss or the source's rate limit
        # device settings (they live in the hardware and survive TDC_init)
        self.enabled_inputs: set[int] = set()
        self.start_enabled = False
        self.delays_ps: dict[int, int] = {}
        self.conditioning: dict[int, tuple[int, bool, float]] = {}
        self.exposure_ms = 100
        self.coinc_window = 0
        self._loss: tuple[int, int] | None = None
        self._latched = False

    # -- test controls -------------------------------------------------------------------------------------
    def advance(self, picoseconds: int) -> None:
        self.inputs.advance(picoseconds)

    def unplug(self) -> None:
        self.inputs.plugged = False

    def replug(self) -> None:
        self.inputs.plugged = True
        self.inputs.discard()
        _LIB.forget(self)  # the library's connection to it is gone: a new TDC_init is needed

    def inject_data_loss(self, duration_ps: int) -> None:
        """From now, for duration_ps of device time, tags do not reach the PC; the loss flag latches."""
        start = max(self.inputs.emitted_ps, self.inputs.now_ps())
        self._loss = (start, start + int(duration_ps))

    # -- data path -------------------------------------------------------------------------------------
    def ticks(self, ps: np.ndarray) -> np.ndarray:
        """Device time in ps -> counter ticks: floor(ps / timebase), exactly, then the counter's width."""
        num, den = self.timebase_ps.numerator, self.timebase_ps.denominator  # ps per tick = num / den
        q, r = np.divmod(ps.astype(np.int64), np.int64(num))
        t = q * np.int64(den) + (r * np.int64(den)) // np.int64(num)
        t = (t.view(np.uint64) + np.uint64(self.start_ticks % (1 << 64))).view(np.int64)
        if self.counter_bits < 64:
            t = t & np.int64((1 << self.counter_bits) - 1)
        return t

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """New events since the last collect: (ticks int64, buffer channel int8), in time order."""
        chunk = self.inputs.take()
        ts, ch = chunk.timestamps, chunk.channels
        if chunk.dropped or chunk.skipped:
            self.lost += chunk.dropped
            self._latched = True
        if self._loss is not None:
            a, b = self._loss
            gone = (ts >= a) & (ts < b)
            if gone.any():
                self.lost += int(gone.sum())
                ts, ch = ts[~gone], ch[~gone]
            if a < chunk.end:
                self._latched = True
            if b <= chunk.end:
                self._loss = None
        if self.data_loss_active:
            self._latched = True
        enabled = np.zeros(self.inputs.channel_count + 1, bool)
        for k in self.enabled_inputs:
            if 1 <= k <= self.inputs.channel_count:
                enabled[k - 1] = True
        keep = enabled[ch]
        ts, ch = ts[keep], ch[keep]
        return self.ticks(ts), ch.astype(np.int8)

    def data_lost(self) -> bool:
        """TDC_getDataLost: current or latched loss; reading clears the latch."""
        lost = self._latched or self.data_loss_active
        self._latched = self.data_loss_active
        return lost


class _Library:
    """The tdcbase DLL: one connection per process, a timestamp ring buffer, integer return codes."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.initialized = False
        self.device: QuTAGHardware | None = None
        self._reset()

    def _reset(self) -> None:
        self.buffer_size = 0
        self.frozen = False
        self._ring_t = np.empty(0, np.int64)
        self._ring_c = np.empty(0, np.int8)

    def forget(self, hw: QuTAGHardware) -> None:
        with self.lock:
            if self.device is hw:
                self.device = None  # still "initialized": calls now report TDC_NotConnected

    # -- state checks ----------------------------------------------------------------------------------
    def _dev(self) -> tuple[int, QuTAGHardware | None]:
        """(rc, device): rc 12 before TDC_init, 2 for a lost device; (0, None) in demo mode."""
        if not self.initialized:
            return TDC_NotInitialized, None
        if self.device is None:
            return (TDC_NotConnected, None) if self._had_device else (TDC_Ok, None)
        if not self.device.inputs.plugged:
            return TDC_NotConnected, None
        return TDC_Ok, self.device

    _had_device = False

    def _record(self, name: str, *args: Any) -> None:
        if self.device is not None:
            self.device.calls.append((name, args))

    # -- TDC_* ----------------------------------------------------------------------------------------
    def init(self, device_id: int) -> int:
        with self.lock:
            self.device = None
            self._reset()
            self.initialized = True
            self._had_device = False
            for hw in BUS.devices():
                if device_id in (-1, hw.device_id):
                    self.device = hw
                    self._had_device = True
                    hw.inputs.discard()
                    hw.calls.append(("TDC_init", (device_id,)))
                    return TDC_Ok
            return TDC_NotConnected  # ignored by the caller: demo mode

    def deinit(self) -> int:
        with self.lock:
            self._record("TDC_deInit")
            self.device = None
            self.initialized = False
            self._had_device = False
            self._reset()
            return TDC_Ok

    def dev_type(self) -> int:
        rc, dev = self._dev()
        return DEVTYPE_QUTAG if rc == TDC_Ok and dev is not None else DEVTYPE_NONE

    def channel_count(self) -> int:
        _, dev = self._dev()
        if dev is not None:
            return dev.inputs.channel_count
        devices = BUS.devices()
        return devices[0].inputs.channel_count if devices else TDC_QUTAG_CHANNELS

    def timebase(self) -> tuple[int, float]:
        rc, dev = self._dev()
        if dev is None:
            return (rc or TDC_NotConnected), 0.0  # no longer possible without a device (tdcbase.h)
        return TDC_Ok, float(dev.timebase_ps) * 1e-12

    def setter(self, name: str, apply: Any, *args: Any) -> int:
        with self.lock:
            rc, dev = self._dev()
            if rc != TDC_Ok:
                return rc
            if dev is None:
                return TDC_Ok  # demo mode: every setting "succeeds"
            rc = apply(dev, *args)
            self._record(name, *args)
            return rc

    def set_buffer_size(self, size: int) -> int:
        with self.lock:
            rc, _ = self._dev()
            if rc != TDC_Ok:
                return rc
            if not 1 <= size <= MAX_BUFFER:
                return TDC_OutOfRange
            self._pump()
            self.buffer_size = int(size)
            self._ring_t, self._ring_c = np.empty(0, np.int64), np.empty(0, np.int8)  # "the buffer is cleared"
            self._record("TDC_setTimestampBufferSize", size)
            return TDC_Ok

    def freeze(self, freeze: bool) -> int:
        with self.lock:
            rc, _ = self._dev()
            if rc != TDC_Ok:
                return rc
            self._pump()
            self.frozen = bool(freeze)
            self._record("TDC_freezeBuffers", bool(freeze))
            return TDC_Ok

    def _pump(self) -> None:
        _, dev = self._dev()
        if dev is None:
            return
        if self.frozen or self.buffer_size == 0:
            dev.inputs.discard()
            return
        t, c = dev.collect()
        if len(t):
            t = np.concatenate([self._ring_t, t])
            c = np.concatenate([self._ring_c, c])
            if len(t) > self.buffer_size:  # a ring: the oldest events are overwritten
                dev.overwritten += len(t) - self.buffer_size
                t, c = t[-self.buffer_size:], c[-self.buffer_size:]
            self._ring_t, self._ring_c = t, c

    def last_timestamps(self, reset: bool, ts: np.ndarray, ch: np.ndarray) -> int:
        with self.lock:
            _, dev = self._dev()
            if dev is None:
                return 0
            dev.inputs.step()
            self._pump()
            n = min(len(self._ring_t), len(ts), len(ch))
            ts[:n] = self._ring_t[:n]
            ch[:n] = self._ring_c[:n]
            if reset:
                self._ring_t, self._ring_c = np.empty(0, np.int64), np.empty(0, np.int8)
            return n

    def data_lost(self) -> tuple[int, int]:
        with self.lock:
            rc, dev = self._dev()
            if dev is None:
                return rc, 0
            self._pump()
            return TDC_Ok, int(dev.data_lost())


_LIB = _Library()


# -- device settings (run by _Library.setter against the connected hardware) ---------------------------
def _set_delay(dev: QuTAGHardware, channel: int, delay: int) -> int:
    if not 1 <= channel <= dev.inputs.channel_count:
        return TDC_OutOfRange
    if not -MAX_DELAY_PS <= delay <= MAX_DELAY_PS:
        return TDC_OutOfRange
    dev.inputs.set_delay(channel - 1, int(delay))
    dev.delays_ps[channel] = int(delay)
    return TDC_Ok


def _enable(dev: QuTAGHardware, start: bool, mask: int) -> int:
    if mask < 0 or mask >> dev.inputs.channel_count:
        return TDC_OutOfRange
    dev.start_enabled = bool(start)
    dev.enabled_inputs = {k + 1 for k in range(dev.inputs.channel_count) if mask >> k & 1}
    return TDC_Ok


def _conditioning(dev: QuTAGHardware, channel: int, cond: int, edge: int, threshold: float) -> int:
    if not 1 <= channel <= dev.inputs.channel_count or cond not in (1, 2, 3) or not -2.0 <= threshold <= 3.0:
        return TDC_OutOfRange
    dev.conditioning[channel] = (int(cond), bool(edge), float(threshold))
    return TDC_Ok


def _exposure(dev: QuTAGHardware, ms: int) -> int:
    if not 0 <= ms <= 65535:
        return TDC_OutOfRange
    dev.exposure_ms = int(ms)
    return TDC_Ok


def _coinc_window(dev: QuTAGHardware, bins: int) -> int:
    if not 0 <= bins <= 2_000_000_000:
        return TDC_OutOfRange
    dev.coinc_window = int(bins)
    return TDC_Ok


def plug(device: Any) -> QuTAGHardware:
    """Plug a QuTAGHardware into the stand-in bus, or attach one over a block source (once per source,
    running in real time: speed 1)."""
    if isinstance(device, QuTAGHardware):
        return BUS.plug(device)
    return BUS.attach(device, lambda src: QuTAGHardware(src, speed=1.0))  # a bench runs in real time


def unplug_all() -> None:
    """Empty the stand-in bus and reset the library (test cleanup)."""
    BUS.clear()
    _LIB.deinit()


class QuTAG:
    """The demo wrapper's class: QuTAG() loads the library, initializes it and sets a 1 000 000 buffer."""

    SET_BUFFER_IN_INIT = True  # the demo wrapper does; direct DLL users must (the DLL default is 0)

    DEVTYPE_QUTAG = DEVTYPE_QUTAG
    DEVTYPE_NONE = DEVTYPE_NONE
    SCOND_LVTTL, SCOND_NIM, SCOND_MISC, SCOND_NONE = 1, 2, 3, 4
    err_dict = {-1: "unspecified error", 0: "No error", 1: "Receive timed out", 2: "No connection was established",
                3: "Error accessing the USB driver", 4: "Unknown Error", 5: "Unknown Error", 6: "Unknown Error",
                7: "Can't connect device because already in use", 8: "Unknown error",
                9: "Invalid device number used in call", 10: "Parameter in fct. call is out of range",
                11: "Failed to open specified file", 12: "Library has not been initialized",
                13: "Requested Feature is not enabled", 14: "Requested Feature is not available"}

    def __init__(self) -> None:
        self.qutools_dll = _LIB
        self.TDC_QUTAG_CHANNELS = _LIB.channel_count()
        self.dev_nr = -1
        print("Initialize and Start with quTAG device: ", self.err_dict[self.Initialize()])
        self._bufferSize = 0
        if self.SET_BUFFER_IN_INIT:
            self._bufferSize = 1000000
            self.setBufferSize(self._bufferSize)
        self._deviceType = self.getDeviceType()
        self._timebase = self.getTimebase()

    def _report(self, name: str, ans: int) -> int:
        if ans != 0:
            print(f"Error in {name}: " + self.err_dict.get(ans, "Unknown error"))
        return ans

    # init ----------------------------------------------------------------------------------------------
    def Initialize(self) -> int:
        return self._report("TDC_init", _LIB.init(self.dev_nr))

    def deInitialize(self) -> int:
        return self._report("TDC_deInit", _LIB.deinit())

    # device info ---------------------------------------------------------------------------------------
    def getVersion(self) -> float:
        return 1.5

    def getTimebase(self) -> float:
        ans, tb = _LIB.timebase()
        self._report("TDC_getTimebase", ans)
        return tb

    def getDeviceType(self) -> int:
        return _LIB.dev_type()

    def getChannelCount(self) -> int:
        return _LIB.channel_count()

    # channels ------------------------------------------------------------------------------------------
    def setSignalConditioning(self, channel: int, conditioning: int, edge: bool, threshold: float) -> int:
        ans = _LIB.setter("TDC_configureSignalConditioning", _conditioning, int(channel), int(conditioning),
                          1 if edge else 0, float(threshold))
        return self._report("TDC_configureSignalConditioning", ans)

    def getSignalConditioning(self, channel: int) -> tuple[bool, float]:
        rc, dev = _LIB._dev()
        self._report("TDC_getSignalConditioning", rc)
        cond = dev.conditioning.get(int(channel), (3, True, 1.0)) if dev is not None else (3, True, 1.0)
        return cond[1], cond[2]

    def setChannelDelay(self, channel: int, delays: int) -> int:
        return self._report("TDC_setChannelDelays", _LIB.setter("TDC_setChannelDelay", _set_delay, int(channel),
                                                                  int(delays)))

    def getChannelDelay(self, channel: int) -> int:
        rc, dev = _LIB._dev()
        self._report("TDC_getChannelDelays", rc)
        return dev.delays_ps.get(int(channel), 0) if dev is not None else 0

    def enableChannels(self, enStart: bool, channels: Any = False) -> int:
        count = _LIB.channel_count()
        bitstring = channels if channels else "1" * count
        mask = int(str(bitstring), 2)
        return self._report("TDC_enableChannels", _LIB.setter("TDC_enableChannels", _enable, bool(enStart), mask))

    def getChannelsEnabled(self) -> tuple[bool, str]:
        rc, dev = _LIB._dev()
        self._report("TDC_getChannelsEnabled", rc)
        if dev is None:
            return False, ""
        mask = sum(1 << (k - 1) for k in dev.enabled_inputs)
        return dev.start_enabled, format(mask, "b") if mask else ""

    # measurement ---------------------------------------------------------------------------------------
    def setCoincidenceWindow(self, coincWin: int) -> int:
        self._report("TDC_setCoincidenceWindow", _LIB.setter("TDC_setCoincidenceWindow", _coinc_window, int(coincWin)))
        return 0  # sic: the demo wrapper returns 0 here whatever the DLL said

    def setExposureTime(self, expTime: int) -> int:
        return self._report("TDC_setExposureTime", _LIB.setter("TDC_setExposureTime", _exposure, int(expTime)))

    def getDeviceParams(self) -> tuple[int, int, int]:
        rc, dev = _LIB._dev()
        self._report("TDC_getDeviceParams", rc)
        return (0, dev.coinc_window, dev.exposure_ms) if dev is not None else (0, 0, 0)

    def getCoincCounters(self) -> tuple[np.ndarray, int]:
        return np.zeros(59, np.int32), 0

    # timestamps ----------------------------------------------------------------------------------------
    def getBufferSize(self) -> int:
        rc, _ = _LIB._dev()
        self._report("TDC_getTimestampBufferSize", rc)
        return _LIB.buffer_size

    def setBufferSize(self, size: int) -> int:
        self._bufferSize = size
        return self._report("TDC_setTimestampBufferSize", _LIB.set_buffer_size(int(size)))

    def getDataLost(self) -> int:
        ans, lost = _LIB.data_lost()
        self._report("TDC_getDataLost", ans)
        return lost

    def freezeBuffers(self, freeze: bool) -> int:
        return self._report("TDC_freezeBuffers", _LIB.freeze(bool(freeze)))

    def getLastTimestamps(self, reset: bool) -> tuple[np.ndarray, np.ndarray, int]:
        timestamps = np.zeros(int(self._bufferSize), dtype=np.int64)
        channels = np.zeros(int(self._bufferSize), dtype=np.int8)
        valid = _LIB.last_timestamps(bool(reset), timestamps, channels)
        return timestamps, channels, valid
