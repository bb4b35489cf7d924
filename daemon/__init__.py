"""qnetd: the control daemon of quantum-network testbeds."""

__version__ = "0.1.0"
