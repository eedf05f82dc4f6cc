"""Log-SNR TDQ: activation step sizes predicted from the noise level (So et al. 2023, conditioned on λ instead of t).

schedule   scheduler → λ(t), the normalised condition for static | timestep | logsnr
fourier    Fourier features of the scalar condition
scale_mlp  ScaleMLP: condition → positive scale(s), initialised at the static scale
fit        per-condition optimal scales (MSE search) → trained ScaleMLP, with fit errors
step_hook  denoiser pre-hook: each step's timestep → set_condition(c) on every conditioned quantizer
quantizer  TdqActQuantizer: the runtime quantizer (scale MLP of the condition), calibrating itself when asked
calibrate  calibrate_tdq_pipeline: TDQ activations + weights, block by block through the sequential driver
inference  attach_tdq(pipe): the condition hook on a pipeline's denoiser, for any scheduler
checkpoint build_tdq_act(entry): rebuild a TdqActQuantizer when loading a checkpoint
"""
from diffptq.config.tdq import CONDITIONS, TdqConfig, TdqFitConfig

from .calibrate import TdqCalibration, calibrate_tdq_pipeline
from .step_hook import (
    ConditionHook,
    apply_condition,
    attach_condition_hook,
    detach_condition_hook,
    find_conditioned_quantizers,
)
from .fit import (
    TdqFit,
    collect_samples,
    evaluate_scale_fn,
    evaluate_scales,
    fit_condition_scales,
    fit_static_scale,
    fit_tdq,
    fit_zero_rule,
    predict_scales,
    quant_mse,
    train_scale_mlp,
    zero_for_scale,
)
from .fourier import FourierFeatures, fourier_features, fourier_frequencies
from .inference import attach_tdq, detach_tdq
from .quantizer import OffsetZero, TdqActQuantizer, tdq_quantizers
from .scale_mlp import ScaleMLP, softplus_inverse
from .schedule import (
    AffineNormalizer,
    ConditionFn,
    ConditionKind,
    log_snr_at,
    log_snr_bounds,
    log_snr_from_alphas_cumprod,
    log_snr_from_sigma,
    log_snr_table,
    make_condition_fn,
)

__all__ = [
    "CONDITIONS",
    "TdqActQuantizer",
    "TdqCalibration",
    "TdqConfig",
    "OffsetZero",
    "attach_tdq",
    "calibrate_tdq_pipeline",
    "detach_tdq",
    "tdq_quantizers",
    "AffineNormalizer",
    "ConditionFn",
    "ConditionHook",
    "ConditionKind",
    "FourierFeatures",
    "ScaleMLP",
    "TdqFit",
    "TdqFitConfig",
    "apply_condition",
    "attach_condition_hook",
    "collect_samples",
    "detach_condition_hook",
    "evaluate_scale_fn",
    "evaluate_scales",
    "find_conditioned_quantizers",
    "fit_condition_scales",
    "fit_static_scale",
    "fit_tdq",
    "fit_zero_rule",
    "fourier_features",
    "fourier_frequencies",
    "log_snr_at",
    "log_snr_bounds",
    "log_snr_from_alphas_cumprod",
    "log_snr_from_sigma",
    "log_snr_table",
    "make_condition_fn",
    "predict_scales",
    "quant_mse",
    "softplus_inverse",
    "train_scale_mlp",
    "zero_for_scale",
]
