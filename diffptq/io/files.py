"""Writing result files so that a final name never holds a partial file (light: no torch)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` (parents made) through a temporary name beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # failed or interrupted: no temporary file is left behind either
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """JSON, indented, written atomically (values JSON does not know are written as their str())."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str))
