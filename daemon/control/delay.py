"""Delay tracking: keep a link's coincidence peak centred while the fibers change length, without stopping.

One :class:`DelayTracker` per ``[control.delay.NAME]`` table. Every ``measure_s`` of tagger time it collects
the correlation histograms of the link's matching detector pairs (Alice H with Bob H, V-V, D-D, A-A) through
the analysis pipeline's own calibration machinery (:meth:`AnalysisPipeline.start_calibration`: a second
coincidence engine fed the same batches, ``+-range_ps`` around the current delays in ``bin_ps`` bins, peak
centroid per pair), so acquisition, the ``qkd.<link>`` statistics and key production go on meanwhile. The
peak offsets of the pairs found (significance >= 5) are averaged, weighted by their peak counts: one fiber
length change moves all four peaks together. When the mean offset exceeds ``tolerance_ps`` the delays of
the ``adjust`` side's channels of the link are changed by it (at most ``max_step_ps`` at once: a larger
jump is followed in steps, never in one command) through :meth:`AnalysisPipeline.set_delays`, which takes
effect at the next batch; the analysis discards the interval in progress then (mixed delays), and
``adjusting`` is true from the change until ``settle_s`` of tagger time after the next interval boundary,
so the key pipeline discards that instant too.

If a user's ``analysis.calibrate_delays`` starts, the tracker's histogram is cancelled (it is marked
``background``: the one-line rule in ``AnalysisPipeline.start_calibration``) and the tracker waits for the
user's calibration to end. No data for
``measure_timeout_s`` wall seconds (tagger stopped) or no peak found: the state says so (``paused`` /
``lost``), and it keeps trying.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog

from drivers.params import REQUIRED, Field, ParamError, validate_table

PS_PER_S = 1_000_000_000_000

FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, doc="false: the tracker is not created"),
    "link": Field(str, REQUIRED, doc="the [[analysis.links]] name whose coincidence peak is followed"),
    "adjust": Field(str, "bob", choices=("alice", "bob"), doc="whose channels' software delays are changed"),
    "tolerance_ps": Field(int, 20, unit="ps", min=1, max=10**9,
                          doc="correct when the peak is further than this from zero"),
    "measure_s": Field(float, 5.0, unit="s", min=0.1, max=3600.0,
                       doc="tagger seconds of histogram per estimate"),
    "range_ps": Field(int, 5000, unit="ps", min=100, max=10**8,
                      doc="the peak is searched within +-range_ps of where the delays put it"),
    "bin_ps": Field(int, 10, unit="ps", min=1, max=10**6, doc="histogram bin"),
    "max_step_ps": Field(int, 1000, unit="ps", min=1, max=10**10,
                         doc="largest delay change commanded at once (larger offsets are followed in steps)"),
    "settle_s": Field(float, 0.2, unit="s", min=0.0, max=60.0,
                      doc="tagger seconds after the next interval boundary during which adjusting stays true"),
    "measure_timeout_s": Field(float, 60.0, unit="s", min=1.0, max=3600.0,
                               doc="wall seconds without a finished histogram before the tracker reports paused"),
}

TOPICS: dict[str, dict[str, Any]] = {
    "control.<tracker>": {
        "doc": "Progress of a delay tracker ([control.delay.NAME]): after every estimate of the peak offset.",
        "fields": {
            "name": {"type": "string", "doc": "tracker name ([control.delay.NAME])"},
            "link": {"type": "string", "doc": "the link whose coincidence peak is followed"},
            "state": {"type": "string", "doc": "tracking, lost (no significant peak), paused (no data) or stopped"},
            "adjusting": {"type": "boolean", "doc": "true from a delay change until the analysis uses the new delays"},
            "reason": {"type": "string or null", "doc": "why it is lost or paused"},
            "offset_ps": {"type": "number or null", "unit": "ps", "doc": "the last measured mean peak offset"},
            "pairs_found": {"type": "integer", "doc": "pairs with a significant peak in the last estimate"},
            "estimates": {"type": "integer", "doc": "estimates since start"},
            "corrections": {"type": "integer", "doc": "delay changes since start"},
            "total_shift_ps": {"type": "integer", "unit": "ps", "doc": "sum of the delay changes since start"},
            "delays_ps": {"type": "object", "doc": "channel: the adjusted channels' delays now"},
        },
        "frames": [],
    },
}


def validate_trackers(tables: Any, errors: list[ParamError], *, links: dict[str, dict[str, Any]] | list[str],
                      path: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(tables, dict):
        errors.append(ParamError(path, "expected tables [control.delay.NAME]"))
        return out
    names = list(links)
    for name, table in tables.items():
        p = f"{path}.{name}"
        if not (isinstance(name, str) and name[:1].isalpha() and all(c.isalnum() or c == "_" for c in name)):
            errors.append(ParamError(p, "tracker names are letters, digits and _, starting with a letter"))
            continue
        cfg = validate_table(table, FIELDS, p, errors)
        if cfg["link"] not in names:
            errors.append(ParamError(f"{p}.link", f"no analysis link {cfg['link']!r}",
                                     "one of " + (", ".join(names) or "(no [[analysis.links]])")))
        if cfg["range_ps"] is not None and cfg["bin_ps"] is not None:
            if cfg["range_ps"] % cfg["bin_ps"]:
                errors.append(ParamError(f"{p}.range_ps", "must be a multiple of bin_ps", f"bin_ps = {cfg['bin_ps']}"))
            elif 2 * cfg["range_ps"] // cfg["bin_ps"] > 2_000_000:
                errors.append(ParamError(f"{p}.bin_ps", "too many bins (2 range_ps / bin_ps > 2e6)", "a wider bin"))
            if (cfg["tolerance_ps"] or 0) >= cfg["range_ps"]:
                errors.append(ParamError(f"{p}.tolerance_ps", "must be below range_ps", f"< {cfg['range_ps']}"))
        if cfg["enabled"]:
            out[name] = cfg
    return out


class DelayTracker:
    def __init__(self, name: str, cfg: dict[str, Any], pipeline: Any, publish: Callable[[str, dict], None],
                 now_ps: Callable[[], int | None], topic_prefix: str = "control") -> None:
        from daemon.analysis.calibration import CalibrationSettings

        self.name = name
        self.cfg = cfg
        self.pipeline = pipeline
        self._publish = publish
        self._now_ps = now_ps
        self.topic = f"{topic_prefix}.{name}"
        self.log = structlog.get_logger("qnetd.control").bind(tracker=name)
        link = next((lk for lk in pipeline.config.get("links", []) if lk["name"] == cfg["link"]), None)
        if link is None:
            raise ValueError(f"no analysis link {cfg['link']!r}")
        self.link = link
        # the matching pairs; the adjusted side is the second channel of each pair (propagate_delays' rule)
        if cfg["adjust"] == "bob":
            self.pairs = list(zip(link["alice"], link["bob"]))
        else:
            self.pairs = list(zip(link["bob"], link["alice"]))
        self.channels = [b for _, b in self.pairs]
        r, b = int(cfg["range_ps"]), int(cfg["bin_ps"])
        coarse = 10 * b if (2 * r) % (10 * b) == 0 else b  # the coarse peak search in 10-bin steps when they fit
        self.settings = CalibrationSettings(coarse_range_ps=r, coarse_bin_ps=coarse, fine_bin_ps=b, fine_range_ps=r)
        self.state = "tracking"
        self.reason: str | None = None
        self.offset_ps: float | None = None
        self.pairs_found = 0
        self.estimates = 0
        self.corrections = 0
        self.total_shift_ps = 0
        self.history: list[dict[str, Any]] = []  # per estimate: tagger s, offset, found, shift
        self._adjust_until_ps: int | None = None  # adjusting until the tagger passes this (None: not adjusting)
        self._expect: dict[int, int] | None = None  # the delays of our last change, until the analysis uses them
        self._task: asyncio.Task[None] | None = None

    # -- the adjusting contract --------------------------------------------------------------------------
    @property
    def adjusting(self) -> bool:
        if self._adjust_until_ps is None:
            return False
        now = self._now_ps()
        if now is not None and now >= self._adjust_until_ps:
            self._adjust_until_ps = None
            return False
        return True

    def delays(self) -> dict[int, int]:
        d = list(self.pipeline.config.get("delays_ps", []))
        return {int(c): int(d[c]) if c < len(d) else 0 for c in self.channels}

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "link": self.cfg["link"], "state": self.state, "adjusting": self.adjusting,
                "reason": self.reason, "offset_ps": self.offset_ps, "pairs_found": self.pairs_found,
                "estimates": self.estimates, "corrections": self.corrections,
                "total_shift_ps": self.total_shift_ps, "delays_ps": {str(k): v for k, v in self.delays().items()}}

    def publish(self) -> None:
        self._publish(self.topic, self.status())

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.state, self.reason = "tracking", None
            self._task = asyncio.create_task(self._run(), name=f"control-{self.name}")

    async def stop(self, reason: str = "stopped by request") -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state, self.reason = "stopped", reason
        self.publish()

    # -- the loop ---------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug must not kill the daemon
                self.log.exception("delay tracker failed")
                self.state, self.reason = "paused", f"error: {type(e).__name__}: {e}"
                self.publish()
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        if self.adjusting:  # new delays are taking effect: histograms from now on would mix old and new
            await asyncio.sleep(0.05)
            return
        try:
            run = self.pipeline.start_calibration(self.pairs, self.cfg["measure_s"], self.settings)
        except RuntimeError:  # a user's calibration runs: wait for it
            self.state, self.reason = "paused", "waiting for a delay calibration in progress"
            await asyncio.sleep(0.5)
            return
        run.background = True  # a user's analysis.calibrate_delays cancels it and runs instead
        if self._expect and any(int(run.delays.get(ch, 0)) != d for ch, d in self._expect.items()):
            self.pipeline.cancel_calibration(run)  # the analysis has not switched to our last change yet
            await asyncio.sleep(0.05)
            return
        self._expect = None
        deadline = time.monotonic() + self.cfg["measure_timeout_s"]
        try:
            while not run.done:
                if time.monotonic() > deadline:
                    self.state, self.reason = "paused", f"no histogram for {self.cfg['measure_timeout_s']:g} s (no data?)"
                    self.publish()
                    return
                await asyncio.sleep(0.05)
        finally:
            if not run.done:
                self.pipeline.cancel_calibration(run)
        if run.cancelled or run.result is None:
            return
        self._analyse(run.result)

    def _analyse(self, result: dict[str, Any]) -> None:
        found = [p for p in result["pairs"] if p.get("found")]
        self.estimates += 1
        self.pairs_found = len(found)
        now = self._now_ps() or 0
        if not found:
            self.offset_ps = None
            self.state, self.reason = "lost", "no significant coincidence peak within +-range_ps"
            self.history.append({"sim_s": now / PS_PER_S, "offset_ps": None, "found": 0, "shift_ps": 0})
            self.publish()
            return
        weight = sum(max(1.0, float(p.get("peak_counts") or 1.0)) for p in found)
        offset = sum(float(p["offset_ps"]) * max(1.0, float(p.get("peak_counts") or 1.0)) for p in found) / weight
        self.offset_ps = round(offset, 2)
        self.state, self.reason = "tracking", None
        shift = 0
        if abs(offset) > self.cfg["tolerance_ps"]:
            step = int(round(max(-self.cfg["max_step_ps"], min(self.cfg["max_step_ps"], offset))))
            # the peak sits at (t_second + d_second) - (t_first + d_first) = offset: d_second -= offset centres it
            current = self.delays()
            new = {ch: d - step for ch, d in current.items()}
            self.pipeline.set_delays(new)
            self._expect = dict(new)
            interval_ps = int(round(float(self.pipeline.config.get("integration_s", 1.0)) * PS_PER_S))
            self._adjust_until_ps = now + interval_ps + int(self.cfg["settle_s"] * PS_PER_S)
            self.corrections += 1
            self.total_shift_ps += -step
            shift = -step
            self.log.info("delays follow the coincidence peak", offset_ps=self.offset_ps, shift_ps=shift, delays=new)
        self.history.append({"sim_s": now / PS_PER_S, "offset_ps": self.offset_ps, "found": len(found),
                             "shift_ps": shift})
        if len(self.history) > 10000:
            del self.history[:1000]
        self.publish()
