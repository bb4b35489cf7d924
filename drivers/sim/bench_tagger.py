"""The virtual optical bench's time tagger (entry point ``sim.bench_tagger``).

An in-process simulated TimeTagger whose tags come from the physics of :class:`~drivers.sim.bench.model.BenchModel`
(pairs, fibers, polarization, receivers, detectors, the tagger's own jitter, dead time and rate limit), paced
by :class:`~drivers.sim.tagger.PacedSimTagger`. It is *not* a protocol-level simulator: there is no wire
protocol between the daemon and this tagger.

Option ``bench``: the daemon replaces the config string ``"sim://bench"`` with the live BenchModel it runs for
the ``[simulation]`` table before constructing the driver, so the pump, paddle and detector simulators and this
tagger share one bench. Constructed with the plain string (no simulation running), :meth:`connect` fails and
says why.
"""

from __future__ import annotations

from typing import Any

from drivers.base import DeviceError
from drivers.params import Field
from drivers.sim.bench.model import BenchModel
from drivers.sim.tagger import PacedSimTagger

__all__ = ["BenchTimeTagger"]


class BenchTimeTagger(PacedSimTagger):
    """Simulated time tagger reading the virtual optical bench (channels 0-3 Alice, 4-7 Bob)."""

    options = {
        "bench": Field(Any, "sim://bench",
                       doc="the bench to read: the daemon substitutes its running BenchModel for 'sim://bench'"),
        **PacedSimTagger.options,
    }
    limits = {"input_delay_ps": Field(unit="ps", doc="allowed hardware input delays")}

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        bench = options.get("bench")
        self._model: BenchModel | None = bench if isinstance(bench, BenchModel) else None

    def _require_model(self) -> BenchModel:
        if self._model is None:
            got = self.opts.get("bench")
            raise ConnectionError(
                f"bench tagger {self.name}: no simulated bench to read (option bench = {got!r}); the daemon "
                "provides one only when the config has a [simulation] table with enabled = true"
            )
        return self._model

    def connect(self) -> None:
        model = self._require_model()
        seconds = model.warm_up()  # numba kernels: ~20 s to compile on a fresh machine, then cached on disk
        if seconds > 1.0:
            self.log.info("bench kernels compiled", seconds=round(seconds, 1))
        super().connect()

    def make_source(self) -> BenchModel:
        return self._require_model()

    def describe(self) -> dict[str, Any]:
        seed = self._model.cfg.seed if self._model is not None else None
        return {"vendor": "qnetd", "model": "virtual optical bench tagger (in-process)", "serial": f"seed-{seed}"}

    @property
    def channel_count(self) -> int:
        return self._require_model().channel_count

    @property
    def resolution_ps(self) -> int:
        return self._require_model().resolution_ps

    def set_input_delay(self, channel: int, picoseconds: int) -> None:
        self.require_connected()
        model = self._require_model()
        if not 0 <= channel < model.channel_count:
            raise DeviceError(f"channel {channel} does not exist (0..{model.channel_count - 1})", "set_input_delay")
        if picoseconds < 0:
            raise DeviceError("the simulated tagger supports only non-negative input delays", "set_input_delay")
        try:
            model.set_input_delay(channel, picoseconds)  # effective from the next generated block
        except ValueError as e:
            raise DeviceError(str(e), "set_input_delay") from None

    def status(self) -> dict:
        model = self._require_model()
        return {**super().status(), "input_delays_ps": model.input_delays_ps}
