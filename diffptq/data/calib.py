"""Calibration data: the denoiser's inputs recorded along real sampling trajectories of the float pipeline.

`calibration_set(pipe, CalibConfig)` is what every quantization run records (weights and TDQ alike): its prompts
(diffptq.data.prompts.calibration_prompts) and their trajectories. `collect_calibration` runs the pipeline (with
classifier-free guidance, so each record holds both CFG branches) on N prompts and records, at every sampling step,
the keyword arguments the denoiser was called with: latents (`hidden_states` for PixArt, `sample` for the UNet),
`timestep`, `encoder_hidden_states`, masks and extra conditions. Records are kept on `storage` (the CPU by default,
pinned when CUDA is used) and text states shared between steps are stored once. `CalibrationSet.batches()` replays
them batch by batch on the compute device.
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffptq.config import CalibConfig
from diffptq.data.prompts import calibration_prompts
from diffptq.models.families import family_of


@dataclass
class CalibRecord:
    """One denoiser call. `inputs`: keyword tensors/values as the denoiser received them (batch = 2 × prompts under
    CFG); `step`: index of the sampling step; `timestep`: the scalar timestep of that step; `batch`: index of the
    batch of prompts it belongs to (its records share those prompts)."""

    inputs: dict
    step: int
    timestep: float
    batch: int = 0


@dataclass
class CalibrationSet:
    """Recorded denoiser inputs. `prompts`: the prompts in recording order; `num_steps`: sampling steps per run."""

    records: list[CalibRecord] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    num_steps: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def timesteps(self) -> list[float]:
        return [r.timestep for r in self.records]

    def batches(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Iterator[dict]:
        """Yield each record's inputs moved to `device` (floating tensors cast to `dtype` when given)."""
        for record in self.records:
            yield move_inputs(record.inputs, device, dtype)

    def holdout_indices(self, holdout_every: int) -> list[int]:
        """Indices of held-out records: every `holdout_every`-th one (0: none), at least the last one when the set
        has two or more records."""
        if not holdout_every:
            return []
        held = [i for i in range(len(self.records)) if (i + 1) % holdout_every == 0]
        return held or ([len(self.records) - 1] if len(self.records) > 1 else [])

    def prompt_holdout(self, fraction: float) -> list[int]:
        """Indices of the records of the last ceil(fraction × batches) prompt batches (every step of those prompts),
        so held-out records share no prompt with the others; none when there is only one batch."""
        batches = sorted({r.batch for r in self.records})
        if len(batches) < 2:
            return []
        held = set(batches[len(batches) - min(len(batches) - 1, math.ceil(fraction * len(batches))):])
        return [i for i, r in enumerate(self.records) if r.batch in held]

    def split(self, holdout_every: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(calibration, held-out) by `holdout_indices(holdout_every)`."""
        held = set(self.holdout_indices(holdout_every))
        keep = [r for i, r in enumerate(self.records) if i not in held]
        out = [r for i, r in enumerate(self.records) if i in held]
        return CalibrationSet(keep, self.prompts, self.num_steps), CalibrationSet(out, self.prompts, self.num_steps)


def move_inputs(inputs: dict, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> dict:
    """Recursively move the tensors of a denoiser-input dict to `device` (floats cast to `dtype` if given)."""
    def mv(v):
        if isinstance(v, torch.Tensor):
            cast = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
            return v.to(device=device, dtype=cast, non_blocking=non_blocking)
        if isinstance(v, dict):
            return {k: mv(x) for k, x in v.items()}
        return v
    return {k: mv(v) for k, v in inputs.items()}


class _Recorder:
    """Forward pre-hook that stores the denoiser's arguments, sharing storage for tensors seen before."""

    def __init__(self, denoiser, storage: str, pin: bool):
        self.signature = inspect.signature(denoiser.forward)
        self.storage, self.pin = storage, pin
        self.calls: list[dict] = []
        self._shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _store(self, v):
        if isinstance(v, torch.Tensor):
            key = (v.data_ptr(), tuple(v.shape), v.dtype, v._version)
            if key not in self._shared:
                t = v.detach().to(self.storage, copy=True)
                # keep the original alive: a freed tensor's address could be reused by a later, different tensor
                self._shared[key] = (v, t.pin_memory() if self.pin else t)
            return self._shared[key][1]
        if isinstance(v, dict):
            return {k: self._store(x) for k, x in v.items()}
        return v

    def __call__(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        bound.pop("return_dict", None)
        self.calls.append({k: self._store(v) for k, v in bound.items() if v is not None})


@torch.no_grad()
def collect_calibration(pipe, prompts: list[str] | None, num_inference_steps: int, guidance_scale: float | None = None,
                        batch_size: int = 8, seed: int = 0, storage: str = "cpu", progress: bool = True,
                        prompt_embeds: dict | None = None, **call_kwargs) -> CalibrationSet:
    """Run `pipe` on `prompts` (batches of `batch_size`, generator seeded with `seed + batch index`) for
    `num_inference_steps` steps with CFG and record every denoiser call. Returns a CalibrationSet whose records
    are ordered batch-major, step-minor. Instead of prompts, `prompt_embeds` may give pipeline keyword tensors
    (prompt_embeds, negative_prompt_embeds, masks; first dim = prompts) that are passed batch by batch."""
    if prompt_embeds is not None:
        n = len(prompt_embeds["prompt_embeds"])
        prompts = [f"<embedding {i}>" for i in range(n)]
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    device = pipe._execution_device
    recorder = _Recorder(denoiser, storage, pin=(storage == "cpu" and torch.device(device).type == "cuda"))
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    kwargs = {**family.call_kwargs(pipe), **call_kwargs}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    result = CalibrationSet(num_steps=num_inference_steps)
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    try:
        for b, chunk in enumerate(tqdm(chunks, desc="calibration trajectories", disable=not progress)):
            start = len(recorder.calls)
            generator = torch.Generator(device="cpu").manual_seed(seed + b)
            if prompt_embeds is None:
                batch_kwargs = {"prompt": chunk}
            else:
                lo = b * batch_size
                batch_kwargs = {k: v[lo:lo + len(chunk)] if isinstance(v, torch.Tensor) else v
                                for k, v in prompt_embeds.items()}
            pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="latent",
                 **batch_kwargs, **kwargs)
            for step, inputs in enumerate(recorder.calls[start:]):
                t = inputs["timestep"]
                t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
                result.records.append(CalibRecord(inputs, step, t, b))
            result.prompts.extend(chunk)
    finally:
        handle.remove()
    return result


def calibration_set(pipe, cfg: CalibConfig, progress: bool = True) -> tuple[CalibrationSet, float]:
    """The calibration data of `cfg` for `pipe` (its prompts: data.prompts.calibration_prompts) and the seconds the
    recording took."""
    prompts = calibration_prompts(pipe, cfg.n_calib, cfg.prompts)
    t0 = time.perf_counter()
    calib = collect_calibration(pipe, prompts, cfg.calib_steps, cfg.guidance_scale, cfg.batch_size, cfg.seed,
                                progress=progress)
    return calib, time.perf_counter() - t0
