"""Prompt sets: the bundled everyday captions, or a user's file (one prompt per line)."""
from __future__ import annotations

from pathlib import Path

from diffptq.errors import DiffptqError

EVERYDAY_PROMPTS = Path(__file__).with_name("prompts_everyday.txt")


class PromptFileError(DiffptqError, ValueError):
    """A prompt file that is missing, unreadable or empty."""


def load_prompts(path: str | Path | None = None, n: int | None = None) -> list[str]:
    """Prompts from `path` (default: the bundled everyday captions), blank lines and '#' comments dropped.

    `n` takes the first n, cycling through the list when it is shorter. Raises PromptFileError with the path
    when the file is missing or holds no prompt.
    """
    path = Path(path) if path is not None else EVERYDAY_PROMPTS
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path} (give a text file with one prompt per line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise PromptFileError(f"prompt file holds no prompt: {path} (one prompt per line)")
    if n is not None:
        if n <= 0:
            raise ValueError(f"number of prompts must be positive, got {n}")
        prompts = [prompts[i % len(prompts)] for i in range(n)]
    return prompts


CALIBRATION_SEED = 1_000  # bundled models: calibration captions are drawn apart from the evaluation captions


def default_prompts(pipe, n: int, purpose: str = "calibration") -> list[str]:
    """n prompts suited to `pipe`: a project model's own caption generator when it has one (`diffptq_prompts`,
    set by load_pipeline for the bundled models; `purpose` 'calibration' or 'evaluation' picks disjoint seeds),
    else the bundled everyday captions."""
    make = getattr(pipe, "diffptq_prompts", None)
    if make is None:
        return load_prompts(None, n)
    return make(n, purpose)
