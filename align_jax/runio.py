"""Crash-safe result files shared by every run: atomic writes and JSONL appends.

A run appends one JSON line per finished unit (grid point, question, ...),
flushed and fsync-ed; a crash can leave at most one partial last line, which
readers skip (that unit is redone) and the next append starts on a new line.
Whole files (CSV, summaries, configs) are written to a temporary name and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["append_jsonl", "atomic_write", "read_jsonl"]


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Appends ``rows`` as JSON lines, durably (flush + fsync)."""
    path = Path(path)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "ab") as handle:
        if needs_newline:
            handle.write(b"\n")
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every complete JSON line; a line cut by a crash is skipped."""
    path = Path(path)
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError:
                continue
    return rows
