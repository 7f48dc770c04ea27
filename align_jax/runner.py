"""One runner for every command: run directory, settings hash, resume, atomic JSONL,
CSV, summary files, progress bar, CLI overrides.

A command (``simulate``, ``reason``, ``replay``, ``cage``, and the methods to come)
describes its work as a list of :class:`Unit` s, each naming the result rows it
produces by key, and a function that computes one unit. :func:`run_units` skips the
units whose rows are all in ``results.jsonl`` already, computes the others, appends
only the rows not yet written (so a resumed run writes exactly the rows an
uninterrupted one would, none lost, none repeated) and shows one progress bar.

Settings hash (:func:`settings_hash`): a row carries the hash of the settings that
determine it. Fields equal to their dataclass default are left out of the hashed
data, so a config class that gains a field with a default keeps the hash of every
existing run; changing a setting (or, deliberately, a default) changes it. A rerun
whose hash differs from the rows already written is refused with a
:class:`~align_jax.config.ConfigError` naming the results file and line.

Layout: ``<output_dir>/<name>/seed<seed>/`` holds ``config.json``,
``results.jsonl`` and whatever the command writes at the end (``results.csv``,
``summary.md``, ``summary.json``, figures), all through atomic writes.

Shards (:mod:`align_jax.shards`): ``RunFiles(..., shard=Shard(i, n))`` opens the shard's
own directory ``<run dir>/shards/<i>-of-<n>/`` and :func:`run_units` computes only that
shard's units; ``RunFiles(..., merge=True)`` checks the shards when it opens and
:func:`run_units` first merges them into the run's ``results.jsonl`` (in unit order),
so every command that runs on this runner gets ``--shard I/N`` and ``--merge``
(:func:`add_run_arguments` with ``shards=True``) without code of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from align_jax.config import ConfigError, config_to_dict
from align_jax.runio import append_jsonl, atomic_write, read_jsonl
from align_jax.shards import Shard, check_shards, merge_shards, shard_argument, shard_directory, write_manifest

__all__ = [
    "Unit",
    "RunFiles",
    "run_dir",
    "settings_hash",
    "non_default_settings",
    "ADDED_FIELD",
    "stable_asdict",
    "run_units",
    "progress_bar",
    "write_csv",
    "add_run_arguments",
    "apply_overrides",
]

HASH_FIELD = "settings_hash"


def run_dir(output_dir: str | os.PathLike, name: str, seed: int) -> Path:
    """``output_dir/name/seed<seed>``."""
    return Path(output_dir) / name / f"seed{seed}"


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return non_default_settings(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def non_default_settings(config: Any, exclude: Iterable[str] = ()) -> dict:
    """The fields of a config dataclass that differ from their defaults, recursively.

    Nested config sections are reduced the same way (list items are always kept, as
    reduced dicts); top-level fields named in ``exclude`` are dropped.
    """
    skip = set(exclude)
    out = {}
    for field in dataclasses.fields(config):
        if not field.init or field.name in skip:
            continue
        value = getattr(config, field.name)
        default = _default_of(field)
        if default is not dataclasses.MISSING and value == default:
            continue
        out[field.name] = _plain(value)
    return out


def settings_hash(config: Any, exclude: Iterable[str] = (), length: int = 16) -> str:
    """Hash of the settings of ``config`` that are not at their default (see module doc).

    Args:
      config: a config dataclass.
      exclude: top-level fields that do not change a row (names, output paths, limits).
      length: hex digits kept.
    """
    blob = json.dumps(non_default_settings(config, exclude), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


ADDED_FIELD = {"added_field": True}
"""``dataclasses.field(metadata=ADDED_FIELD)`` marks a config field added after results keyed on
the full field set (simulate's grid-point ids, which also seed the point's games) were made:
:func:`stable_asdict` leaves it out at its default, so those ids, and the numbers, do not move."""


def stable_asdict(config: Any) -> dict:
    """``dataclasses.asdict(config)`` without the :data:`ADDED_FIELD` fields that are at their default."""
    out = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        if field.metadata.get("added_field") and getattr(config, field.name) == _default_of(field):
            out.pop(field.name)
    return out


class Unit(NamedTuple):
    """One piece of work: the rows it writes (by key) and what computes them.

    Attributes:
      keys: the keys of the rows this unit produces.
      label: shown on the progress bar.
      payload: anything the compute function needs (a window of questions, a grid point, ...).
    """

    keys: tuple
    label: str = ""
    payload: Any = None


class RunFiles:
    """The run directory of one command: reads finished rows, checks their settings, appends.

    Args:
      directory: the run directory (created).
      key_field: the row field that identifies a row (``question_id``, ``point_id``, ``key``).
      settings: the run's settings hash (stamped on every row; rows with another hash are refused).
      config: written to ``config.json`` when given.
      hash_field: the row field holding the hash.
      writer: whether this process writes the directory; the other processes of
        a multi-process run (:mod:`align_jax.distributed`) read it and keep
        their record of finished rows in memory.
      shard: this process computes shard ``i/n`` only; the files are those of
        ``directory/shards/<i>-of-<n>/`` (``run_directory`` stays ``directory``).
      merge: merge the run's shards into ``directory`` (checked here, written by
        :func:`run_units`).

    Raises:
      ConfigError: a row without ``key_field`` or with another settings hash
        (``file:line`` in the message).
      CorruptResultsError: a corrupt line in the middle of ``results.jsonl``.
      ShardError: ``merge`` and the shards are missing, of several splits or of other settings.
    """

    def __init__(self, directory: str | os.PathLike, *, key_field: str, settings: str,
                 config: Any = None, hash_field: str = HASH_FIELD, writer: bool = True,
                 shard: Optional[Shard] = None, merge: bool = False):
        if shard is not None and merge:
            raise ValueError("a run is either one shard or the merge of all of them, not both")
        self.run_directory = Path(directory)
        self.shard = shard
        self.merge = merge
        self.shards_found = check_shards(self.run_directory, settings) if merge else None
        self.directory = shard_directory(directory, shard) if shard is not None else Path(directory)
        self.writer = writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.key_field = key_field
        self.settings = settings
        self.hash_field = hash_field
        self.results_path = self.directory / "results.jsonl"
        self.done: dict[Any, dict] = {}
        for line, row in read_jsonl(self.results_path):
            if not isinstance(row, dict) or key_field not in row:
                raise ConfigError(f"{self.results_path}:{line}: not a results row (no {key_field!r})")
            if row.get(hash_field) != settings:
                raise ConfigError(
                    f"{self.results_path}:{line}: {key_field} {row[key_field]!r} was computed with different "
                    f"settings (hash {row.get(hash_field)} != {settings}); use another name/output_dir or delete "
                    "the file")
            self.done.setdefault(row[key_field], row)
        if config is not None:
            self.write_json("config.json", config_to_dict(config))

    def missing(self, keys: Iterable) -> list:
        """The keys among ``keys`` that have no row yet."""
        return [k for k in keys if k not in self.done]

    def record(self, rows: Sequence[dict]) -> list[dict]:
        """Stamps the settings hash on the rows not written yet and appends them; returns those."""
        new = []
        for row in rows:
            key = row[self.key_field]
            if key in self.done:
                continue
            row[self.hash_field] = self.settings
            self.done[key] = row
            new.append(row)
        if self.writer:
            append_jsonl(self.results_path, new)
        return new

    def rows(self, keys: Iterable) -> list[dict]:
        """The finished rows of ``keys``, in that order (keys without a row are skipped)."""
        return [self.done[k] for k in keys if k in self.done]

    def path(self, name: str) -> Path:
        """A file of the run directory."""
        return self.directory / name

    def write_text(self, name: str, text: str) -> Path:
        """Atomically writes a text file of the run directory (nothing when not the writer)."""
        if self.writer:
            atomic_write(self.path(name), text)
        return self.path(name)

    def write_json(self, name: str, data: Any) -> Path:
        """Atomically writes ``data`` as indented, key-sorted JSON."""
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=True))


def progress_bar(enabled: bool = True):
    """The rich progress bar every command shows (description, bar, done/total, elapsed, remaining)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled, transient=False)


def run_units(files: RunFiles, units: Sequence[Unit], compute: Callable[[Unit], Sequence[dict]], *,
              description: str, progress: bool = True,
              on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Computes every unit that still has missing rows; returns the rows written by this call.

    ``compute(unit)`` must return a row for each of ``unit.keys`` (more rows are an
    error, rows already written are dropped, not re-appended). The bar counts rows.

    ``units`` is always the whole run's list. When ``files`` is a shard's, its
    ``shard.json`` is written and only the shard's units (:meth:`Shard.select`) are
    computed; when ``files`` merges, the shards' rows are merged into ``results.jsonl``
    first (:func:`align_jax.shards.merge_shards`), so nothing is left to compute.

    Raises:
      RuntimeError: ``compute`` returned no row for one of the unit's keys, or a row
        with a key outside the unit (a bug in the command).
      ShardError: the shards to merge do not make up this run (see :mod:`align_jax.shards`).
    """
    if getattr(files, "merge", False):
        merge_shards(files, units, files.shards_found)
    if getattr(files, "shard", None) is not None:
        if files.writer:
            write_manifest(files, files.shard, units)
        units = files.shard.select(units)
    total = sum(len(u.keys) for u in units)
    finished = sum(len(u.keys) - len(files.missing(u.keys)) for u in units)
    written = []
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=total, completed=finished)
        for unit in units:
            if not files.missing(unit.keys):
                continue
            if unit.label:
                bar.update(task, description=f"{description}: {unit.label}")
            rows = list(compute(unit))
            got = {row[files.key_field] for row in rows}
            expected = set(unit.keys)
            if got != expected:
                raise RuntimeError(f"unit {unit.label or unit.keys!r} returned rows for {sorted(map(str, got))}, "
                                   f"expected {sorted(map(str, expected))}")
            new = files.record(rows)
            written += new
            bar.advance(task, len(new))
            if on_row is not None:
                for row in new:
                    on_row(row)
        bar.update(task, description=description)
    return written


def write_csv(path: Path, records: Sequence[dict]) -> Path:
    """Atomically writes flat records as CSV (pandas)."""
    import pandas as pd

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pd.DataFrame(list(records)).to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


_OVERRIDES = {
    "seed": dict(type=int, help="override seed"),
    "output_dir": dict(help="override output_dir"),
    "limit": dict(type=int, help="override limit (number of questions)"),
    "num_questions": dict(type=int, help="override num_questions"),
    "max_new_tokens": dict(type=int, help="override max_new_tokens"),
    "scenarios_per_point": dict(type=int, help="override scenarios_per_point"),
}


def add_run_arguments(parser, overrides: Sequence[str] = ("seed", "output_dir"), *,
                      figures: bool = True, quiet: bool = True, flags: Optional[dict] = None,
                      shards: bool = False) -> None:
    """Adds the common ``CONFIG``, override (``--seed``, ``--output-dir``, ...), ``--no-figures``
    and ``--quiet`` arguments to a sub-command parser.

    ``flags`` maps an override field to its flag when it is not ``--field-name``.
    ``shards`` adds ``--shard I/N`` and ``--merge`` (:mod:`align_jax.shards`); the command
    passes ``args.shard`` and ``args.merge`` on to its :class:`RunFiles`.
    """
    parser.add_argument("config", help="YAML config (see configs/)")
    for name in overrides:
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        parser.add_argument(flag, dest=name, **_OVERRIDES[name])
    if figures:
        parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if shards:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--shard", type=shard_argument, default=None, metavar="I/N",
                           help="compute only shard I of N (1-based) into RUN_DIR/shards/I-of-N/ (resumable)")
        group.add_argument("--merge", action="store_true",
                           help="merge the finished shards into RUN_DIR/results.jsonl, then write the summary")


def apply_overrides(config: Any, args, overrides: Sequence[str]) -> Any:
    """``config`` with every override given on the command line replaced (validation reruns)."""
    values = {name: getattr(args, name) for name in overrides if getattr(args, name, None) is not None}
    return dataclasses.replace(config, **values) if values else config
