"""Protocol-level simulators: fake instruments that speak the real wire protocols.

Each is a view onto the bench (:class:`drivers.sim.bench.state.BenchState`): a command changes the shared
state, and what the instrument reports comes from it. The real drivers in ``drivers/`` talk to them
unchanged (pyvisa-py over ``TCPIP::127.0.0.1::PORT::SOCKET``, pyserial on a pseudo-terminal, JSON over TCP).

Every simulator implements :class:`SimInstrument`. ``MODELS`` maps the ``model`` key of a
``[simulation.instruments.NAME]`` config table to its class, imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol

from drivers.params import Field
from drivers.sim.bench.state import BenchState

MODELS: dict[str, str] = {
    "thorlabs_cld1015": "drivers.sim.instruments.cld1015:SimCLD1015",
    "idq_id120": "drivers.sim.instruments.id120:SimID120",
    "thorlabs_mpc320": "drivers.sim.instruments.mpc320:SimMPC320",
    "singlequantum_eos": "drivers.sim.instruments.eos:SimEos",
    "toptica_dlcpro": "drivers.sim.instruments.dlcpro:SimDLCPro",
    "ozoptics_epc04": "drivers.sim.instruments.epc04:SimEPC04",
    "idq_id900": "drivers.sim.instruments.id900:SimID900",
}


class SimInstrument(Protocol):
    """What the daemon's simulation host needs of a simulated instrument."""

    model: ClassVar[str]
    options: ClassVar[dict[str, Field]]  # keys of [simulation.instruments.NAME] besides `model`

    def __init__(self, name: str, state: BenchState, options: dict[str, Any]) -> None: ...

    def start(self) -> None:
        """Begin serving in background threads. Restartable after stop(), at the same address."""

    def stop(self) -> None:
        """Like unplugging the instrument: close the listener and every connection. State is kept."""

    @property
    def address(self) -> str:
        """What the matching driver's resource option takes (VISA resource, pty path, host:port)."""


def load_model(model: str) -> type:
    """The simulator class for a model name; KeyError if unknown."""
    module, _, cls = MODELS[model].partition(":")
    return getattr(importlib.import_module(module), cls)
