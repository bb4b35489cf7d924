"""Stand-ins of vendor time-tagger libraries that cannot be installed here (Swabian, qutools, PicoQuant).

Each mimics the documented behaviour of the vendor API closely enough that the real driver runs unchanged
against it; drivers import their vendor module by name (an option), so tests and the simulated testbed point
them here. These are stand-ins of an API, not wire-protocol simulators: vendor libraries are not protocols.
"""
