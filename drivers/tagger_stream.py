"""Helpers the vendor time-tagger drivers (Swabian, quTAG) share: importing the vendor API, pacing reads,
and turning converted tags into a valid :class:`~drivers.base.TagBatch` stream (sorted, never before the
previous batch's end)."""

from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np

__all__ = ["drop_late", "import_api", "pace", "sort_by_time"]


def import_api(device: str, requested: str, default: str, fallbacks: tuple[str, ...], what: str,
               advice: str) -> tuple[Any, str]:
    """Import the vendor module ``requested`` (the ``default`` also tries ``fallbacks``): (module, its name).

    If none imports: ImportError naming ``what`` could not be imported, each attempt's error, then ``advice``.
    """
    names = [requested, *fallbacks] if requested == default else [requested]
    problems = []
    for n in names:
        try:
            return importlib.import_module(n), n
        except (ImportError, OSError) as e:  # OSError: the package is there but its native library is not
            problems.append(f"{n}: {type(e).__name__}: {e}")
    raise ImportError(f"{device}: the {what} could not be imported ({'; '.join(problems)}). {advice}")


def pace(last_get: float, interval_ms: float, timeout_s: float) -> None:
    """Wait out the rest of ``interval_ms`` since ``last_get`` (monotonic), but no longer than ``timeout_s``."""
    wait = last_get + interval_ms / 1000.0 - time.monotonic()
    if wait > 0:
        time.sleep(min(wait, max(0.0, timeout_s)))


def sort_by_time(ts: np.ndarray, ch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tags in time order (stable: equal times keep their order); unchanged if already sorted."""
    if len(ts) > 1 and bool((ts[1:] < ts[:-1]).any()):
        order = np.argsort(ts, kind="stable")
        return ts[order], ch[order]
    return ts, ch


def drop_late(ts: np.ndarray, ch: np.ndarray, t_begin: int, log: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop the (sorted) tags earlier than ``t_begin`` and log it: (ts, ch, how many were dropped)."""
    if not len(ts) or ts[0] >= t_begin:
        return ts, ch, 0
    cut = int(np.searchsorted(ts, t_begin, side="left"))
    log.warning("tags earlier than the previous batch's end dropped; batch flagged overflow", late=cut)
    return ts[cut:], ch[cut:], cut
