"""Crash-safe result files shared by every run: atomic writes and JSONL appends.

A run appends one JSON line per finished unit (grid point, question, ...),
flushed and fsync-ed. A crash can leave at most one partial *last* line (no
trailing newline): readers skip it (that unit is redone) and the next append
truncates it before writing, so the file never holds a broken line in the
middle. A line that does not parse anywhere else is corruption, not a crash, and
:func:`read_jsonl` raises :class:`CorruptResultsError` naming the file and line
instead of silently dropping a finished unit. Whole files (CSV, summaries,
configs) are written to a temporary name and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["CorruptResultsError", "append_jsonl", "atomic_write", "read_jsonl"]


class CorruptResultsError(ValueError):
    """A results file has a line that is neither JSON nor a crash-cut last line."""


def _partial_tail(handle) -> int:
    """Byte length of a trailing line without a newline (0 when the file ends in one)."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return 0
    block = 4096
    position = size
    while position > 0:
        start = max(0, position - block)
        handle.seek(start)
        chunk = handle.read(position - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return size - (start + cut + 1)
        position = start
    return size


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Appends ``rows`` as JSON lines, durably (flush + fsync).

    A partial last line left by a crash is cut off first (it is an unfinished unit
    that is being redone). Only the file's tail is read, never the whole file.
    """
    path = Path(path)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    if not data:
        return
    with open(path, "ab+") as handle:
        partial = _partial_tail(handle)
        if partial:
            handle.truncate(handle.seek(0, os.SEEK_END) - partial)
        handle.seek(0, os.SEEK_END)
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
    """``(line number, row)`` for every complete JSON line.

    A last line without a trailing newline that does not parse was cut by a crash and
    is skipped (its unit is redone).

    Raises:
      CorruptResultsError: any other line is not valid JSON (``file:line`` in the message).
    """
    path = Path(path)
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                continue  # crash-cut last line
            raise CorruptResultsError(f"{path}:{number}: corrupt results line ({exc.msg}); "
                                      "fix or remove that line to resume") from None
    return rows
