"""structlog set-up: console rendering on a TTY, JSON lines otherwise; stderr, so stdout stays clean."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib(LEVELS[level])


class _ToStructlog(logging.Handler):
    """Standard-library log records (e.g. qnetd.qkd.keystore, pyvisa) as structlog lines of the same format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _bridge_stdlib(level: int) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(h)
    root.addHandler(_ToStructlog())
    root.setLevel(level)
    for noisy in ("numba", "pyvisa", "asyncio"):  # their debug output is not the daemon's
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
