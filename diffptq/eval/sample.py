"""Fixed-seed, batched image generation, optionally sharded over processes with `accelerate`.

Every image gets its own CPU `torch.Generator` seeded with its own seed (a list of generators per batch), so an
image depends only on its prompt and seed: not on the batch size, the batch it lands in, the process that makes it
or the device's RNG. With an `accelerate` PartialState/Accelerator of N processes, process r makes the r-th
contiguous slice of the prompts and the slices are gathered, in order, on every process; with one process (or
none given) the same code runs without any collective.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffptq.eval.metrics.common import as_uint8
from diffptq.models.families import family_of

Gather = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def image_seeds(n: int, seed: int = 0) -> list[int]:
    """The default seeds of n images: seed, seed + 1, ..., seed + n - 1 (image i always gets seed + i)."""
    return [seed + i for i in range(n)]


def shard_range(n: int, num_processes: int, process_index: int) -> range:
    """The contiguous slice of range(n) that process `process_index` of `num_processes` makes.

    Slices are in process order, cover range(n) exactly once, and differ in length by at most one (the first
    n % num_processes processes take one more); a process may get an empty slice when n < num_processes.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process {process_index} of {num_processes} processes")
    base, extra = divmod(n, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def _gather_object(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    from accelerate.utils import gather_object

    return gather_object(parts)


@torch.no_grad()
def _generate_local(pipe, prompts: Sequence[str], seeds: Sequence[int], batch_size: int,
                    call_kwargs: dict[str, Any], progress: bool, desc: str, uint8: bool = False) -> torch.Tensor:
    """Images of `prompts` with `seeds` on this process: float32 (n,3,H,W) in [0,1] on the CPU (n may be 0); with
    `uint8`, uint8 in [0,255] (as_uint8's rounding)."""
    out = []
    starts = range(0, len(prompts), max(1, batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        stop = min(len(prompts), start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:stop]]
        res = pipe(prompt=list(prompts[start:stop]), generator=generators, output_type="pt", **call_kwargs)
        images = res.images.float().clamp(0, 1).cpu()
        out.append(as_uint8(images) if uint8 else images)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8 if uint8 else torch.float32)


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | int = 0,
    batch_size: int = 8,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "generate",
    gather: Gather | None = None,
    uint8: bool = False,
    **call_kwargs: Any,
) -> torch.Tensor:
    """Images of `prompts` (N strings) from `pipe`: float32 (N,3,H,W) in [0,1] on the CPU, in prompt order.

    seeds: one seed per prompt, or a base seed b (image i gets b + i). guidance_scale: None keeps the pipeline's
    default. The model family's call arguments (family.call_kwargs) are always passed; `call_kwargs` override them.
    accelerator: an accelerate PartialState/Accelerator (anything with num_processes and process_index); each
    process makes its shard_range of the prompts and every process returns the full set. gather: collects one
    list element per process in process order (default accelerate.utils.gather_object; injectable for tests).
    The progress bar shows on the main process only. uint8: return uint8 (N,3,H,W) in [0,255] instead, each
    process converting its own images before the gather (a quarter of the bytes to send).
    """
    n = len(prompts)
    seed_list = image_seeds(n, seeds) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seed_list) != n:
        raise ValueError(f"{n} prompts but {len(seed_list)} seeds")
    kwargs = {**family_of(pipe).call_kwargs(pipe), "num_inference_steps": num_inference_steps, **call_kwargs}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    world = int(getattr(accelerator, "num_processes", 1)) if accelerator is not None else 1
    rank = int(getattr(accelerator, "process_index", 0)) if accelerator is not None else 0
    mine = shard_range(n, world, rank)
    local = _generate_local(pipe, [prompts[i] for i in mine], [seed_list[i] for i in mine], batch_size, kwargs,
                            progress and rank == 0, desc, uint8)
    if world == 1:
        return local
    parts = (gather or _gather_object)([local])
    if len(parts) != world:
        raise RuntimeError(f"gathered {len(parts)} shards from {world} processes")
    images = torch.cat([p for p in parts if p.numel()])
    if len(images) != n:
        raise RuntimeError(f"gathered {len(images)} images for {n} prompts")
    return images
