"""ECON with real models next to ALIGN, debate, self-consistency and greedy CoT on the same
GSM8K questions (issue 14, must-show 3): one table from two committed runs joined by question id.

* ECON rows: ``configs/reason_econ_gsm8k_50.yaml`` (``econ/real``, ``econ/initial``, ``econ/fixed``);
* the other methods: the committed rows of ``configs/reason_gsm8k_100.yaml`` on the same questions
  (same model, agents and seed), ALIGN both as run (verifier principal) and replayed with the
  program-of-thought principal's committed programs (``docs/results/pot_principal/programs.jsonl``);
* pooled self-consistency at ECON's token budget: the majority answer of the first m candidates
  (round-robin over the three agents), m the number of candidates whose mean generated tokens
  match ``econ/real``'s generated tokens per question.

Accuracy with 95% paired bootstrap intervals over questions (one set of resamples for every
method), model calls and tokens per question, wall seconds per question, paired differences
``econ/real - X``, and ECON's diagnostics (rounds, chosen temperatures, commitment changes,
executor vs commitment accuracy).  Writes ``<econ run>/econ_report.{md,json}`` and ``econ_report.png``.

    python experiments/econ_real_report.py
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

PAPER_TOKENS = {"econ": 4200, "debate": 12500}  # ECON paper: tokens per question on GSM8K


def _pot_replay_module():
    spec = importlib.util.spec_from_file_location("pot_replay", Path(__file__).with_name("pot_replay.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["pot_replay"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def align_with_pot(base_config, base_rows: list[dict], programs_path: Path) -> np.ndarray | None:
    """ALIGN's per-question correctness replayed with the committed PoT scores (None if missing)."""
    from align_jax.methods.principals.pot import program_scores
    from align_jax.methods.replay import questions_from_rows, replay_principal

    if not programs_path.exists():
        return None
    done = {}
    for line in programs_path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            done[entry["question_id"]] = entry
    if any(r["question_id"] not in done for r in base_rows):
        return None
    pot = _pot_replay_module()
    questions, correct_maps = questions_from_rows(base_rows)
    num_slots = max(a.num_samples for a in base_config.agents)
    scores = {row["question_id"]: program_scores(q, [pot._result_from_json(p) for p in done[row["question_id"]]["programs"]],
                                                 num_slots)
              for row, q in zip(base_rows, questions)}
    subset = dataclasses.replace(base_config, limit=len(base_rows))
    result = replay_principal(subset, base_rows, pot._FixedReplay(pot._Fixed(scores)), questions=(questions, correct_maps))
    return np.asarray(result["align"], np.float64)


def sc_at_budget(rows: list[dict], num_candidates: int) -> np.ndarray:
    """Majority vote (by canonical answer id, ties to the first seen) of the first ``num_candidates``
    candidates taken round-robin over the agents; correctness per question."""
    out = []
    for row in rows:
        agents = [a["samples"] for a in row["agents"]]
        order = [agents[i % len(agents)][i // len(agents)] for i in range(num_candidates)
                 if i // len(agents) < len(agents[i % len(agents)])]
        votes = collections.Counter(s["answer_id"] for s in order if s["answer"] is not None)
        if not votes:
            out.append(0.0)
            continue
        best = votes.most_common(1)[0][0]
        out.append(float(next(s["correct"] for s in order if s["answer"] is not None and s["answer_id"] == best)))
    return np.asarray(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--econ-config", default="configs/reason_econ_gsm8k_50.yaml")
    parser.add_argument("--base-config", default="configs/reason_gsm8k_100.yaml")
    parser.add_argument("--programs", default="docs/results/pot_principal/programs.jsonl")
    parser.add_argument("--sweep", default="docs/results/econ_real/temperature_sweep/sweep.json")
    args = parser.parse_args(argv)

    from align_jax.methods.reason import bootstrap_interval, load_reason_config, run_dir
    from align_jax.methods.rows import read_rows

    econ_config = load_reason_config(args.econ_config)
    base_config = load_reason_config(args.base_config)
    econ_rows = list(read_rows(run_dir(econ_config) / "results.jsonl").values())
    base_all = read_rows(run_dir(base_config) / "results.jsonl")
    base_order = list(base_all)
    q = len(econ_rows)
    if q == 0:
        raise SystemExit("no ECON rows yet")
    ids = [r["question_id"] for r in econ_rows]
    if base_order[:q] != ids:
        raise SystemExit(f"the ECON run's questions are not the first {q} of {args.base_config}'s")
    base_rows = [base_all[i] for i in ids]

    correct: dict[str, np.ndarray] = {}
    cost: dict[str, dict] = {}
    wall: dict[str, float] = {}

    def add(name, values, costs=None, seconds=None):
        correct[name] = np.asarray(values, np.float64)
        if costs is not None:
            cost[name] = {k: float(np.mean([c[k] for c in costs])) for k in ("calls", "gen_tokens", "prompt_tokens")}
        if seconds is not None:
            wall[name] = float(seconds)

    econ_policies = [m for m in econ_rows[0]["methods"] if m.startswith("econ/")]
    econ_gen = {m: np.array([r["methods"][m]["cost"]["gen_tokens"] for r in econ_rows], float) for m in econ_policies}
    econ_stage = np.array([r["stage_wall_s"].get("econ", 0.0) for r in econ_rows])
    gen_total = sum(econ_gen.values())
    for m in econ_policies:  # the econ stage runs the policies one after the other: split its time by tokens
        share = np.where(gen_total > 0, econ_gen[m] / np.maximum(gen_total, 1), 1.0 / len(econ_policies))
        add(m, [r["methods"][m]["correct"] for r in econ_rows], [r["methods"][m]["cost"] for r in econ_rows],
            float(np.mean(econ_stage * share)))
    stage = lambda k: float(np.mean([r["stage_wall_s"].get(k, 0.0) for r in base_rows]))  # noqa: E731
    sampling, principal = stage("sampling"), stage("principal")
    for m in ("align", "sc_pooled", "greedy/zs-t0.7", "debate", "pass@k"):
        seconds = {"align": sampling + principal + stage("align"), "sc_pooled": sampling, "pass@k": sampling,
                   "greedy/zs-t0.7": stage("greedy") / 3, "debate": stage("debate")}[m]
        add(m if m != "align" else "align (verifier, as run)", [r["methods"][m]["correct"] for r in base_rows],
            [r["methods"][m]["cost"] for r in base_rows], seconds)
    pot = align_with_pot(base_config, base_rows, Path(args.programs))
    if pot is not None:
        pot_cost = [dict(r["methods"]["sc_pooled"]["cost"]) for r in base_rows]
        programs = {json.loads(line)["question_id"]: json.loads(line)
                    for line in Path(args.programs).read_text().splitlines() if line.strip()}
        for c, r in zip(pot_cost, base_rows):
            extra = programs[r["question_id"]]["cost"]
            c.update(calls=c["calls"] + extra["calls"], gen_tokens=c["gen_tokens"] + extra["gen_tokens"],
                     prompt_tokens=c["prompt_tokens"] + extra["prompt_tokens"])
        pot_seconds = float(np.mean([programs[r["question_id"]]["seconds"] for r in base_rows]))
        add("align (pot principal, replay)", pot, pot_cost, sampling + pot_seconds)
    tokens_per_sample = float(np.mean([s["tokens"] for r in base_rows for a in r["agents"] for s in a["samples"]]))
    budget = float(econ_gen["econ/real"].mean()) if "econ/real" in econ_gen else float(np.mean(gen_total))
    m_samples = int(np.clip(round(budget / tokens_per_sample), 1, 24))
    add(f"sc_pooled at ECON's budget ({m_samples} candidates)", sc_at_budget(base_rows, m_samples),
        [dict(calls=m_samples, gen_tokens=m_samples * tokens_per_sample, prompt_tokens=0)],
        sampling * m_samples / 24)

    rng = np.random.default_rng(econ_config.seed)
    indices = rng.integers(0, q, size=(econ_config.bootstrap_samples, q))
    table = {}
    for name, values in correct.items():
        low, high = bootstrap_interval(values, indices)
        table[name] = dict(accuracy=float(values.mean()), ci=[low, high], **cost.get(name, {}),
                           wall_s=wall.get(name))
    head = "econ/real" if "econ/real" in correct else econ_policies[0]
    differences = {}
    for name, values in correct.items():
        if name == head:
            continue
        diff = correct[head] - values
        low, high = bootstrap_interval(diff, indices)
        differences[f"{head} - {name}"] = dict(mean=float(diff.mean()), ci=[low, high])

    diagnostics = {}
    for policy in [p.split("/", 1)[1] for p in econ_policies]:
        recs = [r["econ"][policy] for r in econ_rows]
        temps = np.concatenate([np.asarray(rec["temperatures"]).reshape(-1) for rec in recs])
        changes = [sum(a != b for a, b in zip(rec["commitments"], rec["commitments"][1:])) for rec in recs]
        diagnostics[policy] = dict(
            rounds=float(np.mean([rec["rounds"] for rec in recs])),
            rounds_histogram=dict(collections.Counter(rec["rounds"] for rec in recs)),
            temperature_geomean=float(np.exp(np.log(temps).mean())),
            temperature_values=dict(collections.Counter(round(float(t), 2) for t in temps)),
            commitment_changes=float(np.mean(changes)),
            no_commitment=float(np.mean([rec["commitments"][-1] is None for rec in recs])))
    sweep = json.loads(Path(args.sweep).read_text()) if Path(args.sweep).exists() else None
    result = dict(questions=q, methods=table, differences=differences, diagnostics=diagnostics,
                  sc_budget_candidates=m_samples, tokens_per_candidate=tokens_per_sample, paper_tokens=PAPER_TOKENS,
                  sweep=sweep)
    out = run_dir(econ_config)
    (out / "econ_report.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, args)
    (out / "econ_report.md").write_text(text)
    figure(result, out / "econ_report.png")
    print(text)
    return result


def markdown(result: dict, args) -> str:
    q = result["questions"]
    lines = [f"# ECON with real models vs ALIGN, debate, self-consistency and greedy CoT: first {q} GSM8K test questions",
             "", "Qwen2.5-Coder-0.5B-Instruct everywhere (bfloat16 weights). ECON: 3 executors, up to 5 rounds, "
             "320 executor tokens; policies trained in the calibrated simulator then on real GSM8K-train episodes "
             f"(`{args.econ_config}`). Other rows: `{args.base_config}` on the same questions (3 agents x 8 samples, "
             "320 tokens). 95% paired bootstrap intervals over questions.", "",
             "| method | accuracy | 95% CI | model calls / q | generated tokens / q | total tokens / q | wall s / q |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        total = m.get("gen_tokens", 0) + m.get("prompt_tokens", 0)
        wall = f"{m['wall_s']:.1f}" if m.get("wall_s") is not None else "-"
        lines.append(f"| {name} | {m['accuracy']:.3f} | [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}] | {m.get('calls', 0):.1f} | "
                     f"{m.get('gen_tokens', 0):.0f} | {total:.0f} | {wall} |")
    lines += ["", "| paired difference | mean | 95% CI |", "|---|---|---|"]
    for name, d in result["differences"].items():
        lines.append(f"| {name} | {d['mean']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    lines += ["", "ECON diagnostics per policy:", "",
              "| policy | rounds | rounds histogram | temperature (geo. mean) | commitment changes / q | no commitment |",
              "|---|---|---|---|---|---|"]
    for policy, d in result["diagnostics"].items():
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(d["rounds_histogram"].items()))
        lines.append(f"| {policy} | {d['rounds']:.2f} | {hist} | {d['temperature_geomean']:.2f} | "
                     f"{d['commitment_changes']:.2f} | {d['no_commitment']:.2f} |")
    paper = result["paper_tokens"]
    lines += ["", f"Tokens per question, paper (GSM8K, larger models): ECON {paper['econ']}, debate {paper['debate']}."]
    if result.get("sweep"):
        s = result["sweep"]
        best = max(s["settings"], key=lambda x: x["accuracy"])
        worst = min(s["settings"], key=lambda x: x["accuracy"])
        lines += ["", f"How much the executors' parameters matter for this model (GSM8K train sweep, {s['questions']} "
                  f"questions x {s['samples']} samples): accuracy from {worst['accuracy']:.3f} (T={worst['temperature']}, "
                  f"top-p {worst['top_p']}) to {best['accuracy']:.3f} (T={best['temperature']}, top-p {best['top_p']}); "
                  f"fitted tau* {s['fit']['best_temperature']:.2f}, curvature {s['fit']['temperature_curvature']:.2f}."]
    lines += ["", "Reproduce: `align-jax econ train configs/econ_real_gsm8k.yaml && align-jax reason "
              "configs/reason_econ_gsm8k_50.yaml && python experiments/econ_real_report.py`."]
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    acc = np.array([result["methods"][n]["accuracy"] for n in names])
    ci = np.array([result["methods"][n]["ci"] for n in names])
    tokens = np.array([result["methods"][n].get("gen_tokens", 0) for n in names])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    axes[0].barh(y, acc, xerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3, color="tab:blue")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].set_xlabel("accuracy (95% CI)")
    axes[1].barh(y, tokens, color="tab:gray")
    axes[1].set_yticks(y, [])
    axes[1].set_xlabel("generated tokens / question")
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
