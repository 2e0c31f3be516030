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
    """A status file, or None when it is missing, half-written or not text (a status
    file is only ever read for display). PermissionError goes to the caller, which says
    who may read a network's state."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
