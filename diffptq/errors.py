"""User-facing errors: each carries a one-line message that says what is wrong and how to fix it."""


class DiffptqError(Exception):
    """Base of the errors that scripts print as one line (no traceback) and exit with status 2."""


class ModelNotFoundError(DiffptqError):
    """Weights of a model are not available locally (and could not be fetched)."""


class UnknownModelError(DiffptqError):
    """A --model value that is neither a known name, a hub id nor an existing directory."""


class ConfigError(DiffptqError):
    """Flag values that do not fit the model (e.g. a group size that does not divide a layer's input width)."""
