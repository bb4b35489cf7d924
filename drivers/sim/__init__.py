"""Simulated instruments: in-process stand-ins and (later) the virtual optical bench.

Every simulated device here is labelled as what it is: an in-process simulation of the driver interface,
not a protocol-level simulator. Protocol-level simulators (SCPI over TCP, APT over a pseudo-terminal, ...)
let the real drivers in ``drivers/`` run unchanged; see docs/drivers.md.
"""
