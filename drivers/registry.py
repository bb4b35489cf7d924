"""Driver discovery through the ``qnetd.drivers`` entry-point group.

Built-in drivers are registered in pyproject.toml; a lab ships its own driver by registering a class under
the same group in its own package. Config names a driver by its entry-point name (``driver = "sim.tagger"``).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from drivers.base import Device

GROUP = "qnetd.drivers"


class DriverNotFound(LookupError):
    pass


def available() -> dict[str, str]:
    """Entry-point name -> ``module:Class`` for every installed driver."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Device]:
    """The driver class registered as ``name``; DriverNotFound if none, TypeError if it is not a Device."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise DriverNotFound(name)
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise TypeError(f"entry point {name} = {matches[0].value} is not a drivers.base.Device subclass")
    return cls
