"""What every script shares: the common flags, the run (device, dtype, output folder), config.json, and `run_main`.

A script's main: `args = parser.parse_args(argv)` (flags checked, nothing heavy imported yet), `run = start_run(args,
script, outputs)` (output paths checked before any work), the work, then `finish_run(run, ...)`: config.json is
written last, so a failed run leaves no config. `run_main(main)` turns every expected failure into one `error:` line:
exit 2 for bad input (DiffptqError, OSError), 3 for CUDA out of memory, 130 when interrupted; a run that wrote
nothing removes the output folder it created.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from diffptq.cli.parser import device_value, positive_int, seed_value
from diffptq.errors import DiffptqError, OutputPathError
from diffptq.io.files import write_json
from diffptq.models.names import DEFAULT_MODELS, PROJECT_MODEL_NAMES, SCHEDULER_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "torchmetrics", "numpy",
                      "safetensors")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
PARTIAL_SUFFIXES = (".partial", ".tmp")  # temporary names of files being written (renamed when complete)
_CURRENT: list[Run] = []  # the run of this process, for run_main's clean-up


def add_common_args(parser: argparse.ArgumentParser, family: str) -> None:
    """Flags shared by all scripts; `family` ('pixart' or 'sd') picks the --model default."""
    parser.add_argument("--model", default=DEFAULT_MODELS[family],
                        help=f"hub id, local pipeline directory, or one of {', '.join(PROJECT_MODEL_NAMES)} "
                             "(fullsize-*: random weights, for speed) (default: %(default)s)")
    parser.add_argument("--device", default="auto", type=device_value,
                        help="cuda, cuda:N, cpu or auto (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="float dtype of the model (default: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--seed", type=seed_value, default=0, help="0 .. 2^63-1 (default: %(default)s)")
    parser.add_argument("--out_dir", default=None, help="results folder (default: results/<script>/<timestamp>/)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out_dir")
    parser.add_argument("--num_inference_steps", type=positive_int, default=20)
    parser.add_argument("--scheduler", default="default", choices=["default", *SCHEDULER_NAMES],
                        help="sampling scheduler (default: the model's own)")


@dataclass
class Run:
    """A script run: resolved device and dtype (torch objects), and its output folder. `created`: the folders this
    run made (removed again by run_main when the run fails before writing anything into them)."""

    out_dir: Path
    device: Any
    dtype: Any
    args: argparse.Namespace
    script: str = ""
    created: list[Path] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "").replace("float32", "fp32").replace("float16", "fp16") \
            .replace("bfloat16", "bf16")


def resolve_device(name: str):
    """torch.device for --device (auto: cuda when available); DiffptqError when the device is not there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffptqError(f"--device {name!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffptqError(f"--device {name} asked for, but torch sees no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DiffptqError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _writable_parent(path: Path, flag: str) -> None:
    """Raise OutputPathError unless `path` (absent) could be created: its nearest existing ancestor must be a
    writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path} cannot be created: no write permission in {parent}")


def check_output_dir(path: str | Path, flag: str = "--out_dir", overwrite: bool = False) -> Path:
    """A results folder: refused when it is a file, unwritable, or already holds files (without `overwrite`)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{flag} {path} is a file, not a folder: choose a folder name")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: no write permission")
        if any(path.iterdir()) and not overwrite:
            raise OutputPathError(f"{flag} {path} already holds files; pass --overwrite or choose another folder")
    else:
        _writable_parent(path, flag)
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file to write: refused when it is a folder or its folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder: give a file name (e.g. {path / 'checkpoint.safetensors'})")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: no write permission")
    else:
        _writable_parent(path, flag)
    return path


def make_dir(path: Path, run: Run | None = None) -> Path:
    """mkdir -p, remembering on `run` the folders it created."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if run is not None:
        run.created.extend(reversed(missing))
    return path


def start_run(args: argparse.Namespace, script: str, outputs: dict[str, Any] | None = None) -> Run:
    """Check the output folder and the other output files (`outputs`: flag → path or None), resolve device and dtype,
    create the folder, seed torch, set up logging. Nothing is written yet: `finish_run` writes config.json last."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = check_output_dir(args.out_dir or default_out_dir(script), "--out_dir", getattr(args, "overwrite", False))
    for flag, path in (outputs or {}).items():
        if path is not None:
            check_output_file(path, flag)
    import torch

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    run = Run(out_dir, device, dtype, args, script)
    make_dir(out_dir, run)
    _CURRENT[:] = [run]
    torch.manual_seed(args.seed)
    return run


def finish_run(run: Run, **extra) -> Path:
    """Write <out_dir>/config.json: arguments, package versions, git commit, plus `extra` (e.g. file hashes)."""
    path = run.out_dir / "config.json"
    write_json(path, {**run_config(run), **extra})
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
    return Path("results") / script / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_config(run: Run) -> dict:
    import torch

    return {
        "script": run.script,
        "args": {k: (v.label if hasattr(v, "label") else v) for k, v in vars(run.args).items()},
        "device": str(run.device),
        "dtype": str(run.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), **package_versions()},
        "git_commit": git_commit(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def report_meta(script: str, argv: list[str] | None, device, dtype, packages: tuple[str, ...]) -> dict:
    """The header facts of a results markdown: date, card (with the dtype), versions of `packages`, git commit and
    the command (`python <script> <argv>`; argv None: this process's own arguments)."""
    import shlex

    import torch

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"date": _dt.date.today().isoformat(), "card": f"{card}, {str(dtype).removeprefix('torch.')}",
            "versions": ", ".join(f"{k} {v}" for k, v in package_versions(packages).items()),
            "commit": git_commit() or "unknown",
            "command": f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)}


def report_header(title: str, meta: dict) -> list[str]:
    """The opening lines of a results markdown from report_meta's facts: '# title (date, card)', versions and
    commit, the command."""
    return [f"# {title} ({meta['date']}, {meta['card']})", "", f"{meta['versions']}; git {meta['commit']}.", "",
            f"Command: `{meta['command']}`", ""]


def package_versions(names=VERSIONED_PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() + ("-dirty" if dirty else "")


def finished_files(run: Run) -> list[Path]:
    """The complete files under the run's folder (temporary names left out)."""
    if not run.out_dir.is_dir():
        return []
    return sorted(p for p in run.out_dir.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL_SUFFIXES))


def _clean_up() -> str:
    """After a failure: remove what is partial, and the folders the run made if they hold nothing; say what stays."""
    if not _CURRENT:
        return "no partial result was written under a final name"
    run = _CURRENT[0]
    if run.out_dir.is_dir():
        for p in run.out_dir.rglob("*"):
            if p.is_file() and p.name.endswith(PARTIAL_SUFFIXES):
                p.unlink(missing_ok=True)
    for folder in sorted(run.created, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    kept = finished_files(run)
    if not kept:
        return "nothing was written"
    names = ", ".join(str(p.relative_to(run.out_dir)) for p in kept[:6]) + (" ..." if len(kept) > 6 else "")
    return (f"no partial result was written under a final name; the files finished before it stay in "
            f"{run.out_dir} ({names})")


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: what, where, why."""
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or type(err).__name__}{where}" if err.strerror else f"{type(err).__name__}: {err}"


def run_main(main) -> None:
    """Call `main()`; every expected failure becomes one line on stderr (see the module docstring)."""
    try:
        main()
    except DiffptqError as err:
        print(f"error: {err} ({_clean_up()})" if _CURRENT else f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        print(f"error: {describe_os_error(err)} ({_clean_up()})", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: {_clean_up()}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if type(err).__name__ != "OutOfMemoryError":
            raise
        print("error: CUDA out of memory. Try fewer calibration prompts or a smaller batch (--n_calib, "
              "--calib_batch_size), --offload_done --offload_pending (blocks wait in host memory but for their turn), "
              "fewer --blocks at a time, or --device cpu; calibration caches already live in CPU memory "
              f"({_clean_up()})", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        _CURRENT.clear()
