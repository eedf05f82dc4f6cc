"""What every script shares: common flags, device/dtype resolution, the run folder and its config.json.

Scripts call `add_common_args(parser, family)`, `start_run(args, script)`, then `finish_run(run, ...)` once the
results exist (config.json is written last, so a failed run leaves no config); `run_main(main)` turns a
DiffptqError (or a bad value) into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from diffptq.errors import DiffptqError
from diffptq.models.families import FAMILIES
from diffptq.models.schedulers import SCHEDULERS

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSIONED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "torchmetrics", "numpy",
                      "safetensors")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutDirExistsError(DiffptqError):
    """--out_dir already holds results and --overwrite was not given."""


def add_common_args(parser: argparse.ArgumentParser, family: str) -> None:
    """Flags shared by all scripts; `family` ('pixart' or 'sd') picks the --model default."""
    parser.add_argument("--model", default=FAMILIES[family].default_model,
                        help="hub id, local pipeline directory, bundled-dit, bundled-unet, tiny-dit, tiny-unet, or "
                             "fullsize-pixart / fullsize-sd (random weights, for speed) (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="float dtype of the model (default: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="results folder (default: results/<script>/<timestamp>/)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out_dir")
    parser.add_argument("--num_inference_steps", type=positive_int, default=20)
    parser.add_argument("--scheduler", default="default", choices=["default", *SCHEDULERS],
                        help="sampling scheduler (default: the model's own)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@dataclass
class Run:
    """A script run: resolved device and dtype, and its output folder (created)."""

    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    args: argparse.Namespace
    script: str = ""

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffptqError(f"--device {name!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffptqError(f"--device {name} asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def start_run(args: argparse.Namespace, script: str) -> Run:
    """Resolve device/dtype, create the output folder (refusing a non-empty one without --overwrite), set the seed
    and logging. Nothing is written yet: `finish_run` writes config.json once the results exist."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(script)
    if out_dir.exists() and any(out_dir.iterdir()) and not getattr(args, "overwrite", False):
        raise OutDirExistsError(f"--out_dir {out_dir} already holds files; pass --overwrite or choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return Run(out_dir, device, dtype, args, script)


def finish_run(run: Run, **extra) -> Path:
    """Write <out_dir>/config.json: arguments, package versions, git commit, plus `extra` (e.g. file hashes)."""
    path = run.out_dir / "config.json"
    write_json(path, {**run_config(run.args, run.script, run.device, run.dtype), **extra})
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file (or of the files under a folder, in sorted order)."""
    h = hashlib.sha256()
    path = Path(path)
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def default_out_dir(script: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / script / stamp


def run_config(args: argparse.Namespace, script: str, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "script": script,
        "args": {k: v for k, v in vars(args).items()},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), **package_versions()},
        "git_commit": git_commit(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def package_versions() -> dict:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=5).stdout.strip()
    return res.stdout.strip() + ("-dirty" if dirty else "")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: to a temporary name, then rename (no partial file under the final name)."""
    from diffptq.eval.report import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def run_main(main) -> None:
    """Call `main()`; print DiffptqError / ValueError as one line and exit 2 instead of a traceback."""
    try:
        main()
    except DiffptqError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except torch.OutOfMemoryError:
        print("error: CUDA out of memory. Try fewer calibration prompts or a smaller batch (--n_calib, "
              "--calib_batch_size), --offload_done --offload_pending (blocks wait in host memory but for their turn), "
              "fewer --blocks at a time, "
              "or --device cpu; calibration caches already live in CPU memory. Nothing was written under a final "
              "name.", file=sys.stderr)
        raise SystemExit(3) from None
    except KeyboardInterrupt:
        print("interrupted: no partial result was written under a final name", file=sys.stderr)
        raise SystemExit(130) from None


def damp_value(text: str) -> float | str:
    """--damp: a non-negative number (relative to mean diag H) or 'adaptive'."""
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--damp takes a number or 'adaptive', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--damp must be >= 0, got {value}")
    return value


def bits_value(text: str) -> int:
    """Bit width 2..8, or 16/32 meaning 'not quantized'."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if value not in (16, 32) and not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must lie in 2..8 (or 16 for float), got {value}")
    return value


def add_quant_args(parser: argparse.ArgumentParser, method_flag: str = "--method") -> None:
    """Weight/activation quantization and calibration flags shared by the quantization scripts."""
    parser.add_argument(method_flag, dest="method", default="qronos", choices=["rtn", "gptq", "qronos"],
                        help="weight quantization method (default: %(default)s)")
    parser.add_argument("--wbits", type=bits_value, default=4, help="weight bits 2..8 (default: %(default)s)")
    parser.add_argument("--abits", type=bits_value, default=8,
                        help="activation bits 2..8, or 16 for float activations (default: %(default)s)")
    parser.add_argument("--act_quant", default="static", choices=["static", "dynamic"],
                        help="activation quantizer: static per-tensor or dynamic per-token (default: %(default)s)")
    parser.add_argument("--group_size", type=positive_int, default=None,
                        help="weight group size in input columns (default: per output channel)")
    parser.add_argument("--act_order", action="store_true", help="GPTQ/Qronos columns by decreasing diag(H)")
    parser.add_argument("--damp", type=damp_value, default=0.01,
                        help="Hessian damping relative to mean(diag H), or 'adaptive' (default: %(default)s)")
    parser.add_argument("--n_calib", type=positive_int, default=32, help="calibration prompts (default: %(default)s)")
    parser.add_argument("--calib_steps", type=positive_int, default=10,
                        help="sampling steps per calibration trajectory (default: %(default)s)")
    parser.add_argument("--calib_batch_size", type=positive_int, default=8, help="prompts per calibration batch")
    parser.add_argument("--prompts", default=None, help="prompt file, one per line (default: bundled captions)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--offload_done", action="store_true",
                        help="keep finished blocks in host memory until the end of the calibration, so GPU memory "
                             "does not grow with depth (same result; costs one copy of each block each way)")
    parser.add_argument("--offload_pending", action="store_true",
                        help="keep the blocks still to come in host memory, each moved to the GPU just before its "
                             "turn (with --offload_done: one block's weights on the GPU at a time; same result)")
    parser.add_argument("--granularity", default="unit", choices=["unit", "block"],
                        help="sequential unit: 'unit' quantizes the UNet's ResNets / transformer blocks / resamplers "
                             "one after the other (several times faster on the UNet), 'block' its down/mid/up blocks "
                             "whole; PixArt's blocks are units either way (default: %(default)s)")
    add_rotation_args(parser)


def add_rotation_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--rotate, --rotate_conv, --rotate_seed: the online input rotation of diffptq.quant.rotation (see
    rotation_kwargs)."""
    from diffptq.quant.rotation import ROTATIONS

    parser.add_argument("--rotate", default="none", choices=["none", *ROTATIONS],
                        help="online input rotation y = (W R)(Rᵀx) of every quantized Linear, applied before "
                             "GPTQ/Qronos and the activation quantizer (default: %(default)s)")
    parser.add_argument("--rotate_conv", action="store_true", help="rotate the quantized Conv2d layers' inputs too")
    parser.add_argument("--rotate_seed", type=int, default=0, help="seed of the rotation's random signs and mixing")


def rotation_kwargs(args: argparse.Namespace) -> dict:
    """{rotate, rotate_seed, rotate_conv} from the flags of add_rotation_args, as quantize_pipeline takes them
    (rotate None for 'none'). --rotate_conv without a rotation is an error, not ignored."""
    rotate = None if args.rotate == "none" else args.rotate
    if rotate is None and args.rotate_conv:
        raise DiffptqError("--rotate_conv rotates Conv2d inputs as well: it needs --rotate hadamard")
    return {"rotate": rotate, "rotate_seed": args.rotate_seed, "rotate_conv": args.rotate_conv}


def sequential_config(args: argparse.Namespace, blocks: list[int] | None):
    """SequentialConfig from the flags of add_quant_args (group size checked against the layers later)."""
    from diffptq.algo.driver import SequentialConfig
    from diffptq.quant.quantizer import QuantSpec

    act = None if args.abits >= 16 else QuantSpec(args.abits, symmetric=False)
    if args.wbits >= 16:
        raise DiffptqError("--wbits 16 leaves nothing to quantize; give 2..8")
    weight = QuantSpec(args.wbits, symmetric=True, group_size=args.group_size)
    return SequentialConfig(method=args.method, weight=weight, act=act, act_kind=args.act_quant, damp=args.damp,
                            act_order=args.act_order, blocks=blocks, offload_done=getattr(args, "offload_done", False),
                            offload_pending=getattr(args, "offload_pending", False),
                            granularity=getattr(args, "granularity", "unit"))


def calib_config(args: argparse.Namespace):
    from diffptq.run.quantize import CalibConfig

    return CalibConfig(n_calib=args.n_calib, calib_steps=args.calib_steps, batch_size=args.calib_batch_size,
                       guidance_scale=args.guidance_scale, prompts=args.prompts, seed=args.seed)
