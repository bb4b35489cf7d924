"""The live-analysis pipeline: TagBatches in, messages for the ``coincidences``, ``histogram.<name>`` and
``qkd.<link>`` topics out, one set per integration interval.

Wiring (the daemon does this)::

    cfg, errors = validate(raw_config.get("analysis", {}))          # every problem with its key path
    pipeline = AnalysisPipeline(cfg, device="tagger")
    register(method_table, pipeline, progress=lambda f: publisher.publish("analysis.calibration", f))
    ...
    for topic, fields, arrays, t0, t1 in pipeline.feed(batch):       # per batch, in time order
        publisher.publish(topic, fields, arrays, t_begin_ps=t0, t_end_ps=t1)
    pipeline.reset()                                                 # when the stream restarts

``feed`` is synchronous and CPU-bound (numba kernels that release the GIL); it may run on a worker thread.
Setters and RPC handlers are thread-safe: a change takes effect at the next batch, and the interval in progress
is discarded (counted in ``status()['discarded_intervals']``) because it would mix two configurations; the new
interval grid starts at that batch's ``t_begin``. A batch that starts before the previous one ended (a stream
restart the caller did not report) resets the analysis as :meth:`AnalysisPipeline.reset` does.
"""

from __future__ import annotations

import asyncio
import copy
import re
import threading
import time
from typing import Annotated, Any, Callable

import numpy as np

from daemon.analysis.calibration import CalibrationRun, CalibrationSettings
from daemon.analysis.coincidences import CoincidenceEngine, EngineSpec, IntervalResult
from daemon.analysis.histograms import HistogramAccumulator, spec_from_range
from daemon.analysis.statistics import BELL_STATES, link_statistics
from drivers.base import TagBatch
from drivers.params import Field, ParamError, validate_table

__all__ = [
    "ANALYSIS_FIELDS",
    "HISTOGRAM_FIELDS",
    "LINK_FIELDS",
    "MATRIX_FIELDS",
    "PROGRESS_TOPIC",
    "TOPICS",
    "AnalysisPipeline",
    "Message",
    "register",
    "rpc_handlers",
    "validate",
    "warm_up",
]

PS_PER_S = 1_000_000_000_000
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_HIST_BINS = 1_000_000
Message = tuple[str, dict[str, Any], list[tuple[str, np.ndarray]], int, int]

# ------------------------------------------------------------------------------------------------------------
# configuration: the [analysis] table

ANALYSIS_FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, doc="false: no coincidence analysis (counts are still published)"),
    "window_ps": Field(int, 1000, unit="ps", min=1, max=1_000_000_000,
                       doc="coincidence window, full width: a pair counts if -w//2 <= Δ < w - w//2"),
    "integration_s": Field(float, 1.0, unit="s", min=1e-6, max=3600,
                           doc="integration interval of the coincidences, histogram and qkd topics (tagger time)"),
    "accidental_offset_ps": Field(int, 100_000, unit="ps", min=-10**10, max=10**10,
                                  doc="accidentals: the same window displaced by this much; 0 = no accidentals; "
                                      "otherwise |offset| >= window_ps"),
    "delays_ps": Field(list[int], [], unit="ps", min=-10**12, max=10**12,
                       doc="software delay per channel (index = channel), added to its timestamps; missing: 0"),
    "pairs": Field(list[list[int]], [], doc="coincidence pairs [left, right]; empty: the matrix below"),
    "matrix": Field(dict, {}, doc="alice = [...], bob = [...]: every Alice x Bob pair (used when pairs is empty)"),
    "histograms": Field(list[dict], [], doc="correlation histograms: [[analysis.histograms]] tables"),
    "links": Field(list[dict], [], doc="BBM92 links for the qkd.<name> topic: [[analysis.links]] tables"),
}

MATRIX_FIELDS: dict[str, Field] = {
    "alice": Field(list[int], [0, 1, 2, 3], min=0, max=255, doc="left channels (Alice H, V, D, A)"),
    "bob": Field(list[int], [4, 5, 6, 7], min=0, max=255, doc="right channels (Bob H, V, D, A)"),
}

HISTOGRAM_FIELDS: dict[str, Field] = {
    "name": Field(str, doc="topic histogram.<name>: lower-case letters, digits and _, starting with a letter"),
    "pair": Field(list[int], min=0, max=255, doc="[start, stop] channels: bins count stop - start"),
    "bin_ps": Field(int, 50, unit="ps", min=1, max=10**9, doc="bin width"),
    "range_ps": Field(int, 10_000, unit="ps", min=1, max=10**10,
                      doc="half range: bins cover [center - range, center + range); 2*range must be a multiple of bin"),
    "center_ps": Field(int, 0, unit="ps", min=-10**10, max=10**10, doc="centre of the range"),
    "accumulate": Field(bool, False, doc="true: publish the running sum since start/reset; false: per interval"),
}

LINK_FIELDS: dict[str, Field] = {
    "name": Field(str, doc="topic qkd.<name>: lower-case letters, digits and _, starting with a letter"),
    "alice": Field(list[int], [0, 1, 2, 3], min=0, max=255, doc="Alice's H, V, D, A channels"),
    "bob": Field(list[int], [4, 5, 6, 7], min=0, max=255, doc="Bob's H, V, D, A channels"),
    "bell_state": Field(str, "phi+", choices=BELL_STATES, doc="the state the source makes"),
    "alice_angles_deg": Field(list[float], [0.0, 45.0], unit="degrees",
                              doc="analyser angles of Alice's H/V and D/A bases"),
    "bob_angles_deg": Field(list[float], [0.0, 45.0], unit="degrees",
                            doc="analyser angles of Bob's bases (22.5/67.5 allow a CHSH test)"),
}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _channels(value: Any, path: str, errors: list[ParamError], count: int | None = None) -> bool:
    ok = True
    if count is not None and (not isinstance(value, list) or len(value) != count):
        errors.append(ParamError(path, f"expected {count} channels, got {value!r}", f"{count} channels 0..255"))
        return False
    if isinstance(value, list) and len(set(value)) != len(value):
        errors.append(ParamError(path, f"repeats a channel: {value!r}", "distinct channels"))
        ok = False
    return ok


def validate(raw: Any, path: str = "analysis", channel_count: int | None = None
             ) -> tuple[dict[str, Any] | None, list[ParamError]]:
    """Validate the ``[analysis]`` table; return ``(config, [])`` or ``(None, every problem with its key path)``.

    ``channel_count`` (the tagger's, if known) also checks that every channel exists.
    """
    errors: list[ParamError] = []
    cfg = validate_table({} if raw is None else raw, ANALYSIS_FIELDS, path, errors)
    cfg["matrix"] = validate_table(cfg.get("matrix") or {}, MATRIX_FIELDS, _join(path, "matrix"), errors)
    for key in ("alice", "bob"):
        _channels(cfg["matrix"][key], _join(path, f"matrix.{key}"), errors)
    used: list[tuple[str, int]] = []
    for i, pair in enumerate(cfg.get("pairs") or []):
        kp = f"{_join(path, 'pairs')}[{i}]"
        if len(pair) != 2 or not all(0 <= c <= 255 for c in pair) or pair[0] == pair[1]:
            errors.append(ParamError(kp, f"{pair!r} is not a pair of two different channels",
                                     "[a, b], 0 <= a != b <= 255"))
        else:
            used += [(kp, c) for c in pair]
    if not cfg.get("pairs"):
        used += [(_join(path, "matrix"), c) for c in cfg["matrix"]["alice"] + cfg["matrix"]["bob"]]
        overlap = set(cfg["matrix"]["alice"]) & set(cfg["matrix"]["bob"])
        if overlap:
            errors.append(ParamError(_join(path, "matrix"), f"channel(s) {sorted(overlap)} are on both sides",
                                     "disjoint alice and bob channels"))
    w, off = cfg.get("window_ps"), cfg.get("accidental_offset_ps")
    if isinstance(w, int) and isinstance(off, int) and off and abs(off) < w:
        errors.append(ParamError(_join(path, "accidental_offset_ps"),
                                 f"{off} overlaps the coincidence window ({w} ps)", f"0 or |offset| >= {w}"))
    if isinstance(cfg.get("integration_s"), float) and round(cfg["integration_s"] * PS_PER_S) < 1:
        errors.append(ParamError(_join(path, "integration_s"), "is shorter than 1 ps", "> 1e-12 s"))
    if len(cfg.get("delays_ps") or []) > 256:
        errors.append(ParamError(_join(path, "delays_ps"), "has more than 256 entries", "one delay per channel 0..255"))
    names: set[str] = set()
    hists = []
    for i, h in enumerate(cfg.get("histograms") or []):
        kp = f"{_join(path, 'histograms')}[{i}]"
        t = validate_table(h, HISTOGRAM_FIELDS, kp, errors)
        hists.append(t)
        name = t.get("name")
        if isinstance(name, str):
            if not NAME_RE.fullmatch(name):
                errors.append(ParamError(f"{kp}.name", f"invalid name {name!r}",
                                         "lower-case letters, digits and _, starting with a letter, at most 32"))
            elif name in names:
                errors.append(ParamError(f"{kp}.name", f"histogram {name!r} is defined twice", "unique names"))
            names.add(name)
        pair = t.get("pair")
        if isinstance(pair, list):
            if len(pair) != 2 or pair[0] == pair[1]:
                errors.append(ParamError(f"{kp}.pair", f"{pair!r} is not a pair of two different channels", "[a, b]"))
            else:
                used += [(f"{kp}.pair", c) for c in pair]
        b, r = t.get("bin_ps"), t.get("range_ps")
        if isinstance(b, int) and isinstance(r, int):
            if (2 * r) % b:
                errors.append(ParamError(f"{kp}.range_ps", f"2*range_ps = {2 * r} is not a multiple of bin_ps = {b}",
                                         "2*range_ps divisible by bin_ps"))
            elif 2 * r // b > MAX_HIST_BINS:
                errors.append(ParamError(f"{kp}.range_ps", f"{2 * r // b} bins", f"at most {MAX_HIST_BINS} bins"))
    cfg["histograms"] = hists
    links = []
    lnames: set[str] = set()
    for i, lk in enumerate(cfg.get("links") or []):
        kp = f"{_join(path, 'links')}[{i}]"
        t = validate_table(lk, LINK_FIELDS, kp, errors)
        links.append(t)
        name = t.get("name")
        if isinstance(name, str):
            if not NAME_RE.fullmatch(name):
                errors.append(ParamError(f"{kp}.name", f"invalid name {name!r}",
                                         "lower-case letters, digits and _, starting with a letter, at most 32"))
            elif name in lnames:
                errors.append(ParamError(f"{kp}.name", f"link {name!r} is defined twice", "unique names"))
            lnames.add(name)
        for side in ("alice", "bob"):
            if _channels(t.get(side), f"{kp}.{side}", errors, 4):
                used += [(f"{kp}.{side}", c) for c in t[side]]
        if isinstance(t.get("alice"), list) and isinstance(t.get("bob"), list) and set(t["alice"]) & set(t["bob"]):
            errors.append(ParamError(kp, "alice and bob share a channel", "disjoint channels"))
        for key in ("alice_angles_deg", "bob_angles_deg"):
            v = t.get(key)
            if isinstance(v, list) and len(v) != 2:
                errors.append(ParamError(f"{kp}.{key}", f"expected 2 angles, got {v!r}", "[basis 0, basis 1] degrees"))
    cfg["links"] = links
    if channel_count is not None:
        for kp, c in used:
            if not 0 <= c < channel_count:
                errors.append(ParamError(kp, f"channel {c} does not exist", f"0..{channel_count - 1}"))
    if errors:
        return None, errors
    return cfg, []


# ------------------------------------------------------------------------------------------------------------
# topics (same format as daemon/api/topics.py)

_INTERVAL_FIELDS = {
    "t_begin_ps": {"type": "integer", "unit": "ps", "doc": "start of the interval (corrected time of the left tag)"},
    "t_end_ps": {"type": "integer", "unit": "ps", "doc": "end of the interval"},
    "interval_ps": {"type": "integer", "unit": "ps", "doc": "t_end_ps - t_begin_ps"},
    "device": {"type": "string or null", "doc": "the time tagger the tags come from"},
    "overflow": {"type": "boolean", "doc": "tags were dropped in the span this interval draws from: not valid data"},
    "missed_events": {"type": "integer", "doc": "tags the tagger reported as dropped, first interval affected"},
}

TOPICS: dict[str, dict[str, Any]] = {
    "coincidences": {
        "doc": "Coincidences and accidentals per configured pair over one integration interval of tagger time.",
        "fields": {
            **_INTERVAL_FIELDS,
            "mode": {"type": "string", "doc": "pairs (configured list) or matrix (every alice x bob pair)"},
            "pairs": {"type": "array of array of integer", "doc": "[left, right] channels, in the order of counts"},
            "counts": {"type": "array of integer", "doc": "coincidences per pair: -w//2 <= Δ < w - w//2, all pairs"},
            "accidentals": {"type": "array of integer or null",
                            "doc": "the same window displaced by accidental_offset_ps; null if disabled"},
            "rates_hz": {"type": "array of number", "unit": "Hz", "doc": "counts / interval"},
            "car": {"type": "array of number or null", "doc": "(C - A) / A per pair; null where A = 0"},
            "alice": {"type": "array of integer or null", "doc": "matrix mode: row channels"},
            "bob": {"type": "array of integer or null", "doc": "matrix mode: column channels"},
            "matrix": {"type": "array of array of integer or null", "doc": "matrix mode: counts[alice][bob]"},
            "accidentals_matrix": {"type": "array of array of integer or null", "doc": "matrix mode: accidentals"},
            "window_ps": {"type": "integer", "unit": "ps", "doc": "coincidence window (full width)"},
            "accidental_offset_ps": {"type": "integer", "unit": "ps", "doc": "displacement of the accidental window"},
            "delays_ps": {"type": "object", "unit": "ps", "doc": "channel -> software delay applied (non-zero ones)"},
        },
        "frames": [],
    },
    "histogram.<name>": {
        "doc": "Correlation histogram (all pairs, a g2) of one pair over one interval, or the running sum.",
        "fields": {
            **_INTERVAL_FIELDS,
            "name": {"type": "string", "doc": "histogram name"},
            "pair": {"type": "array of integer", "doc": "[start, stop]: bins count Δ = t_stop - t_start"},
            "bin_ps": {"type": "integer", "unit": "ps", "doc": "bin width"},
            "lo_ps": {"type": "integer", "unit": "ps",
                      "doc": "left edge of bin 0; bin k = [lo + k*bin, lo + (k+1)*bin)"},
            "n_bins": {"type": "integer", "doc": "number of bins"},
            "total": {"type": "integer", "doc": "sum of the counts frame"},
            "accumulate": {"type": "boolean", "doc": "true: running sum since accumulated_since_ps"},
            "accumulated_since_ps": {"type": "integer or null", "unit": "ps", "doc": "start of the running sum"},
            "intervals": {"type": "integer", "doc": "intervals summed"},
            "overflow_intervals": {"type": "integer", "doc": "of them, flagged overflow"},
        },
        "frames": [{"name": "counts", "dtype": "<i8", "shape": "[n_bins]", "doc": "pairs per bin"}],
    },
    "qkd.<link>": {
        "doc": "BBM92 statistics of one link per interval: QBER per basis, visibility, CHSH S, CAR.",
        "fields": {
            **_INTERVAL_FIELDS,
            "link": {"type": "string", "doc": "link name"},
            "kind": {"type": "string", "doc": "\"interval\": these statistics (\"block\": a key block, "
                                              "docs/qkd-pipeline.md)"},
            "alice": {"type": "array of integer", "doc": "Alice's H, V, D, A channels"},
            "bob": {"type": "array of integer", "doc": "Bob's H, V, D, A channels"},
            "bell_state": {"type": "string", "doc": "phi+, phi-, psi+ or psi-"},
            "matrix": {"type": "array of array of integer", "doc": "coincidences [alice HVDA][bob HVDA]"},
            "accidentals_matrix": {"type": "array of array of integer or null", "doc": "accidentals, same layout"},
            "coincidences": {"type": "integer", "doc": "sum of the matrix"},
            "accidentals": {"type": "integer or null", "doc": "sum of the accidentals matrix"},
            "sifted": {"type": "object", "doc": "Z, X: coincidences with matching bases"},
            "qber": {"type": "object", "doc": "Z, X: error share against the Bell state (null: no counts)"},
            "qber_error": {"type": "object", "doc": "Z, X: standard error sqrt(Q(1-Q)/N)"},
            "qber_corrected": {"type": "object", "doc": "Z, X: QBER of counts minus accidentals"},
            "visibility": {"type": "object", "doc": "Z, X: 1 - 2 QBER"},
            "correlations": {"type": "array of array of number or null", "doc": "E[alice basis][bob basis]"},
            "ideal_correlations": {"type": "array of array of number", "doc": "E of the Bell state at these angles"},
            "chsh": {"type": "number or null", "doc": "CHSH S, when the analyser settings allow a violation"},
            "chsh_ideal": {"type": "number", "doc": "S of the ideal state at these settings"},
            "chsh_reason": {"type": "string or null", "doc": "why chsh is null"},
            "s_equivalent": {"type": "number or null", "doc": "sqrt(2) (V_Z + V_X): diagnostics only, not a Bell test"},
            "car": {"type": "number or null", "doc": "(C - A) / A over the 16 pairs; null if A = 0"},
            "coincidence_rate_hz": {"type": "number", "unit": "Hz", "doc": "coincidences / interval"},
            "sifted_rate_hz": {"type": "number", "unit": "Hz", "doc": "sifted coincidences / interval"},
        },
        "frames": [],
    },
}

PROGRESS_TOPIC: dict[str, dict[str, Any]] = {
    "analysis.calibration": {
        "doc": "Progress of analysis.calibrate_delays (suggested topic for the progress callback).",
        "fields": {
            "phase": {"type": "string", "doc": "started, collecting, done, failed or cancelled"},
            "fraction": {"type": "number", "doc": "share of the requested tagger time collected, 0..1"},
            "pairs": {"type": "array of array of integer", "doc": "the pairs being calibrated"},
            "found": {"type": "array of boolean", "doc": "done: peak found per pair"},
            "error": {"type": "string", "doc": "failed: why"},
        },
        "frames": [],
    },
}


# ------------------------------------------------------------------------------------------------------------
# the pipeline


def _pairs_of(cfg: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    if cfg["pairs"]:
        return "pairs", [tuple(p) for p in cfg["pairs"]]
    m = cfg["matrix"]
    return "matrix", [(a, b) for a in m["alice"] for b in m["bob"]]


def _delays_dict(delays: list[int]) -> dict[int, int]:
    return {c: int(d) for c, d in enumerate(delays) if d}


class AnalysisPipeline:
    """Coincidences, histograms and link statistics over a TagBatch stream (see the module docstring)."""

    def __init__(self, config: dict[str, Any], *, device: str | None = None, log: Any = None) -> None:
        cfg, errors = validate(config)
        if errors:
            raise ValueError("invalid analysis config:\n" + "\n".join(f"  {e}" for e in errors))
        if log is None:
            import structlog

            log = structlog.get_logger("qnetd.analysis")
        self.log = log
        self.device = device
        self._lock = threading.RLock()
        self._cfg = cfg
        self._pending: dict[str, Any] | None = None
        self._calibration: CalibrationRun | None = None
        self.tags = 0
        self.batches = 0
        self.intervals = 0
        self.overflow_intervals = 0
        self.discarded_intervals = 0
        self.restarts = 0
        self.busy_s = 0.0
        self._build(cfg)

    # -- configuration --------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The configuration in effect (or about to take effect at the next batch)."""
        with self._lock:
            return copy.deepcopy(self._pending or self._cfg)

    def window_and_delays(self) -> tuple[int, dict[int, int]]:
        """The coincidence window and the per-channel delays in effect (or about to take effect), without copying
        the whole configuration: the key pipeline reads them for every batch."""
        with self._lock:
            cfg = self._pending or self._cfg
            return int(cfg["window_ps"]), _delays_dict(cfg["delays_ps"])

    def _build(self, cfg: dict[str, Any]) -> None:
        self._mode, pub_pairs = _pairs_of(cfg)
        all_pairs = list(pub_pairs)
        index = {p: i for i, p in enumerate(all_pairs)}
        self._link_idx = []
        for lk in cfg["links"]:
            idx = []
            for a in lk["alice"]:
                for b in lk["bob"]:
                    if (a, b) not in index:
                        index[(a, b)] = len(all_pairs)
                        all_pairs.append((a, b))
                    idx.append(index[(a, b)])
            self._link_idx.append(np.array(idx, np.int64))
        self._pub_pairs = pub_pairs
        self._n_pub = len(pub_pairs)
        hspecs = [spec_from_range(h["name"], h["pair"][0], h["pair"][1], h["bin_ps"], h["range_ps"], h["center_ps"])
                  for h in cfg["histograms"]]
        self._interval_ps = max(1, int(round(cfg["integration_s"] * PS_PER_S)))
        self._delays = _delays_dict(cfg["delays_ps"])
        if not cfg["enabled"]:
            all_pairs, hspecs = [], []
        self._spec = EngineSpec(tuple(all_pairs), cfg["window_ps"], cfg["accidental_offset_ps"], self._delays,
                                self._interval_ps, tuple(hspecs))
        self._engine = CoincidenceEngine(self._spec)
        self._hacc = [HistogramAccumulator(s, bool(h["accumulate"])) for s, h in zip(hspecs, cfg["histograms"])]
        self._cfg = cfg

    def _reconfigure(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to a copy of the config, validate it, and schedule it for the next batch."""
        with self._lock:
            cfg = copy.deepcopy(self._pending or self._cfg)
            change(cfg)
            new, errors = validate(cfg)
            if errors:
                raise ValueError("; ".join(str(e) for e in errors))
            self._pending = new
            if not self._engine.started:
                self._apply_pending()
            return copy.deepcopy(new)

    def _apply_pending(self) -> None:
        cfg, self._pending = self._pending, None
        if self._engine.started:
            self.discarded_intervals += 1
            self.log.info("analysis reconfigured: the interval in progress is discarded")
        self._build(cfg)

    def set_window(self, window_ps: int) -> dict[str, Any]:
        return self._reconfigure(lambda c: c.update(window_ps=int(window_ps)))

    def set_accidental_offset(self, offset_ps: int) -> dict[str, Any]:
        return self._reconfigure(lambda c: c.update(accidental_offset_ps=int(offset_ps)))

    def set_integration(self, seconds: float) -> dict[str, Any]:
        return self._reconfigure(lambda c: c.update(integration_s=float(seconds)))

    def set_delays(self, delays_ps: dict[int, int] | list[int], replace: bool = False) -> dict[str, Any]:
        """Set software delays: ``{channel: ps}`` (merged into the current ones unless ``replace``) or a full list."""
        def change(c: dict[str, Any]) -> None:
            if isinstance(delays_ps, list):
                c["delays_ps"] = [int(d) for d in delays_ps]
                return
            cur = [] if replace else list(c["delays_ps"])
            for ch, d in delays_ps.items():
                ch = int(ch)
                if not 0 <= ch <= 255:
                    raise ValueError(f"delays_ps: channel {ch} is not 0..255")
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
                    raise ValueError(f"delays_ps[{ch}]: expected an integer number of ps, got {d!r}")
                while len(cur) <= ch:
                    cur.append(0)
                cur[ch] = int(d)
            c["delays_ps"] = cur
        return self._reconfigure(change)

    def set_pairs(self, pairs: list[list[int]] | None = None, alice: list[int] | None = None,
                  bob: list[int] | None = None) -> dict[str, Any]:
        """Explicit pairs, or (pairs empty/None) the matrix of ``alice`` x ``bob`` channels."""
        def change(c: dict[str, Any]) -> None:
            if pairs:
                c["pairs"] = [list(p) for p in pairs]
            else:
                c["pairs"] = []
                if alice is not None:
                    c["matrix"]["alice"] = list(alice)
                if bob is not None:
                    c["matrix"]["bob"] = list(bob)
        return self._reconfigure(change)

    # -- streaming --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """The stream restarted (tagger time is not contiguous): forget intervals in progress and carried tags."""
        with self._lock:
            if self._pending is not None:
                self._apply_pending()
            self._engine.reset()
            for h in self._hacc:
                h.reset()

    def feed(self, batch: TagBatch) -> list[Message]:
        """Account one batch; return the messages of the intervals it completed: (topic, fields, arrays, t0, t1)."""
        with self._lock:
            t_start = time.perf_counter()
            if self._pending is not None:
                self._apply_pending()
            if self._engine.started and batch.t_begin < self._engine.watermark_ps:
                self.restarts += 1
                self.log.warning("tagger time went backwards: analysis restarted", t_begin_ps=batch.t_begin,
                                 previous_t_end_ps=self._engine.watermark_ps)
                self._engine.reset()
                for h in self._hacc:
                    h.reset()
            self.tags += len(batch)
            self.batches += 1
            out: list[Message] = []
            for iv in self._engine.feed(batch):
                out += self._messages(iv)
            cal = self._calibration
            if cal is not None and cal.feed(batch):
                self._calibration = None
            self.busy_s += time.perf_counter() - t_start
            return out

    def _messages(self, iv: IntervalResult) -> list[Message]:
        self.intervals += 1
        self.overflow_intervals += iv.overflow
        cfg = self._cfg
        if not cfg["enabled"]:
            return []
        isec = (iv.t_end - iv.t_begin) / PS_PER_S
        base = {"interval_ps": iv.t_end - iv.t_begin, "device": self.device, "overflow": bool(iv.overflow),
                "missed_events": int(iv.missed_events)}
        out: list[Message] = []
        counts = iv.counts[:self._n_pub]
        acc = None if iv.accidentals is None else iv.accidentals[:self._n_pub]
        fields = {
            **base,
            "mode": self._mode,
            "pairs": [list(p) for p in self._pub_pairs],
            "counts": counts.tolist(),
            "accidentals": None if acc is None else acc.tolist(),
            "rates_hz": (counts / isec).tolist(),
            "car": None if acc is None else [None if a == 0 else (int(c) - int(a)) / int(a)
                                             for c, a in zip(counts, acc)],
            "alice": None, "bob": None, "matrix": None, "accidentals_matrix": None,
            "window_ps": cfg["window_ps"],
            "accidental_offset_ps": cfg["accidental_offset_ps"],
            "delays_ps": {str(k): v for k, v in self._delays.items()},
        }
        if self._mode == "matrix":
            na, nb = len(cfg["matrix"]["alice"]), len(cfg["matrix"]["bob"])
            fields.update(alice=cfg["matrix"]["alice"], bob=cfg["matrix"]["bob"],
                          matrix=counts.reshape(na, nb).tolist(),
                          accidentals_matrix=None if acc is None else acc.reshape(na, nb).tolist())
        out.append(("coincidences", fields, [], iv.t_begin, iv.t_end))
        for hcfg, accum, hist in zip(cfg["histograms"], self._hacc, iv.histograms):
            shown = accum.add(hist, iv.t_begin, iv.overflow)
            s = accum.spec
            hf = {**base, "name": s.name, "pair": [s.a, s.b], "bin_ps": s.bin_ps, "lo_ps": s.lo_ps, "n_bins": s.n_bins,
                  "total": int(shown.sum()), "accumulate": accum.accumulate,
                  "accumulated_since_ps": accum.t_begin if accum.accumulate else None,
                  "intervals": accum.intervals, "overflow_intervals": accum.overflow_intervals}
            frame = np.ascontiguousarray(shown, "<i8")
            out.append((f"histogram.{s.name}", hf, [("counts", frame)], iv.t_begin, iv.t_end))
        for lk, idx in zip(cfg["links"], self._link_idx):
            m = iv.counts[idx].reshape(4, 4)
            a = None if iv.accidentals is None else iv.accidentals[idx].reshape(4, 4)
            st = link_statistics(m, a, bell_state=lk["bell_state"], alice_angles_deg=tuple(lk["alice_angles_deg"]),
                                 bob_angles_deg=tuple(lk["bob_angles_deg"]), interval_s=isec)
            qf = {**base, "link": lk["name"], "kind": "interval", "alice": lk["alice"], "bob": lk["bob"],
                  "matrix": m.tolist(),
                  "accidentals_matrix": None if a is None else a.tolist(), **st}
            out.append((f"qkd.{lk['name']}", qf, [], iv.t_begin, iv.t_end))
        return out

    # -- calibration ------------------------------------------------------------------------------------------
    def default_calibration_pairs(self) -> list[tuple[int, int]]:
        """Configured pairs; else the matrix diagonal (alice[i], bob[i]); else the first link's diagonal."""
        cfg = self.config
        if cfg["pairs"]:
            return [tuple(p) for p in cfg["pairs"]]
        m = cfg["matrix"]
        if len(m["alice"]) == len(m["bob"]):
            return list(zip(m["alice"], m["bob"]))
        if cfg["links"]:
            return list(zip(cfg["links"][0]["alice"], cfg["links"][0]["bob"]))
        raise ValueError("no default pairs: the matrix is not square and no link is configured; name the pairs")

    def start_calibration(self, pairs: list[tuple[int, int]], duration_s: float, settings: CalibrationSettings,
                          progress: Callable[[dict[str, Any]], None] | None = None) -> CalibrationRun:
        """Start collecting calibration histograms from the next batch on (one calibration at a time)."""
        with self._lock:
            if self._calibration is not None and not self._calibration.done:
                if not getattr(self._calibration, "background", False):
                    raise RuntimeError("a delay calibration is already running")
                self._calibration.cancel()  # a background one (control delay tracker) yields to this one
            run = CalibrationRun([tuple(p) for p in pairs], dict(self._delays), int(round(duration_s * PS_PER_S)),
                                 settings, progress)
            self._calibration = run
            return run

    def cancel_calibration(self, run: CalibrationRun) -> None:
        with self._lock:
            run.cancel()
            if self._calibration is run:
                self._calibration = None

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            e = self._engine
            cal = self._calibration
            return {
                "config": copy.deepcopy(self._cfg),
                "pending_config": copy.deepcopy(self._pending),
                "mode": self._mode,
                "pairs": [list(p) for p in self._pub_pairs],
                "interval_ps": self._interval_ps,
                "tags": self.tags,
                "batches": self.batches,
                "intervals": self.intervals,
                "overflow_intervals": self.overflow_intervals,
                "discarded_intervals": self.discarded_intervals,
                "restarts": self.restarts,
                "t0_ps": e.t0,
                "watermark_ps": e.watermark_ps,
                "horizon_ps": e.horizon_ps,
                "buffered_tags": e.buffered_tags,
                "busy_s": self.busy_s,
                "tags_per_busy_s": (self.tags / self.busy_s) if self.busy_s > 0 else None,
                "calibration": None if cal is None else {"pairs": [list(p) for p in cal.pairs],
                                                         "fraction": cal.fraction},
            }


def warm_up() -> float:
    """Compile (first run) or load from numba's cache (later runs) every kernel the pipeline uses; returns the
    seconds it took. Call once at start-up, off the event loop, so the first batch is not delayed by it."""
    t0 = time.perf_counter()
    ts = np.array([100, 130, 900, 1000, 1200, 5000, 5030, 9000], np.int64)
    ch = np.array([0, 1, 0, 1, 2, 0, 1, 2], np.uint8)
    batch = TagBatch(ts, ch, 0, 10_000)
    hist = (spec_from_range("w", 0, 1, 10, 100),)
    # raw-buffer kernels with the accidental ring / with the probe / without accidentals; a corrected copy
    for delays, off in (({1: 5}, 2000), ({1: 4000}, 300), ({1: 5}, 0), ({1: 10**7}, 2000)):
        eng = CoincidenceEngine(EngineSpec(((0, 1), (2, 1)), 200, off, delays, 1000, hist))
        eng.feed(batch)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------
# RPC


def rpc_handlers(pipeline: AnalysisPipeline, progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> list[tuple[str, Callable[..., Any]]]:
    """The ``analysis.*`` RPC methods as ``(name, async handler)``; parameters are ``Annotated[T, Field]``.

    ``progress(fields)`` (optional) receives calibration progress on the event loop thread, e.g. to publish it
    on ``analysis.calibration`` (:data:`PROGRESS_TOPIC`).
    """
    from daemon.api.errors import Busy, InvalidParams, Timeout

    def invalid(e: Exception) -> InvalidParams:
        return InvalidParams(str(e))

    async def set_window(window_ps: Annotated[int, Field(unit="ps", min=1, max=1_000_000_000,
                                                         doc="full width of the coincidence window")]) -> dict:
        """Set the coincidence window. Takes effect at the next batch; the interval in progress is discarded."""
        try:
            return pipeline.set_window(window_ps)
        except ValueError as e:
            raise invalid(e) from None

    async def set_delays(
        delays_ps: Annotated[dict, Field(unit="ps",
                                         doc='{"<channel>": ps, ...}, integers; other channels keep theirs')],
        replace: Annotated[bool, Field(doc="true: channels not named get delay 0")] = False,
    ) -> dict:
        """Set per-channel software delays (int ps, added to the channel's timestamps). Next batch on."""
        try:
            parsed = {}
            for k, v in delays_ps.items():
                try:
                    ch = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"delays_ps: {k!r} is not a channel number") from None
                parsed[ch] = v
            return pipeline.set_delays(parsed, replace=replace)
        except ValueError as e:
            raise invalid(e) from None

    async def set_pairs(
        pairs: Annotated[list[list[int]] | None, Field(doc="[[left, right], ...]; null or []: use the matrix")] = None,
        alice: Annotated[list[int] | None, Field(doc="matrix rows (when pairs is empty)")] = None,
        bob: Annotated[list[int] | None, Field(doc="matrix columns (when pairs is empty)")] = None,
    ) -> dict:
        """Choose the coincidence pairs: an explicit list, or the full alice x bob matrix. Next batch on."""
        try:
            return pipeline.set_pairs(pairs, alice, bob)
        except ValueError as e:
            raise invalid(e) from None

    async def set_integration(seconds: Annotated[float, Field(unit="s", min=1e-6, max=3600,
                                                              doc="integration interval (tagger time)")]) -> dict:
        """Set the integration interval of the coincidences/histogram/qkd topics. Next batch on."""
        try:
            return pipeline.set_integration(seconds)
        except ValueError as e:
            raise invalid(e) from None

    async def set_accidental_offset(offset_ps: Annotated[int, Field(unit="ps", min=-10**10, max=10**10,
                                                                    doc="0 disables accidentals")]) -> dict:
        """Set the displacement of the accidental window. Next batch on."""
        try:
            return pipeline.set_accidental_offset(offset_ps)
        except ValueError as e:
            raise invalid(e) from None

    async def calibrate_delays(
        pairs: Annotated[list[list[int]] | None, Field(
            doc="[[a, b], ...]: b's delay is adjusted so the a-b peak sits at 0; default: configured pairs, "
                "else the matrix diagonal")] = None,
        duration_s: Annotated[float, Field(unit="s", min=1e-6, max=3600, doc="tagger time to collect")] = 1.0,
        coarse_range_ps: Annotated[int, Field(unit="ps", min=1, max=10**10, doc="search ±this")] = 100_000,
        coarse_bin_ps: Annotated[int, Field(unit="ps", min=1, max=10**9, doc="coarse peak search bins")] = 1000,
        fine_bin_ps: Annotated[int, Field(unit="ps", min=1, max=10**9, doc="fine bins (divides coarse_bin_ps)")] = 10,
        fine_range_ps: Annotated[int, Field(unit="ps", min=1, max=10**10,
                                            doc="fine analysis ±this around the peak")] = 5000,
        apply: Annotated[bool, Field(doc="true: set the new delays when every peak was found")] = False,
        timeout_s: Annotated[float, Field(unit="s", min=0.01, max=86400, doc="wall-clock limit")] = 120.0,
    ) -> dict:
        """Coarse-to-fine delay search per pair on the live stream: delays, peak widths, signal-to-background.

        Progress goes to the progress callback (topic analysis.calibration). With apply=true the delays are
        set (next batch on) only if every pair's peak was found.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def report(fields: dict[str, Any]) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, fields)

        settings = CalibrationSettings(coarse_range_ps, coarse_bin_ps, fine_bin_ps, fine_range_ps)
        holder: list[CalibrationRun] = []

        def on_progress(fields: dict[str, Any]) -> None:  # on the event loop thread
            if progress is not None:
                progress(fields)
            if fields.get("phase") == "done" and holder and not fut.done():
                fut.set_result(holder[0].result)

        try:
            plist = [tuple(p) for p in pairs] if pairs else pipeline.default_calibration_pairs()
            for p in plist:
                if len(p) != 2:
                    raise ValueError(f"pairs: {list(p)!r} is not [a, b]")
            run = pipeline.start_calibration(plist, duration_s, settings,
                                             lambda f: loop.call_soon_threadsafe(on_progress, f))
        except RuntimeError as e:
            raise Busy(str(e)) from None
        except ValueError as e:
            raise invalid(e) from None
        holder.append(run)
        if run.done and run.result is not None and not fut.done():
            fut.set_result(run.result)
        report({"phase": "started", "fraction": 0.0, "pairs": [list(p) for p in plist]})
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see daemon/worker.py
                result = await fut
        except TimeoutError:
            pipeline.cancel_calibration(run)
            report({"phase": "failed", "fraction": run.fraction, "pairs": [list(p) for p in plist],
                    "error": f"timed out after {timeout_s} s"})
            raise Timeout(f"analysis.calibrate_delays: only {run.fraction:.0%} of {duration_s} s of tagger time "
                          f"arrived within {timeout_s} s (is the acquisition running?)") from None
        except asyncio.CancelledError:
            pipeline.cancel_calibration(run)
            raise
        result = dict(result)
        result["applied"] = False
        if apply:
            if result["all_found"]:
                pipeline.set_delays({int(k): v for k, v in result["delays_ps"].items()})
                result["applied"] = True
            else:
                result["not_applied_reason"] = "not every peak was found"
        result["delays_ps"] = {str(k): v for k, v in result["delays_ps"].items()}
        return result

    async def status() -> dict:
        """Configuration in effect, counters (tags, intervals, overflow/discarded), horizon, calibration state."""
        return pipeline.status()

    return [(f"analysis.{fn.__name__}", fn) for fn in (set_window, set_delays, set_pairs, set_integration,
                                                         set_accidental_offset, calibrate_delays, status)]


def register(table: Any, pipeline: AnalysisPipeline, progress: Callable[[dict[str, Any]], None] | None = None,
             group: str = "analysis") -> None:
    """Register the ``analysis.*`` methods on a :class:`daemon.api.methods.MethodTable`."""
    for name, fn in rpc_handlers(pipeline, progress):
        table.add(name, fn, group=group)
