"""Scaling of ``align-jax launch``: 2 Ray workers against 1 on the same 2-shard reason run.

    python experiments/bench_ray_shards.py [--questions 8] [--max-new-tokens 48] [--hidden 256]

A random decoder (``--hidden`` wide, 4 layers; big enough that decoding, not dispatch, is
most of a window's time) answers ``--questions`` GSM8K test questions (windows of 2, one
agent with K=4, oracle principal, no greedy / debate). The same run is launched three
ways, each into a fresh directory: unsharded in one process (no Ray, the reference),
``launch --shards 2 --workers 1`` (one Ray worker runs both shards, one after the other,
compiling once) and ``launch --shards 2 --workers 2`` (two workers at once, each
compiling). Printed: wall time of the shards (first submission to last result) and of
the whole launch (Ray start-up, shards, merge), the speed-up of 2 workers over 1, and
whether the three ``results.jsonl`` files hold the same rows (wall times aside). Needs
Ray (``pip install 'align_jax[cluster]'``) and ``ALIGN_JAX_DATA_DIR``.

On a 2-core machine shared with other jobs the two workers compete for the same cores
(and one XLA:CPU process already uses both for its larger matmuls), so the figure is an
upper bound on overhead rather than a measure of what separate machines give.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _strip(path: Path) -> list[dict]:
    wall = ("wall_s", "window_wall_s", "stage_wall_s")
    return [{k: v for k, v in json.loads(line).items() if k not in wall} for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()

    import jax
    import yaml
    from flax import nnx

    from align_jax.cluster import launch
    from align_jax.llm.model import Transformer
    from align_jax.llm.weights import save_checkpoint
    from tests.llm.conftest import make_tiny_config, make_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench_ray_shards_"))
    model_config = make_tiny_config("qwen2", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                    num_layers=4, num_heads=8, num_kv_heads=4, head_dim=args.hidden // 8,
                                    max_position_embeddings=2048)
    checkpoint = root / "model"
    save_checkpoint(checkpoint, Transformer(model_config, rngs=nnx.Rngs(0)), make_tiny_tokenizer(),
                    source="random init (bench_ray_shards)")
    config = dict(name="bench", dataset="gsm8k", limit=args.questions, batch_questions=2, seed=0,
                  agents=[dict(model=str(checkpoint), name="zs", temperature=1.0, num_samples=4,
                               max_new_tokens=args.max_new_tokens)],
                  principal=dict(type="oracle"), game=dict(num_rounds=10), greedy=False, debate=dict(rounds=0),
                  bootstrap_samples=200)
    outputs = {}
    for label in ("unsharded", "workers1", "workers2"):
        path = root / f"{label}.yaml"
        path.write_text(yaml.safe_dump(dict(config, output_dir=str(root / label))))
        outputs[label] = (path, root / label / "bench" / "seed0")

    print(f"jax {jax.__version__}, {jax.devices()[0]}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; model hidden {args.hidden}, 4 layers; {args.questions} questions, "
          f"K=4, {args.max_new_tokens} new tokens")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "align_jax.cli", "reason", str(outputs["unsharded"][0]), "--quiet",
                    "--no-figures"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    plain = time.perf_counter() - start
    print(f"unsharded, one process (no Ray): {plain:.1f} s")
    timings = {}
    for workers in (1, 2):
        path, _ = outputs[f"workers{workers}"]
        report = launch(["reason", str(path), "--quiet", "--no-figures"], shards=2, workers=workers,
                        log=lambda line: print("  " + line))
        timings[workers] = report
        print(f"launch --shards 2 --workers {workers}: shards {report.shards_wall_s:.1f} s, "
              f"launch {report.wall_s:.1f} s (per shard: "
              + ", ".join(f"{s['shard']} {s['wall_s']:.1f} s" for s in report.shards) + ")")
    speedup = timings[1].shards_wall_s / timings[2].shards_wall_s
    print(f"2 workers vs 1: shards {speedup:.2f}x faster "
          f"(whole launch {timings[1].wall_s / timings[2].wall_s:.2f}x); load average now {os.getloadavg()[0]:.2f}")
    reference = _strip(outputs["unsharded"][1] / "results.jsonl")
    same = all(_strip(outputs[f"workers{w}"][1] / "results.jsonl") == reference for w in (1, 2))
    print(f"merged rows identical to the unsharded run (wall times aside): {same}")


if __name__ == "__main__":
    main()
