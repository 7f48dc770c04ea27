"""Orbax checkpoints of an ECON training run, refused when they come from another config.

A checkpoint is the whole :class:`~align_jax.methods.econ.train.TrainState` (stacked over
S seeds): parameters, target and initial parameters, Adam state, replay buffer, the
questions in progress, the base key and the training curve, so a resumed run continues
exactly where the saved one stopped (segments compose exactly, see
:mod:`~align_jax.methods.econ.train`).

Layout of a checkpoint directory::

    <dir>/settings.json          settings hash and config of the run that owns <dir>
    <dir>/<step>/state/...       the state's leaves (orbax StandardSave of a flat dict)
    <dir>/<step>/meta/...        leaf paths, shapes, dtypes and a SHA-256 of every leaf

The state is saved as a flat ``{leaf00000: array, ...}`` dict (typed PRNG keys as their
key data) and rebuilt on the structure of a freshly initialised state, so nothing depends
on orbax understanding NNX or flashbax pytrees.  A restore checks the leaf paths, shapes,
dtypes and digests: a truncated or overwritten file is reported as a
:class:`CheckpointError` naming the step directory, and nothing is deleted or overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.config import ConfigError

__all__ = ["CheckpointError", "Checkpointer"]

_SETTINGS = "settings.json"


class CheckpointError(ConfigError):
    """A checkpoint directory cannot be used: written by another config, or corrupt.  The
    message names the directory (and the differing fields or the damaged step)."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat(state) -> tuple[dict, list[str]]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    flat, paths = {}, []
    for i, (path, leaf) in enumerate(leaves):
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        flat[f"leaf{i:05d}"] = np.asarray(leaf)
        paths.append(jax.tree_util.keystr(path))
    return flat, paths


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


class Checkpointer:
    """The checkpoints of one run directory.

    Args:
      directory: the checkpoint directory (created on the first save).
      settings: the run's settings hash.
      config: the run's config as plain data (stored, and used to name differing fields).
      max_to_keep: checkpoints kept.

    Raises:
      CheckpointError: ``directory`` holds checkpoints of another config (the message
        names the directory and the differing fields), or its ``settings.json`` is unreadable.
    """

    def __init__(self, directory: str | Path, *, settings: str, config: dict, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.settings = settings
        self.config = config
        settings_path = self.directory / _SETTINGS
        if settings_path.exists():
            try:
                stored = json.loads(settings_path.read_text())
                stored_hash, stored_config = stored["settings_hash"], stored["config"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{settings_path}: unreadable checkpoint settings ({exc}); "
                                      "move the directory away or choose another output_dir") from None
            if stored_hash != settings:
                changed = _diff(stored_config, config) or ["(same fields, different defaults)"]
                raise CheckpointError(
                    f"{self.directory}: checkpoints of a different config (settings hash {stored_hash} != "
                    f"{settings}); changed: {'; '.join(changed[:8])}.  Use another name or output_dir, "
                    "or delete the directory to start over")
        elif self.directory.exists() and any(p.name.isdigit() for p in self.directory.iterdir()):
            raise CheckpointError(f"{self.directory}: checkpoints without {_SETTINGS}; not resuming them")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Saves ``state`` (any pytree) as checkpoint ``step`` (synchronously, atomically)."""
        flat, paths = _flat(state)
        meta = {"step": int(step), "settings_hash": self.settings, "paths": paths,
                "shapes": [list(a.shape) for a in flat.values()], "dtypes": [str(a.dtype) for a in flat.values()],
                "sha256": [_digest(a) for a in flat.values()]}
        settings_path = self.directory / _SETTINGS
        if not settings_path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = settings_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings_hash": self.settings, "config": self.config}, indent=2,
                                      sort_keys=True))
            tmp.replace(settings_path)
        args = self._ocp.args
        self.manager.save(int(step), args=args.Composite(state=args.StandardSave(flat), meta=args.JsonSave(meta)),
                          force=True)
        self.manager.wait_until_finished()

    def restore(self, like, step: Optional[int] = None):
        """Checkpoint ``step`` (default the latest) rebuilt on the structure of ``like``.

        Args:
          like: a pytree of the same structure, shapes and dtypes (e.g. a fresh state or
            ``jax.eval_shape`` of one).
        Raises:
          CheckpointError: no checkpoint, or the step directory is corrupt (unreadable,
            wrong leaves, shapes, dtypes or digests).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        where = self.directory / str(step)
        like_leaves, treedef = jax.tree_util.tree_flatten(like)
        abstract = {}
        for i, leaf in enumerate(like_leaves):
            if _is_key(leaf):
                leaf = jax.eval_shape(jax.random.key_data, leaf)
            abstract[f"leaf{i:05d}"] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        args = self._ocp.args
        try:
            restored = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract),
                                                                      meta=args.JsonRestore()))
            flat, meta = dict(restored["state"]), restored["meta"]
            expected_paths = _flat_paths(like)
        except CheckpointError:
            raise
        except Exception as exc:  # orbax / tensorstore raise many kinds on damaged files
            raise CheckpointError(f"{where}: corrupt or unreadable checkpoint ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}); nothing was overwritten, delete the step directory to fall "
                                  "back on an older checkpoint") from None
        if not isinstance(meta, dict) or meta.get("paths") != expected_paths:
            raise CheckpointError(f"{where}: the checkpoint's leaves do not match this run's state")
        leaves = []
        for i, (name, spec) in enumerate(abstract.items()):
            array = np.asarray(flat[name])
            if array.shape != spec.shape or array.dtype != spec.dtype:
                raise CheckpointError(f"{where}: leaf {expected_paths[i]} is {array.dtype}{list(array.shape)}, "
                                      f"expected {spec.dtype}{list(spec.shape)}")
            if _digest(array) != meta["sha256"][i]:
                raise CheckpointError(f"{where}: leaf {expected_paths[i]} fails its SHA-256 check (corrupt file); "
                                      "nothing was overwritten, delete the step directory to fall back on an "
                                      "older checkpoint")
            leaf = jnp.asarray(array)
            if _is_key(like_leaves[i]):
                leaf = jax.random.wrap_key_data(leaf)  # the default impl, as jax.random.key
            leaves.append(leaf)
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _flat_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
