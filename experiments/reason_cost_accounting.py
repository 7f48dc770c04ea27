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


def stage_work(row: dict, config: dict, m: dict) -> dict:
    """``{stage: (prefill tokens, generated tokens, flops)}`` of one row."""
    work = {}
    agents = row["agents"]
    pre = gen = flops = 0.0
    for agent in agents:
        p = agent["cost"]["prompt_tokens"]
        lengths = [s["tokens"] for s in agent["samples"]]
        pre += p
        gen += sum(lengths)
        flops += prefill_flops(m, p, p) + sum(decode_flops(m, n, p + n / 2) for n in lengths)
    work["sampling"] = (pre, gen, flops)

    cost = row["principal"].get("cost") or {}
    p, g, calls = cost.get("prompt_tokens", 0), cost.get("gen_tokens", 0), max(cost.get("calls", 1), 1)
    # per call: prompts of mean length p / calls, one LM-head row each (or the generated tokens)
    flops = prefill_flops(m, p, p / calls) + calls * 2 * m["head"] + decode_flops(m, g, p / calls + g / calls / 2)
    work["principal"] = (p, g, flops)

    seen, pre, gen, flops = set(), 0.0, 0.0, 0.0
    for agent_cfg, name in zip(config["agents"], [a["name"] for a in agents]):
        prompt = (agent_cfg.get("model"), agent_cfg["prompt_style"], agent_cfg.get("num_fewshot"))
        record = row["methods"].get(f"greedy/{name}")
        if record is None or prompt in seen:
            continue
        seen.add(prompt)
        p, g = record["cost"]["prompt_tokens"], record["cost"]["gen_tokens"]
        pre, gen = pre + p, gen + g
        flops += prefill_flops(m, p, p) + decode_flops(m, g, p + g / 2)
    work["greedy"] = (pre, gen, flops)

    debate = row["methods"].get("debate")
    if debate is not None:
        first_gen = sum(a["samples"][0]["tokens"] for a in agents)
        first_pre = sum(a["cost"]["prompt_tokens"] for a in agents)
        turns = max(debate["cost"]["calls"] - len(agents), 1)
        p = debate["cost"]["prompt_tokens"] - first_pre
        g = debate["cost"]["gen_tokens"] - first_gen
        work["debate"] = (p, g, prefill_flops(m, p, p / turns) + decode_flops(m, g, p / turns + g / turns / 2))
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


def account(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
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
    args = parser.parse_args(argv)
    text = "\n".join(account(run) for run in args.runs)
    print(text)
    if args.out:
        from align_jax.runio import atomic_write

        atomic_write(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
