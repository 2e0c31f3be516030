"""Status files that node processes publish and `qkdctl status` reads: written whole and
atomically (temporary file, then rename), so a reader never sees half a file, and never
through a link planted at either name; readable by the node's owner alone."""

from __future__ import annotations

import json
from pathlib import Path

from dataplane.private import write_private


def write_json(path: Path, obj: object) -> None:
    write_private(path, json.dumps(obj).encode())


def read_status(path: Path) -> dict | None:
    """A status file, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
