"""Closed-loop control of the testbed (issue 7): polarization compensation (daemon/control/polarization.py)."""
