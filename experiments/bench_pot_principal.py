"""Program-of-thought principal: one generation for a window's questions vs one per question.

Scores a window of a finished reason run's questions (their committed candidates) with the
``pot`` principal twice, ``batched: true`` (all Q questions in one generation call, B = Q prompts,
K = P programs, each question with its own key) and ``batched: false`` (Q calls of B = 1, the mode
of the committed GSM8K replay and GSM-Hard study). Each mode is first run on another window of the
same size, so both figures exclude compilation (reported apart). Prints seconds per question,
the ratio, and whether the two modes wrote the same programs.

    python experiments/bench_pot_principal.py docs/results/reason_gsmhard_50/seed0 --questions 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def window(rows, start: int, size: int):
    from align_jax.methods.principals import PrincipalBatch
    from align_jax.methods.replay import questions_from_rows

    chosen = rows[start:start + size]
    questions, correct = questions_from_rows(chosen)
    slots = max(len(agent.slots) for q in questions for agent in q.agents)
    return PrincipalBatch([r["question"] for r in chosen], [r["question_id"] for r in chosen], questions, correct,
                          slots)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished reason run directory (results.jsonl, config.json)")
    parser.add_argument("--questions", type=int, default=8, help="Q, questions per scoring call (a window)")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)

    from align_jax.methods.candidates import ModelPool
    from align_jax.methods.principals.pot import PotSettings, make_pot_principal

    rows = [json.loads(line) for line in (args.run / "results.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((args.run / "config.json").read_text())
    q = args.questions
    if len(rows) < 2 * q:
        parser.error(f"{args.run} has {len(rows)} rows; need {2 * q} (a warm-up window and a timed one)")
    model = config["principal"].get("model") or config["agents"][0]["model"]
    pool = ModelPool(dtype=config.get("dtype", "float32"), param_dtype=config.get("param_dtype"))
    warm, timed = window(rows, 0, q), window(rows, q, q)
    out = {"run": str(args.run), "model": model, "questions": q}
    programs = {}
    for mode, batched in (("batched", True), ("per_question", False)):
        principal = make_pot_principal(pool, model, dataclasses.replace(PotSettings(), batched=batched))
        start = time.perf_counter()
        principal.score(warm)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        principal.score(timed)
        seconds = time.perf_counter() - start
        programs[mode] = {qid: principal.last_programs[qid].texts for qid in timed.question_ids}
        out[mode] = {"s_per_question": seconds / q, "first_window_s_per_question": warm_s / q,
                     "compile_and_warmup_s": warm_s - seconds}
        print(f"{mode:>12}: {seconds / q:6.2f} s / question  (first window, incl. compile: {warm_s / q:6.2f})",
              flush=True)
    out["ratio"] = out["per_question"]["s_per_question"] / out["batched"]["s_per_question"]
    same = sum(programs["batched"][k] == programs["per_question"][k] for k in programs["batched"])
    out["same_programs"] = f"{same}/{q}"
    print(f"batched is {out['ratio']:.2f}x faster per question; same programs in {same} of {q} questions")
    if args.out:
        from align_jax.runio import atomic_write

        atomic_write(args.out, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
