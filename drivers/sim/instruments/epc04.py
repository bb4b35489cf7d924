"""Protocol-level simulator of an OZ Optics EPC-04 / EPC-400 electronic polarization controller.

It speaks the controller's ASCII dialect (protocols.md section 2.2; command shapes as the pylablib ``EPC04``
class uses them) on a pseudo-terminal, so :class:`drivers.ozoptics_epc.OZOpticsEPC` opens it with pyserial
exactly as it opens the real unit's serial port (9600 8N1; the pty ignores the baud rate).

**Not on the bench.** The EPC-04 squeezes the fiber with four piezo actuators driven by voltages; the
bench's polarization model is three rotating waveplates per arm (the MPC320 paddles), and there is no
faithful map from four squeezer voltages onto three waveplate angles without a calibration of the
particular unit. So this simulator keeps its state (voltages, mode, frequencies) to itself and changes
nothing on the bench; counts on the tagger do not depend on it.

Addressing: as :class:`~drivers.sim.instruments.mpc320.SimMPC320`, :attr:`SimEPC04.address` is a stable
symlink ``<tmpdir>/<name>`` to the current pty slave. ``stop()`` (unplug) closes the pty, so an open driver's
next read or write fails, and removes the symlink; ``start()`` makes a new pty behind the same symlink.

Dialect (every reply ends with ``Done\\r\\n`` on success or ``Error!\\r\\n`` on failure; lines end in ``\\r\\n``):

======================  =============================================================================
``V<ch>,<mV>``          channel 1..4 to an integer voltage in mV. Beyond +-``max_mv``: ``Error!`` and
                        no change (``out_of_range = "error"``, the default), or the value is clamped to
                        +-``max_mv`` and ``Done`` (``"clamp"``). Which one the real unit does is unknown
                        (pylablib clamps on the host side before sending).
``V?``                  ``CH1 <mV> CH2 <mV> CH3 <mV> CH4 <mV>`` then ``Done``
``MDC`` / ``MAC``       DC mode (voltages held) / AC mode (scrambling at the channel frequencies)
``M?``                  ``Mode: DC`` or ``Mode: AC`` (text assumed) then ``Done``
``F<ch>,<Hz>``          scrambling frequency of channel 1..4, integer 0..100 Hz (pylablib's range), else
                        ``Error!``; accepted in either mode, used in AC mode (assumed)
``F?``                  ``CH1 <Hz> CH2 <Hz> CH3 <Hz> CH4 <Hz>`` then ``Done``
``RST``                 restart: the unit is silent for ``restart_s`` (about 40 s on the real unit),
                        ignores what it receives meanwhile, comes back with 0 V, DC mode and the default
                        frequencies, and then answers ``Done``
``CD``                  configuration: a few ``key: value`` lines (content assumed) then ``Done``
anything else           ``Error!`` (commands are case-insensitive; surrounding spaces are ignored)
======================  =============================================================================

In AC mode ``V?`` still reports the DC setpoints (assumed). Commands end with ``\\r\\n``; a lone ``\\r`` or
``\\n`` also ends one, and empty lines are ignored. With ``echo`` the unit repeats each command line first
(pylablib strips such an echo, so some units do it).

Test controls (any thread): :meth:`inject` (raw bytes now), :meth:`override` (raw reply to one command),
:meth:`fragment_writes` (split output into small, delayed writes), :attr:`stall` (read commands, never
answer), :meth:`power_cycle`, :attr:`history` (command lines received), :attr:`voltages_mv`, :attr:`mode`,
:attr:`frequencies_hz`, :attr:`restarting`.
"""

from __future__ import annotations

import collections
import re
from typing import Any, ClassVar

from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.pty import PtySimulator

CHANNELS = 4
MAX_FREQUENCY_HZ = 100
DEFAULT_FREQUENCY_HZ = 10  # assumed power-up scrambling frequency
DONE = b"Done\r\n"
ERROR = b"Error!\r\n"

_V_SET = re.compile(r"^V([1-4]),([+-]?\d{1,6})$")
_F_SET = re.compile(r"^F([1-4]),([+-]?\d{1,6})$")


class SimEPC04(PtySimulator):
    """An OZ Optics EPC-04 on a pseudo-terminal; its state is its own (see the module docstring)."""

    model: ClassVar[str] = "ozoptics_epc04"
    options: ClassVar[dict[str, Field]] = {
        "max_mv": Field(int, 5000, unit="mV", min=0, max=5000, doc="output range of each channel is +-max_mv"),
        "out_of_range": Field(str, "error", choices=("error", "clamp"),
                              doc="a V<ch> beyond the range: Error! and no change, or clamp and Done"),
        "echo": Field(bool, False, doc="repeat each command line before the reply"),
        "restart_s": Field(float, 0.5, unit="s", min=0, max=120,
                           doc="how long RST keeps the unit silent (the real unit: about 40 s)"),
        "serial": Field(str, "EPC04-SIM-0001", doc="serial number in the CD reply"),
        "firmware": Field(str, "1.0-sim", doc="firmware version in the CD reply"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        for key, value in (options or {}).items():
            if key not in self.options:
                raise ValueError(f"SimEPC04 {name}: unknown option {key!r}; allowed: {', '.join(sorted(self.options))}")
            opts[key] = value
        if opts["out_of_range"] not in ("error", "clamp"):
            raise ValueError(f"SimEPC04 {name}: out_of_range must be 'error' or 'clamp'")
        super().__init__(name, "epc", "epc")
        self.state = state  # not used: the EPC-04's voltages do not map onto the bench's waveplates
        self.opts = opts
        self._in = bytearray()
        self._overrides: dict[str, bytes] = {}
        self._restart_until: float | None = None
        self.stall = False
        self.history: collections.deque[str] = collections.deque(maxlen=1000)
        self.power_cycle()

    # -- PtySimulator hooks -----------------------------------------------------------------------------
    def _on_plug(self) -> None:
        self._in.clear()

    def _on_unplug(self, now: float) -> None:
        if self._restart_until is not None:  # unplugged mid-restart: it comes back restarted
            self._restart_until = None
            self._reset()

    def _tick(self, now: float) -> float:
        if self._restart_until is not None and now >= self._restart_until:
            self._restart_until = None
            self._reset()
            self._out += DONE
        timeout = 1.0
        if self._restart_until is not None:
            timeout = max(0.0, min(timeout, self._restart_until - now))
        return timeout

    # -- test controls ----------------------------------------------------------------------------------
    def power_cycle(self) -> None:
        """Model a power cycle (the pty, if open, stays): 0 V, DC mode, default frequencies."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._voltages = [0] * CHANNELS
        self._frequencies = [DEFAULT_FREQUENCY_HZ] * CHANNELS
        self._mode = "DC"

    @property
    def voltages_mv(self) -> list[int]:
        with self._lock:
            return list(self._voltages)

    @property
    def frequencies_hz(self) -> list[int]:
        with self._lock:
            return list(self._frequencies)

    @property
    def mode(self) -> str:
        """``"DC"`` or ``"AC"``."""
        with self._lock:
            return self._mode

    @property
    def restarting(self) -> bool:
        with self._lock:
            return self._restart_until is not None

    def override(self, command: str, raw: bytes | None) -> None:
        """Answer ``command`` (upper case, as received without the terminator) with ``raw`` bytes verbatim,
        doing nothing else; None: back to normal."""
        with self._lock:
            if raw is None:
                self._overrides.pop(command.upper(), None)
            else:
                self._overrides[command.upper()] = bytes(raw)

    def handle_line(self, line: str) -> bytes:
        """Execute one command line (no terminator); return the reply bytes (no echo)."""
        with self._lock:
            return self._execute(line)

    # -- device logic -----------------------------------------------------------------------------------
    def _execute(self, line: str) -> bytes:
        cmd = line.strip().upper()
        if cmd in self._overrides:
            return self._overrides[cmd]
        m = _V_SET.match(cmd)
        if m:
            ch, mv = int(m.group(1)), int(m.group(2))
            limit = int(self.opts["max_mv"])
            if abs(mv) > limit:
                if self.opts["out_of_range"] == "error":
                    return ERROR
                mv = max(-limit, min(limit, mv))
            self._voltages[ch - 1] = mv
            return DONE
        m = _F_SET.match(cmd)
        if m:
            ch, hz = int(m.group(1)), int(m.group(2))
            if not 0 <= hz <= MAX_FREQUENCY_HZ:
                return ERROR
            self._frequencies[ch - 1] = hz
            return DONE
        if cmd == "V?":
            return _channels_line(self._voltages) + DONE
        if cmd == "F?":
            return _channels_line(self._frequencies) + DONE
        if cmd in ("MDC", "MAC"):
            self._mode = cmd[1:]
            return DONE
        if cmd == "M?":
            return f"Mode: {self._mode}\r\n".encode() + DONE
        if cmd == "CD":
            lines = [
                "Model: EPC-04 (qnetd simulator)",
                f"Serial: {self.opts['serial']}",
                f"Firmware: {self.opts['firmware']}",
                f"Channels: {CHANNELS}",
                f"Voltage range: -{self.opts['max_mv']}..{self.opts['max_mv']} mV",
            ]
            return "".join(ln + "\r\n" for ln in lines).encode() + DONE
        return ERROR

    # -- serving thread ---------------------------------------------------------------------------------
    def _take_lines(self) -> list[str]:
        lines = []
        while True:
            idx = [i for i in (self._in.find(b"\r"), self._in.find(b"\n")) if i >= 0]
            if not idx:
                if len(self._in) > 4096:
                    self._in.clear()  # garbage without a terminator: an input buffer overflow
                return lines
            i = min(idx)
            raw = bytes(self._in[:i])
            del self._in[: i + 1]
            lines.append(raw.decode("ascii", errors="replace"))

    def _on_data(self, data: bytes, now: float) -> None:
        self._in += data
        for line in self._take_lines():
            if not line.strip():
                continue
            self.history.append(line)
            if self.stall or self._restart_until is not None:
                continue  # hung, or busy restarting: the command is lost
            if self.opts["echo"]:
                self._out += line.encode("ascii", errors="replace") + b"\r\n"
            if line.strip().upper() == "RST" and "RST" not in self._overrides:
                self._restart_until = now + float(self.opts["restart_s"])
                continue
            self._out += self._execute(line)


def _channels_line(values: list[int]) -> bytes:
    return (" ".join(f"CH{i + 1} {v}" for i, v in enumerate(values)) + "\r\n").encode()


__all__ = ["CHANNELS", "MAX_FREQUENCY_HZ", "SimEPC04"]
