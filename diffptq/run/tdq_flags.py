"""The flags of the LogSnr-DiT/ and LogSnr-Unet/ scripts (calibrate_snr, evaluate_compare) and their checks.

Light: nothing heavy is imported, so a bad flag is reported at once (the mains: run.tdq_scripts).
"""
from __future__ import annotations

import argparse
from argparse import RawDescriptionHelpFormatter
from dataclasses import dataclass

from diffptq.cli import (
    ArgumentParser,
    add_blocks_arg,
    add_calib_args,
    add_common_args,
    add_tdq_args,
    add_weight_args,
    bits_value,
    calib_config,
    non_negative_int,
    positive_int,
    sequential_config,
    tdq_config,
)
from diffptq.config import check_calibration_fits
from diffptq.errors import ConfigError
from diffptq.models.names import SCHEDULER_NAMES

TDQ_DEFAULTS = {"method": "rtn", "wbits": 8}  # the TDQ scripts quantize weights with RTN W8 unless told otherwise
COMPARE_DEFAULTS = {"n_calib": 16, "calib_steps": 20, "scheduler": "ddim"}
DEFAULT_EVAL = "ddim:20,ddim:10,ddim-trailing:50,dpm:20,euler-karras:30"


@dataclass(frozen=True)
class EvalSampler:
    """A scheduler name (diffptq.models.names.SCHEDULER_NAMES) and a step count."""

    scheduler: str
    steps: int

    @property
    def label(self) -> str:
        return f"{self.scheduler}-{self.steps}"


def parse_samplers(text: str) -> list[EvalSampler]:
    """'ddim:20,euler-karras:30' → [EvalSampler('ddim', 20), EvalSampler('euler-karras', 30)]."""
    out = []
    for part in text.split(","):
        name, _, steps = part.strip().partition(":")
        if name not in SCHEDULER_NAMES or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"--eval {part.strip()!r}: expected NAME:STEPS with STEPS >= 1 and NAME one of "
                              f"{', '.join(SCHEDULER_NAMES)}")
        out.append(EvalSampler(name, int(steps)))
    return out


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    """evaluate_compare's own flags (besides the common, weight, calibration and TDQ ones)."""
    parser.add_argument("--eval", default=DEFAULT_EVAL,
                        help="eval samplers NAME:STEPS, comma-separated (default: %(default)s)")
    parser.add_argument("--n_prompts", type=positive_int, default=8, help="eval prompts (default: %(default)s)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=8, help="prompts per eval batch")
    parser.add_argument("--no_images", action="store_true", help="skip image generation and image metrics")
    parser.add_argument("--plot_layers", type=non_negative_int, default=4,
                        help="layers in the scale-vs-λ plot (0: no plot)")


def _parser(family: str, doc: str, compare: bool) -> ArgumentParser:
    p = ArgumentParser(description=doc, formatter_class=RawDescriptionHelpFormatter)
    add_common_args(p, family)
    add_weight_args(p, method_flag="--weight_method", bits=not compare, act_kind=False, execution=False,
                    outliers=False)
    add_blocks_arg(p, "all")
    add_calib_args(p)
    add_tdq_args(p, compare)
    p.set_defaults(**TDQ_DEFAULTS)
    # --rotate is the quantization scripts' flag: refused by name here, not as an unknown flag
    p.add_argument("--rotate", default="none", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace, parser: ArgumentParser, wbits: list[int], abits: list[int]) -> None:
    """Everything checkable without the model, before anything heavy is imported."""
    if args.rotate != "none":
        raise ConfigError(f"--rotate {args.rotate}: the TDQ scripts do not rotate layer inputs (TDQ fits its "
                          "activation scales on unrotated inputs); rotated W4A4 is in "
                          "qronos_diffusion/quantize_qronos_4blocks.py and qronos_diffusion/benchmark_final.py")
    for a in abits:
        if a >= 16:
            parser.error("argument --abits: 16 leaves no activation to quantize: TDQ needs 2..8")
    calib = calib_config(args)
    for w in wbits:
        check_calibration_fits(sequential_config(args, wbits=w, abits=abits[0]), calib.n_calib, calib.batch_size)
    tdq_config(args, getattr(args, "condition", None) or args.conditions[0])


def parse_calibrate_args(family: str, doc: str, argv=None) -> argparse.Namespace:
    p = _parser(family, doc, compare=False)
    p.add_argument("--save_path", default=None, help="checkpoint file (safetensors; a .pt name is accepted)")
    args = p.parse_args(argv)
    _check(args, p, [args.wbits], [args.abits])
    return args


def parse_compare_args(family: str, doc: str, argv=None) -> argparse.Namespace:
    p = _parser(family, doc, compare=True)
    p.add_argument("--wbits", nargs="+", type=bits_value, default=[8, 4], help="weight bits (default: 8 4)")
    p.add_argument("--abits", nargs="+", type=bits_value, default=[8], help="activation bits (default: 8)")
    add_compare_args(p)
    p.set_defaults(**COMPARE_DEFAULTS)
    args = p.parse_args(argv)
    _check(args, p, args.wbits, args.abits)
    parse_samplers(args.eval)
    return args
