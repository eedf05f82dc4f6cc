"""The quantization, calibration and TDQ flags of every script, and the one mapping from flags to configs.

Each flag takes its default from its config's dataclass (diffptq.config): a value has one default. A script whose
defaults differ says so once, with `parser.set_defaults(...)` after adding the flags (the TDQ scripts: RTN W8A8).
`sequential_config`, `calib_config` and `tdq_config` build the configs the package functions take. Light: no torch.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from diffptq.cli.parser import (
    blocks_value,
    bits_value,
    correction_value,
    damp_value,
    guidance_value,
    lowrank_value,
    non_negative_int,
    positive_int,
    prompt_file,
    skip_value,
    smooth_value,
)
from diffptq.config import (
    ACT_KINDS,
    AUTO,
    CONDITIONS,
    EXTRAPOLATIONS,
    GRANULARITIES,
    METHODS,
    RECIPE_CORRECTION,
    RECIPE_FIELDS,
    RECIPE_LOWRANK,
    RECIPE_MAX_ABITS,
    ROTATIONS,
    CalibConfig,
    SequentialConfig,
    TdqConfig,
    TdqFitConfig,
    check_rotation,
)
from diffptq.config.checks import FLOAT_BITS

SEQ, CALIB, TDQ, FIT = SequentialConfig(), CalibConfig(), TdqConfig(), TdqFitConfig()


def add_weight_args(parser, method_flag: str | None = "--method", bits: bool = True, act_kind: bool = True,
                    execution: bool = True, outliers: bool = True) -> None:
    """How weights (and activations) are quantized: method, bits, activation quantizer, groups, act-order, damping.
    method_flag None / bits False: the script chooses methods and bits otherwise (benchmark_final's --methods,
    --bits). execution: the driver's memory and granularity switches. outliers: --smooth and --lowrank."""
    if method_flag:
        parser.add_argument(method_flag, dest="method", default=SEQ.method, choices=METHODS,
                            help="weight quantization method (default: %(default)s)")
    if bits:
        parser.add_argument("--wbits", type=bits_value, default=SEQ.weight.bits,
                            help="weight bits 2..8 (default: %(default)s)")
        parser.add_argument("--abits", type=bits_value, default=SEQ.act.bits if SEQ.act else FLOAT_BITS,
                            help="activation bits 2..8, or 16 for float activations (default: %(default)s)")
    if act_kind:
        parser.add_argument("--act_quant", default=AUTO, choices=[AUTO, *ACT_KINDS],
                            help="activation quantizer: static per-tensor or dynamic per-token; auto: dynamic at "
                                 f"--abits <= {RECIPE_MAX_ABITS}, static above (default: %(default)s)")
    parser.add_argument("--group_size", type=positive_int, default=SEQ.weight.group_size,
                        help="weight group size in input columns (default: per output channel)")
    parser.add_argument("--act_order", action="store_true", help="GPTQ/Qronos columns by decreasing diag(H)")
    parser.add_argument("--skip", type=skip_value, default=SEQ.skip,
                        help="block layers to leave in float: comma-separated name patterns, glob or re:REGEX (e.g. "
                             "--skip 're:conv|proj_in|proj_out' keeps every convolution of the SD UNet in 16-bit, as "
                             "group-wise peer formats do; default: none)")
    parser.add_argument("--correction", type=correction_value, default=AUTO,
                        help="Qronos: the share 0..1 of the upstream quantization error each layer corrects (1: "
                             f"Qronos as published, 0: GPTQ's target; default: auto, {RECIPE_CORRECTION} at 4-bit "
                             "activations or fewer, else 1)")
    parser.add_argument("--damp", type=damp_value, default=SEQ.damp,
                        help="Hessian damping: a number > 0 relative to mean(diag H), 'adaptive' (per layer, chosen "
                             "on held-out calibration prompts), 'spread' or 'lambda_max' "
                             f"(default: {SEQ.damp.label})")
    if outliers:
        parser.add_argument("--smooth", type=smooth_value, default=SEQ.smooth,
                            help="smooth each Linear's input channels with this alpha in (0, 1] before quantizing "
                                 "(x / s, W·s; default: off)")
        parser.add_argument("--lowrank", type=lowrank_value, default=AUTO,
                            help="rank of a 16-bit branch kept out of each Linear's quantized weight (at most a "
                                 "quarter of its smaller dimension), 0: off (default: auto, "
                                 f"{RECIPE_LOWRANK} at 4-bit activations or fewer, else off)")
        parser.add_argument("--lowrank_conv", action="store_true",
                            help="give Conv2d layers the --lowrank branch too (on their weight matrix; the UNet's "
                                 "convolutions; default: Linear layers only)")
    if execution:
        parser.add_argument("--offload_done", action="store_true",
                            help="keep finished blocks in host memory until the end of the calibration, so GPU "
                                 "memory does not grow with depth (same result; one copy of each block each way)")
        parser.add_argument("--offload_pending", action="store_true",
                            help="keep the blocks still to come in host memory, each moved to the GPU just before its "
                                 "turn (with --offload_done: one block's weights on the GPU at a time; same result)")
        parser.add_argument("--granularity", default=SEQ.granularity, choices=GRANULARITIES,
                            help="sequential unit: 'unit' quantizes the UNet's ResNets / transformer blocks / "
                                 "resamplers one after the other (several times faster on the UNet), 'block' its "
                                 "down/mid/up blocks whole; PixArt's blocks are units either way (default: "
                                 "%(default)s)")


def add_blocks_arg(parser, default: str) -> None:
    parser.add_argument("--blocks", type=blocks_value, default=default,
                        help=f"blocks to quantize: 'all', N (the first N), a range 0-7 or a list 0-3,8 (default: "
                             f"{default})")


def add_rotation_args(parser) -> None:
    """--rotate, --rotate_conv, --rotate_seed, --keep: the online input rotation of diffptq.quant.rotation."""
    parser.add_argument("--rotate", default=AUTO, choices=[AUTO, "none", *ROTATIONS],
                        help="online input rotation y = (W R)(Rᵀx) of every quantized Linear, applied before "
                             "GPTQ/Qronos and the activation quantizer: hadamard (random, data-free) or pca (the "
                             "eigenvectors of the calibration inputs' second moment, saved in the checkpoint); auto: "
                             f"hadamard at --abits <= {RECIPE_MAX_ABITS}, none above (default: %(default)s)")
    parser.add_argument("--rotate_conv", action="store_true",
                        help="rotate the quantized Conv2d layers' inputs too (hadamard only)")
    parser.add_argument("--rotate_seed", type=non_negative_int, default=SEQ.rotate_seed,
                        help="seed of the Hadamard rotations' random signs and mixing (with --rotate pca: of the "
                             "mixing inside the leading and the other components)")
    parser.add_argument("--keep", type=non_negative_int, default=SEQ.keep,
                        help="with --rotate pca: quantize the K leading components of each Linear's input at 8 bits, "
                             "the rest at --abits (clamped to the layer's width; default: %(default)s, off)")


def add_calib_args(parser, prompts_flag: str = "--prompts", guidance: bool = True) -> None:
    """The calibration data: prompts × steps with CFG (CalibConfig). guidance False: the script's own
    --guidance_scale serves calibration too (benchmark_final)."""
    parser.add_argument("--n_calib", type=positive_int, default=CALIB.n_calib,
                        help="calibration prompts (default: %(default)s)")
    parser.add_argument("--calib_steps", type=positive_int, default=CALIB.calib_steps,
                        help="sampling steps per calibration trajectory (default: %(default)s)")
    parser.add_argument("--calib_batch_size", type=positive_int, default=CALIB.batch_size,
                        help="prompts per calibration batch (default: %(default)s)")
    parser.add_argument(prompts_flag, dest="calib_prompts", type=prompt_file, default=CALIB.prompts,
                        help="calibration prompt file, one per line (default: the model's own calibration prompts)")
    if guidance:
        add_guidance_arg(parser)


def add_guidance_arg(parser) -> None:
    parser.add_argument("--guidance_scale", type=guidance_value, default=CALIB.guidance_scale,
                        help="classifier-free guidance scale >= 0 (default: the model's own)")


def add_tdq_args(parser, compare: bool = False) -> None:
    """TDQ's own flags (TdqConfig, TdqFitConfig); compare: --conditions takes a list."""
    if compare:
        parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS,
                            help="TDQ conditions to compare (default: all three)")
    else:
        parser.add_argument("--condition", default=TDQ.condition, choices=CONDITIONS,
                            help="what the activation scales follow: static (one scale), timestep or logsnr "
                                 "(default: %(default)s)")
    parser.add_argument("--act_symmetric", action="store_true",
                        help="symmetric activation grid (default: asymmetric, zero point by the fitted rule)")
    parser.add_argument("--max_per_condition", type=positive_int, default=FIT.max_per_condition,
                        help="activation samples kept per layer and condition (default: %(default)s)")
    parser.add_argument("--mlp_steps", type=non_negative_int, default=FIT.steps,
                        help="Adam steps of each scale MLP (default: %(default)s)")
    parser.add_argument("--n_freqs", type=positive_int, default=FIT.n_freqs,
                        help="Fourier frequencies of the MLP input (default: %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=FIT.hidden,
                        help="scale MLP width (default: %(default)s)")
    parser.add_argument("--extrapolate", default=TDQ.extrapolate, choices=EXTRAPOLATIONS,
                        help="beyond the calibrated conditions: hold the nearest calibrated scale (clamp) or evaluate "
                             "the MLP (mlp) (default: %(default)s)")
    parser.add_argument("--refine_steps", type=non_negative_int, default=TDQ.refine_steps,
                        help="end-to-end refinement steps per block on block output error (default: %(default)s)")


# ---- flags → configs -------------------------------------------------------------------------------------------
def sequential_config(args: argparse.Namespace, method: str | None = None, wbits: int | None = None,
                      abits: int | None = None, blocks: list[int] | None = None) -> SequentialConfig:
    """The SequentialConfig of the flags (method / bits given here override theirs, for scripts with lists)."""
    act_kind, rotate = getattr(args, "act_quant", SEQ.act_kind), getattr(args, "rotate", "none")
    lowrank, correction = getattr(args, "lowrank", SEQ.lowrank), getattr(args, "correction", SEQ.correction)
    auto = tuple(name for name, value in zip(RECIPE_FIELDS, (act_kind, rotate, lowrank, correction)) if value == AUTO)
    cfg = SequentialConfig(
        method=method or args.method, weight=replace(SEQ.weight, group_size=args.group_size),
        act_kind=SEQ.act_kind if act_kind == AUTO else act_kind, damp=args.damp, act_order=args.act_order,
        blocks=blocks, skip=tuple(getattr(args, "skip", SEQ.skip)),
        granularity=getattr(args, "granularity", SEQ.granularity),
        offload_done=getattr(args, "offload_done", False), offload_pending=getattr(args, "offload_pending", False),
        rotate=_named_rotation(args), rotate_seed=getattr(args, "rotate_seed", SEQ.rotate_seed),
        rotate_conv=getattr(args, "rotate_conv", False), smooth=getattr(args, "smooth", SEQ.smooth),
        lowrank=SEQ.lowrank if lowrank == AUTO else lowrank, lowrank_conv=getattr(args, "lowrank_conv", False),
        keep=getattr(args, "keep", SEQ.keep),
        correction=SEQ.correction if correction == AUTO else correction, auto=auto)
    return cfg.with_bits(args.wbits if wbits is None else wbits, args.abits if abits is None else abits)


def calib_config(args: argparse.Namespace) -> CalibConfig:
    return CalibConfig(n_calib=args.n_calib, calib_steps=args.calib_steps, batch_size=args.calib_batch_size,
                       guidance_scale=args.guidance_scale, prompts=args.calib_prompts, seed=args.seed)


def tdq_config(args: argparse.Namespace, condition: str | None = None) -> TdqConfig:
    fit = TdqFitConfig(max_per_condition=args.max_per_condition, n_freqs=args.n_freqs, hidden=args.hidden,
                       steps=args.mlp_steps, seed=args.seed)
    return TdqConfig(condition=condition or args.condition, act_symmetric=args.act_symmetric, fit=fit,
                     refine_steps=args.refine_steps, extrapolate=args.extrapolate)


def check_rotation_flags(args: argparse.Namespace) -> None:
    """--rotate_conv without --rotate hadamard, --keep without --rotate pca: usage errors at parse time (the check
    SequentialConfig makes; auto names no rotation: it rotates at some bits only)."""
    check_rotation(_named_rotation(args), getattr(args, "rotate_conv", False), getattr(args, "keep", 0))


def _named_rotation(args: argparse.Namespace) -> str | None:
    """The rotation --rotate names: None for none and for auto (which the bits decide: SequentialConfig.with_bits)."""
    rotate = getattr(args, "rotate", "none")
    return None if rotate in ("none", AUTO) else rotate
