"""Quantization primitives: integer grids (quantizer), activation quantizers (act), quantized layers (layers)."""
from diffptq.quant.act import ActQuantizer, DynamicActQuantizer, StaticActQuantizer, TimeConditionedActQuantizer
from diffptq.quant.layers import (
    QuantConfig,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    float_mode,
    name_matches,
    quant_layers,
    set_quant_enabled,
    swap_modules,
)
from diffptq.quant.quantizer import (
    QuantSpec,
    check_group_size,
    dequantize,
    fake_quant,
    fit_rows,
    fit_weight_params,
    pack_codes,
    pack_int4,
    params_from_range,
    quantize_codes,
    unpack_codes,
    unpack_int4,
)

__all__ = [
    "ActQuantizer", "DynamicActQuantizer", "StaticActQuantizer", "TimeConditionedActQuantizer",
    "QuantConfig", "QuantConv2d", "QuantLayer", "QuantLinear", "float_mode", "name_matches", "quant_layers",
    "set_quant_enabled", "swap_modules",
    "QuantSpec", "check_group_size", "dequantize", "fake_quant", "fit_rows", "fit_weight_params", "pack_codes",
    "pack_int4", "params_from_range", "quantize_codes", "unpack_codes", "unpack_int4",
]
