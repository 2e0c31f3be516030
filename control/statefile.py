"""Status files that node processes publish and `qkdctl status` reads: written whole and
atomically (temporary file, then rename), so a reader never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_status(path: Path) -> dict | None:
    """A status file, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
