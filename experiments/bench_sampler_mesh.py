"""Benchmark: data-parallel sampling throughput on 1, 2, 4, 8 forced host devices, same work.

One greedy batch (``--rows`` prompts of 8-24 random tokens, ``--new-tokens`` tokens each, EOS
ignored) through :class:`~align_jax.llm.sampler.Sampler` on a small random decoder, each
device count D in a fresh process (``XLA_FLAGS=--xla_force_host_platform_device_count=D``)
with a ``(D, 1)`` mesh (:func:`~align_jax.llm.sharding.make_mesh`): the rows split D ways,
the weights replicated. Every mesh run takes the XLA path (``ALIGN_JAX_NATIVE_KERNELS=0``,
what GPUs run); two single-device runs without a mesh are printed for reference: the same
XLA path, and the native CPU kernels (this CPU's default).

Reported per run: compile time (first call minus the best timed call), the prefill and the
decode time (best of ``--reps``, each ended by ``block_until_ready``), decode and end-to-end
tokens/s, speedup over the 1-device mesh, parallel efficiency (speedup / D) and efficiency
against the core bound (speedup / min(D, CPUs)), and whether the tokens equal the first run's.
On a 2-core CPU the forced devices share two cores, so the ideal speedup is at most 2 whatever
D: the figures measure the sharding's overhead on this machine, not a GPU node's scaling.

Usage::

    python experiments/bench_sampler_mesh.py                 # 64 rows x 64 tokens, D = 1, 2, 4, 8
    python experiments/bench_sampler_mesh.py --quick         # 16 rows x 16 tokens, D = 1, 8
    python experiments/bench_sampler_mesh.py --out docs/results/bench/sampler_mesh.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL = dict(arch="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
             num_heads=8, num_kv_heads=4, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6,
             max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True)


def child(devices: int, mesh: bool, rows: int, new_tokens: int, reps: int) -> dict:
    """One measurement in this process (JAX started with ``devices`` host devices)."""
    import jax
    import numpy as np
    from flax import nnx

    from align_jax.llm import sharding
    from align_jax.llm.model import ModelConfig, Transformer
    from align_jax.llm.sampler import Sampler

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sampler import timed_prefill_decode

    assert len(jax.devices()) == devices, jax.devices()
    config = ModelConfig(**MODEL)
    model = Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, int(rng.integers(8, 25))).tolist() for _ in range(rows)]
    sampler = Sampler(model, mesh=sharding.make_mesh(devices, 1) if mesh else None)
    batch = sampler.prepare(prompts, max_new_tokens=new_tokens, temperature=0.0)
    spec = sampler.make_spec(batch, ignore_eos=True, eos_token_ids=())
    key = jax.random.key(0)

    def run():
        return timed_prefill_decode(sampler, batch, spec, key)

    first_prefill, first_decode, _ = run()
    timings = [run() for _ in range(reps)]
    prefill_s = min(t[0] for t in timings)
    decode_s = min(t[1] for t in timings)
    tokens = np.asarray(timings[-1][2].tokens)
    assert tokens.shape == (rows, new_tokens)
    return dict(
        devices=devices, mesh=mesh, native=os.environ.get("ALIGN_JAX_NATIVE_KERNELS", "1") != "0",
        compile_s=max(first_prefill - prefill_s, 0.0) + max(first_decode - decode_s, 0.0),
        prefill_s=prefill_s, decode_s=decode_s, decode_tok_s=rows * new_tokens / decode_s,
        e2e_tok_s=rows * new_tokens / (prefill_s + decode_s),
        tokens_sha=hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
        jax=jax.__version__, device=str(jax.devices()[0]),
    )


def spawn(devices: int, mesh: bool, native: bool, args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["ALIGN_JAX_NATIVE_KERNELS"] = "1" if native else "0"
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, __file__, "--child", str(devices), "--rows", str(args.rows),
           "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)] + ([] if mesh else ["--no-mesh"])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rows", type=int, default=64, help="prompts (rows), a multiple of every device count")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed calls after the compile call (best taken)")
    parser.add_argument("--quick", action="store_true", help="16 rows x 16 tokens, devices 1 and 8")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-mesh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, not args.no_mesh, args.rows, args.new_tokens, args.reps)))
        return {}
    if args.quick:
        args.rows, args.new_tokens, args.devices = 16, 16, [1, 8]
    bad = [d for d in args.devices if args.rows % d]
    if bad:
        parser.error(f"--rows {args.rows} is not a multiple of device count(s) {bad}")

    cpus = os.cpu_count() or 1
    print(f"model: random {MODEL['arch']} D={MODEL['hidden_size']} layers={MODEL['num_layers']} "
          f"V={MODEL['vocab_size']} (float32); {args.rows} rows x {args.new_tokens} new tokens, greedy; "
          f"CPUs {cpus}; load avg {os.getloadavg()[0]:.2f}", flush=True)
    runs = [("1 device, no mesh, native kernels", 1, False, True),
            ("1 device, no mesh, XLA path", 1, False, False)]
    runs += [(f"mesh ({d}, 1), XLA path", d, True, False) for d in args.devices]
    rows = []
    for label, devices, mesh, native in runs:
        row = spawn(devices, mesh, native, args)
        row["label"] = label
        rows.append(row)
        print(f"{label}: decode {row['decode_tok_s']:.0f} tok/s, compile {row['compile_s']:.1f} s "
              f"(load avg {os.getloadavg()[0]:.2f})", flush=True)
    base = next(r for r in rows if r["mesh"] and r["devices"] == 1) if 1 in args.devices else None
    reference = rows[0]["tokens_sha"]
    print()
    print(f"jax {rows[0]['jax']} on {rows[0]['device']} (forced host devices), {cpus} CPU cores")
    head = (f"{'run':<36} | {'compile s':>9} | {'prefill s':>9} | {'decode s':>8} | {'decode tok/s':>12} | "
            f"{'e2e tok/s':>9} | {'speedup':>7} | {'eff.':>5} | {'eff. vs cores':>13} | same tokens")
    print(head)
    print("-" * len(head))
    for r in rows:
        if base is not None and r["mesh"]:
            r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["efficiency"] = r["speedup"] / r["devices"]
            r["efficiency_vs_cores"] = r["speedup"] / min(r["devices"], cpus)
            extra = f"{r['speedup']:>6.2f}x | {100 * r['efficiency']:>4.0f}% | {100 * r['efficiency_vs_cores']:>12.0f}%"
        else:
            extra = f"{'':>7} | {'':>5} | {'':>13}"
        r["same_tokens"] = r["tokens_sha"] == reference
        print(f"{r['label']:<36} | {r['compile_s']:>9.2f} | {r['prefill_s']:>9.3f} | {r['decode_s']:>8.3f} | "
              f"{r['decode_tok_s']:>12.0f} | {r['e2e_tok_s']:>9.0f} | {extra} | {'yes' if r['same_tokens'] else 'NO'}")
    print(f"speedup = decode tok/s over the (1, 1) mesh; eff. = speedup / D; eff. vs cores = speedup / min(D, {cpus}) "
          f"(the {cpus} cores bound any speedup on this machine)")
    result = {"model": MODEL, "rows": args.rows, "new_tokens": args.new_tokens, "cpu_count": cpus, "runs": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if not all(r["same_tokens"] for r in rows):
        raise SystemExit("a run generated different tokens")
    return result


if __name__ == "__main__":
    main()
