"""Devices and hosts: the mesh that shards a batch of games, and multi-process start-up.

A sweep's games are independent, so they shard on one mesh axis, ``"games"``:
every device plays its slice of each chunk (``jax.shard_map``), reduces it to
per-block sums, and the blocks are gathered.  Each game's key and each block's
sum are the same whatever the number of devices, so a run on 1, 8 or 64
devices, or on several processes, writes the same rows (tested).

Several hosts (or several processes on one host) join through
:func:`jax.distributed.initialize`; :func:`initialize` takes the coordinator
address, process count and id from flags, from ``ALIGN_JAX_COORDINATOR``,
``ALIGN_JAX_NUM_PROCESSES`` and ``ALIGN_JAX_PROCESS_ID``, or -- with
``auto=True`` -- from the cluster's own environment as JAX detects it (SLURM,
TPU pod slices, Open MPI).  On CPU the processes talk through JAX's gloo
collectives.  Every process runs the same program on the global mesh; process
0 alone writes files (:func:`is_writer`).

Launch lines::

    # 4 local processes on one machine (CPU, gloo collectives)
    for i in 0 1 2 3; do
      align-jax simulate configs/theorem1_sweep.yaml --coordinator localhost:12355 \\
          --num-processes 4 --process-id $i &
    done; wait
    # a SLURM job: one task per host (or per GPU), JAX reads SLURM's variables
    srun --nodes=4 --ntasks-per-node=1 align-jax simulate configs/theorem1_sweep.yaml --distributed
    # a TPU pod slice: the same command on every worker
    gcloud compute tpus tpu-vm ssh $TPU --worker=all \\
        --command="align-jax simulate configs/theorem1_sweep.yaml --distributed"
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.sharding import Mesh

from align_jax.config import ConfigError

__all__ = ["GAMES_AXIS", "initialize", "game_mesh", "is_writer", "process_count", "sync"]

GAMES_AXIS = "games"
"""The mesh axis a batch of games is sharded over."""

_ENV = ("ALIGN_JAX_COORDINATOR", "ALIGN_JAX_NUM_PROCESSES", "ALIGN_JAX_PROCESS_ID")
_started = False


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {value!r}") from None


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False) -> bool:
    """Joins a multi-process JAX run; returns whether one was started.

    Does nothing (returns False) when no coordinator is given by argument or
    environment and ``auto`` is off: a single-process run.

    Args:
      coordinator: ``host:port`` of process 0 (default ``$ALIGN_JAX_COORDINATOR``).
      num_processes: total processes (default ``$ALIGN_JAX_NUM_PROCESSES``).
      process_id: this process, ``0 .. num_processes - 1`` (default ``$ALIGN_JAX_PROCESS_ID``).
      auto: let JAX read the cluster's environment (SLURM, TPU pod, Open MPI)
        for whatever is not given.

    Raises:
      ConfigError: an incomplete or inconsistent set of values (named), or a
        second call with other values.
    """
    global _started
    coordinator = coordinator or os.environ.get(_ENV[0]) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV[1])
    process_id = process_id if process_id is not None else _env_int(_ENV[2])
    if coordinator is None and num_processes is None and process_id is None and not auto:
        return False
    if not auto:
        missing = [flag for flag, value in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                            ("--process-id", process_id)) if value is None]
        if missing:
            raise ConfigError(f"a multi-process run needs {', '.join(missing)} (or {', '.join(_ENV)}); "
                              "use --distributed to read them from the cluster's environment")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes: must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id: must be in [0, {num_processes}), got {process_id}")
    if _started:
        return True
    # Cross-process collectives between CPU devices (GPU and TPU backends have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    _started = True
    return True


def process_count() -> int:
    """Processes in this run (1 without :func:`initialize`)."""
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def game_mesh(devices: Optional[int] = None) -> Mesh:
    """A one-axis mesh (:data:`GAMES_AXIS`) over the devices that play games.

    Args:
      devices: how many devices; ``None`` for all of them (every process's, in
        a multi-process run).  A smaller count takes the first local devices
        and is only allowed with one process.

    Raises:
      ConfigError: ``devices`` < 1, more than there are, or a subset in a
        multi-process run.
    """
    available = jax.devices()
    if devices is None:
        chosen = available
    else:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ConfigError(f"devices: must be a positive integer or null (all), got {devices!r}")
        if devices > len(available):
            raise ConfigError(f"devices: {devices} requested, {len(available)} available "
                              f"({available[0].platform}); on CPU, XLA_FLAGS="
                              "--xla_force_host_platform_device_count=N makes N host devices")
        if jax.process_count() > 1 and devices != len(available):
            raise ConfigError(f"devices: a multi-process run uses all {len(available)} devices; "
                              f"got {devices}")
        chosen = available[:devices]
    return Mesh(chosen, (GAMES_AXIS,))
