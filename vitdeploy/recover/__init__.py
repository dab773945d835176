"""Accuracy recovery after calibration (``build --recover``): block reconstruction, see reconstruct.py."""
from .reconstruct import RecoverySettings, recover  # noqa: F401
