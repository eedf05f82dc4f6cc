"""Configuration dataclasses, one per concern, and the checks of their values. Light: no torch, so scripts build
and check them from flags (diffptq.cli) before importing anything heavy.

calib   CalibConfig: the calibration data (prompts × sampling steps)
checks  one check per kind of value (bits, seeds, positive integers, finite floats), shared by flags and fields
"""
from diffptq.config.calib import CalibConfig

__all__ = ["CalibConfig"]
