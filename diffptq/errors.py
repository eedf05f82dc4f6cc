"""User-facing errors: each carries a one-line message that says what is wrong and how to fix it.

Scripts print a DiffptqError as one `error:` line (no traceback) and exit with status 2 (diffptq.cli.run_main).
"""


class DiffptqError(Exception):
    """Base of the errors that scripts print as one line (no traceback) and exit with status 2."""


class ConfigError(DiffptqError, ValueError):
    """A flag or config value that is invalid, or that does not fit the model (e.g. a group size that does not
    divide a layer's input width)."""


class ModelNotFoundError(DiffptqError):
    """Weights of a model are not available locally (and could not be fetched)."""


class UnknownModelError(DiffptqError):
    """A --model value that is neither a known name, a hub id nor an existing directory."""


class CheckpointError(DiffptqError):
    """A checkpoint that is missing, truncated, corrupted, not ours, inconsistent, or made for another base model."""


class PromptFileError(DiffptqError, ValueError):
    """A prompt file that is missing, unreadable, not text, or empty."""


class OutputPathError(DiffptqError):
    """An output path that cannot be written: an existing non-empty --out_dir without --overwrite, a file where a
    folder is needed (or the reverse), or a place without write permission."""


class NonFiniteActivationError(DiffptqError, RuntimeError):
    """NaN/Inf reached a layer's input during calibration."""
