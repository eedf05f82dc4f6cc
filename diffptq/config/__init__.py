"""Configuration dataclasses, one per concern, and the checks of their values. Light (no torch), so that scripts
build and check them from their flags (diffptq.cli) before anything heavy is imported.

quant       QuantSpec (an integer grid) and Damping (the Hessian damping rule)
sequential  SequentialConfig: the block-by-block weight (and activation) quantization job
calib       CalibConfig: the calibration data (prompts × sampling steps)
tdq         TdqConfig, TdqFitConfig: TDQ activation quantization and its scale fit
checks      one check per kind of value (bits, seeds, counts, finite numbers), shared by flags and fields
"""
from diffptq.config.calib import CalibConfig
from diffptq.config.quant import DAMP_MODES, SCALE_METHODS, Damping, QuantSpec, as_damping
from diffptq.config.sequential import (
    ACT_KINDS,
    AUTO,
    GRANULARITIES,
    METHODS,
    RECIPE_CORRECTION,
    RECIPE_FIELDS,
    RECIPE_LOWRANK,
    RECIPE_MAX_ABITS,
    ROTATIONS,
    SequentialConfig,
    check_calibration_fits,
    check_rotation,
    recipe,
)
from diffptq.config.tdq import CONDITIONS, EXTRAPOLATIONS, TdqConfig, TdqFitConfig

__all__ = ["ACT_KINDS", "AUTO", "CONDITIONS", "DAMP_MODES", "EXTRAPOLATIONS", "GRANULARITIES", "METHODS",
           "RECIPE_CORRECTION", "RECIPE_FIELDS", "RECIPE_LOWRANK", "RECIPE_MAX_ABITS", "ROTATIONS", "SCALE_METHODS",
           "CalibConfig", "Damping", "QuantSpec", "SequentialConfig", "TdqConfig", "TdqFitConfig", "as_damping",
           "check_calibration_fits", "check_rotation", "recipe"]
