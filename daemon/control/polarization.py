"""Polarization compensation: keep a link's QBER low by moving one polarization controller's paddles.

One :class:`PolarizationLoop` per ``[control.polarization.NAME]`` table. It reads the link statistics the
analysis pipeline produces (``qkd.<link>``: QBER and sifted counts of the Z and X bases, one set per
interval, handed over in the event loop by :class:`daemon.acquisition.Acquisition`'s ``listeners``) and
moves the paddles of the configured controller through its :class:`DeviceSupervisor` (so the configured
limits are enforced and, in the simulated testbed, the APT protocol runs against the simulated MPC320).

Two methods. ``model`` (the default, daemon/control/polmodel.py): every interval's whole 4x4 coincidence
matrix (cross-basis blocks included) is fitted with a model of the channel (one unknown SU(2) element and a
visibility, the MPC320's quarter-half-quarter optics at the commanded angles); a run moves all paddles to
the predicted optimum and measures, two or three times; between runs (``track``) the same fit on the data
of key production itself moves the paddles whenever the predicted gain is worth the move: small moves, no
dithering. ``sweep`` (and the fallback when model steps do not reach the target) is the model-free method:

Optimizer: sequential exact coordinate minimization (Rotosolve-style). For a Werner state, the measured
error probability is a quadratic form in the Jones matrix of each waveplate, whose entries are affine in
cos 2phi and sin 2phi; so, all other paddles fixed, QBER_Z + QBER_X of one paddle angle phi is *exactly* a
trigonometric polynomial c0 + a1 cos 2phi + b1 sin 2phi + a2 cos 4phi + b2 sin 4phi (5 parameters). A step
measures the cost at ``samples`` angles spread over the paddle's allowed range (plus where it is), fits
the 5 parameters by least squares (so counting noise is averaged over all samples, not met one
difference at a time), moves to the fitted minimum inside the limits and measures it: it keeps that
angle if it is no worse than the best sampled one, else it goes to the best sample. Each step is a global
minimization along one coordinate, needs no step size and no gradient, and every move is an absolute
move to a known angle (slow paddles are visited once per sample). Near the optimum (max QBER below
``local_below_qber``) steps are local instead: a parabola through here +- step, with the step halved when a
sweep does not improve. Sweeps repeat until both bases are at the target, or no longer improve
(``stalled``: back to the best setting of the run), or ``max_sweeps``.

Fixing one arm suffices: for phi+, what the receivers see depends on ``U_A U_B^T`` up to a phase, and a
quarter-half-quarter controller on one arm reaches (almost, given the 0-170 degree travel) all of SU(2).

Life cycle: ``idle`` -> (max(QBER Z, X) above ``threshold_qber`` for ``hold_s`` of tagger time, with
``auto``; or RPC start) ``adjusting`` -> ``converged`` / ``stalled`` / ``stopped`` -> ``idle``
watching again. A device fault (or a missing QBER feed) makes it ``paused`` with the reason; it resumes
by itself when the device is ready again. While it runs, ``adjusting`` is true on topic ``control.<name>``
and in ``control.<name>.status``: key production must not use intervals measured while adjusting
(the paddles move between samples; the channel is deliberately made worse). A tracking move is ``adjusting``
from the first move until ``settle_s`` of tagger time after the last. ``qkd.<link>`` messages of
``kind`` ``block`` (per key block) are ignored; only per-interval statistics feed the loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable

import numpy as np
import structlog

from daemon.api.errors import RpcError
from daemon.control.polmodel import ChannelModel, Tracker
from drivers.params import REQUIRED, Field, ParamError, validate_table

PS_PER_S = 1_000_000_000_000
MIN_STEP_DEG = 0.5  # local steps are halved down to this before a run gives up
VERIFY_S = 2.0  # tagger seconds of data after a tracking move before the next decision

FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, doc="false: the loop is not created"),
    "link": Field(str, REQUIRED, doc="the [[analysis.links]] name whose qkd.<link> QBER is minimized"),
    "controller": Field(str, REQUIRED, doc="device name of the polarization controller to move"),
    "paddles": Field(list[int], [0, 1, 2], doc="paddle indices to optimize, in sweep order"),
    "auto": Field(bool, True, doc="start by itself when QBER stays above threshold_qber for hold_s"),
    "threshold_qber": Field(float, 0.03, min=0.0, max=0.5,
                            doc="auto start when max(QBER Z, QBER X) stays above this"),
    "target_qber": Field(float, 0.015, min=0.0, max=0.5, doc="stop when both bases are at or below this"),
    "hold_s": Field(float, 10.0, unit="s", min=0.0, max=86400.0,
                    doc="tagger (simulated) seconds above threshold before an auto start"),
    "samples": Field(int, 6, min=5, max=36, doc="angles sampled per paddle step (5 determine the fit)"),
    "fine_step_deg": Field(float, 4.0, unit="deg", min=0.0, max=40.0,
                           doc="step of the local (parabolic) coordinate steps near the optimum (0: never local)"),
    "local_below_qber": Field(float, 0.12, min=0.0, max=0.5,
                              doc="max(QBER Z, X) below which a run uses local steps, not whole-range sweeps"),
    "settle_s": Field(float, 0.1, unit="s", min=0.0, max=60.0,
                      doc="tagger time discarded after a move completes (batches already in flight)"),
    "measure_intervals": Field(int, 1, min=1, max=1000, doc="qkd intervals summed per measurement"),
    "max_sweeps": Field(int, 12, min=1, max=1000, doc="sweeps over the paddles before giving up"),
    "measure_timeout_s": Field(float, 30.0, unit="s", min=0.1, max=3600.0,
                               doc="wall seconds without QBER data before the loop pauses"),
    "method": Field(str, "model", choices=("model", "sweep"),
                    doc="model: fit the channel to the coincidence matrix and solve for the paddles (sweeps "
                        "as fallback); sweep: model-free coordinate sweeps only"),
    "arm": Field(str, "bob", choices=("alice", "bob"), doc="the arm whose fiber the controller follows"),
    "max_model_steps": Field(int, 6, min=1, max=100,
                             doc="model steps (measure, fit, move) in a run before falling back to sweeps"),
    "track": Field(bool, True, doc="model method: follow the drift while not adjusting, with small moves"),
    "track_s": Field(float, 5.0, unit="s", min=0.5, max=3600.0,
                     doc="tagger seconds of key-production data between two tracking decisions"),
    "track_min_gain": Field(float, 0.003, min=0.0, max=1.0,
                            doc="predicted decrease of QBER Z + QBER X that justifies a tracking move"),
    "drift_prior_rad2_per_s": Field(float, 1e-4, unit="rad^2/s", min=0.0, max=100.0,
                                    doc="expected fiber drift: how fast older measurements lose weight in the fit"),
    "memory_s": Field(float, 30.0, unit="s", min=1.0, max=86400.0,
                      doc="tagger seconds of measurements kept for the channel fit"),
    "move_penalty_per_deg": Field(float, 3e-4, min=0.0, max=1.0,
                                  doc="tracking: predicted fidelity a degree of paddle travel must buy (the paddles "
                                      "pass through bad settings while they move): near, small moves; not applied "
                                      "while the predicted QBER is above threshold_qber, nor in runs"),
    "track_jump_gain": Field(float, 0.0, min=0.0, max=1.0,
                             doc="tracking: a long move (no travel penalty) even below threshold_qber when it "
                                 "lowers the predicted max(QBER Z, X) by at least this (0: never, the default; see docs/control.md)"),
}

TOPICS: dict[str, dict[str, Any]] = {
    "control.<name>": {
        "doc": "Progress of a polarization compensation loop: on every state change and every measurement.",
        "fields": {
            "name": {"type": "string", "doc": "loop name ([control.polarization.NAME])"},
            "link": {"type": "string", "doc": "the link whose QBER is minimized"},
            "controller": {"type": "string", "doc": "the polarization controller moved"},
            "state": {"type": "string",
                      "doc": "idle, adjusting, tracking (a tracking move), paused, converged, stalled or stopped"},
            "adjusting": {"type": "boolean",
                          "doc": "true while paddles move (and settle_s after): key production must pause or "
                                 "mark these intervals"},
            "reason": {"type": "string or null", "doc": "why it started, paused or ended"},
            "steps": {"type": "integer", "doc": "measurements (paddle settings tried) in this run"},
            "sweep": {"type": "integer", "doc": "sweeps over the paddles in this run"},
            "paddles_deg": {"type": "array of number or null", "doc": "the commanded angles"},
            "qber": {"type": "object or null", "doc": "Z, X: the last measurement"},
            "best_qber": {"type": "object or null", "doc": "Z, X: the best measurement of this run"},
            "sim_s": {"type": "number", "unit": "s", "doc": "tagger seconds since this run started"},
            "method": {"type": "string", "doc": "model or sweep"},
            "track_moves": {"type": "integer", "doc": "tracking moves since the daemon started"},
            "model": {"type": "object or null",
                      "doc": "last channel fit: visibility, residual, predicted QBER Z, X here and at the target"},
        },
        "frames": [],
    },
}


class ControlConfig(dict):
    """The validated [control] table: name -> [control.polarization.NAME] (the dict itself, as before) and
    ``delay``: name -> [control.delay.NAME]. True when either is configured."""

    def __init__(self, loops: dict[str, dict[str, Any]] | None = None,
                 delay: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(loops or {})
        self.delay: dict[str, dict[str, Any]] = dict(delay or {})

    def __bool__(self) -> bool:
        return bool(len(self)) or bool(self.delay)

    def __reduce__(self):  # copy/deepcopy/pickle keep both parts
        return (ControlConfig, (dict(self), self.delay))


from daemon.control.delay import TOPICS as _DELAY_TOPICS  # noqa: E402

TOPICS.update(_DELAY_TOPICS)


def validate(raw: Any, errors: list[ParamError], *, devices: dict[str, Any], links: list[str],
             path: str = "control") -> ControlConfig:
    """Validate ``[control]``: ``polarization.NAME`` loops and ``delay.NAME`` trackers (daemon/control/delay.py);
    returns a :class:`ControlConfig`. Loop and tracker names share the control.NAME namespace."""
    from daemon.control.delay import validate_trackers

    out: dict[str, dict[str, Any]] = {}
    top = validate_table(raw, {"polarization": Field(dict, {}, doc="[control.polarization.NAME] loops"),
                               "delay": Field(dict, {}, doc="[control.delay.NAME] delay trackers")}, path, errors)
    loops = top["polarization"] or {}
    for name, table in loops.items():
        p = f"{path}.polarization.{name}"
        if not (isinstance(name, str) and name[:1].isalpha() and all(c.isalnum() or c == "_" for c in name)):
            errors.append(ParamError(p, "loop names are letters, digits and _, starting with a letter"))
            continue
        cfg = validate_table(table, FIELDS, p, errors)
        dev = devices.get(cfg["controller"])
        if dev is None or getattr(dev.driver_cls, "kind", "") != "polarization_controller":
            pcs = [d for d, c in devices.items() if getattr(c.driver_cls, "kind", "") == "polarization_controller"]
            errors.append(ParamError(f"{p}.controller", f"no polarization controller {cfg['controller']!r}",
                                     "one of " + (", ".join(pcs) or "(none configured)")))
        if cfg["link"] not in links:
            errors.append(ParamError(f"{p}.link", f"no analysis link {cfg['link']!r}",
                                     "one of " + (", ".join(links) or "(no [[analysis.links]])")))
        if not isinstance(cfg["paddles"], list) or not cfg["paddles"] or len(set(cfg["paddles"])) != len(cfg["paddles"]) or min(cfg["paddles"]) < 0:
            errors.append(ParamError(f"{p}.paddles", "expected distinct paddle indices >= 0", "e.g. [0, 1, 2]"))
        if (cfg["target_qber"] or 0) > (cfg["threshold_qber"] or 1):
            errors.append(ParamError(f"{p}.target_qber", "must not exceed threshold_qber",
                                     f"<= {cfg['threshold_qber']}"))
        if cfg["enabled"]:
            out[name] = cfg
    delay = validate_trackers(top["delay"] or {}, errors, links=links, path=f"{path}.delay")
    for name in set(delay) & set(loops):
        errors.append(ParamError(f"{path}.delay.{name}", f"the name {name!r} is also a polarization loop",
                                 "another name (both publish on control.NAME)"))
    return ControlConfig(out, delay)


def fit_minimum(angles_deg: np.ndarray, costs: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Least-squares fit of c0 + a1 cos 2phi + b1 sin 2phi + a2 cos 4phi + b2 sin 4phi; its minimum on [lo, hi]
    (degrees) and the fitted value there."""
    phi = np.radians(np.asarray(angles_deg, float))
    basis = lambda x: np.stack([np.ones_like(x), np.cos(2 * x), np.sin(2 * x), np.cos(4 * x), np.sin(4 * x)], 1)  # noqa: E731
    coef, *_ = np.linalg.lstsq(basis(phi), np.asarray(costs, float), rcond=None)
    grid = np.linspace(lo, hi, max(2, int(round((hi - lo) * 10)) + 1))  # 0.1 degree
    values = basis(np.radians(grid)) @ coef
    k = int(np.argmin(values))
    return float(grid[k]), float(values[k])


class DeviceFault(Exception):
    """The controller (or the QBER feed) cannot be used now; the loop pauses."""


class PolarizationLoop:
    def __init__(self, name: str, cfg: dict[str, Any], controller: Any, publish: Callable[[str, dict], None],
                 now_ps: Callable[[], int | None], link: dict[str, Any] | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.sup = controller  # DeviceSupervisor of the polarization controller
        self._publish = publish
        self._now_ps = now_ps  # tagger time of the last batch read (Acquisition.last_t_end_ps)
        self.log = structlog.get_logger("qnetd.control").bind(loop=name)
        self.topic = f"qkd.{cfg['link']}"
        self.state = "idle"
        self.reason: str | None = None
        self.steps = 0
        self.sweep = 0
        self.runs = 0
        self.paddles: list[float] | None = None
        self.last: dict[str, float] | None = None
        self.best: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []  # per measurement of the last run: steps, sim_s, qber
        self._t0_ps: int | None = None
        self._meas_t_s = 0.0
        self._best: tuple[float, list[float]] = (math.inf, [])
        self._step = float(cfg["fine_step_deg"])
        self._t_last_ps = 0
        self._above_since_ps: int | None = None
        self._queue: asyncio.Queue[tuple[int, int, dict]] = asyncio.Queue(maxsize=1000)
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        lo, hi = controller.cfg.limits.get("angle_deg", (0.0, 170.0))
        self.lo, self.hi = max(0.0, float(lo)), min(170.0, float(hi))  # never outside limits nor travel
        self._link = link or {}
        self.tracker: Tracker | None = None
        self.track_moves = 0
        self.model_info: dict[str, Any] | None = None
        self._moving = False
        self._settle_until_ps = 0
        self._track_task: asyncio.Task[None] | None = None
        self._last_track_ps: int | None = None
        self._verify = False

    # -- feed ------------------------------------------------------------------------------------------
    def on_message(self, topic: str, fields: dict[str, Any], t_begin: int, t_end: int) -> None:
        """Acquisition listener (event loop): one analysis message. Per-key-block messages on the same
        topic (``kind`` = block) are ignored: only per-interval statistics (``kind`` interval or absent)."""
        if topic != self.topic or fields.get("kind", "interval") != "interval":
            return
        q = _qber(fields)
        if q is None:
            return
        self._t_last_ps = t_end
        if self.running:
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait((t_begin, t_end, fields))
            return
        if self._tracking_enabled() and self.state != "paused":
            self._track_feed(fields, t_begin, t_end)
        worst = max(q["Z"], q["X"])
        if worst > self.cfg["threshold_qber"]:
            if self._above_since_ps is None:
                self._above_since_ps = t_begin
            if (self.cfg["auto"] and self.state != "paused" and not self.adjusting
                    and t_end - self._above_since_ps >= self.cfg["hold_s"] * PS_PER_S):
                self.start(f"auto: QBER {worst:.4f} above {self.cfg['threshold_qber']} for {self.cfg['hold_s']:g} s")
        else:
            self._above_since_ps = None

    @property
    def running(self) -> bool:
        """A compensation run (start ... converged/stalled/stopped) is going on."""
        return self._task is not None and not self._task.done()

    @property
    def adjusting(self) -> bool:
        """True during a run, during a tracking move and until settle_s of tagger time after it."""
        if self.running or self._moving:
            return True
        now = self._now_ps() or self._t_last_ps
        return now < self._settle_until_ps

    # -- tracking (model method, between runs) ---------------------------------------------------------
    def _tracking_enabled(self) -> bool:
        return self.cfg["method"] == "model" and self.cfg["track"]

    def _ensure_tracker(self, fields: dict[str, Any]) -> Tracker:
        if self.tracker is None:
            bell = fields.get("bell_state") or self._link.get("bell_state", "phi+")
            model = ChannelModel(bell, self.cfg["arm"], tuple(self._link.get("alice_angles_deg", (0.0, 45.0))),
                                 tuple(self._link.get("bob_angles_deg", (0.0, 45.0))), self.lo, self.hi)
            self.tracker = Tracker(model, memory_s=self.cfg["memory_s"], min_gain=self.cfg["track_min_gain"],
                                   paddles=self.cfg["paddles"], drift_rad2_per_s=self.cfg["drift_prior_rad2_per_s"],
                                   move_weight=self.cfg["move_penalty_per_deg"],
                                   urgent_qber=self.cfg["threshold_qber"], jump_gain=self.cfg["track_jump_gain"])
        return self.tracker

    def _track_feed(self, fields: dict[str, Any], t_begin: int, t_end: int) -> None:
        if self._track_task is not None and not self._track_task.done():
            return  # deciding or moving: these intervals are not at a known, settled setting
        if t_begin < self._settle_until_ps or fields.get("matrix") is None:
            return
        tracker = self._ensure_tracker(fields)
        if self.paddles is None:  # positions unknown yet: read them first
            self._track_task = asyncio.create_task(self._track(None), name=f"control-{self.name}-track")
            return
        tracker.add(t_end / PS_PER_S, self.paddles, fields["matrix"])
        if self._last_track_ps is None:
            self._last_track_ps = t_begin
        # right after a move, decide again after VERIFY_S: the data on both sides of the move resolve the fit's
        # two-fold ambiguity, so a move made on the wrong branch is undone within seconds
        wait_s = min(self.cfg["track_s"], VERIFY_S) if self._verify else self.cfg["track_s"]
        if t_end - self._last_track_ps >= wait_s * PS_PER_S:
            self._verify = False
            self._last_track_ps = t_end
            self._track_task = asyncio.create_task(self._track(t_end), name=f"control-{self.name}-track")

    async def _track(self, t_end: int | None) -> None:
        try:
            if t_end is None or self.paddles is None:
                self.paddles = [float(x) for x in await self._call("positions")]
                if self.tracker is not None:
                    self.tracker.reset()
                self._last_track_ps = None
                return
            tracker = self.tracker
            assert tracker is not None
            pos = [float(x) for x in await self._call("positions")]
            if any(abs(a - b) > 0.3 for a, b in zip(pos, self.paddles)):
                # moved by someone else (an RPC, a panel): the data so far were taken elsewhere
                self.log.info("paddles moved outside the loop: tracking restarts", paddles=pos, expected=self.paddles)
                self.paddles = pos
                tracker.reset()
                self._last_track_ps = None
                return
            current = list(self.paddles)
            target, info = await asyncio.to_thread(tracker.propose, t_end / PS_PER_S, current)
            self.model_info = _round_info(info)
            if target is None or self.running or self.state == "paused":
                return
            prev = self.state
            self._moving = True
            self.state, self.reason = "tracking", (f"track: predicted QBER Z+X gain {info['gain']:.4f}"
                                                   + (" (long move)" if info.get("jump") else ""))
            try:
                for p in self.cfg["paddles"]:
                    if abs(target[p] - current[p]) >= 0.001:
                        await self._move(p, target[p])
            finally:
                self._moving = False
                self._settle_until_ps = (self._now_ps() or self._t_last_ps) + int(self.cfg["settle_s"] * PS_PER_S)
            self.track_moves += 1
            self._verify = True
            self._last_track_ps = None
            self.state, self.reason = (prev if prev != "tracking" else "idle"), self.reason
            self.publish()
        except DeviceFault as e:
            self._moving = False
            self.paddles = None  # re-read after the fault
            self._set("paused", str(e))
            asyncio.get_running_loop().create_task(self._resume_after_fault())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not kill the daemon
            self._moving = False
            self.log.exception("polarization tracking failed")
            self.reason = f"tracking error: {type(e).__name__}: {e}"

    async def _resume_after_fault(self) -> None:
        await self.sup.wait_ready()
        if self.state == "paused" and not self.running:
            self._set("idle", "resumed: device ready")

    # -- control ---------------------------------------------------------------------------------------
    def start(self, reason: str = "requested") -> bool:
        if self.running:
            return False
        self.runs += 1
        self.steps = self.sweep = 0
        self.best = self.last = None
        self.history = []
        self._t0_ps = self._now_ps() or self._t_last_ps
        self._above_since_ps = None
        self._drain()
        if self._track_task is not None and not self._track_task.done():
            self._track_task.cancel()
        self._moving = False
        self._task = asyncio.create_task(self._run(reason), name=f"control-{self.name}")
        return True

    async def stop(self, reason: str = "stopped by request") -> None:
        track = self._track_task
        if track is not None and not track.done():
            track.cancel()
            await asyncio.gather(track, return_exceptions=True)
            self._moving = False
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._set("stopped", reason)

    def status(self) -> dict[str, Any]:
        sim_s = 0.0
        if self._t0_ps is not None:
            sim_s = max(0, (self._now_ps() or self._t_last_ps) - self._t0_ps) / PS_PER_S
        return {"name": self.name, "link": self.cfg["link"], "controller": self.sup.name, "state": self.state,
                "adjusting": self.adjusting, "reason": self.reason, "steps": self.steps, "sweep": self.sweep,
                "paddles_deg": self.paddles, "qber": self.last, "best_qber": self.best, "sim_s": round(sim_s, 3),
                "method": self.cfg["method"], "track_moves": self.track_moves, "model": self.model_info}

    def _set(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason
        self.log.info("polarization loop", state=state, reason=reason, steps=self.steps)
        self.publish()

    def publish(self) -> None:
        self._publish(f"control.{self.name}", self.status())

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    # -- the loop --------------------------------------------------------------------------------------
    async def _run(self, reason: str) -> None:
        self._set("adjusting", reason)
        try:
            while True:
                try:
                    await self.sup.wait_ready()
                    if self.state == "paused":
                        self._set("adjusting", "resumed: device ready")
                    if self.cfg["method"] == "model":
                        done, why = await self._optimize_model()
                    else:
                        done, why = await self._optimize()
                    self._set("converged" if done else "stalled", why)
                    return
                except DeviceFault as e:
                    self._set("paused", str(e))
                    await asyncio.sleep(0.2)  # a fault: the supervisor reconnects; wait_ready above
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not kill the daemon
            self.log.exception("polarization loop failed")
            self._set("stalled", f"error: {type(e).__name__}: {e}")

    async def _call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await self.sup.call(method, params or {}, user=False)
        except RpcError as e:
            raise DeviceFault(f"{self.sup.name}.{method}: {e.message}") from None

    async def _move(self, paddle: int, degrees: float) -> float:
        degrees = round(min(self.hi, max(self.lo, float(degrees))), 3)  # clamp first: never outside limits
        await self._call("move", {"paddle": paddle, "degrees": degrees})
        assert self.paddles is not None
        # where it actually is: the controller's resolution (MPC320: 1370 counts over 170 degrees, 0.124 degree)
        # rounds the command, and the channel model must use the real angle
        try:
            actual = float((await self._call("positions"))[paddle])
        except (IndexError, TypeError, ValueError):
            actual = degrees
        self.paddles[paddle] = actual
        return actual

    async def _measure(self) -> float:
        """Cost QBER_Z + QBER_X (summed error counts / sifted) over measure_intervals intervals that start
        at least settle_s of tagger time after now."""
        mark = (self._now_ps() or self._t_last_ps) + int(self.cfg["settle_s"] * PS_PER_S)
        err = {"Z": 0.0, "X": 0.0}
        sifted = {"Z": 0, "X": 0}
        matrix = np.zeros((4, 4))
        t_last = mark
        got = 0
        deadline = time.monotonic() + self.cfg["measure_timeout_s"]
        while got < self.cfg["measure_intervals"]:
            left = deadline - time.monotonic()
            try:
                t_begin, t_end, fields = await asyncio.wait_for(self._queue.get(), max(0.01, left))
            except TimeoutError:
                raise DeviceFault(f"no {self.topic} data for {self.cfg['measure_timeout_s']:g} s") from None
            if t_begin < mark:
                continue
            q = _qber(fields)
            if q is None:
                continue
            for b in ("Z", "X"):
                n = int(fields["sifted"][b])
                sifted[b] += n
                err[b] += q[b] * n
            if fields.get("matrix") is not None:
                matrix += np.asarray(fields["matrix"], float).reshape(4, 4)
                self._ensure_tracker(fields)
            t_last = t_end
            got += 1
        if not self.sup.available:  # faulted while we measured: this point is not trustworthy
            raise DeviceFault(f"{self.sup.name} is {self.sup.state.value}: {self.sup.error}")
        qz, qx = (err[b] / sifted[b] if sifted[b] else 0.5 for b in ("Z", "X"))
        self._meas_t_s = t_last / PS_PER_S
        if self.tracker is not None and matrix.sum() > 0 and self.paddles is not None:
            self.tracker.add(self._meas_t_s, self.paddles, matrix)
        self.steps += 1
        self.last = {"Z": round(qz, 6), "X": round(qx, 6)}
        if self.best is None or qz + qx < self.best["Z"] + self.best["X"]:
            self.best = dict(self.last)
        sim_s = max(0, (self._now_ps() or 0) - (self._t0_ps or 0)) / PS_PER_S
        self.history.append({"step": self.steps, "sim_s": sim_s, "qber": dict(self.last),
                             "paddles_deg": list(self.paddles or [])})
        self.publish()
        return qz + qx

    def _at_target(self) -> bool:
        return self.last is not None and max(self.last.values()) <= self.cfg["target_qber"]

    async def _optimize_model(self) -> tuple[bool, str]:
        """Measure (the whole 4x4 matrix), fit the channel, move all paddles to the predicted optimum; repeat
        (each new setting also resolves the fit's two-fold ambiguity) until at target or max_model_steps;
        then the model-free sweeps take over."""
        self.paddles = [float(x) for x in await self._call("positions")]
        self._check_paddles()
        if self.tracker is not None:
            self.tracker.reset()
        cost = await self._measure()
        self._best = (cost, list(self.paddles))
        if self._at_target():
            return True, "at target"
        for _ in range(self.cfg["max_model_steps"]):
            if self.tracker is None:
                break  # no coincidence matrix in the feed: the model cannot be used
            target, info = await asyncio.to_thread(self.tracker.propose, self._meas_t_s, list(self.paddles),
                                                   False, 0.0, 2e-5)  # a run: the best setting, wherever
            self.model_info = _round_info(info)
            if target is None:
                break
            for p in self.cfg["paddles"]:
                if abs(target[p] - self.paddles[p]) >= 0.001:
                    await self._move(p, target[p])
            cost = await self._measure()
            if cost < self._best[0]:
                self._best = (cost, list(self.paddles))
            if self._at_target():
                return True, f"at target after {self.steps} steps (model)"
        model_steps = self.steps
        self.log.info("model steps did not reach the target: sweeps", steps=model_steps)
        done, why = await self._optimize()
        return done, f"{why} (sweeps after {model_steps} model steps)"

    def _check_paddles(self) -> None:
        assert self.paddles is not None
        for p in self.cfg["paddles"]:
            if p >= len(self.paddles):
                raise DeviceFault(f"{self.sup.name} has {len(self.paddles)} paddles; paddle {p} configured")

    async def _optimize(self) -> tuple[bool, str]:
        self.paddles = [float(x) for x in await self._call("positions")]
        for p in self.cfg["paddles"]:
            if p >= len(self.paddles):
                raise DeviceFault(f"{self.sup.name} has {len(self.paddles)} paddles; paddle {p} configured")
        cost = await self._measure()
        self._best = (cost, list(self.paddles))
        if self._at_target():
            return True, "at target"
        local = self.cfg["fine_step_deg"] > 0 and max(self.last.values()) <= self.cfg["local_below_qber"]
        self._step = self.cfg["fine_step_deg"]
        while self.sweep < self.cfg["max_sweeps"]:
            self.sweep += 1
            start_cost = cost
            for p in self.cfg["paddles"]:
                cost = await (self._local_step(p, cost) if local else self._global_step(p, cost))
                if cost < self._best[0]:
                    self._best = (cost, list(self.paddles))
                if self._at_target():
                    return True, f"at target after {self.steps} steps"
            if not local and self.cfg["fine_step_deg"] > 0 and max(self.last.values()) <= self.cfg["local_below_qber"]:
                local = True  # near the optimum: the fine parabolic steps from now on
                continue
            if cost <= start_cost - 0.002:
                continue
            if local and self._step / 2 >= MIN_STEP_DEG:  # step adaptation: finer steps before giving up
                self._step /= 2
                continue
            await self._restore_best()  # no progress beyond counting noise
            return False, f"no improvement in sweep {self.sweep} (QBER Z+X {self._best[0]:.4f} at best)"
        await self._restore_best()
        return False, f"not at target after {self.sweep} sweeps"

    async def _restore_best(self) -> None:
        """Giving up: back to the best setting measured in this run (never leave the channel worse)."""
        cost, best = self._best
        assert self.paddles is not None
        if best != self.paddles:
            for p in self.cfg["paddles"]:
                if self.paddles[p] != best[p]:
                    await self._move(p, best[p])
            await self._measure()

    async def _global_step(self, p: int, cost: float) -> float:
        """Sample the whole allowed range of paddle p, fit the trigonometric model, go to its minimum."""
        assert self.paddles is not None
        n = self.cfg["samples"]
        span = self.hi - self.lo
        grid = [self.lo + span * k / (n - 1) for k in range(n)] if span < 179 else [180.0 * k / n for k in range(n)]
        here = self.paddles[p]
        angles, costs = [here], [cost]
        for a in sorted(grid, key=lambda a: abs(a - here)):  # nearest first: shorter moves
            angles.append(await self._move(p, a))
            costs.append(await self._measure())
        best_i = int(np.argmin(costs))
        target, _ = fit_minimum(np.array(angles), np.array(costs), self.lo, self.hi)
        await self._move(p, target)
        cost = await self._measure()
        if cost > costs[best_i]:  # the fit was off (noise, drift): take the best sample
            await self._move(p, angles[best_i])
            cost = await self._measure()
        return cost

    async def _local_step(self, p: int, cost: float) -> float:
        """Near the optimum: cost at here +- fine_step_deg, parabola through the three, go to its vertex
        (at most two steps away); keep the best of what was measured. Small moves: tracking under drift."""
        assert self.paddles is not None
        s = self._step
        here = self.paddles[p]
        c0 = min(max(here, self.lo + s), self.hi - s)  # centre so that both neighbours are in range
        pts: dict[float, float] = {}
        if c0 == here:
            pts[here] = cost
        for a in (c0 - s, c0 + s, c0):
            if a not in pts:
                await self._move(p, a)
                pts[a] = await self._measure()
        ym, y0, yp = pts[c0 - s], pts[c0], pts[c0 + s]
        curv = ym + yp - 2 * y0
        best_a = min(pts, key=pts.get)
        if curv > 0:
            target = c0 + s * (ym - yp) / (2 * curv)
            target = min(max(target, c0 - 2 * s, self.lo), c0 + 2 * s, self.hi)
            if all(abs(target - a) > 0.05 for a in pts):
                await self._move(p, target)
                c = await self._measure()
                if c <= pts[best_a]:
                    return c
        if self.paddles[p] != best_a:
            await self._move(p, best_a)
            return await self._measure()
        return pts[best_a]


def _round_info(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, (tuple, list)):
            out[k] = [round(float(x), 6) for x in v]
        elif isinstance(v, float):
            out[k] = round(v, 6)
        else:
            out[k] = v
    return out


def _qber(fields: dict[str, Any]) -> dict[str, float] | None:
    q = fields.get("qber") or {}
    if q.get("Z") is None or q.get("X") is None:
        return None
    return {"Z": float(q["Z"]), "X": float(q["X"])}


class ControlHost:
    """Every configured loop and delay tracker: the acquisition listener, the RPC methods
    control.<name>.start/stop/status(/history), and the adjusting flag per link."""

    def __init__(self, cfg: dict[str, dict[str, Any]], supervisors: dict[str, Any], publisher: Any,
                 acquisition: Any) -> None:
        def publish(topic: str, fields: dict) -> None:
            if publisher is not None:
                publisher.publish(topic, fields)

        now = lambda: acquisition.last_t_end_ps  # noqa: E731
        links: dict[str, dict[str, Any]] = {}
        pipeline = getattr(acquisition, "pipeline", None)
        if pipeline is not None:
            try:
                links = {lk["name"]: lk for lk in pipeline.config.get("links", [])}
            except Exception:  # noqa: BLE001 - defaults (phi+, analysers at 0 and 45 degrees) then
                links = {}
        self.loops = {name: PolarizationLoop(name, c, supervisors[c["controller"]], publish, now,
                                             links.get(c["link"]))
                      for name, c in cfg.items() if c["controller"] in supervisors}
        self.delays: dict[str, Any] = {}
        if pipeline is not None:
            from daemon.control.delay import DelayTracker

            for name, c in (getattr(cfg, "delay", None) or {}).items():
                if c["link"] in links:
                    self.delays[name] = DelayTracker(name, c, pipeline, publish, now)
        acquisition.listeners.append(self.on_message)
        self._started = False

    def on_message(self, topic: str, fields: dict[str, Any], t_begin: int, t_end: int) -> None:
        if not self._started:  # the delay trackers start with the first analysis message (the event loop runs)
            self._started = True
            for tr in self.delays.values():
                tr.start()
        for loop in self.loops.values():
            loop.on_message(topic, fields, t_begin, t_end)

    def adjusting(self, link: str) -> bool:
        """True while a loop moves paddles on ``link`` (a run, a tracking move and its settle time) or a delay
        tracker's new delays are taking effect: what the key pipeline must honour."""
        return (any(lp.adjusting for lp in self.loops.values() if lp.cfg["link"] == link)
                or any(dt.adjusting for dt in self.delays.values() if dt.cfg["link"] == link))

    async def stop(self) -> None:
        for loop in self.loops.values():
            await loop.stop("daemon stopping")
        for tr in self.delays.values():
            await tr.stop("daemon stopping")

    def register(self, table: Any) -> None:
        for name, loop in self.loops.items():
            def make(lp: PolarizationLoop) -> tuple:
                async def start() -> dict:
                    """Start compensating now (no effect if already adjusting); returns the status."""
                    lp.start("requested")
                    return lp.status()

                async def stop() -> dict:
                    """Stop compensating; the paddles stay where they are."""
                    await lp.stop()
                    return lp.status()

                async def status() -> dict:
                    """State, adjusting flag, steps, last and best QBER, commanded paddle angles."""
                    return lp.status()

                async def history() -> list:
                    """Every measurement of the current or last run: step, tagger seconds, QBER, paddles."""
                    return list(lp.history)
                return start, stop, status, history

            for fn in make(loop):
                table.add(f"control.{name}.{fn.__name__}", fn, group="control")
        for name, tracker in self.delays.items():
            def make_delay(tr: Any) -> tuple:
                async def start() -> dict:
                    """Start (or resume) following the coincidence peak; returns the status."""
                    tr.start()
                    return tr.status()

                async def stop() -> dict:
                    """Stop following the peak; the delays stay where they are."""
                    await tr.stop()
                    return tr.status()

                async def status() -> dict:
                    """State, adjusting flag, last peak offset, corrections and the adjusted channels' delays."""
                    return tr.status()

                async def history() -> list:
                    """Every estimate: tagger seconds, mean peak offset, pairs found, delay shift applied."""
                    return list(tr.history)
                return start, stop, status, history

            for fn in make_delay(tracker):
                table.add(f"control.{name}.{fn.__name__}", fn, group="control")
