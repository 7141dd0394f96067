"""JSON records on disk: written atomically, read with errors naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medseg.io.atomic import write_atomically

__all__ = ["read_json", "write_json"]


def write_json(path: str | os.PathLike, values: Any, **dumps) -> Path:
    """Write ``values`` as indented JSON (and a newline) atomically to ``path``."""
    text = json.dumps(values, indent=2, **dumps) + "\n"
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike, what: str = "file", error: type = ValueError) -> Any:
    """The JSON value in ``path``.

    Raises
    ------
    FileNotFoundError
        ``<what> <path> does not exist``.
    error
        ``<what> <path> is not valid JSON: ...`` (``ValueError`` unless given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from err
