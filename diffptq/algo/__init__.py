"""Weight quantization algorithms as pure tensor functions: RTN, GPTQ, Qronos; H/G accumulation; damping. The
block-by-block driver that runs them over a denoiser is the subpackage diffptq.algo.driver (not imported here: it
reads the model code)."""
from diffptq.algo.damping import DampedFactor, Damping, as_damping, damped_inverse_cholesky, fp32_matmul, lambda_max
from diffptq.algo.gptq import gptq_quantize, gptq_quantize_ex, hessian_quantize
from diffptq.algo.hessian import GramAccumulator, conv_patches, gram_from_inputs, hessian_from_inputs, input_rows
from diffptq.algo.qronos import qronos_quantize, qronos_quantize_ex
from diffptq.algo.rtn import QuantResult, rtn_quantize, rtn_quantize_ex
from diffptq.algo.sweep import gptq_sweep

__all__ = [
    "DampedFactor",
    "Damping",
    "GramAccumulator",
    "QuantResult",
    "as_damping",
    "conv_patches",
    "damped_inverse_cholesky",
    "fp32_matmul",
    "gptq_quantize",
    "gptq_quantize_ex",
    "gptq_sweep",
    "gram_from_inputs",
    "hessian_from_inputs",
    "hessian_quantize",
    "input_rows",
    "lambda_max",
    "qronos_quantize",
    "qronos_quantize_ex",
    "rtn_quantize",
    "rtn_quantize_ex",
]
