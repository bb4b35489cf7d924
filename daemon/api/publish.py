"""The PUB side: one socket, per-topic sequence numbers, never blocking the event loop.

PUB drops messages for a subscriber whose queue is full (high-water mark) instead of blocking; the per-topic
``seq`` lets the subscriber see the gap.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import structlog
import zmq

from daemon.api.protocol import encode_message
from daemon.api.security import CurveConfig, make_server

log = structlog.get_logger("qnetd.publish")


class Publisher:
    """A plain (synchronous) PUB socket: a non-blocking send on PUB returns at once, so it is safe to call
    from the event loop, and no future is left behind per message."""

    def __init__(self, ctx: zmq.Context, endpoint: str, sndhwm: int = 10_000,
                 curve: CurveConfig | None = None) -> None:
        self.endpoint = endpoint
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 500)
        if "[" in endpoint or endpoint.count(":") > 2:
            self.socket.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            make_server(self.socket, curve)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)  # an unclosed socket would block the context's termination
            raise
        self._seq: dict[str, int] = defaultdict(int)
        self.sent = 0
        self.dropped = 0

    def publish(
        self,
        topic: str,
        fields: dict[str, Any],
        arrays: Sequence[tuple[str, np.ndarray]] = (),
        t_begin_ps: int | None = None,
        t_end_ps: int | None = None,
    ) -> None:
        seq = self._seq[topic]
        self._seq[topic] = seq + 1
        parts = encode_message(topic, seq, fields, arrays, t_begin_ps, t_end_ps)
        try:
            self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1
        except zmq.ZMQError as e:
            self.dropped += 1
            log.warning("publish failed", topic=topic, error=str(e))

    def sequences(self) -> dict[str, int]:
        return dict(self._seq)

    def close(self) -> None:
        self.socket.close()
