"""Question shards: one run split over workers that share nothing, merged back exactly.

A command's work is the runner's list of :class:`~align_jax.runner.Unit` s (``reason``:
windows of ``batch_questions`` questions; ``cage``: one decode call per chunk and
method). Shard ``i/n`` is **1-based** (``1 <= i <= n``, "shard 2 of 4"; a SLURM array
``--array=1-4`` passes ``${SLURM_ARRAY_TASK_ID}/4``) and takes units ``i-1, i-1+n,
i-1+2n, ...`` of that list (round robin). Whole units, never parts of one: a reason row
depends on its window (its keys fold in the window index and the question's place in
the window), so a window computed by a shard is the window an unsharded run computes
and its rows are the same rows.

Layout: shard ``i/n`` of the run directory ``RUN`` writes ``RUN/shards/<i>-of-<n>/``
(``config.json``, ``results.jsonl``, ``shard.json`` and the command's summary of the
shard's own rows) through the same :class:`~align_jax.runner.RunFiles` as any run, so a
shard resumes like a run: rerunning ``--shard i/n`` computes only its missing rows.
``shard.json`` (written before the first unit) records the split, the settings hash and
a digest of the whole run's key list (the *plan*).

Merge (``--merge``; :func:`merge_shards`): every shard ``1..n`` must be present, made
with the current settings hash and plan (the plan catches what the hash leaves out on
purpose, such as ``limit``), and complete. ``RUN/results.jsonl`` is then written
atomically with every row of the plan, in plan order, each line as the runner writes it
(``json.dumps(row, sort_keys=True)``): the file an uninterrupted unsharded run appends,
line for line. The only fields that differ are measured wall times (``wall_s``,
``window_wall_s``, ``stage_wall_s``), which differ between any two runs. Rows already in
``RUN/results.jsonl`` with the same settings are replaced by the shards' rows of the
same key; those whose key is outside the plan are kept after the plan's rows. After the
merge the command's normal run finds every row done, computes nothing and writes the
summary and figures of the whole run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from align_jax.config import ConfigError
from align_jax.runio import atomic_write, read_jsonl

__all__ = ["Shard", "ShardError", "shard_argument", "shard_directory", "write_manifest", "check_shards",
           "merge_shards", "plan_digest"]

SHARDS_DIR = "shards"
MANIFEST = "shard.json"
_DIR_PATTERN = re.compile(r"^(\d+)-of-(\d+)$")


class ShardError(ConfigError):
    """A bad shard spec, or shards that cannot be merged (missing, incomplete, other settings or plan)."""


class Shard(NamedTuple):
    """Shard ``index`` of ``count`` (1-based: ``1 <= index <= count``).

    Attributes:
      index: which shard, ``1 .. count``.
      count: how many shards the run is split into (``>= 1``).
    """

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        """``"2/4"`` -> ``Shard(2, 4)``.

        Raises:
          ShardError: not ``I/N`` with integers, ``N < 1``, or ``I`` outside ``1..N``.
        """
        text = str(spec).strip()
        match = re.fullmatch(r"([+-]?\d+)\s*/\s*([+-]?\d+)", text)
        if match is None:
            raise ShardError(f"shard {spec!r}: expected I/N with integers 1 <= I <= N (1-based), e.g. 2/4")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ShardError(f"shard {spec!r}: the number of shards N must be >= 1, got {count}")
        if not 1 <= index <= count:
            raise ShardError(f"shard {spec!r}: index {index} is out of range; shards are numbered 1..{count} "
                             f"(1-based: 1/{count} is the first, {count}/{count} the last)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        """``<index>-of-<count>``, the shard's directory under ``RUN/shards/``."""
        return f"{self.index}-of-{self.count}"

    def select(self, units: Sequence[Any]) -> list:
        """This shard's units: ``units[index - 1 :: count]`` (round robin, order kept)."""
        return list(units[self.index - 1::self.count])


def shard_argument(text: str) -> Shard:
    """``argparse`` type of ``--shard I/N``: a bad spec is a usage error (exit 2) before anything loads."""
    import argparse

    try:
        return Shard.parse(text)
    except ShardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shard_directory(run_directory: str | Path, shard: Shard) -> Path:
    """``RUN/shards/<i>-of-<n>``."""
    return Path(run_directory) / SHARDS_DIR / shard.dirname


def plan_digest(keys: Sequence[Any]) -> str:
    """SHA-256 of the run's ordered key list (shards of one run share it)."""
    return hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest()


def _plan(units) -> list:
    return [key for unit in units for key in unit.keys]


def write_manifest(files, shard: Shard, units: Sequence[Any]) -> None:
    """Writes ``shard.json`` into the shard's directory (``files`` is its :class:`RunFiles`)."""
    plan = _plan(units)
    keys = _plan(shard.select(units))
    files.write_json(MANIFEST, {"shard": str(shard), "index": shard.index, "count": shard.count,
                                "key_field": files.key_field, "settings_hash": files.settings,
                                "plan_sha256": plan_digest(plan), "plan_rows": len(plan), "plan_units": len(units),
                                "keys": keys})


class _Found(NamedTuple):
    shard: Shard
    directory: Path
    manifest: dict


def check_shards(run_directory: str | Path, settings: str) -> list:
    """The shards of ``run_directory``, checked for what needs no plan: one split, all present, same settings.

    Called when a merging run opens its files, before any model is loaded.

    Raises:
      ShardError: no shards, shards of several splits, a missing shard (named, with the
        command that makes it), or shards made with other settings (hashes named).
    """
    root = Path(run_directory) / SHARDS_DIR
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _DIR_PATTERN.match(p.name)) if root.is_dir() else []
    if not dirs:
        raise ShardError(f"{run_directory}: no shards to merge (no {root}/<i>-of-<n>/ directories); run the "
                         "command with --shard I/N for every I first")
    counts = sorted({int(_DIR_PATTERN.match(p.name).group(2)) for p in dirs})
    if len(counts) > 1:
        raise ShardError(f"{root}: shards of {len(counts)} different splits ({', '.join(f'N={c}' for c in counts)}); "
                         "keep the directories of one split and remove the others")
    count = counts[0]
    found, missing = [], []
    for index in range(1, count + 1):
        shard = Shard(index, count)
        directory = shard_directory(run_directory, shard)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            missing.append(shard)
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ShardError(f"{manifest_path}: not a shard manifest ({exc.msg}); rerun shard {shard}") from None
        found.append(_Found(shard, directory, manifest))
    if missing:
        names = ", ".join(str(s) for s in missing)
        word = "shard" if len(missing) == 1 else "shards"
        raise ShardError(f"cannot merge {run_directory}: {word} {names} of {count} missing (no "
                         f"{shard_directory(run_directory, missing[0]) / MANIFEST}); run the command with "
                         f"--shard {missing[0]} first")
    other = [f for f in found if f.manifest.get("settings_hash") != settings]
    if other:
        hashes = ", ".join(f"shard {f.shard}: {f.manifest.get('settings_hash')}" for f in found)
        raise ShardError(f"cannot merge {run_directory}: shards made from different configs (settings hash "
                         f"of this config {settings}; {hashes}); rerun the shards with one config")
    return found


def merge_shards(files, units: Sequence[Any], found: Sequence[_Found]) -> list[dict]:
    """Writes the merged ``results.jsonl`` of the run whose :class:`RunFiles` is ``files``; returns its rows.

    ``units`` is the whole run's unit list (the plan); ``found`` comes from
    :func:`check_shards`. See the module docstring for what is checked and written.

    Raises:
      ShardError: a shard made for another plan (e.g. another ``limit``), an incomplete
        shard (how many rows it has, and the command that resumes it), or a shard row
        with other settings (``file:line``).
    """
    plan = _plan(units)
    digest = plan_digest(plan)
    by_key: dict[Any, dict] = {}
    for f in found:
        if f.manifest.get("plan_sha256") != digest:
            raise ShardError(f"cannot merge {files.directory}: shard {f.shard} was made for other work "
                             f"({f.manifest.get('plan_rows')} rows in its plan, {len(plan)} in this config's; "
                             "another limit, offset or dataset?); rerun it with this config")
        expected = _plan(f.shard.select(units))
        results = f.directory / "results.jsonl"
        rows = {}
        for line, row in read_jsonl(results):
            key = row.get(files.key_field) if isinstance(row, dict) else None
            if key is None:
                raise ShardError(f"{results}:{line}: not a results row (no {files.key_field!r})")
            if row.get(files.hash_field) != files.settings:
                raise ShardError(f"{results}:{line}: {files.key_field} {key!r} was made from a different config "
                                 f"(settings hash {row.get(files.hash_field)} != {files.settings})")
            rows.setdefault(key, row)
        have = [k for k in expected if k in rows]
        if len(have) < len(expected):
            raise ShardError(f"cannot merge {files.directory}: shard {f.shard} is incomplete ({len(have)} of "
                             f"{len(expected)} rows in {results}); rerun it with --shard {f.shard} to resume")
        for key in expected:
            by_key[key] = rows[key]
    merged = [by_key[k] for k in plan]
    extra = [row for key, row in files.done.items() if key not in by_key]
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in merged + extra)
    atomic_write(files.results_path, text)
    files.done = {row[files.key_field]: row for row in merged + extra}
    return merged
