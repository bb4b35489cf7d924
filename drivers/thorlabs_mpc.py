"""Driver for the Thorlabs MPC320 (three paddles) and MPC220 (two paddles) motorized fiber polarization
controllers, over the APT/Kinesis binary protocol (protocols.md 2.1; framing in :mod:`drivers.apt`).

The same code runs in the lab (FTDI USB-serial port, ``/dev/serial/by-id/usb-Thorlabs_...``) and in CI against
:class:`drivers.sim.instruments.mpc320.SimMPC320` on a pseudo-terminal. See docs/hardware/thorlabs-mpc.md.

Link: 115200 baud 8N1 with RTS/CTS flow control. On open the driver raises RTS, purges both buffers and drops
RTS (50 ms steps), then stops the controller's periodic update messages. The RTS cycle is skipped, with a
debug log, on a port without modem-control lines (a pty answers ENOTTY).

Unsolicited messages (MOVE_COMPLETED, MOVE_HOMED, MOVE_STOPPED, status updates) can arrive at any time,
including between a request and its reply. Every message read is first applied to the driver's cache
(positions, status bits, homed flags) and recorded; a waiter only takes the message it is waiting for
(message id *and* channel), so an unsolicited message is never mistaken for a reply. Before each request
whatever is already waiting on the port is read and handled the same way.

Errors: a refused argument, a malformed or contradictory reply, or a move that does not finish while the
controller keeps answering raise :class:`~drivers.base.DeviceError`. No reply within ``timeout_s`` raises
:class:`TimeoutError`, and I/O failures raise :class:`serial.SerialException` / :class:`OSError`: the link is in
doubt and the daemon reconnects a fresh driver instance.
"""

from __future__ import annotations

import collections
import errno
import math
import time
from collections.abc import Callable
from typing import Any

import serial

from drivers import apt
from drivers.apt import DISABLE, ENABLE, Message, MsgId, StatusBits
from drivers.base import DeviceError, PolarizationController, exposed
from drivers.params import Field

MODEL_PADDLES = {"MPC320": 3, "MPC220": 2}
POLL_S = 0.02  # serial read timeout: how often a waiting loop checks its deadline
WRITE_GAP_S = 0.003  # minimum time between two writes (protocols.md: pylablib waits 3 ms)
RTS_STEP_S = 0.05


class ThorlabsMPC(PolarizationController):
    """Thorlabs MPC320 / MPC220 paddle polarization controller (APT protocol over USB-serial).

    Paddles are 0-based here (paddle 0 = the controller's channel 1 = channel ident 0x01). Angles are in
    degrees, 0..170 (1370 encoder counts = 170 degrees).
    """

    options = {
        "resource": Field(str, doc="serial port path (lab: /dev/serial/by-id/usb-Thorlabs_...; simulated "
                                   "testbed: the simulator's address) or a pyserial URL"),
        "timeout_s": Field(float, 1.0, unit="s", min=0.01, max=60,
                           doc="how long to wait for the reply to one request; no reply = link fault"),
        "move_timeout_s": Field(float, 3.0, unit="s", min=0.05, max=600,
                                doc="how long a move (or a homing, per paddle finished) may take; keep "
                                    "move_timeout_s + timeout_s below the daemon's call_timeout_s"),
        "velocity_percent": Field(int, 100, unit="%", min=1, max=100,
                                  doc="paddle velocity set at connect (POL params), percent of maximum"),
        "paddles": Field(int, 3, choices=(2, 3), doc="3 for an MPC320, 2 for an MPC220; checked at connect"),
        "home_on_connect": Field(bool, True,
                                 doc="home at connect unless the controller reports every paddle homed already "
                                     "(positions are only meaningful after homing)"),
    }

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._ser: serial.SerialBase | None = None
        self._reader = apt.FrameReader(own_address=apt.HOST, peer_address=apt.DEVICE)
        self._inbox: collections.deque[Message] = collections.deque()  # decoded, not yet handled
        self._last_write = 0.0
        self.info: apt.HwInfo | None = None
        n = int(options.get("paddles", 3))
        self._known_enabled: set[int] = set()  # paddles we enabled or saw enabled since connect
        self._positions: list[int | None] = [None] * n  # last known counter value per paddle
        self._status: list[int | None] = [None] * n  # last status word per paddle
        self._homed: list[bool] = [False] * n
        self.unsolicited: collections.deque[tuple[float, Message]] = collections.deque(maxlen=200)
        self.unsolicited_count = 0

    # -- life cycle ---------------------------------------------------------------------------------------
    @property
    def paddle_count(self) -> int:
        return int(self.opts.get("paddles", 3))

    def connect(self) -> None:
        ser = serial.serial_for_url(
            self.opts["resource"], baudrate=115200, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE, rtscts=True, timeout=POLL_S,
            write_timeout=float(self.opts.get("timeout_s", 1.0)),
        )
        self._ser = ser
        self._cycle_rts()
        self._send(Message.short(MsgId.HW_STOP_UPDATEMSGS))
        time.sleep(0.02)
        self._drain()

        info = self._query(Message.short(MsgId.HW_REQ_INFO), MsgId.HW_GET_INFO)
        try:
            self.info = apt.HwInfo.unpack(info.data or b"")
        except ValueError as e:
            raise DeviceError(f"malformed HW_GET_INFO: {e}", "HW_REQ_INFO") from None
        model = self.info.model.upper()
        if model not in MODEL_PADDLES:
            raise DeviceError(f"controller reports model {self.info.model!r}, expected MPC320 or MPC220",
                              "HW_REQ_INFO")
        expected = MODEL_PADDLES[model]
        if expected != self.paddle_count:
            raise DeviceError(f"option paddles = {self.paddle_count} but the controller is an {model} with "
                              f"{expected} paddles", "HW_REQ_INFO")
        if self.info.channels not in (0, expected):
            self.log.warning("HW_GET_INFO channel count disagrees with the model", model=model,
                             channels=self.info.channels)

        params = self._get_params()
        velocity = int(self.opts.get("velocity_percent", 100))
        if params.velocity != velocity:
            self._send(Message.long(MsgId.POL_SET_PARAMS, apt.PolParams(
                velocity, params.home_position, params.jog1, params.jog2, params.jog3).pack()))
            check = self._get_params()
            if check.velocity != velocity:
                raise DeviceError(f"velocity set to {velocity} % but the controller reports {check.velocity} %",
                                  "POL_SET_PARAMS")

        for i in range(self.paddle_count):
            self._read_status(i)
        if self.opts.get("home_on_connect", True) and not all(self._homed):
            self.home()
        self.log.info("connected", model=self.info.model, serial=self.info.serial,
                      firmware=self.info.firmware_str, homed=all(self._homed))

    def _cycle_rts(self) -> None:
        """Raise RTS, purge both buffers, drop RTS (as the Thorlabs FTDI link expects)."""
        ser = self._ser
        assert ser is not None
        try:
            ser.rts = True
            time.sleep(RTS_STEP_S)
            ser.reset_input_buffer()
            ser.reset_output_buffer()
            time.sleep(RTS_STEP_S)
            ser.rts = False
        except OSError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            self.log.debug("port has no modem-control lines; RTS cycle skipped", error=str(e))
            ser.reset_input_buffer()
            ser.reset_output_buffer()
        self._reader.reset()
        self._inbox.clear()

    def close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: BLE001 - close must not raise on a dead link
                pass

    def describe(self) -> dict[str, Any]:
        if self.info is None:
            return {"vendor": "Thorlabs", "resource": self.opts.get("resource")}
        return {
            "vendor": "Thorlabs",
            "model": self.info.model,
            "serial": str(self.info.serial),
            "firmware": self.info.firmware_str,
            "hardware_version": self.info.hw_version,
            "paddles": self.paddle_count,
            "resource": self.opts.get("resource"),
        }

    def safe_state(self) -> None:
        """Disable every paddle's motor (MOD_SET_CHANENABLESTATE, 0x02). The paddles keep their angle, so the
        polarization in the fiber does not change; the next move re-enables the paddle it moves."""
        for i in range(self.paddle_count):
            self._send(Message.short(MsgId.MOD_SET_CHANENABLESTATE, apt.chan_ident(i), DISABLE))
            self._known_enabled.discard(i)
        for i in range(self.paddle_count):
            if self._enable_state(i):
                raise DeviceError(f"paddle {i} still reports enabled after disable", "MOD_SET_CHANENABLESTATE")

    # -- PolarizationController ---------------------------------------------------------------------------
    def move(self, paddle: int, degrees: float) -> None:
        """Move one paddle to an absolute angle (0..170 degrees) and wait for MOVE_COMPLETED."""
        self._check_paddle(paddle, "MOT_MOVE_ABSOLUTE")
        if not (isinstance(degrees, (int, float)) and math.isfinite(degrees)
                and 0.0 <= degrees <= apt.MAX_DEGREES):
            raise DeviceError(f"{degrees!r} degrees is outside the paddle travel 0..{apt.MAX_DEGREES:g}",
                              "MOT_MOVE_ABSOLUTE")
        self._ensure_enabled(paddle)
        counts = min(max(apt.degrees_to_counts(degrees), 0), apt.MAX_COUNTS)
        ident = apt.chan_ident(paddle)
        self._drain()
        self._send(Message.long(MsgId.MOT_MOVE_ABSOLUTE, apt.pack_chan_pos(ident, counts)))
        done = self._wait_motion({paddle}, MsgId.MOT_MOVE_COMPLETED, "MOT_MOVE_ABSOLUTE")
        final = done.get(paddle)
        if final is not None and abs(final - counts) > 1:
            raise DeviceError(f"paddle {paddle} completed at {final} counts, commanded {counts}",
                              "MOT_MOVE_ABSOLUTE")

    def home(self) -> None:
        """Home every paddle (all at once) and wait for MOVE_HOMED from each."""
        for i in range(self.paddle_count):
            self._ensure_enabled(i)
        self._drain()
        for i in range(self.paddle_count):
            self._homed[i] = False
            self._send(Message.short(MsgId.MOT_MOVE_HOME, apt.chan_ident(i)))
        self._wait_motion(set(range(self.paddle_count)), MsgId.MOT_MOVE_HOMED, "MOT_MOVE_HOME")
        for i in range(self.paddle_count):
            self._homed[i] = True

    def positions(self) -> list[float]:
        """Current paddle angles in degrees (position counters), one per paddle."""
        return [apt.counts_to_degrees(self._read_counter(i)) for i in range(self.paddle_count)]

    @exposed
    def status(self) -> dict:
        """positions_deg, homed, enabled and moving (one entry per paddle), status_bits (u32 per paddle),
        velocity_percent, and how many unsolicited messages and garbage bytes the driver has seen."""
        bits = [self._read_status(i) for i in range(self.paddle_count)]
        params = self._get_params()
        return {
            "positions_deg": [apt.counts_to_degrees(p) if p is not None else None for p in self._positions],
            "homed": [bool(b & StatusBits.HOMED) for b in bits],
            "enabled": [self._enable_state(i) for i in range(self.paddle_count)],
            "moving": [bool(b & apt.MOVING) for b in bits],
            "status_bits": bits,
            "velocity_percent": params.velocity,
            "unsolicited_messages": self.unsolicited_count,
            "garbage_bytes": self._reader.garbage_bytes,
        }

    @exposed
    def identify(self) -> None:
        """Blink the controller's front panel (MOD_IDENTIFY), to find it on the bench."""
        self._send(Message.short(MsgId.MOD_IDENTIFY))

    # -- exchanges ----------------------------------------------------------------------------------------
    def _check_paddle(self, paddle: int, command: str) -> None:
        if not isinstance(paddle, int) or isinstance(paddle, bool) or not 0 <= paddle < self.paddle_count:
            raise DeviceError(f"paddle {paddle!r} does not exist (0..{self.paddle_count - 1})", command)

    def _port(self) -> serial.SerialBase:
        if self._ser is None:
            raise serial.SerialException(f"{self.name}: port is not open")
        return self._ser

    def _send(self, msg: Message) -> None:
        ser = self._port()
        gap = self._last_write + WRITE_GAP_S - time.monotonic()
        if gap > 0:
            time.sleep(gap)
        ser.write(msg.encode())
        ser.flush()
        self._last_write = time.monotonic()

    def _drain(self) -> None:
        """Handle every message already received or waiting on the port, without blocking."""
        ser = self._port()
        while True:
            while self._inbox:
                self._note(self._inbox.popleft(), waited_for=False)
            n = ser.in_waiting
            if not n:
                return
            self._inbox.extend(self._reader.feed(ser.read(n)))

    def _receive(self) -> None:
        """One read (returns after at most POLL_S without data); complete messages go to the inbox."""
        ser = self._port()
        data = ser.read(max(1, ser.in_waiting))
        if data:
            self._inbox.extend(self._reader.feed(data))

    def _note(self, msg: Message, *, waited_for: bool) -> None:
        """Apply a message to the cache; record it as unsolicited unless it is the awaited reply."""
        try:
            if msg.msg_id in (MsgId.MOT_MOVE_COMPLETED, MsgId.MOT_MOVE_STOPPED, MsgId.MOT_GET_USTATUSUPDATE):
                st = apt.StatusUpdate.unpack(msg.data or b"") if msg.is_long else None
                paddle = apt.ident_paddle(st.ident if st else msg.param1)
                if paddle is not None and paddle < self.paddle_count and st is not None:
                    self._positions[paddle] = st.position
                    self._status[paddle] = st.status
                    self._homed[paddle] = bool(st.status & StatusBits.HOMED)
                    if st.status & StatusBits.ENABLED:
                        self._known_enabled.add(paddle)
                    else:
                        self._known_enabled.discard(paddle)
            elif msg.msg_id == MsgId.MOT_MOVE_HOMED:
                paddle = apt.ident_paddle(msg.param1)
                if paddle is not None and paddle < self.paddle_count:
                    self._homed[paddle] = True
                    self._positions[paddle] = 0
            elif msg.msg_id == MsgId.MOT_GET_POSCOUNTER and msg.is_long:
                ident, counts = apt.unpack_chan_pos(msg.data or b"")
                paddle = apt.ident_paddle(ident)
                if paddle is not None and paddle < self.paddle_count:
                    self._positions[paddle] = counts
        except ValueError as e:
            if waited_for:
                raise DeviceError(f"malformed {msg.name}: {e}", msg.name) from None
            self.log.warning("malformed unsolicited message", message=str(msg), error=str(e))
        if not waited_for:
            self.unsolicited_count += 1
            self.unsolicited.append((time.time(), msg))
            self.log.debug("unsolicited message", message=str(msg))

    def _wait_for(self, match: Callable[[Message], bool], timeout_s: float, command: str) -> Message | None:
        """Read until a message satisfies ``match`` (returned, after being applied to the cache) or the
        timeout passes (None). Every other message is handled as unsolicited."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self._inbox:  # one read can bring several messages: the rest stay queued
                msg = self._inbox.popleft()
                if match(msg):
                    self._note(msg, waited_for=True)
                    return msg
                self._note(msg, waited_for=False)
            if time.monotonic() >= deadline:
                return None
            self._receive()

    def _query(self, request: Message, reply_id: int, ident: int | None = None,
               channel_of: Callable[[Message], int] | None = None) -> Message:
        """Send ``request`` and return the reply with ``reply_id`` (for channel ``ident`` if given).

        No reply within ``timeout_s``: TimeoutError (the link is in doubt). A reply for another channel, to a
        request that is never answered unsolicited: DeviceError.
        """
        self._drain()
        self._send(request)
        timeout = float(self.opts.get("timeout_s", 1.0))

        def match(msg: Message) -> bool:
            if msg.msg_id != reply_id:
                return False
            if ident is None or channel_of is None:
                return True
            try:
                got = channel_of(msg)
            except ValueError as e:
                raise DeviceError(f"malformed {msg.name}: {e}", request.name) from None
            if got == ident:
                return True
            if reply_id == MsgId.MOT_GET_USTATUSUPDATE:
                return False  # another channel's periodic update: keep waiting
            raise DeviceError(f"{msg.name} is for channel 0x{got:02X}, asked for 0x{ident:02X}", request.name)

        reply = self._wait_for(match, timeout, request.name)
        if reply is None:
            raise TimeoutError(f"{self.name}: no {apt.msg_name(reply_id)} in reply to {request.name} "
                               f"within {timeout:g} s")
        return reply

    def _wait_motion(self, paddles: set[int], done_id: int, command: str) -> dict[int, int | None]:
        """Wait for ``done_id`` (MOVE_COMPLETED / MOVE_HOMED) from each paddle. The move_timeout_s deadline
        restarts whenever one paddle finishes. MOVE_STOPPED for a waited paddle is a DeviceError. On timeout
        the paddles are stopped and their status read: an answer means the controller is alive but the move
        did not finish (DeviceError); no answer means the link is gone (TimeoutError)."""
        pending = set(paddles)
        final: dict[int, int | None] = {}
        stopped: dict[int, int] = {}
        move_timeout = float(self.opts.get("move_timeout_s", 3.0))

        def channel(msg: Message) -> int | None:
            if msg.is_long:
                try:
                    return apt.ident_paddle(apt.StatusUpdate.unpack(msg.data or b"").ident)
                except ValueError:
                    return None
            return apt.ident_paddle(msg.param1)

        def match(msg: Message) -> bool:
            if msg.msg_id not in (done_id, MsgId.MOT_MOVE_STOPPED):
                return False
            return channel(msg) in pending

        while pending:
            msg = self._wait_for(match, move_timeout, command)
            if msg is None:
                break
            paddle = channel(msg)
            assert paddle is not None
            pending.discard(paddle)
            position = self._positions[paddle] if msg.is_long else None
            if msg.msg_id == MsgId.MOT_MOVE_STOPPED:
                stopped[paddle] = self._positions[paddle] or 0
            else:
                final[paddle] = position
        if stopped:
            where = ", ".join(f"paddle {p} at {apt.counts_to_degrees(c):.2f} deg" for p, c in sorted(stopped.items()))
            raise DeviceError(f"motion stopped before it finished: {where}", command)
        if pending:
            for p in sorted(pending):
                self._send(Message.short(MsgId.MOT_MOVE_STOP, apt.chan_ident(p), apt.STOP_PROFILED))
            where = []
            for p in sorted(pending):
                bits = self._read_status(p)  # TimeoutError here: the controller does not answer at all
                where.append(f"paddle {p} at {apt.counts_to_degrees(self._positions[p] or 0):.2f} deg "
                             f"(status 0x{bits:08X})")
            raise DeviceError(f"motion did not finish within {move_timeout:g} s; stopped "
                              + ", ".join(where), command)
        return final

    # -- single queries -----------------------------------------------------------------------------------
    def _read_counter(self, paddle: int) -> int:
        ident = apt.chan_ident(paddle)
        reply = self._query(Message.short(MsgId.MOT_REQ_POSCOUNTER, ident), MsgId.MOT_GET_POSCOUNTER, ident,
                            lambda m: apt.unpack_chan_pos(_long_data(m))[0])
        return apt.unpack_chan_pos(_long_data(reply))[1]

    def _read_status(self, paddle: int) -> int:
        """Status word of one paddle (also refreshes its cached position and homed flag)."""
        ident = apt.chan_ident(paddle)
        reply = self._query(Message.short(MsgId.MOT_REQ_USTATUSUPDATE, ident), MsgId.MOT_GET_USTATUSUPDATE,
                            ident, lambda m: apt.StatusUpdate.unpack(_long_data(m)).ident)
        return apt.StatusUpdate.unpack(_long_data(reply)).status

    def _enable_state(self, paddle: int) -> bool:
        ident = apt.chan_ident(paddle)
        reply = self._query(Message.short(MsgId.MOD_REQ_CHANENABLESTATE, ident), MsgId.MOD_GET_CHANENABLESTATE,
                            ident, lambda m: m.param1)
        if reply.param2 not in (ENABLE, DISABLE):
            raise DeviceError(f"MOD_GET_CHANENABLESTATE state 0x{reply.param2:02X} is neither 1 nor 2",
                              "MOD_REQ_CHANENABLESTATE")
        enabled = reply.param2 == ENABLE
        if enabled:
            self._known_enabled.add(paddle)
        else:
            self._known_enabled.discard(paddle)
        return enabled

    def _ensure_enabled(self, paddle: int) -> None:
        if paddle in self._known_enabled:
            return
        self._send(Message.short(MsgId.MOD_SET_CHANENABLESTATE, apt.chan_ident(paddle), ENABLE))
        if not self._enable_state(paddle):
            raise DeviceError(f"paddle {paddle} did not enable", "MOD_SET_CHANENABLESTATE")

    def _get_params(self) -> apt.PolParams:
        reply = self._query(Message.short(MsgId.POL_REQ_PARAMS), MsgId.POL_GET_PARAMS)
        try:
            return apt.PolParams.unpack(_long_data(reply))
        except ValueError as e:
            raise DeviceError(f"malformed POL_GET_PARAMS: {e}", "POL_REQ_PARAMS") from None


def _long_data(msg: Message) -> bytes:
    if not msg.is_long:
        raise ValueError(f"{msg.name} came in the short form, expected data")
    return msg.data or b""
