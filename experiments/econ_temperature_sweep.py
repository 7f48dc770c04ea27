"""How much do an ECON executor's generation parameters matter for this model? A measured
temperature / top-p sweep on GSM8K *train* questions, and the simulator's accuracy curve
fitted to it (issue 14: calibration from a small sweep, and the diagnostic of must-show 3).

For each of Q training questions (offset past the fine-tuning questions of
configs/econ_real_gsm8k.yaml) and each (temperature, top-p) setting, K zero-shot
chain-of-thought samples of Qwen2.5-Coder-0.5B-Instruct (the agents' prompt) are drawn in
one batch per question chunk; one row per (question, setting) goes to
``<out>/sweep.jsonl`` (appended atomically; a rerun computes only the missing rows).
Then:

* accuracy per setting with a 95% bootstrap interval over questions (``sweep.md``, ``sweep.png``);
* the fit of ``logit(rate_q(tau)) = alpha_q - c (ln tau - ln tau*)^2`` over the top-p 0.95
  temperatures (:func:`~align_jax.methods.econ.sim.fit_accuracy_curve`; with >= 3
  temperatures the curvature c is identified, unlike the 2-temperature calibration).

    python experiments/econ_temperature_sweep.py                  # ~ 20 min on 2 CPU cores
    python experiments/econ_temperature_sweep.py --questions 4 --samples 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

TEMPERATURES = (0.2, 0.45, 0.7, 1.0, 1.5)
SETTINGS = tuple((t, 0.95) for t in TEMPERATURES) + ((0.7, 0.5), (1.5, 0.5))


def _setting_id(t: float, p: float) -> str:
    return f"t{t:g}-p{p:g}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--offset", type=int, default=100, help="first GSM8K train question")
    parser.add_argument("--samples", type=int, default=4, help="samples per (question, setting)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2, help="questions per generation batch")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="docs/results/econ_real/temperature_sweep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from align_jax import runner
    from align_jax.data import datasets as datasets_lib
    from align_jax.data.answers import is_correct
    from align_jax.data import extract_answer
    from align_jax.methods.candidates import AgentSpec, ModelPool, agent_conversation
    from align_jax.methods.econ.sim import fit_accuracy_curve

    @dataclasses.dataclass(frozen=True)
    class Settings:
        model: str
        questions: int
        offset: int
        samples: int
        max_new_tokens: int
        seed: int

    settings = Settings(args.model, args.questions, args.offset, args.samples, args.max_new_tokens, args.seed)
    out = Path(args.out)
    files = runner.RunFiles(out, key_field="key", settings=runner.settings_hash(settings), config=settings)
    problems = datasets_lib.load_dataset("gsm8k", "train", data_dir=args.data_dir, limit=args.questions,
                                         offset=args.offset)
    pool = ModelPool(dtype="float32", param_dtype="bfloat16")
    agent = AgentSpec(name="zs", model=args.model)
    keys = [f"{p.id}/{_setting_id(t, tp)}" for p in problems for t, tp in SETTINGS]
    units = [runner.Unit(keys=tuple(f"{p.id}/{_setting_id(t, tp)}" for p in problems[i:i + args.chunk]
                                    for t, tp in SETTINGS), label=f"questions {i}-{i + args.chunk - 1}")
             for i in range(0, len(problems), args.chunk)]

    def compute(unit: runner.Unit) -> list[dict]:
        chunk = problems[units.index(unit) * args.chunk:][:args.chunk]
        conversations, owners = [], []
        for p in chunk:
            for t, tp in SETTINGS:
                conversations.append(agent_conversation(p.question, agent))
                owners.append((p, t, tp))
        start = time.perf_counter()
        gen = pool.generate_chat(args.model, conversations, key=jax.random.fold_in(jax.random.key(args.seed),
                                                                                  units.index(unit)),
                                 num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                                 temperature=np.array([o[1] for o in owners], np.float32),
                                 top_p=np.array([o[2] for o in owners], np.float32))
        seconds = time.perf_counter() - start
        rows = []
        for b, (p, t, tp) in enumerate(owners):
            answers = [extract_answer(text) for text in gen.texts[b]]
            correct = [float(a is not None and is_correct(a, p.gold)) for a in answers]
            rows.append(dict(key=f"{p.id}/{_setting_id(t, tp)}", question_id=p.id, temperature=t, top_p=tp,
                             answers=answers, correct=correct, rate=float(np.mean(correct)),
                             gen_tokens=int(np.asarray(gen.tokens[b]).sum()), batch_seconds=seconds))
        return rows

    runner.run_units(files, units, compute, description="econ temperature sweep")
    rows = files.rows(keys)
    return report(rows, problems, out, fit_accuracy_curve, args.samples)


def report(rows: list[dict], problems, out: Path, fit_accuracy_curve, samples: int) -> dict:
    """Accuracy per setting (bootstrap over questions), the curve fit, sweep.{json,md,png}."""
    qids = [p.id for p in problems]
    table = {(r["question_id"], r["temperature"], r["top_p"]): r["rate"] for r in rows}
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(qids), size=(2000, len(qids)))
    per_setting = []
    for t, tp in SETTINGS:
        rates = np.array([table[(q, t, tp)] for q in qids])
        means = rates[boot].mean(1)
        per_setting.append(dict(temperature=t, top_p=tp, accuracy=float(rates.mean()),
                                ci=[float(x) for x in np.percentile(means, [2.5, 97.5])],
                                solved_any=float((rates > 0).mean())))
    rates = np.array([[table[(q, t, 0.95)] for t in TEMPERATURES] for q in qids])
    fit = fit_accuracy_curve(TEMPERATURES, rates, num_samples=samples)
    result = dict(questions=len(qids), samples=samples, settings=per_setting, fit=fit._asdict(),
                  spread=float(max(s["accuracy"] for s in per_setting) - min(s["accuracy"] for s in per_setting)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Temperature / top-p sweep: Qwen2.5-Coder-0.5B, {len(qids)} GSM8K train questions, "
             f"{samples} zero-shot samples per setting", "",
             "| temperature | top-p | accuracy | 95% CI (questions) | questions solved by any sample |", "|---|---|---|---|---|"]
    for s in per_setting:
        lines.append(f"| {s['temperature']} | {s['top_p']} | {s['accuracy']:.3f} | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | "
                     f"{s['solved_any']:.3f} |")
    f = fit._asdict()
    lines += ["", f"Fit over the top-p 0.95 temperatures: tau* = {f['best_temperature']:.3f}, curvature c = "
              f"{f['temperature_curvature']:.3f}, skill {f['skill']:.3f}, difficulty std {f['difficulty_std']:.3f}, "
              f"RMSE {f['rmse']:.3f}.",
              f"Spread of accuracy across the settings: {result['spread']:.3f}."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _figure(per_setting, out / "sweep.png")
    print("\n".join(lines))
    return result


def _figure(per_setting: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for tp, marker in ((0.95, "o"), (0.5, "s")):
        pts = [s for s in per_setting if s["top_p"] == tp]
        x = [s["temperature"] for s in pts]
        y = np.array([s["accuracy"] for s in pts])
        err = np.array([[s["accuracy"] - s["ci"][0], s["ci"][1] - s["accuracy"]] for s in pts]).T
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=f"top-p {tp}")
    ax.set_xscale("log")
    ax.set_xlabel("temperature")
    ax.set_ylabel("accuracy (GSM8K train)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
