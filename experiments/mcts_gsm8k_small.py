"""MCTS (rStar-style) candidates vs sampled CoT at a matched generated-token budget, small CPU run.

Runs two ``reason`` configs through the shared runner (atomic, resumable rows):

* ``configs/mcts_gsm8k_small.yaml``  -- ``candidates: {type: mcts}``; every window's search
  statistics (:class:`~align_jax.methods.mcts.generator.SearchStats`: per-wave rows, batch
  fill, prefill tokens with and without reuse, wall time in LLM calls vs tree bookkeeping)
  are appended to ``<run dir>/search_stats.jsonl`` (one line per window; a resumed window
  replaces its earlier line when read);
* ``configs/mcts_gsm8k_small_cot.yaml`` -- the same agents with sampled CoT candidates, K
  chosen so that the generated tokens per question match the MCTS run's;

then writes ``docs/results/mcts_gsm8k_small/summary.md`` / ``summary.json`` comparing them.

Run:  python experiments/mcts_gsm8k_small.py [--study small|50] [--stage mcts|cot|report|all] [--limit N]

``--study 50`` runs ``configs/mcts_gsm8k_50.yaml`` / ``configs/mcts_gsm8k_50_cot.yaml`` (two agents,
the first 50 questions, rStar with the discriminator) into ``docs/results/mcts_gsm8k_50``.  The
report gives 95% bootstrap intervals over questions and paired MCTS - CoT differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from align_jax.methods import reason  # noqa: E402
from align_jax.methods.reason_report import bootstrap_interval  # noqa: E402
from align_jax.methods.mcts.generator import SEARCH_LISTENERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDIES = {
    "small": (REPO / "configs" / "mcts_gsm8k_small.yaml", REPO / "configs" / "mcts_gsm8k_small_cot.yaml",
              REPO / "docs" / "results" / "mcts_gsm8k_small"),
    "50": (REPO / "configs" / "mcts_gsm8k_50.yaml", REPO / "configs" / "mcts_gsm8k_50_cot.yaml",
           REPO / "docs" / "results" / "mcts_gsm8k_50"),
}
MCTS_CONFIG, COT_CONFIG, OUT = STUDIES["small"]

# Paper / rStar figures quoted next to ours (ALIGN paper, GSM8K; rStar issue reports).
PAPER = {"align_model_calls": "73-103", "align_tokens": "52K-264K",
         "rstar_minutes_per_question": "3-25 (H100, 7B models, one question at a time)"}


def _config(path, limit):
    config = reason.load_reason_config(path)
    if limit is not None:
        import dataclasses

        config = dataclasses.replace(config, limit=limit)
    return config


def run_mcts(limit=None):
    config = _config(MCTS_CONFIG, limit)
    directory = reason.run_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "search_stats.jsonl"

    def write(stats):
        line = json.dumps(stats.to_dict()) + "\n"
        with open(log, "a") as f:  # one line per window, flushed: a crash leaves whole lines
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    SEARCH_LISTENERS.append(write)
    try:
        report = reason.run_reason(config, progress=False)
    finally:
        SEARCH_LISTENERS.remove(write)
    reason.print_summary(config, report.summary)
    return report


def run_cot(limit=None):
    config = _config(COT_CONFIG, limit)
    report = reason.run_reason(config, progress=False)
    reason.print_summary(config, report.summary)
    return report


def _rows(config):
    path = reason.run_dir(config) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _search_stats(config, questions):
    path = reason.run_dir(config) / "search_stats.jsonl"
    by_window = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_window[tuple(record["questions"])] = record  # a recomputed window replaces its line
    wanted = set(questions)
    return [r for r in by_window.values() if set(r["questions"]) <= wanted]


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def _resamples(questions: int, samples: int = 2000) -> np.ndarray:
    """[B, Q] bootstrap resamples of the questions, shared by every method and both runs (paired)."""
    return np.random.default_rng(0).integers(0, questions, size=(samples, questions))


def _method_table(rows, names):
    out = {}
    indices = _resamples(len(rows))
    for name in names:
        records = [r["methods"][name] for r in rows if name in r["methods"]]
        if not records:
            continue
        ci = bootstrap_interval(np.array([m["correct"] for m in records], float), indices) \
            if len(records) == len(rows) else [float("nan")] * 2
        out[name] = {
            "accuracy": _mean([m["correct"] for m in records]), "accuracy_ci": list(ci),
            "calls": _mean([m["cost"]["calls"] for m in records]),
            "gen_tokens": _mean([m["cost"]["gen_tokens"] for m in records]),
            "prompt_tokens": _mean([m["cost"]["prompt_tokens"] for m in records]),
        }
    return out


def _sampling(rows):
    """Per question: all agents' candidate cost (calls, generated, prompt tokens) and the sampling wall."""
    calls = [sum(a["cost"]["calls"] for a in r["agents"]) for r in rows]
    gen = [sum(a["cost"]["gen_tokens"] for a in r["agents"]) for r in rows]
    prompt = [sum(a["cost"]["prompt_tokens"] for a in r["agents"]) for r in rows]
    wall = [r["stage_wall_s"].get("sampling", 0.0) for r in rows]
    per_agent_gen = {}
    for r in rows:
        for a in r["agents"]:
            per_agent_gen.setdefault(a["name"], []).append(a["cost"]["gen_tokens"])
    return {"calls": _mean(calls), "gen_tokens": _mean(gen), "prompt_tokens": _mean(prompt),
            "sampling_wall_s": _mean(wall), "wall_s": _mean([r["wall_s"] for r in rows]),
            "gen_tokens_per_agent": {k: _mean(v) for k, v in per_agent_gen.items()},
            "distinct_answers_per_agent": _mean([len(a["slots"]) for r in rows for a in r["agents"]])}


def report():
    mcts_config, cot_config = _config(MCTS_CONFIG, None), _config(COT_CONFIG, None)
    mcts_rows, cot_rows = _rows(mcts_config), _rows(cot_config)
    common = sorted({r["question_id"] for r in mcts_rows} & {r["question_id"] for r in cot_rows},
                    key=lambda q: int(q.rsplit("/", 1)[1]))
    mcts_rows = [r for r in mcts_rows if r["question_id"] in common]
    cot_rows = [r for r in cot_rows if r["question_id"] in common]
    agents = mcts_config.agent_names()
    names = (["pass@k", "sc_pooled", "align", "best_of_n", "fair_single"] + [f"sc/{a}" for a in agents]
             + [f"rstar/{a}" for a in agents] + [f"rstar_disc/{a}" for a in agents])
    mcts_table, cot_table = _method_table(mcts_rows, names), _method_table(cot_rows, names)
    indices = _resamples(len(common))
    paired = {}
    for name in ("pass@k", "sc_pooled", "align", "best_of_n", "fair_single"):
        if name in mcts_table and name in cot_table:
            diff = (np.array([r["methods"][name]["correct"] for r in mcts_rows], float)
                    - np.array([r["methods"][name]["correct"] for r in cot_rows], float))
            paired[name] = {"mcts_minus_cot": float(diff.mean()), "ci": list(bootstrap_interval(diff, indices))}
    for a in agents:  # rStar (MCTS + majority / + discriminator) vs the same agent's sampled majority
        for rname in (f"rstar/{a}", f"rstar_disc/{a}"):
            if rname in mcts_table and f"sc/{a}" in cot_table:
                diff = (np.array([r["methods"][rname]["correct"] for r in mcts_rows], float)
                        - np.array([r["methods"][f"sc/{a}"]["correct"] for r in cot_rows], float))
                paired[f"{rname} - cot sc/{a}"] = {"mcts_minus_cot": float(diff.mean()),
                                                    "ci": list(bootstrap_interval(diff, indices))}
    stats = _search_stats(mcts_config, [r["question"] for r in mcts_rows])
    waves = [w for s in stats for w in s["waves"]]
    totals = {k: sum(s["totals"][k] for s in stats) for k in
              ("llm_s", "tree_s", "host_s", "wall_s", "rows", "padded_rows", "children", "prefill_tokens",
               "prefill_tokens_no_reuse", "prefill_tokens_node_shared", "gen_tokens", "too_long")} if stats else {}
    if stats:  # older stats lines have no prefill split
        totals["prefill_s"] = sum(s["totals"].get("prefill_s", float("nan")) for s in stats)
    summary = {
        "questions": len(common), "question_ids": common,
        "mcts": {"methods": mcts_table, "sampling": _sampling(mcts_rows)}, "paired": paired,
        "cot": {"methods": cot_table, "sampling": _sampling(cot_rows),
                "num_samples": [a.num_samples for a in cot_config.agents]},
        "search": {"windows": len(stats), "waves": len(waves), "totals": totals,
                   "batch_fill_per_wave": [round(w["batch_fill"], 3) for w in waves],
                   "rows_per_wave": [w["rows"] for w in waves],
                   "nodes_per_tree": _mean([n for s in stats for n in s["nodes"]]),
                   "dead_ends_per_tree": _mean([n for s in stats for n in s["dead_ends"]])},
        "paper": PAPER,
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    try:
        import jax

        summary["platform"]["jax"] = jax.__version__
        summary["platform"]["device"] = str(jax.devices()[0])
    except Exception:  # pragma: no cover
        pass
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (OUT / "summary.md").write_text(_markdown(summary, mcts_config, cot_config))
    print((OUT / "summary.md").read_text())
    return summary


def _fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _prefill_line(t) -> str:
    prefill_s = t.get("prefill_s", float("nan"))
    if np.isnan(prefill_s):
        return "Prefill time was not recorded in this run (the split was added later)."
    saved = prefill_s * (1 - t["prefill_tokens_node_shared"] / max(t["prefill_tokens"], 1))
    return (f"Prefill wall time {prefill_s:.1f} s = {100 * prefill_s / max(t['llm_s'], 1e-9):.1f}% of the LLM time "
            f"(compilation included); a node-level prefix cache would save at most {saved:.1f} s "
            f"({100 * saved / max(t['wall_s'], 1e-9):.1f}% of the search wall time).")


def _acc(entry) -> str:
    if not entry:
        return "-"
    ci = entry.get("accuracy_ci")
    if ci and not np.isnan(ci[0]):
        return f"{entry['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return _fmt(entry["accuracy"])


def _markdown(s, mcts_config, cot_config) -> str:
    m, c = s["mcts"], s["cot"]
    search = s["search"]
    t = search["totals"]
    lines = [f"# MCTS vs sampled CoT candidates: first {s['questions']} GSM8K test questions", ""]
    section = mcts_config.candidates.mcts
    lines += [
        "Agents (both runs): " + ", ".join(f"{a.name or i} ({a.model}, {a.prompt_style}, T={a.temperature})"
                                           for i, a in enumerate(mcts_config.agents)) + ".",
        f"MCTS: R = {mcts_config.agents[0].num_samples} rollouts per (question, agent), max depth "
        f"{section.max_depth}, actions {', '.join(section.actions)}, {section.children_per_expansion} child per "
        f"action, c = {section.exploration}, step budget {section.step_tokens} tokens, full-completion budget "
        f"{mcts_config.agents[0].max_new_tokens} tokens, utility = share of terminal visits; discriminator "
        f"{section.discriminator} (mask {section.mask_fraction}).",
        f"Sampled CoT: K = {', '.join(str(k) for k in c['num_samples'])} samples per agent (chosen to match the "
        f"MCTS run's generated tokens per question), max {cot_config.agents[0].max_new_tokens} tokens.",
        f"Principal: {mcts_config.principal.type}; ALIGN: {mcts_config.game.num_rounds} rounds, "
        f"eta {mcts_config.game.step_size}.", "",
        "| method | MCTS candidates | sampled CoT |", "|---|---|---|",
    ]
    for name in sorted(set(m["methods"]) | set(c["methods"]), key=lambda n: list(m["methods"]).index(n)
                       if n in m["methods"] else 99):
        lines.append(f"| {name} | {_acc(m['methods'].get(name))} | {_acc(c['methods'].get(name))} |")
    lines += ["", "Accuracy = mean over questions [95% bootstrap interval over questions] (pass@k: any candidate of "
                  "any agent correct; sc = majority; rstar = majority over one agent's rollouts, rstar_disc = with "
                  "the discriminator's mutual-consistency filter).", ""]
    if s.get("paired"):
        lines += ["| paired difference (same questions) | MCTS - CoT | 95% CI |", "|---|---|---|"]
        for name, d in s["paired"].items():
            lines.append(f"| {name} | {d['mcts_minus_cot']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
        lines.append("")
    lines += ["| cost per question (all agents' candidates) | MCTS | sampled CoT |", "|---|---|---|"]
    for key, label in (("calls", "model calls (sequences generated)"), ("gen_tokens", "generated tokens"),
                       ("prompt_tokens", "prompt (prefill) tokens"), ("sampling_wall_s", "candidate wall s"),
                       ("wall_s", "row wall s (all stages)"), ("distinct_answers_per_agent",
                                                              "distinct answers per agent")):
        digits = 2 if "wall" in key or "distinct" in key else 0
        lines.append(f"| {label} | {_fmt(m['sampling'][key], digits)} | {_fmt(c['sampling'][key], digits)} |")
    lines += ["", "Wall times include loading the model and compiling the sampler for each new batch shape "
                  "(the first window of each run pays it); the CPU was shared with other jobs."]
    if t:
        wall = t["wall_s"] or 1.0
        lines += ["", f"Search ({search['windows']} windows, {search['waves']} waves): wall {t['wall_s']:.1f} s = "
                      f"LLM calls {t['llm_s']:.1f} s ({100 * t['llm_s'] / wall:.1f}%) + tree bookkeeping "
                      f"(jitted plan/apply incl. compile) {t['tree_s']:.2f} s ({100 * t['tree_s'] / wall:.2f}%) + host "
                      f"prompt/answer handling {t['host_s']:.2f} s ({100 * t['host_s'] / wall:.2f}%).",
                  f"Prefill tokens: {t['prefill_tokens']} as run (one prefill per prompt row) vs "
                  f"{t['prefill_tokens_no_reuse']} without reuse (one per child) vs {t['prefill_tokens_node_shared']} "
                  f"with a node-level prefix cache (common prefix of a node's prompts once).",
                  _prefill_line(t),
                  f"Sampler batch fill per wave (real prompt rows / power-of-two padded rows): mean "
                  f"{_fmt(_mean(search['batch_fill_per_wave']), 2)}, rows {t['rows']} of {t['padded_rows']} padded; "
                  f"per wave: {search['batch_fill_per_wave']}.",
                  f"Nodes per tree {search['nodes_per_tree']:.1f}, dead ends per tree "
                  f"{search['dead_ends_per_tree']:.2f}, prompt rows skipped for context {t['too_long']}."]
    p = s["paper"]
    lines += ["", f"For scale: the ALIGN paper reports {p['align_model_calls']} model calls and {p['align_tokens']} "
                  f"tokens per question; rStar users report {p['rstar_minutes_per_question']} minutes per question.",
              f"Platform: {s['platform']}.", ""]
    return "\n".join(lines)


def main():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("mcts", "cot", "report", "all"), default="all")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--study", choices=tuple(STUDIES), default="small")
    args = parser.parse_args()
    global MCTS_CONFIG, COT_CONFIG, OUT
    MCTS_CONFIG, COT_CONFIG, OUT = STUDIES[args.study]
    start = time.perf_counter()
    if args.stage in ("mcts", "all"):
        run_mcts(args.limit)
    if args.stage in ("cot", "all"):
        run_cot(args.limit)
    if args.stage in ("report", "all"):
        report()
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
