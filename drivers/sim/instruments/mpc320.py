"""Protocol-level simulator of a Thorlabs MPC320 (three paddles) or MPC220 (two paddles).

It speaks the APT/Kinesis binary protocol (protocols.md 2.1, framing in :mod:`drivers.apt`) on a
pseudo-terminal, so :class:`drivers.thorlabs_mpc.ThorlabsMPC` opens it with pyserial exactly as it opens the
FTDI port of the real controller. Its paddles are the waveplates of one arm of the virtual bench: paddle
angles are written to :meth:`BenchState.set_paddle` while they move.

Addressing. :attr:`SimMPC320.address` is a symlink ``<tmpdir>/<name>`` to the current pty slave (as
``/dev/serial/by-id/...`` is a symlink to ``/dev/ttyUSBn``). ``stop()`` (unplug) closes the pty, so an open
driver's next read or write fails, and removes the symlink, so opening the address fails; ``start()`` makes
a new pty and points the same symlink at it. The address is therefore stable across restarts, as the
SimInstrument protocol asks; :attr:`tty_path` is the pty itself, which changes.

What is modelled (each choice documented in docs/hardware/thorlabs-mpc.md):

* HW_REQ_INFO -> HW_GET_INFO (serial, model, firmware, channel count); MOD_IDENTIFY is counted.
* Channel enable state (MOD_SET/REQ/GET_CHANENABLESTATE). Channels power up enabled (option). MOVE_ABSOLUTE
  and MOVE_HOME on a disabled channel are ignored: no motion, no reply. Disabling a moving channel halts it
  where it is, without a reply.
* MOVE_ABSOLUTE starts a move; its duration is ``|delta| / 100 deg * move_time_s_per_100deg * 100 /
  velocity%``. The position counter and the bench follow progressively (every ``TICK_S``); at the end an
  unsolicited MOVE_COMPLETED (long, 14-byte status structure, :class:`drivers.apt.StatusUpdate`) is sent.
  A target outside 0..1370 counts is clamped to the travel.
* MOVE_HOME drives the paddle to its zero, then sends MOVE_HOMED (short, param1 = channel) and sets the
  homed bit. Before homing the position counter is not the paddle angle: at power-up the counter reads 0
  wherever the paddle physically is (the bench's current angle).
* MOVE_STOP halts a motion and answers MOVE_STOPPED (long, status structure).
* REQ_POSCOUNTER -> GET_POSCOUNTER; SET_POSCOUNTER redefines the counter (paddle does not move).
* REQ_USTATUSUPDATE -> GET_USTATUSUPDATE with position and status bits: moving forward/reverse (4/5),
  homing (9), homed (10), active (29, while moving or homing), enabled (31).
* HW_START/STOP_UPDATEMSGS: while on, a GET_USTATUSUPDATE per channel every ``update_period_s``.
* POL_SET/REQ/GET_PARAMS: velocity (1..100 %, else the message is ignored), home position, jog steps (stored
  and reported; homing always goes to counter 0).
* Unknown message ids, short-form MOVE_ABSOLUTE, and messages for channels the model does not have are
  ignored, as real devices do not answer them.

Test controls (call from any thread): :meth:`inject` (raw bytes, e.g. garbage), :meth:`send` (any message),
:meth:`send_status` (an unsolicited status update), :meth:`interleave` (bytes to emit just before the next
reply), :meth:`fragment_writes` (split output into small, delayed writes), :attr:`stall_moves` (new moves
and homes never finish), :meth:`power_cycle`, :meth:`channel`, :meth:`received_messages` /
:meth:`received_ids`, :attr:`identify_count`, :attr:`velocity_percent`, :attr:`updates_on`, :attr:`model_name`
(what HW_GET_INFO reports; set it to test a host that meets another model).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers import apt
from drivers.apt import DISABLE, ENABLE, Message, MsgId, StatusBits
from drivers.params import Field
from drivers.sim.bench.state import ARMS, BenchState
from drivers.sim.instruments.pty import PtySimulator

MODEL_NAMES = {3: "MPC320", 2: "MPC220"}  # paddles -> the model reported in HW_GET_INFO
TICK_S = 0.02  # how often a moving paddle's angle is written to the bench
MAX_PENDING_OUT = 64 * 1024  # unsolicited periodic updates are dropped beyond this (like a full FTDI buffer)


@dataclass
class _Motion:
    start: float  # physical position, counts
    target: float  # physical position, counts
    t0: float
    t1: float  # inf while stalled
    homing: bool


@dataclass
class _Channel:
    physical: float  # paddle angle in counts (0..1370): what the bench sees
    offset: float  # physical - counter; 0 once homed
    enabled: bool
    homed: bool = False
    motion: _Motion | None = None

    def position_at(self, now: float) -> float:
        m = self.motion
        if m is None:
            return self.physical
        if now >= m.t1:
            return m.target
        frac = (now - m.t0) / (m.t1 - m.t0) if m.t1 > m.t0 else 1.0
        return m.start + (m.target - m.start) * frac


class SimMPC320(PtySimulator):
    """A Thorlabs MPC320/MPC220 on a pseudo-terminal, acting on the paddles of one bench arm."""

    model: ClassVar[str] = "thorlabs_mpc320"
    options: ClassVar[dict[str, Field]] = {
        "arm": Field(str, "alice", choices=ARMS, doc="which arm of the bench the paddles act on"),
        "paddles": Field(int, 3, choices=(3, 2),
                         doc="3: an MPC320, 2: an MPC220 (the model reported in HW_GET_INFO follows)"),
        "serial": Field(int, 38000001, min=0, max=2**32 - 1, doc="serial number reported in HW_GET_INFO"),
        "firmware": Field(str, "1.0.4", doc="firmware version major.interim.minor reported in HW_GET_INFO"),
        "velocity_percent": Field(int, 50, unit="%", min=1, max=100,
                                  doc="power-up velocity (POL params); the driver normally sets its own"),
        "move_time_s_per_100deg": Field(float, 1.0, unit="s", min=0, max=600,
                                        doc="time for 100 degrees of travel at 100 % velocity"),
        "home_overhead_s": Field(float, 0.1, unit="s", min=0, max=60,
                                 doc="extra time a homing takes beyond the travel to zero"),
        "update_period_s": Field(float, 0.1, unit="s", min=0.005, max=60,
                                 doc="period of status messages after HW_START_UPDATEMSGS"),
        "updates_at_power_up": Field(bool, False,
                                     doc="send periodic status messages from power-up until HW_STOP_UPDATEMSGS"),
        "enabled_at_power_up": Field(bool, True, doc="channels are enabled at power-up"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        opts.update(options or {})
        unknown = set(opts) - set(self.options)
        if unknown:
            raise ValueError(f"unknown SimMPC320 options: {sorted(unknown)}")
        if opts["arm"] not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}")
        if opts["paddles"] not in MODEL_NAMES:
            raise ValueError("paddles must be 3 (MPC320) or 2 (MPC220)")
        fw = tuple(int(p) for p in str(opts["firmware"]).split("."))
        if len(fw) != 3 or not all(0 <= p <= 255 for p in fw):
            raise ValueError("firmware must be major.interim.minor, each 0..255")
        super().__init__(name, "apt", "mpc")
        self.state = state
        self.opts = opts
        self.arm: str = opts["arm"]
        self.paddle_count: int = opts["paddles"]
        self.model_name = MODEL_NAMES[self.paddle_count]  # test code may change it (e.g. to an unknown model)
        self._firmware: tuple[int, int, int] = fw  # type: ignore[assignment]
        self._prefix = bytearray()  # bytes to emit right before the next reply
        self.received: collections.deque[Message] = collections.deque(maxlen=1000)
        self.identify_count = 0
        self.stall_moves = False
        self.power_cycle()

    # -- SimInstrument --------------------------------------------------------------------------------------
    @property
    def driver_options(self) -> dict[str, Any]:
        """Driver options that follow from this instrument (the daemon copies them into a device whose
        options refer to it as ``sim://NAME``): an MPC220 simulator makes the driver expect 2 paddles."""
        return {"paddles": self.paddle_count}

    # -- PtySimulator hooks -----------------------------------------------------------------------------
    def _on_plug(self) -> None:
        self._prefix.clear()
        self._reader = apt.FrameReader(own_address=apt.DEVICE, peer_address=None)
        self._next_update = time.monotonic()

    def _on_unplug(self, now: float) -> None:
        for i in range(self.paddle_count):
            self._halt(i, now)  # a paddle in motion stops where it is

    def _tick(self, now: float) -> float:
        self._advance(now)
        return self._next_deadline(now)

    def _on_data(self, data: bytes, now: float) -> None:
        for msg in self._reader.feed(data):
            self._handle(msg)

    # -- test controls ------------------------------------------------------------------------------------
    def power_cycle(self) -> None:
        """Model a power cycle (the pty, if open, stays): not homed, counters read 0 wherever the paddles are,
        power-up enable state, velocity and update-message setting."""
        with self._lock:
            paddles = self.state.paddles(self.arm)
            self._channels = []
            for i in range(self.paddle_count):
                physical = min(max(paddles[i], 0.0), apt.MAX_DEGREES) * apt.COUNTS_PER_DEGREE
                self._channels.append(_Channel(physical, physical, self.opts["enabled_at_power_up"]))
            self._params = apt.PolParams(velocity=self.opts["velocity_percent"])
            self._updates = bool(self.opts["updates_at_power_up"])
            self._next_update = time.monotonic()

    def send(self, msg: Message) -> None:
        """Send any message to the host now."""
        self.inject(msg.encode())

    def send_status(self, paddle: int) -> None:
        """Send an unsolicited GET_USTATUSUPDATE for a 0-based paddle."""
        with self._lock:
            self._out += self._status_msg(paddle, MsgId.MOT_GET_USTATUSUPDATE, time.monotonic()).encode()
            self._poke()

    def interleave(self, data: bytes) -> None:
        """Emit ``data`` immediately before the next reply (to test a host that receives unsolicited
        messages or garbage between its request and the reply)."""
        with self._lock:
            self._prefix += data

    def channel(self, paddle: int) -> dict[str, Any]:
        """The device's view of a paddle: counter, physical angle, enabled, homed, moving."""
        with self._lock:
            now = time.monotonic()
            ch = self._channels[paddle]
            phys = ch.position_at(now)
            return {
                "counts": int(round(phys - ch.offset)),
                "physical_deg": phys / apt.COUNTS_PER_DEGREE,
                "enabled": ch.enabled,
                "homed": ch.homed,
                "moving": ch.motion is not None,
                "status": self._status_bits(paddle, now),
            }

    @property
    def velocity_percent(self) -> int:
        with self._lock:
            return self._params.velocity

    @property
    def updates_on(self) -> bool:
        with self._lock:
            return self._updates

    def received_messages(self) -> list[Message]:
        """Every message the simulator has received (the last 1000), oldest first."""
        with self._lock:
            return list(self.received)

    def received_ids(self) -> list[int]:
        return [m.msg_id for m in self.received_messages()]

    # -- serving thread ---------------------------------------------------------------------------------
    def _next_deadline(self, now: float) -> float:
        deadline = 1.0
        moving = False
        for ch in self._channels:
            if ch.motion is not None:
                moving = True
                deadline = min(deadline, ch.motion.t1 - now)
        if moving:
            deadline = min(deadline, TICK_S)
        if self._updates:
            deadline = min(deadline, self._next_update - now)
        return max(0.0, deadline)

    def _advance(self, now: float) -> None:
        """Move paddles along, finish motions, write the bench, send periodic updates."""
        for i, ch in enumerate(self._channels):
            m = ch.motion
            if m is None:
                continue
            if now >= m.t1:
                ch.physical = m.target
                ch.motion = None
                if m.homing:
                    ch.offset = 0.0
                    ch.homed = True
                    self._emit(Message.short(MsgId.MOT_MOVE_HOMED, apt.chan_ident(i), 0, dest=apt.HOST,
                                             source=apt.DEVICE), reply=False)
                else:
                    self._emit(self._status_msg(i, MsgId.MOT_MOVE_COMPLETED, now), reply=False)
                self._set_bench(i, ch.physical)
            else:
                self._set_bench(i, ch.position_at(now))
        if self._updates and now >= self._next_update:
            self._next_update = now + self.opts["update_period_s"]
            if len(self._out) < MAX_PENDING_OUT:
                for i in range(self.paddle_count):
                    self._emit(self._status_msg(i, MsgId.MOT_GET_USTATUSUPDATE, now), reply=False)

    def _set_bench(self, paddle: int, physical_counts: float) -> None:
        self.state.set_paddle(self.arm, paddle, physical_counts / apt.COUNTS_PER_DEGREE)

    def _emit(self, msg: Message, *, reply: bool = True) -> None:
        if reply and self._prefix:
            self._out += self._prefix
            self._prefix.clear()
        self._out += msg.encode()

    # -- device logic -------------------------------------------------------------------------------------
    def _paddles_of(self, ident: int) -> list[int]:
        """The existing paddles selected by a channel-ident bitmask."""
        return [i for i in range(self.paddle_count) if ident & (1 << i)]

    def _status_bits(self, paddle: int, now: float) -> int:
        ch = self._channels[paddle]
        bits = 0
        if ch.enabled:
            bits |= StatusBits.ENABLED
        if ch.homed:
            bits |= StatusBits.HOMED
        m = ch.motion
        if m is not None:
            bits |= StatusBits.ACTIVE
            if m.homing:
                bits |= StatusBits.HOMING
            bits |= StatusBits.MOVING_FORWARD if m.target > m.start else StatusBits.MOVING_REVERSE
        return int(bits)

    def _status_msg(self, paddle: int, msg_id: int, now: float) -> Message:
        ch = self._channels[paddle]
        status = apt.StatusUpdate(
            ident=apt.chan_ident(paddle),
            position=int(round(ch.position_at(now) - ch.offset)),
            status=self._status_bits(paddle, now),
            velocity=self._params.velocity if ch.motion is not None else 0,
        )
        return Message.long(msg_id, status.pack(), dest=apt.HOST, source=apt.DEVICE)

    def _duration(self, delta_counts: float) -> float:
        degrees = abs(delta_counts) / apt.COUNTS_PER_DEGREE
        return degrees / 100.0 * self.opts["move_time_s_per_100deg"] * 100.0 / self._params.velocity

    def _start_motion(self, paddle: int, target_physical: float, homing: bool, now: float) -> None:
        ch = self._channels[paddle]
        start = ch.position_at(now)
        target = min(max(target_physical, 0.0), float(apt.MAX_COUNTS))  # the paddle's end stops
        duration = self._duration(target - start) + (self.opts["home_overhead_s"] if homing else 0.0)
        t1 = float("inf") if self.stall_moves else now + duration
        ch.physical = start
        ch.motion = _Motion(start, target, now, t1, homing)

    def _halt(self, paddle: int, now: float) -> None:
        ch = self._channels[paddle]
        if ch.motion is not None:
            ch.physical = ch.position_at(now)
            ch.motion = None
            self._set_bench(paddle, ch.physical)

    def _handle(self, msg: Message) -> None:
        self.received.append(msg)
        now = time.monotonic()
        mid = msg.msg_id
        reply_to = dict(dest=msg.source & 0x7F, source=apt.DEVICE)

        if mid == MsgId.HW_REQ_INFO:
            info = apt.HwInfo(serial=self.opts["serial"], model=self.model_name, hw_type=0,
                              firmware=self._firmware, notes=f"qnetd simulated {self.model_name}",
                              hw_version=1, mod_state=0, channels=self.paddle_count)
            self._emit(Message.long(MsgId.HW_GET_INFO, info.pack(), **reply_to))
        elif mid == MsgId.MOD_IDENTIFY:
            self.identify_count += 1
        elif mid == MsgId.HW_START_UPDATEMSGS:
            self._updates = True
            self._next_update = now
        elif mid == MsgId.HW_STOP_UPDATEMSGS:
            self._updates = False
        elif mid == MsgId.MOD_SET_CHANENABLESTATE and not msg.is_long:
            if msg.param2 in (ENABLE, DISABLE):
                for i in self._paddles_of(msg.param1):
                    if msg.param2 == DISABLE:
                        self._halt(i, now)
                    self._channels[i].enabled = msg.param2 == ENABLE
        elif mid == MsgId.MOD_REQ_CHANENABLESTATE and not msg.is_long:
            paddle = apt.ident_paddle(msg.param1)
            if paddle is not None and paddle < self.paddle_count:
                state = ENABLE if self._channels[paddle].enabled else DISABLE
                self._emit(Message.short(MsgId.MOD_GET_CHANENABLESTATE, msg.param1, state, **reply_to))
        elif mid == MsgId.MOT_MOVE_HOME and not msg.is_long:
            for i in self._paddles_of(msg.param1):
                if self._channels[i].enabled:
                    self._start_motion(i, 0.0, True, now)
        elif mid == MsgId.MOT_MOVE_ABSOLUTE and msg.is_long and len(msg.data or b"") >= 6:
            ident, counts = apt.unpack_chan_pos(msg.data or b"")
            for i in self._paddles_of(ident):
                ch = self._channels[i]
                if ch.enabled:
                    counts_c = min(max(counts, 0), apt.MAX_COUNTS)  # clamp to the travel
                    self._start_motion(i, counts_c + ch.offset, False, now)
        elif mid == MsgId.MOT_MOVE_STOP and not msg.is_long:
            for i in self._paddles_of(msg.param1):
                self._halt(i, now)
                self._emit(self._status_msg(i, MsgId.MOT_MOVE_STOPPED, now))
        elif mid == MsgId.MOT_REQ_POSCOUNTER and not msg.is_long:
            paddle = apt.ident_paddle(msg.param1)
            if paddle is not None and paddle < self.paddle_count:
                ch = self._channels[paddle]
                counts = int(round(ch.position_at(now) - ch.offset))
                self._emit(Message.long(MsgId.MOT_GET_POSCOUNTER, apt.pack_chan_pos(msg.param1, counts),
                                        **reply_to))
        elif mid == MsgId.MOT_SET_POSCOUNTER and msg.is_long and len(msg.data or b"") >= 6:
            ident, counts = apt.unpack_chan_pos(msg.data or b"")
            for i in self._paddles_of(ident):
                ch = self._channels[i]
                if ch.motion is None:
                    ch.offset = ch.physical - counts
        elif mid == MsgId.MOT_REQ_USTATUSUPDATE and not msg.is_long:
            paddle = apt.ident_paddle(msg.param1)
            if paddle is not None and paddle < self.paddle_count:
                self._emit(self._status_msg(paddle, MsgId.MOT_GET_USTATUSUPDATE, now))
        elif mid == MsgId.POL_SET_PARAMS and msg.is_long and len(msg.data or b"") == apt.PolParams.SIZE:
            params = apt.PolParams.unpack(msg.data or b"")
            if 1 <= params.velocity <= 100:
                self._params = params
        elif mid == MsgId.POL_REQ_PARAMS and not msg.is_long:
            self._emit(Message.long(MsgId.POL_GET_PARAMS, self._params.pack(), **reply_to))
        # anything else: ignored, as a real controller does not answer what it does not know
