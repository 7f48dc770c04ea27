"""Where a reason run's seconds go, against the arithmetic it has to do (issue 17, scope 1).

For each stage of a finished ``align-jax reason`` run (sampling, principal, greedy, debate) this
counts, from the rows' recorded costs, the tokens the stage had to prefill and to generate, turns
them into floating-point operations of the model, and sets them against the measured seconds::

    prefill token at position p:  2 P_body + 4 L H hd (p / 2)               (causal attention)
    generated token at context c: 2 (P_body + P_head) + 4 L H hd c
    one LM-head row per prompt that is only prefilled (its next-token logits)

``P_body`` = the decoder's weights without embedding and LM head, ``P_head`` = D V. It then
divides the work by the best matmul rate this machine showed on the same model
(``docs/results/bench/sampler_qwen_cpu_bf16.json``: the highest prefill tokens / s of ours or
PyTorch, times the FLOPs of those tokens), giving a floor on each stage's seconds that no
scheduling change can beat without doing less arithmetic. ``measured / floor`` is how far each stage
is from that floor.

Counted once: the candidates' prompts (one prefill serves a prompt's K samples), agents that share a
greedy prompt (one decode), debate rounds >= 1 (round 0 reuses each agent's first sample). Not
counted: padding rows and padded prompt positions, rows kept decoding after they finished, compile
time; these are what the measured seconds carry above the floor.

    python experiments/reason_cost_accounting.py docs/results/reason_throughput/after
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "results" / "bench" / "sampler_qwen_cpu_bf16.json"


def model_shape(name: str) -> dict:
    """Decoder dimensions of a registered model, read from its GGUF metadata (no weights loaded)."""
    import gguf

    from align_jax.llm import registry
    from align_jax.llm.gguf_loader import config_from_gguf

    path = registry.resolve_gguf(name)
    c = config_from_gguf(gguf.GGUFReader(str(path)), path)
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return {"layers": c.num_layers, "heads": c.num_heads, "head_dim": c.head_dim, "hidden": c.hidden_size,
            "vocab": c.vocab_size, "body": c.num_layers * (attn + mlp), "head": c.hidden_size * c.vocab_size}


def prefill_flops(m: dict, tokens: float, length: float) -> float:
    return tokens * (2 * m["body"] + 4 * m["layers"] * m["heads"] * m["head_dim"] * length / 2)


def decode_flops(m: dict, tokens: float, context: float) -> float:
    return tokens * (2 * (m["body"] + m["head"]) + 4 * m["layers"] * m["heads"] * m["head_dim"] * context)


def stage_items(row: dict, config: dict) -> dict:
    """``{stage: [(kind, tokens, length), ...]}`` of one row: ``("prefill", n, p)`` is n prompt tokens
    of prompts of length p, ``("decode", n, c)`` n generated tokens at mean context c, ``("head", n, 0)``
    n LM-head rows of prompts that are only prefilled (their next-token logits)."""
    items = {}
    agents = row["agents"]
    sampling = []
    for agent in agents:
        p = agent["cost"]["prompt_tokens"]
        sampling.append(("prefill", p, p))
        sampling += [("decode", n, p + n / 2) for n in (s["tokens"] for s in agent["samples"])]
    items["sampling"] = sampling

    cost = row["principal"].get("cost") or {}
    p, g, calls = cost.get("prompt_tokens", 0), cost.get("gen_tokens", 0), max(cost.get("calls", 1), 1)
    # per call: prompts of mean length p / calls, one LM-head row each (or the generated tokens)
    items["principal"] = [("prefill", p, p / calls), ("head", calls, 0), ("decode", g, p / calls + g / calls / 2)]

    seen, greedy = set(), []
    for agent_cfg, name in zip(config["agents"], [a["name"] for a in agents]):
        prompt = (agent_cfg.get("model"), agent_cfg["prompt_style"], agent_cfg.get("num_fewshot"))
        record = row["methods"].get(f"greedy/{name}")
        if record is None or prompt in seen:
            continue
        seen.add(prompt)
        p, g = record["cost"]["prompt_tokens"], record["cost"]["gen_tokens"]
        greedy += [("prefill", p, p), ("decode", g, p + g / 2)]
    items["greedy"] = greedy

    debate = row["methods"].get("debate")
    if debate is not None:
        first_gen = sum(a["samples"][0]["tokens"] for a in agents)
        first_pre = sum(a["cost"]["prompt_tokens"] for a in agents)
        turns = max(debate["cost"]["calls"] - len(agents), 1)
        p = debate["cost"]["prompt_tokens"] - first_pre
        g = debate["cost"]["gen_tokens"] - first_gen
        items["debate"] = [("prefill", p, p / turns), ("decode", g, p / turns + g / turns / 2)]
    return items


def item_flops(m: dict, kind: str, tokens: float, length: float) -> float:
    """Model FLOPs of one :func:`stage_items` entry."""
    if kind == "prefill":
        return prefill_flops(m, tokens, length)
    if kind == "decode":
        return decode_flops(m, tokens, length)
    return tokens * 2 * m["head"]


def stage_work(row: dict, config: dict, m: dict) -> dict:
    """``{stage: (prefill tokens, generated tokens, flops)}`` of one row."""
    work = {}
    for stage, items in stage_items(row, config).items():
        pre = sum(n for kind, n, _ in items if kind == "prefill")
        gen = sum(n for kind, n, _ in items if kind == "decode")
        work[stage] = (pre, gen, sum(item_flops(m, *item) for item in items))
    return work


def bench_peak(m: dict, path: Path = BENCH) -> tuple[float, str]:
    """The best prefill rate of the sampler benchmark (ours or PyTorch) as FLOP/s, and its label."""
    data = json.loads(path.read_text())
    best, label = 0.0, ""
    for row in data["rows"]:
        for who in ("ours", "torch"):
            length = row["prompt_tokens"] / row["batch"]  # the bench's prompt_tokens count the whole batch
            rate = row[who]["prefill_tok_s"] * prefill_flops(m, 1, length)
            if rate > best:
                best, label = rate, f"{who} prefill at B={row['batch']} x {length:.0f} prompt tokens"
    return best, label


def measure_rates(model: str, param_dtype: str = "bfloat16", *, rows=(64, 128, 192, 256),
                  contexts=(384, 768, 1280), prompts=((16, 128), (8, 384), (4, 768)), reps: int = 3) -> dict:
    """This machine's best seconds per token of our decoder, measured now (compile excluded).

    ``decode[S]``: the least seconds per generated token over R in ``rows`` of one decode step
    (:func:`align_jax.llm.decoding.step`: the model and the LM head, no token choice) with S cache
    slots all visible; ``prefill[P]``: seconds per prompt token of :func:`~align_jax.llm.decoding.prefill`
    for B prompts of P tokens. Every figure is the median of ``reps`` timed calls after a warm call.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from align_jax.llm import decoding
    from align_jax.llm.model import init_cache
    from align_jax.llm.weights import load_pretrained

    loaded = load_pretrained(model, dtype="float32", param_dtype=param_dtype)
    graphdef, params = nnx.split(loaded.model)
    cfg = loaded.config

    from bench_qmatmul import timed as timed_call  # the sibling script (experiments/ is the script's directory)

    def timed(fn) -> float:
        return timed_call(fn, reps=reps)[1]

    decode, per_row = {}, {}
    for slots in contexts:
        for r in rows:
            used = slots - reps - 2  # slots already holding a token; the timed steps write the rest
            state = decoding.DecodeState(init_cache(cfg, r, slots), jnp.ones((r, slots), bool),
                                         jnp.full((r,), used, jnp.int32), jnp.asarray(used, jnp.int32))
            tokens = jnp.full((r,), 100, jnp.int32)
            box = [state]

            def one_step():
                logits, box[0] = decoding.step(graphdef, params, box[0], tokens)
                return logits

            per_row[(slots, r)] = timed(one_step) / r
            print(f"  decode R={r:4d} S={slots:5d}: {per_row[(slots, r)] * 1e3:.2f} ms per token", file=sys.stderr)
        decode[slots] = min(per_row[(slots, r)] for r in rows)
    prefill = {}
    for b, length in prompts:
        tokens = jnp.full((b, length), 100, jnp.int32)
        lengths = jnp.full((b,), length, jnp.int32)
        seconds = timed(lambda: decoding.prefill(graphdef, params, tokens, lengths, num_samples=1, max_new_tokens=1))
        prefill[length] = seconds / (b * length)
        print(f"  prefill B={b} P={length}: {b * length / seconds:.0f} tok/s", file=sys.stderr)
    return {"model": model, "param_dtype": param_dtype, "decode": decode, "prefill": prefill,
            "decode_by_rows": {f"{s}x{r}": v for (s, r), v in per_row.items()}}


def _interp(table: dict, x: float) -> float:
    keys = sorted(table)
    return float(np.interp(x, keys, [table[k] for k in keys]))


def bound_seconds(items, rates: dict) -> float:
    """Seconds of :func:`stage_items` entries at the measured best rates. ``"head"`` rows (the LM head
    of a prompt that is only prefilled) are not priced, so the bound errs low."""
    total = 0.0
    for kind, tokens, length in items:
        if kind == "prefill":
            total += tokens * _interp(rates["prefill"], length)
        elif kind == "decode":
            total += tokens * _interp(rates["decode"], length)
    return total


def bound_table(run_dir: Path, rates: dict, before_s: float | None = None) -> str:
    """Per stage: measured seconds per question against the same work at ``rates`` (perfect
    batching, no padding, no compile, no host work)."""
    rows = run_rows(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    items = [stage_items(r, config) for r in rows]
    stages = ("sampling", "principal", "greedy", "debate")
    dec = ", ".join(f"S={s}: {1 / v:.0f} tok/s" for s, v in sorted(rates["decode"].items()))
    pre = ", ".join(f"P={p}: {1 / v:.0f} tok/s" for p, v in sorted(rates["prefill"].items()))
    lines = [f"# The same work at our best measured rates ({run_dir}, {len(rows)} questions)", "",
             f"Best decode rate over R in the measured batch sizes (one step = model + LM head, no token choice): {dec}.",
             f"Prefill: {pre}.", "",
             "| stage | measured s / q | at the best measured rates s / q | measured / bound |", "|---|---|---|---|"]
    total_s = total_b = 0.0
    for stage in stages:
        per_row = [x.get(stage) for x in items]
        if any(x is None for x in per_row):
            continue
        bound = float(np.mean([bound_seconds(x, rates) for x in per_row]))
        seconds = float(np.mean([r["stage_wall_s"].get(stage, 0.0) for r in rows]))
        total_s, total_b = total_s + seconds, total_b + bound
        lines.append(f"| {stage} | {seconds:.1f} | {bound:.1f} | {seconds / bound:.2f}x |")
    lines.append(f"| **all stages** | {total_s:.1f} | {total_b:.1f} | {total_s / total_b:.2f}x |")
    if before_s:
        lines += ["", f"Against the before run ({before_s:.1f} s / q), this bound is a speed-up of at most "
                      f"{before_s / total_b:.2f}x; the 3x target needs {before_s / 3:.1f} s / q."]
    return "\n".join(lines) + "\n"


def run_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's ``results.jsonl`` (the runner's reader: a corrupt line names file and line)."""
    from align_jax.runio import read_jsonl

    return [row for _, row in read_jsonl(run_dir / "results.jsonl")]


def account(run_dir: Path) -> str:
    rows = run_rows(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    models = {a["model"] for a in config["agents"]}
    if len(models) != 1:
        raise SystemExit(f"{run_dir}: the accounting assumes one model for every agent, got {sorted(models)}")
    m = model_shape(models.pop())
    peak, label = bench_peak(m)
    q = len(rows)
    stages = ("sampling", "principal", "greedy", "debate")
    lines = [f"# Cost accounting of {run_dir} ({q} questions, {config['agents'][0]['model']})", "",
             f"Matmul rate used for the floor: {peak / 1e9:.0f} GFLOP/s ({label}; `{BENCH.relative_to(ROOT)}`).", "",
             "| stage | prefill tok / q | generated tok / q | TFLOP / q | measured s / q | floor s / q | "
             "achieved GFLOP/s | measured / floor |", "|---|---|---|---|---|---|---|---|"]
    total_s = total_floor = total_flops = 0.0
    for stage in stages:
        work = [stage_work(r, config, m).get(stage) for r in rows]
        if any(w is None for w in work):
            continue
        pre, gen, flops = (np.mean([w[i] for w in work]) for i in range(3))
        seconds = float(np.mean([r["stage_wall_s"].get(stage, 0.0) for r in rows]))
        floor = flops / peak
        total_s, total_floor, total_flops = total_s + seconds, total_floor + floor, total_flops + flops
        lines.append(f"| {stage} | {pre:.0f} | {gen:.0f} | {flops / 1e12:.2f} | {seconds:.1f} | {floor:.1f} | "
                     f"{flops / max(seconds, 1e-9) / 1e9:.0f} | {seconds / floor:.1f}x |")
    wall = float(np.mean([r["wall_s"] for r in rows]))
    lines.append(f"| **all stages** | | | {total_flops / 1e12:.2f} | {total_s:.1f} | {total_floor:.1f} | "
                 f"{total_flops / total_s / 1e9:.0f} | {total_s / total_floor:.1f}x |")
    lines += ["", f"Wall time per question (row `wall_s`, incl. host work): {wall:.1f} s. At the floor of every stage "
                  f"a question would take {total_floor:.1f} s, {wall / total_floor:.1f}x less: the most any "
                  "change can gain without doing less arithmetic (or finding a faster matmul than the benchmark's)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished reason run directories (results.jsonl, config.json)")
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    parser.add_argument("--measure", action="store_true",
                        help="also measure our decoder's best decode and prefill rates on this machine (loads the "
                             "model, about 3 minutes) and add the table of each stage at those rates")
    parser.add_argument("--before-s", type=float, help="seconds per question of the before run (for the bound's ratio)")
    parser.add_argument("--rates-json", type=Path, help="write (or, when it exists and --measure is off, read) the measured rates")
    args = parser.parse_args(argv)
    text = "\n".join(account(run) for run in args.runs)
    rates = None
    if args.measure:
        config = json.loads((args.runs[0] / "config.json").read_text())
        rates = measure_rates(config["agents"][0]["model"], config.get("param_dtype", "bfloat16"))
        if args.rates_json:
            from align_jax.runio import atomic_write

            atomic_write(args.rates_json, json.dumps(rates, indent=1, default=float))
    elif args.rates_json and args.rates_json.exists():
        raw = json.loads(args.rates_json.read_text())
        rates = {**raw, "decode": {int(k): v for k, v in raw["decode"].items()},
                 "prefill": {int(k): v for k, v in raw["prefill"].items()}}
    if rates is not None:
        text += "\n" + "\n".join(bound_table(run, rates, args.before_s) for run in args.runs)
    emit(text, args.out)
    return 0


def emit(text: str, out: Path | None) -> None:
    """Print ``text`` and, with ``out``, also write it there atomically."""
    print(text)
    if out:
        from align_jax.runio import atomic_write

        atomic_write(out, text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
