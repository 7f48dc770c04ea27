"""Calibrates the ECON simulator's accuracy curve from committed real measurements.

Reads the per-question correctness of Qwen2.5-Coder-0.5B's zero-shot samples at temperature
0.7 and 1.0 (top-p 0.95, 8 samples each) from docs/results/reason_gsm8k_100 and fits
``logit(rate_q(tau)) = alpha_q - c (ln tau - ln tau*)^2`` (:func:`fit_accuracy_curve`).
With two temperatures the curvature c is not identified, so it is fixed (the simulator's
default 1.0, and 0.5 / 2.0 for sensitivity); tau*, the skill and the difficulty spread are
fitted.  Writes calibration.json and calibration.md next to the simulated study.

    python experiments/econ_calibrate.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from align_jax.methods.econ.sim import fit_accuracy_curve


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="docs/results/reason_gsm8k_100/seed0/results.jsonl")
    parser.add_argument("--out", default="docs/results/econ_sim")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    temps = (0.7, 1.0)
    rates = np.array([[np.mean([s["correct"] for s in next(a for a in row["agents"]
                                                           if a["name"] == f"zs-t{t}")["samples"]]) for t in temps]
                      for row in rows])
    fits = {}
    for c in (0.5, 1.0, 2.0):
        fit = fit_accuracy_curve(temps, rates, num_samples=8, temperature_curvature=c)
        fits[str(c)] = fit._asdict()
    result = dict(source=args.rows, questions=len(rows), temperatures=temps, top_p=0.95, samples_per_rate=8,
                  mean_rate=rates.mean(0).tolist(), fits=fits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    lines = ["# ECON simulator calibration (Qwen2.5-Coder-0.5B, GSM8K test, first 100 questions)", "",
             f"Mean per-question accuracy: {rates.mean(0)[0]:.3f} at T=0.7, {rates.mean(0)[1]:.3f} at T=1.0 "
             "(top-p 0.95, 8 zero-shot samples per question, docs/results/reason_gsm8k_100).", "",
             "| fixed curvature c | fitted tau* | skill (logit at tau*) | difficulty std | RMSE of rates |",
             "|---|---|---|---|---|"]
    for c, fit in fits.items():
        lines.append(f"| {c} | {fit['best_temperature']:.3f} | {fit['skill']:.3f} | {fit['difficulty_std']:.3f} | "
                     f"{fit['rmse']:.3f} |")
    lines += ["", "Two temperatures identify tau* only given c; a temperature sweep (not run here) would fit c too."]
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
