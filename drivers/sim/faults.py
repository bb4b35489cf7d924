"""Fault injection shared by the in-process simulated devices, so tests can exercise supervision."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from drivers.params import Field

FAULT_OPTIONS: dict[str, Field] = {
    "fail_connect": Field(bool, False, doc="simulate an absent instrument: connect raises ConnectionRefusedError"),
    "connect_delay_s": Field(float, 0.0, unit="s", min=0, max=3600, doc="simulate a slow link: connect sleeps"),
}


class SimFaults:
    """Mixin: honours ``fail_connect`` and ``connect_delay_s``; ``fail_connect`` may be flipped at run time."""

    opts: dict[str, Any]
    fault_options: ClassVar[dict[str, Field]] = FAULT_OPTIONS

    def simulate_connect(self) -> None:
        delay = self.opts.get("connect_delay_s", 0.0)
        if delay:
            time.sleep(delay)
        if self.opts.get("fail_connect", False):
            raise ConnectionRefusedError(f"simulated instrument {getattr(self, 'name', '?')} is not answering")
