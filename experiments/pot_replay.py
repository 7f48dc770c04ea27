"""The program-of-thought principal on the committed GSM8K study's candidates (issue 18, must-show 3).

    nice python experiments/pot_replay.py configs/pot_gsm8k_replay.yaml [--limit 40] [--max-minutes 30]

Reads the finished rows of the reason config named in the study config (default
``configs/reason_gsm8k_100.yaml``, rows in ``docs/results/reason_gsm8k_100/seed0``), has the
principal model write P programs per question (:mod:`align_jax.methods.principals.pot`), runs
them in the sandbox and scores every slot. Per question it appends one JSON line to
``<output_dir>/programs.jsonl`` (programs, verdicts, results, cost, seconds; a rerun resumes).
Then it replays the ALIGN game on the scored questions with the PoT scores and, on the same
questions, with the run's stored verifier scores and the arithmetic checker
(:func:`align_jax.methods.replay.replay_principal`), and writes ``summary.json`` /
``summary.md``: within-question pairwise accuracy, ALIGN / best-of-N vs pooled
self-consistency, verdict counts, programs' cost and sandbox seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from align_jax.config import load_config
from align_jax.methods.candidates import ModelPool
from align_jax.methods.principals import PrincipalBatch, PrincipalScores
from align_jax.methods.principals.pot import PotSettings, make_pot_principal, program_scores
from align_jax.methods.reason import bootstrap_interval, load_reason_config, run_dir
from align_jax.methods.replay import ReplayPrincipal, questions_from_rows, replay_principal
from align_jax.methods.rows import read_rows
from align_jax.sandbox import SandboxResult


@dataclasses.dataclass(frozen=True)
class PotStudyConfig:
    """``configs/pot_gsm8k_replay.yaml``.

    Attributes:
      reason_config: the finished reason run whose candidates are scored.
      model: the program-writing model.
      pot: :class:`PotSettings` (P, sampling, sandbox limits).
      limit: first questions of the run to score (None: all).
      output_dir: where programs.jsonl and the summary go.
      param_dtype / quantized: how the model is loaded (as in reason configs).
      bootstrap_samples: resamples of the intervals.
    """

    reason_config: str = "configs/reason_gsm8k_100.yaml"
    model: str = "qwen2.5-coder-0.5b"
    pot: PotSettings = dataclasses.field(default_factory=PotSettings)
    limit: Optional[int] = None
    output_dir: str = "docs/results/pot_principal"
    param_dtype: Optional[str] = "bfloat16"
    quantized: bool = True
    bootstrap_samples: int = 2000


class _Fixed:
    """A principal returning precomputed scores (so replay_principal can play the game with them)."""

    name = "pot"
    needs_model = False
    answer_level = True
    seeded = False

    def __init__(self, scores: dict):
        self.scores = scores

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        from align_jax.methods.candidates import Cost

        return [PrincipalScores(self.scores[qid], Cost()) for qid in batch.question_ids]


class _FixedReplay:
    type = "pot"
    flip_rate = None
    label = "pot"

    def __init__(self, principal):
        self.principal = principal

    def build(self, seed):
        return self.principal


def _result_from_json(entry: dict) -> SandboxResult:
    return SandboxResult(entry["status"], entry["result"], entry.get("error", ""), tuple(entry.get("violations", ())),
                         "", 0, entry.get("wall_s", 0.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop generating after this long")
    parser.add_argument("--summary-only", action="store_true", help="no model: summarise programs.jsonl")
    args = parser.parse_args(argv)
    study = load_config(args.config, PotStudyConfig)
    limit = args.limit if args.limit is not None else study.limit
    reason = load_reason_config(study.reason_config)
    rows = list(read_rows(run_dir(reason) / "results.jsonl").values())
    rows = rows[:limit] if limit is not None else rows
    out_dir = Path(study.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "programs.jsonl"
    done = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["question_id"]] = entry
    num_slots = max(a.num_samples for a in reason.agents)
    questions, correct_maps = questions_from_rows(rows)
    started = time.perf_counter()
    if not args.summary_only:
        pool = ModelPool(dtype="float32", param_dtype=study.param_dtype, quantized=study.quantized)
        principal = make_pot_principal(pool, study.model, study.pot, seed=reason.seed)
        print(f"sandbox: {principal.sandbox.isolation.describe()}", flush=True)
        for j, row in enumerate(rows):
            if row["question_id"] in done:
                continue
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                print(f"stopping after {args.max_minutes} minutes", flush=True)
                break
            t0 = time.perf_counter()
            programs = principal.run_programs(row["question"], row["question_id"])
            gen_and_run = time.perf_counter() - t0
            entry = {"question_id": row["question_id"], "seconds": gen_and_run,
                     "sandbox_seconds": float(sum(r.wall_s for r in programs.results)),
                     "cost": programs.cost._asdict(), "gold": row.get("gold"),
                     "programs": [{"text": t, "status": r.status, "result": r.result, "error": r.error[:200],
                                   "violations": list(r.violations), "wall_s": r.wall_s}
                                  for t, r in zip(programs.texts, programs.results)]}
            with log_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
            done[row["question_id"]] = entry
            print(f"[{j + 1}/{len(rows)}] {row['question_id']}: "
                  f"{Counter(r.status for r in programs.results)} results {[r.result for r in programs.results]} "
                  f"gold {row.get('gold')} {gen_and_run:.1f}s", flush=True)
    # summary over the scored prefix of questions (replay needs the run's question order from its start)
    scored = 0
    while scored < len(rows) and rows[scored]["question_id"] in done:
        scored += 1
    if scored == 0:
        print("no scored questions yet")
        return 1
    rows, questions, correct_maps = rows[:scored], questions[:scored], correct_maps[:scored]
    scores = {}
    for row, question in zip(rows, questions):
        results = [_result_from_json(p) for p in done[row["question_id"]]["programs"]]
        scores[row["question_id"]] = program_scores(question, results, num_slots)
    reason_subset = dataclasses.replace(reason, limit=scored)
    both = (questions, correct_maps)
    replays = {"pot": replay_principal(reason_subset, rows, _FixedReplay(_Fixed(scores)), questions=both),
               "verifier (stored)": replay_principal(reason_subset, rows, ReplayPrincipal("stored"), questions=both),
               "arithmetic": replay_principal(reason_subset, rows, ReplayPrincipal("arithmetic"), questions=both),
               "oracle": replay_principal(reason_subset, rows, ReplayPrincipal("oracle"), questions=both)}
    sc = np.array([row["methods"]["sc_pooled"]["correct"] for row in rows], np.float64)
    rng = np.random.default_rng(reason.seed)
    indices = rng.integers(0, scored, size=(study.bootstrap_samples, scored))

    def stat(values):
        low, high = bootstrap_interval(values, indices)
        return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high}

    entries = [done[row["question_id"]] for row in rows]
    statuses = Counter(p["status"] for e in entries for p in e["programs"])
    any_ok = sum(any(p["status"] == "ok" for p in e["programs"]) for e in entries)
    gold_hit = sum(any(p["status"] == "ok" and p["result"] is not None and _eq(p["result"], e["gold"])
                       for p in e["programs"]) for e in entries if e.get("gold") is not None)
    majority_right = sum(_majority_right(e) for e in entries)
    summary = {"questions": scored, "P": study.pot.num_programs, "model": study.model,
               "settings": {"temperature": study.pot.temperature, "top_p": study.pot.top_p,
                            "max_new_tokens": study.pot.max_new_tokens,
                            "limits": dataclasses.asdict(study.pot.limits)},
               "program_statuses": dict(statuses),
               "questions_with_a_successful_program": any_ok,
               "questions_where_some_program_gives_gold": gold_hit,
               "pot_majority_accuracy": majority_right / scored,
               "cost_per_question": {k: float(np.mean([e["cost"][k] for e in entries])) for k in entries[0]["cost"]},
               "seconds_per_question": float(np.mean([e["seconds"] for e in entries])),
               "sandbox_seconds_per_program": float(np.mean([p["wall_s"] for e in entries for p in e["programs"]])),
               "verifier_cost_per_question": {
                   k: float(np.mean([row["principal"]["cost"][k] for row in rows])) for k in rows[0]["principal"]["cost"]},
               "verifier_seconds_per_question": float(np.mean([row["stage_wall_s"].get("principal", 0.0)
                                                               for row in rows])),
               "sc_pooled": stat(sc), "principals": {}}
    for label, result in replays.items():
        defined = np.isfinite(result["pairwise"])
        summary["principals"][label] = {
            "pairwise_accuracy": float(result["pairwise"][defined].mean()) if defined.any() else None,
            "pairwise_ties": float(result["ties"][defined].mean()) if defined.any() else None,
            "pairwise_questions": int(defined.sum()),
            "align": stat(result["align"]), "best_of_n": stat(result["best_of_n"]),
            "align - sc_pooled": stat(result["align"] - sc), "best_of_n - sc_pooled": stat(result["best_of_n"] - sc)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(_markdown(summary, args.config))
    print(_markdown(summary, args.config))
    return 0


def _eq(result: str, gold: str) -> bool:
    from align_jax.data import answers_equal

    return answers_equal(result, gold)


def _majority_right(entry: dict) -> bool:
    """Whether the most frequent successful result (ties: the first) equals the gold answer."""
    results = [p["result"] for p in entry["programs"] if p["status"] == "ok" and p["result"] is not None]
    if not results or entry.get("gold") is None:
        return False
    classes: list[list[str]] = []
    for result in results:
        for members in classes:
            if _eq(result, members[0]):
                members.append(result)
                break
        else:
            classes.append([result])
    best = max(classes, key=len)
    return _eq(best[0], entry["gold"])


def _fmt(s: dict) -> str:
    return f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def _markdown(summary: dict, config: str) -> str:
    lines = [f"# Program-of-thought principal on the reason_gsm8k_100 candidates "
             f"(first {summary['questions']} questions)",
             "",
             f"P = {summary['P']} programs per question by {summary['model']} "
             f"(T = {summary['settings']['temperature']}, top-p {summary['settings']['top_p']}, "
             f"{summary['settings']['max_new_tokens']} new tokens), each run in `align_jax.sandbox`.",
             "",
             "| principal | pairwise accuracy (ties) | questions | ALIGN | best-of-N | ALIGN - pooled SC "
             "| best-of-N - pooled SC |",
             "|---|---|---|---|---|---|---|"]
    for label, p in summary["principals"].items():
        pair = "n/a" if p["pairwise_accuracy"] is None else f"{p['pairwise_accuracy']:.3f} ({p['pairwise_ties']:.3f})"
        lines.append(f"| {label} | {pair} | {p['pairwise_questions']} | {p['align']['mean']:.3f} | "
                     f"{p['best_of_n']['mean']:.3f} | {_fmt(p['align - sc_pooled'])} | "
                     f"{_fmt(p['best_of_n - sc_pooled'])} |")
    sc = summary["sc_pooled"]
    lines += ["", f"Pooled self-consistency on these questions: {sc['mean']:.3f} "
                  f"[{sc['ci_low']:.3f}, {sc['ci_high']:.3f}].", "",
              f"Program verdicts: {summary['program_statuses']}; questions with at least one successful program: "
              f"{summary['questions_with_a_successful_program']} / {summary['questions']}; with a program giving the "
              f"gold answer: {summary['questions_where_some_program_gives_gold']}; majority of the programs' results "
              f"right (PoT alone as a solver): {summary['pot_majority_accuracy']:.3f}.", "",
              f"Cost per question: {summary['cost_per_question']}; {summary['seconds_per_question']:.1f} s per "
              f"question (generation + sandbox), {summary['sandbox_seconds_per_program']:.3f} s sandbox wall time "
              f"per program. The run's verifier (stored, same questions): {summary['verifier_cost_per_question']}, "
              f"{summary['verifier_seconds_per_question']:.1f} s per question (its run's window, not quantized).", "",
              f"Reproduce: `nice python experiments/pot_replay.py {config}` (resumes from programs.jsonl; "
              "`--summary-only` recomputes this table without a model).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
