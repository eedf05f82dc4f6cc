"""Prompt sets: the bundled everyday captions, a user's file (one prompt per line), or a bundled model's scenes.

Which prompts a run uses, in one place: `calibration_prompts` and `evaluation_prompts`. A prompt file, when given,
is used as it is; bundled models get captions of random scenes of their data set (calibration and evaluation from
disjoint seeds); other models the everyday captions, calibration from the front of the list, evaluation from its end.
"""
from __future__ import annotations

from pathlib import Path

from diffptq.errors import PromptFileError
from diffptq.models.names import EVERYDAY_CAPTIONS, is_bundled

CALIBRATION_SEED = 1_000  # bundled models: calibration scenes, drawn apart from the evaluation scenes


def load_prompts(path: str | Path | None = None, n: int | None = None, tail: bool = False) -> list[str]:
    """Prompts from `path` (default: the bundled everyday captions), blank lines and '#' comments dropped.

    `n` takes the first n (the last n with `tail`), cycling through the list when it is shorter. Raises
    PromptFileError, naming the path, when the file is missing, a folder, unreadable, not UTF-8 text, or empty.
    """
    path = Path(path) if path is not None else EVERYDAY_CAPTIONS
    if path.is_dir():
        raise PromptFileError(f"prompt file {path} is a folder: give a text file with one prompt per line")
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path} (give a text file with one prompt per line)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PromptFileError(f"prompt file {path} cannot be read: {err.strerror or err}") from None
    if b"\x00" in data:
        raise PromptFileError(f"prompt file {path} is a binary file, not text (one prompt per line, UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                              f"{err.start}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise PromptFileError(f"prompt file holds no prompt: {path} (one prompt per line)")
    if n is not None:
        if n <= 0:
            raise ValueError(f"number of prompts must be positive, got {n}")
        start = (len(prompts) - n) % len(prompts) if tail else 0
        prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
    return prompts


def _bundled(pipe_or_model) -> bool:
    source = pipe_or_model if isinstance(pipe_or_model, str) else getattr(pipe_or_model, "diffptq_source", None)
    return is_bundled(str(source))


def calibration_prompts(pipe_or_model, n: int, path: str | Path | None = None) -> list[str]:
    """n calibration prompts for a pipeline (or model name): the file at `path` (its first n), a bundled model's
    scene captions (seed CALIBRATION_SEED), else the first n everyday captions."""
    if path is None and _bundled(pipe_or_model):
        from diffptq.models.bundled.sampling import eval_prompts

        return eval_prompts(n, CALIBRATION_SEED)
    return load_prompts(path, n)


def evaluation_prompts(pipe_or_model, n: int, path: str | Path | None = None, tail: bool = False) -> list[str]:
    """n evaluation prompts: the file at `path` (its first n, or its last n with `tail`, apart from the calibration
    prompts a run took from the same file), a bundled model's evaluation scenes, else the last n everyday captions
    (calibration takes the first ones)."""
    if path is None and _bundled(pipe_or_model):
        from diffptq.models.bundled.sampling import eval_prompts

        return eval_prompts(n)
    return load_prompts(path, n, tail=tail or path is None)
