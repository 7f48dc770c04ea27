"""``align-jax launch``: the shards of a run as Ray tasks, then the merge.

    align-jax launch --shards 4 [--ray-address HOST:PORT | auto] reason CONFIG [--limit N ...]

runs ``align-jax reason CONFIG ... --shard i/4`` for ``i = 1..4`` as one Ray task each
(``--cpus-per-shard`` CPUs per task), then ``align-jax reason CONFIG ... --merge`` here.
Any command whose parser has ``--shard`` (``reason``, ``cage``) can be launched. Ray
schedules, places and retries; this module only submits, collects and merges (no
scheduler of our own). Without ``--ray-address`` a local Ray cluster with ``--workers``
CPUs is started for the launch and stopped after it.

Each task returns the files of its shard directory (``results.jsonl``, ``shard.json``,
``config.json``); the driver writes them into its own ``RUN/shards/`` when they are not
there already, so the workers need not share a file system with the driver (they need
the config, data and model files at the same paths). A worker that dies is retried by
Ray (``--retries``): on a shared file system the retry resumes the shard's rows. Environment
variables ``ALIGN_JAX_*`` of the driver are passed to the tasks.

Bad input fails here before any model is loaded or any task is submitted: an unknown
command or one without shards, a bad config (``file:line: field``), ``--shards`` below
1, and a Ray address where no Ray cluster answers within ``--connect-timeout``
seconds (the message names the address; :func:`check_ray_address`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from align_jax.runio import atomic_write
from align_jax.shards import MANIFEST, Shard, shard_directory

__all__ = ["LaunchError", "LaunchReport", "check_ray_address", "launch", "add_launch_subcommand"]

SHARD_FILES = ("results.jsonl", MANIFEST, "config.json")


class LaunchError(RuntimeError):
    """A launch that cannot start (no Ray, an address that does not answer, a bad command) or a failed shard."""


class LaunchReport(NamedTuple):
    """What :func:`launch` returns.

    Attributes:
      run_directory: the merged run directory.
      shards: per shard, in order: ``{"shard", "node", "wall_s", "rows"}``.
      wall_s: wall time of the launch (cluster start, shards and merge).
      shards_wall_s: from the first submission to the last shard's result.
    """

    run_directory: Path
    shards: list
    wall_s: float
    shards_wall_s: float


_PROBE = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False, "
          "include_dashboard=False); ray.shutdown()")


def check_ray_address(address: str, timeout: float) -> None:
    """Fails fast, naming ``address``, when no Ray cluster answers there within ``timeout`` seconds.

    ``ray.init`` on an address where no Ray cluster answers retries for a minute or more
    (and a TCP connection alone proves nothing: a proxy or another server may accept
    it). So: a TCP connection first (a refused port fails at once), then ``ray.init``
    in a child process that is killed after ``timeout`` seconds. ``auto`` (the cluster
    started on this machine by ``ray start``) skips the TCP step.

    Raises:
      LaunchError: not ``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``; no connection;
        or no Ray cluster replied in time (the message names the address).
    """
    import subprocess
    import warnings

    deadline = time.monotonic() + timeout
    if address != "auto":
        target = address[len("ray://"):] if address.startswith("ray://") else address
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise LaunchError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            raise LaunchError(f"Ray address {address!r} does not answer: no connection to {host}:{port} within "
                              f"{timeout:g} s ({reason}); start the cluster (`ray start --head`) or fix "
                              "--ray-address") from None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise LaunchError(f"Ray address {address!r}: cannot talk to it, Ray is not installed here "
                          "(pip install -e '.[cluster]')")
    try:
        with warnings.catch_warnings():  # fork + exec of a fresh interpreter; JAX's fork warning does not apply
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            probe = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                                   timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise LaunchError(f"Ray address {address!r} does not answer: no Ray cluster replied within {timeout:g} s "
                          "(--connect-timeout); start the cluster (`ray start --head`) or fix --ray-address (a "
                          "cluster with token authentication also needs RAY_AUTH_MODE=token here)") from None
    if probe.returncode != 0:
        # the root cause comes first in a chained traceback (e.g. an AuthenticationError under the ConnectionError)
        errors = [line.strip() for line in probe.stderr.splitlines()
                  if re.match(r"^[\w.]+(Error|Exception): ", line.strip())]
        cause = errors[0] if errors else "ray.init failed"
        if len(errors) > 1 and errors[-1] != cause:
            cause = f"{errors[-1]} ({cause[:300]})"
        raise LaunchError(f"Ray address {address!r} does not answer: {cause}")


def _run_shard(argv: Sequence[str], shard: str, env: dict) -> dict:
    """The Ray task: one shard of ``argv`` in this worker; returns its shard directory's files."""
    os.environ.update(env)
    try:
        os.getcwd()
    except FileNotFoundError:  # the worker was started in a directory removed since (imports resolve paths)
        os.chdir(os.path.expanduser("~"))
    from align_jax.cli import build_parser

    start = time.perf_counter()
    args = build_parser().parse_args([*argv, "--shard", shard, "--quiet", "--no-figures"])
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        args.func(args)
    directory = shard_directory(args.run_directory(args), args.shard)
    files = {name: (directory / name).read_text(encoding="utf-8") for name in SHARD_FILES
             if (directory / name).is_file()}
    return {"shard": shard, "node": socket.gethostname(), "pid": os.getpid(), "wall_s": time.perf_counter() - start,
            "rows": files.get("results.jsonl", "").count("\n"), "directory": str(directory), "files": files}


def _failure(exc: BaseException) -> str:
    """One line for a failed task: the shard's own error and, for a bug, where it was raised."""
    from align_jax.cli import user_errors

    cause = getattr(exc, "cause", None) or exc
    message = str(cause).strip().splitlines()
    line = f"{type(cause).__name__}: {message[-1] if message else ''}"
    if not isinstance(cause, user_errors()):
        frames = [f for f in re.findall(r'File "([^"]+)", line (\d+)', str(exc)) if not f[0].startswith("<")]
        if frames:
            line += f" (raised at {frames[-1][0]}:{frames[-1][1]} on the worker)"
    return line


def _parse_command(argv: Sequence[str]):
    from align_jax.cli import build_parser

    if not argv:
        raise LaunchError("launch: name the command to shard, e.g. `align-jax launch --shards 4 reason CONFIG`")
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(list(argv))
    except SystemExit:
        raise LaunchError(f"launch: bad command {' '.join(argv)!r}: "
                          f"{stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else 'usage error'}") from None
    if not hasattr(args, "run_directory") or not hasattr(args, "shard"):
        raise LaunchError(f"launch: `{argv[0]}` does not run in shards (commands that do: reason, cage)")
    if args.shard is not None or args.merge:
        raise LaunchError("launch: leave --shard / --merge out of the command; launch adds them")
    return args


def launch(command: Sequence[str], *, shards: int, address: Optional[str] = None, workers: Optional[int] = None,
           cpus_per_shard: float = 1.0, connect_timeout: float = 15.0, retries: int = 2,
           merge: bool = True, ship_package: bool = False, log=print) -> LaunchReport:
    """Runs the ``shards`` shards of ``command`` (an ``align-jax`` argv) as Ray tasks, then merges them.

    Args:
      command: e.g. ``["reason", "configs/reason_small.yaml", "--limit", "8"]``.
      shards: N, the number of shards (and tasks).
      address: a running Ray cluster (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``);
        ``None`` starts a local one (or uses the Ray already initialised in this process).
      workers: CPUs of the local cluster (default: ``min(shards, os.cpu_count())``).
      cpus_per_shard: Ray CPUs each task reserves.
      connect_timeout: seconds to wait for a Ray cluster to answer at ``address``
        (:func:`check_ray_address`).
      retries: Ray retries of a task whose worker died.
      merge: merge and summarise at the end (``command ... --merge``, run here).
      ship_package: upload this ``align_jax`` package to the workers (Ray
        ``runtime_env`` ``py_modules``), for clusters where it is not installed.
      log: progress lines.

    Raises:
      LaunchError: see the module docstring; a failed shard names the shard and its
        error (the finished shards are kept; a relaunch or ``--shard i/N`` resumes).
      ConfigError: the command's config is bad (raised before Ray starts).
    """
    started = time.perf_counter()
    if shards < 1:
        raise LaunchError(f"launch: --shards must be >= 1, got {shards}")
    args = _parse_command(command)
    run_directory = Path(args.run_directory(args))  # loads and validates the config (no model)
    if address is not None:
        check_ray_address(address, connect_timeout)
    try:
        import ray
    except ImportError:
        raise LaunchError("launch needs Ray: pip install 'align_jax[cluster]' (or pip install ray)") from None

    env = {k: v for k, v in os.environ.items() if k.startswith("ALIGN_JAX_")}
    own_cluster = not ray.is_initialized()
    if ship_package and not own_cluster:
        raise LaunchError("launch: --ship-package needs a Ray session of its own (Ray is already initialised here)")
    if own_cluster:
        options = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        if address is None:  # "local": always a new cluster, even where `ray start` left one running
            options.update(address="local", num_cpus=workers or min(shards, os.cpu_count() or 1))
        else:
            options["address"] = address
        if ship_package:  # a local package is uploaded at the job level only
            import align_jax

            options["runtime_env"] = {"py_modules": [str(Path(align_jax.__file__).parent)]}
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError) as exc:
            raise LaunchError(f"Ray address {address!r}: {exc}") from None
    try:
        task = ray.remote(num_cpus=cpus_per_shard, max_retries=retries)(_run_shard)
        shard_list = [Shard(i, shards) for i in range(1, shards + 1)]
        shards_start = time.perf_counter()
        pending = {task.remote(list(command), str(s), env): s for s in shard_list}
        log(f"launch: {shards} shards of `align-jax {' '.join(command)}` submitted to Ray "
            f"({ray.cluster_resources().get('CPU', 0):g} CPUs)")
        results, failures = {}, {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # RayTaskError wraps the shard's own exception
                failures[shard] = _failure(exc)
                log(f"launch: shard {shard} failed: {failures[shard]}")
                continue
            results[shard] = result
            log(f"launch: shard {shard} done: {result['rows']} rows in {result['wall_s']:.1f} s on "
                f"{result['node']} (pid {result['pid']})")
        shards_wall = time.perf_counter() - shards_start
    finally:
        if own_cluster:
            ray.shutdown()
    for shard, result in sorted(results.items()):  # without a shared file system: the rows come here
        directory = shard_directory(run_directory, shard)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in result["files"].items():
            path = directory / name
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                atomic_write(path, text)
    if failures:
        lines = "; ".join(f"shard {s}: {m}" for s, m in sorted(failures.items()))
        first = min(failures)
        raise LaunchError(f"launch: {len(failures)} of {shards} shards failed ({lines}); finished rows are kept: "
                          f"relaunch, or run `align-jax {' '.join(command)} --shard {first}` and then --merge")
    if merge:
        from align_jax.cli import build_parser

        merge_args = build_parser().parse_args([*command, "--merge"])
        merge_args.func(merge_args)
    report = [{"shard": str(s), "node": r["node"], "wall_s": r["wall_s"], "rows": r["rows"]}
              for s, r in sorted(results.items())]
    return LaunchReport(run_directory, report, time.perf_counter() - started, shards_wall)


def _launch_options(parser) -> None:
    parser.add_argument("--shards", type=int, required=True, metavar="N", help="number of shards (Ray tasks)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="a running Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: start a local one)")
    parser.add_argument("--workers", type=int, default=None,
                        help="CPUs of the local cluster started without --ray-address (default: min(N, cores))")
    parser.add_argument("--cpus-per-shard", type=float, default=1.0, help="Ray CPUs each shard reserves (default 1)")
    parser.add_argument("--connect-timeout", type=float, default=15.0,
                        help="seconds to wait for a Ray cluster to answer at --ray-address (default 15)")
    parser.add_argument("--retries", type=int, default=2, help="Ray retries of a shard whose worker died (default 2)")
    parser.add_argument("--no-merge", dest="merge", action="store_false", help="leave the shards unmerged")
    parser.add_argument("--ship-package", action="store_true",
                        help="upload this align_jax package to the workers (when the cluster does not have it)")


def _launch_command(args) -> int:
    # launch options may also follow the command: pick them out of the remainder
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _launch_options(options)
    options.set_defaults(**{k: getattr(args, k) for k in ("shards", "ray_address", "workers", "cpus_per_shard",
                                                          "connect_timeout", "retries", "merge", "ship_package")})
    for action in options._actions:
        action.required = False
    picked, command = options.parse_known_args(args.command)
    if picked.shards is None:
        raise LaunchError("launch: --shards N is required")
    report = launch(command, shards=picked.shards, address=picked.ray_address, workers=picked.workers,
                    cpus_per_shard=picked.cpus_per_shard, connect_timeout=picked.connect_timeout,
                    retries=picked.retries, merge=picked.merge, ship_package=picked.ship_package,
                    log=lambda line: print(line, file=sys.stderr))
    print(f"launch: {len(report.shards)} shards in {report.shards_wall_s:.1f} s, {report.wall_s:.1f} s in all; "
          f"results: {report.run_directory}")
    return 0


def add_launch_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``launch --shards N [--ray-address ADDR] COMMAND CONFIG [command options]``."""
    parser = subparsers.add_parser(
        "launch", help="run a command's shards as Ray tasks, then merge them",
        description="Run `align-jax COMMAND ... --shard i/N` for i = 1..N as Ray tasks, then "
                    "`align-jax COMMAND ... --merge` (see align_jax.cluster).",
        usage="align-jax launch --shards N [--ray-address ADDR] [options] COMMAND CONFIG [command options]",
        allow_abbrev=False)
    _launch_options(parser)
    parser.set_defaults(func=_launch_command)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the align-jax command to shard (reason, cage)")
    # --shards may come after the command too (it is then picked out of the remainder)
    for action in parser._actions:
        if action.dest == "shards":
            action.required = False
            action.default = None
    return parser
