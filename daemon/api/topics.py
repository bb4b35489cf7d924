"""Schemas of the published topics: what ``daemon.describe`` reports and docs/protocol.md states.

Each entry: a pattern (``<name>`` stands for a device or link name), a docstring, the header fields (beyond
the common ones: version, topic, seq, host_time, frames) with type and unit, and the binary frames.
"""

from __future__ import annotations

from typing import Any

COMMON_FIELDS: dict[str, dict[str, Any]] = {
    "version": {"type": "string", "doc": "protocol version, MAJOR.MINOR"},
    "topic": {"type": "string", "doc": "the topic, as in frame 0"},
    "seq": {"type": "integer", "doc": "per-topic sequence number from 0; a gap means messages were dropped"},
    "host_time": {"type": "number", "unit": "s", "doc": "Unix time at which the daemon sent the message"},
    "frames": {"type": "array of object", "doc": "for each binary frame: name, dtype (little-endian), shape"},
}

TOPICS: dict[str, dict[str, Any]] = {
    "counts": {
        "doc": "Singles per channel over one integration interval of tagger time.",
        "fields": {
            "t_begin_ps": {"type": "integer", "unit": "ps", "doc": "tagger time at which the interval starts"},
            "t_end_ps": {"type": "integer", "unit": "ps", "doc": "tagger time at which the interval ends"},
            "interval_ps": {"type": "integer", "unit": "ps", "doc": "t_end_ps - t_begin_ps"},
            "device": {"type": "string", "doc": "the time tagger the counts come from"},
            "channels": {"type": "array of integer", "doc": "0-based channel numbers"},
            "counts": {"type": "array of integer", "doc": "tags per channel in the interval"},
            "rates_hz": {"type": "array of number", "unit": "Hz", "doc": "counts / interval"},
            "overflow": {"type": "boolean", "doc": "the tagger dropped tags in this interval: counts are a lower bound, not valid data"},
            "missed_events": {"type": "integer", "doc": "tags the tagger reported as dropped in this interval"},
        },
        "frames": [],
    },
    "device.<name>": {
        "doc": "A device's state changed (and once per device at start-up).",
        "fields": {
            "device": {"type": "string", "doc": "device name"},
            "driver": {"type": "string", "doc": "driver entry-point name"},
            "state": {"type": "string", "doc": "disconnected, connecting, ready, busy or faulted"},
            "previous": {"type": "string or null", "doc": "the state before"},
            "error": {"type": "string or null", "doc": "why it faulted, if it did"},
            "retry_in_s": {"type": "number or null", "unit": "s", "doc": "when the next connect attempt starts"},
            "attempt": {"type": "integer", "doc": "connect attempts since the last success"},
        },
        "frames": [],
    },
    "daemon": {
        "doc": "Health, every daemon.health_interval_s and on start and stop.",
        "fields": {
            "state": {"type": "string", "doc": "starting, running, stopping or stopped"},
            "uptime_s": {"type": "number", "unit": "s", "doc": "seconds since start"},
            "devices": {"type": "object", "doc": "device name -> state"},
            "loop_lag_ms": {"type": "number", "unit": "ms", "doc": "event-loop scheduling delay measured by the health task"},
            "requests_in_flight": {"type": "integer", "doc": "RPC requests being served"},
        },
        "frames": [],
    },
}


def all_topics() -> dict[str, dict[str, Any]]:
    """The daemon's own topics and the analysis pipeline's (coincidences, histogram.<name>, qkd.<link>, ...)."""
    from daemon.analysis.pipeline import PROGRESS_TOPIC
    from daemon.analysis.pipeline import TOPICS as ANALYSIS_TOPICS

    from daemon.control.polarization import TOPICS as CONTROL_TOPICS
    from daemon.qkd.service import BLOCK_FIELDS
    from daemon.qkd.service import TOPICS as KEY_TOPICS

    topics = {**TOPICS, **ANALYSIS_TOPICS, **PROGRESS_TOPIC, **CONTROL_TOPICS, **KEY_TOPICS}
    q = topics["qkd.<link>"]  # interval statistics (analysis) and, with [qkd.links.NAME], one message per key block
    topics["qkd.<link>"] = {**q, "doc": q["doc"] + " With a key pipeline ([qkd.links.NAME]) also one message per "
                            "key block: kind = \"block\" (the interval statistics have kind = \"interval\").",
                            "fields": {**q["fields"], **BLOCK_FIELDS}}
    return topics


def describe_topics() -> list[dict[str, Any]]:
    return [
        {"name": name, "doc": t["doc"], "fields": {**COMMON_FIELDS, **t["fields"]}, "frames": t["frames"]}
        for name, t in all_topics().items()
    ]
