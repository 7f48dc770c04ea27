"""The CAGE weight sweep on the shared runner, and the ``align-jax cage`` command.

:func:`run_cage` sweeps a grid of weight vectors (``align-jax cage CONFIG``) with every
method of the config: ``cage`` (the equilibrium), ``linear`` (``log pi0 + Q^T w / tau``,
multi-objective decoding), ``args`` (ARGS-greedy: argmax of ``log pi0 + beta Q^T w``
over the top-M), ``base`` (the base model sampled at the configured temperature) and
``best_of_n`` (N base samples, the one with the largest ``sum_k w_k s_k`` of sequence
scores). Results go to ``<output_dir>/<name>/seed<seed>/`` through
:class:`align_jax.runner.RunFiles`: ``results.jsonl`` (one row per method, weight and
question, keyed ``method|weight index|question id``; a rerun skips work already
there), ``results.csv``, ``summary.md`` / ``summary.json`` and ``tradeoff.png``.

A unit of work is one decode call: the base samples of a chunk of ``batch_questions``
questions, or one processor method on a chunk for every weight vector at once
(:func:`~align_jax.methods.cage.processor.decode_weight_grid`). Chunks start at fixed
multiples of ``batch_questions``, so ``num_questions`` is left out of the settings
hash: a longer or shorter run keeps the rows it shares.

Several machines: ``--shard I/N`` computes only units ``I-1, I-1+N, ...`` (whole decode
calls) into ``<run dir>/shards/<I>-of-<N>/``; ``--merge`` joins the finished shards into
the run's ``results.jsonl`` in unit order and writes the summary (:mod:`align_jax.shards`);
``align-jax launch`` runs the shards as Ray tasks (:mod:`align_jax.cluster`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from align_jax import runner
from align_jax.game.common_agency import SolverConfig
from align_jax.methods.cage.config import CageConfig, config_error, load_cage_config, remember_source
from align_jax.methods.cage.objectives import OBJECTIVES, Completion, DecodeContext, Objective
from align_jax.methods.cage.processor import (
    PROCESSOR_METHODS,
    decode_weight_grid,
    decode_with_method,
    make_processor,
)
from align_jax.methods.cage.report import summarise, summary_markdown, tradeoff_figure
from align_jax.registry import UnknownNameError
from align_jax.shards import check_shards

__all__ = ["SETTINGS_EXCLUDE", "build_objectives", "run_cage", "run_dir", "add_cage_subcommand"]

#: Config fields a result row does not depend on (left out of its settings hash).
SETTINGS_EXCLUDE = ("name", "weights", "methods", "output_dir", "num_questions")


def run_dir(config: CageConfig) -> Path:
    """``output_dir/name/seed<seed>``."""
    return runner.run_dir(config.output_dir, config.name, config.seed)


def build_objectives(config: CageConfig, load_model) -> list[Objective]:
    """The config's objectives, built by their registered factories, in weight order.

    ``load_model(name) -> LoadedModel`` is called by objectives that need a model.

    Raises:
      ConfigError: a name no objective registered (``file:line: objectives.i: ...``;
        a config that was loaded is checked at load time already, this guards
        configs built or changed in code).
    """
    out = []
    for i, name in enumerate(config.objectives):
        try:
            factory = OBJECTIVES.get(name, field=f"objectives.{i}")
        except UnknownNameError as exc:
            raise config_error(config, exc.field, str(exc)) from None
        out.append(factory(config, load_model))
    return out


def _completions(output, num_prompts: int, sample: int = 0, offset: int = 0) -> list[Completion]:
    """Sample ``sample`` of each of the call's prompts; ``prompt_index`` is ``offset + b`` (global)."""
    return [Completion(offset + b, output.tokens[b, sample, : output.lengths[b, sample]].tolist(),
                       output.text[b][sample]) for b in range(num_prompts)]


def _units(config: CageConfig, problems) -> list[runner.Unit]:
    chunk = config.batch_questions
    units = []
    for c0 in range(0, len(problems), chunk):
        part = problems[c0:c0 + chunk]
        span = f"questions {c0}..{c0 + len(part) - 1}"
        if "base" in config.methods or "best_of_n" in config.methods:
            keys = [f"base|-|{p.id}" for p in part] if "base" in config.methods else []
            if "best_of_n" in config.methods:
                keys += [f"best_of_n|{i}|{p.id}" for i in range(len(config.weights)) for p in part]
            units.append(runner.Unit(tuple(keys), f"sampled {span}", ("sampled", c0)))
    for method in PROCESSOR_METHODS:
        if method in config.methods:
            for c0 in range(0, len(problems), chunk):
                part = problems[c0:c0 + chunk]
                keys = [f"{method}|{i}|{p.id}" for i in range(len(config.weights)) for p in part]
                units.append(runner.Unit(tuple(keys), f"{method} questions {c0}..{c0 + len(part) - 1}",
                                         (method, c0)))
    return units


def _check_weights_of_rows(config: CageConfig, files: runner.RunFiles, units) -> None:
    """Weights are not in the settings hash (a grid may grow), so a finished row is only reused
    when its weight vector is still the config's vector at its index."""
    for row in files.rows([k for u in units for k in u.keys]):
        index = row["weight_index"]
        if index != "-" and row["weights"] != [float(x) for x in config.weights[int(index)]]:
            raise config_error(config, f"weights.{index}",
                               f"{files.results_path}: row {row['key']!r} was computed with weights "
                               f"{row['weights']}, not {config.weights[int(index)]}; use another name or output_dir")


def run_cage(config: CageConfig, *, progress: bool = True, figures: bool = True,
             base=None, guide=None, shard=None, merge: bool = False) -> dict:
    """Run (or resume) a weight sweep; returns the summary dict (also written to disk).

    ``base`` / ``guide``: optional preloaded ``LoadedModel``s (default: load
    ``config.base_model`` / ``config.guide_model``). ``shard``: compute only this
    :class:`~align_jax.shards.Shard`'s units, in its own directory (the summary is the
    shard's); ``merge``: merge the finished shards into the run directory first.

    Raises:
      ConfigError: ``top_m`` larger than the base vocabulary, an unknown objective,
        rows of other settings in the run directory, or a row computed for another
        vector at its weight index (file and line named).
    """
    from align_jax.data import datasets
    from align_jax.data.answers import extract_answer, is_correct
    from align_jax.llm.sampler import Sampler
    from align_jax.llm.weights import load_pretrained

    problems = datasets.load_dataset(config.dataset, config.split, config.data_dir,
                                     limit=config.num_questions, offset=config.offset)
    settings = runner.settings_hash(config, exclude=SETTINGS_EXCLUDE)
    if merge:  # missing or mismatched shards fail before any model loads
        check_shards(run_dir(config), settings)
    base = base if base is not None else load_pretrained(config.base_model, param_dtype=config.param_dtype)
    loaded = {config.base_model: base}

    def load_model(name: str):
        if name == config.guide_model and guide is not None:
            return guide
        if name not in loaded:
            loaded[name] = load_pretrained(name, param_dtype=config.param_dtype)
        return loaded[name]

    vocab = base.config.vocab_size
    if config.top_m > vocab:
        raise config_error(config, "top_m", f"{config.top_m} candidate tokens is larger than the base "
                                            f"model's vocabulary size {vocab}")
    objectives = build_objectives(config, load_model)
    sampler = Sampler(base)
    convs = tuple([{"role": "system", "content": config.system_prompt}, {"role": "user", "content": p.question}]
                  for p in problems)
    ctx = DecodeContext(base.tokenizer, vocab, convs, 1, config.max_new_tokens, tuple(base.tokenizer.eos_token_ids))
    solver = SolverConfig(max_iters=config.solver_max_iters)
    processors = {m: make_processor(objectives, method=m, top_m=config.top_m, vocab_size=vocab, solver_config=solver)
                  for m in PROCESSOR_METHODS if m in config.methods}
    files = runner.RunFiles(run_dir(config), key_field="key", config=config, settings=settings, shard=shard,
                            merge=merge)
    root = jax.random.key(config.seed)
    chunk = config.batch_questions

    def score_rows(method, w_index, weights, completions, wall_s, extra=None):
        scores = np.stack([obj.sequence_scores(completions, ctx) for obj in objectives], axis=1)  # [B, J]
        rows = []
        for i, (c, s) in enumerate(zip(completions, scores)):
            p = problems[c.prompt_index]
            pred = extract_answer(c.text)
            row = {"key": f"{method}|{w_index}|{p.id}", "method": method,
                   "weight_index": w_index, "weights": [float(x) for x in weights], "question_id": p.id,
                   "text": c.text, "num_tokens": len(c.token_ids), "answer": pred,
                   "correct": bool(pred is not None and is_correct(pred, p.gold)), "wall_s": wall_s,
                   **{f"score_{o.name}": float(v) for o, v in zip(objectives, s)}}
            row.update({k: v[i] if isinstance(v, list) else v for k, v in (extra or {}).items()})
            rows.append(row)
        return rows

    def compute(unit: runner.Unit) -> list[dict]:
        method, c0 = unit.payload
        part, part_convs = problems[c0:c0 + chunk], convs[c0:c0 + chunk]
        t0 = time.perf_counter()
        rows = []
        if method == "sampled":
            n = config.best_of_n if "best_of_n" in config.methods else 1
            output = decode_with_method(sampler, objectives, processors, part_convs, method="base", weights=None,
                                        key=jax.random.fold_in(jax.random.fold_in(root, 0), c0),
                                        max_new_tokens=config.max_new_tokens, num_samples=n,
                                        temperature=config.temperature)
            wall = time.perf_counter() - t0
            per_sample = [_completions(output, len(part), k, c0) for k in range(n)]
            scores = np.stack([np.stack([o.sequence_scores(cs, ctx) for o in objectives], axis=1)
                               for cs in per_sample], axis=1)  # [B, N, J]
            if "base" in config.methods:
                rows += score_rows("base", "-", [], per_sample[0], wall)
            if "best_of_n" in config.methods:
                for i, w in enumerate(config.weights):
                    pick = np.argmax(scores @ np.asarray(w, np.float64), axis=1)  # [B]
                    chosen = [per_sample[int(pick[b])][b] for b in range(len(part))]
                    rows += score_rows("best_of_n", i, w, chosen, wall,
                                       {"picked_sample": [int(k) for k in pick]})
            return rows
        method_key = jax.random.fold_in(root, 1 + PROCESSOR_METHODS.index(method))
        output = decode_weight_grid(sampler, objectives, processors, part_convs, method=method,
                                    weight_grid=config.weights, key=jax.random.fold_in(method_key, c0),
                                    tau=config.tau, beta=config.beta, max_new_tokens=config.max_new_tokens,
                                    temperature=config.temperature)
        wall = time.perf_counter() - t0
        unconverged = np.asarray(output.processor_state["unconverged"]).reshape(len(part), len(config.weights))
        for i, w in enumerate(config.weights):
            extra = {"unit_rows": len(part) * len(config.weights)}
            if method == "cage":
                extra["unconverged_steps"] = [int(u) for u in unconverged[:, i]]
            rows += score_rows(method, i, w, _completions(output, len(part), i, c0), wall, extra)
        return rows

    units = _units(config, problems)
    _check_weights_of_rows(config, files, units)
    t_start = time.perf_counter()
    description = f"cage {config.name}" + (f" (shard {shard})" if shard is not None else "")
    runner.run_units(files, units, compute, description=description, progress=progress)
    _check_weights_of_rows(config, files, units)  # merged rows too
    rows = files.rows([k for u in units for k in u.keys])
    summary = summarise([o.name for o in objectives], rows)
    summary["guide_truncated_tokens"] = None
    for obj in objectives:
        summary.update(obj.summary(ctx))
    summary["wall_s"] = time.perf_counter() - t_start
    runner.write_csv(files.path("results.csv"),
                     [{k: v for k, v in r.items() if k != "weights"} | {"weights": json.dumps(r["weights"])}
                      for r in rows])
    files.write_json("summary.json", summary)
    files.write_text("summary.md", summary_markdown(config, summary, {o.name: o.description for o in objectives}))
    if figures:
        tradeoff_figure(config, summary, files.path("tradeoff.png"))
    return summary


# ----------------------------------------------------------------------------
# CLI

_OVERRIDES = ("num_questions", "max_new_tokens", "seed", "output_dir")


def _cage_config(args) -> CageConfig:
    return remember_source(runner.apply_overrides(load_cage_config(args.config), args, _OVERRIDES), args.config)


def _cage_command(args) -> int:
    from align_jax.shards import shard_directory

    config = _cage_config(args)
    summary = run_cage(config, progress=not args.quiet, figures=not args.no_figures, shard=args.shard,
                       merge=args.merge)
    directory = run_dir(config) if args.shard is None else shard_directory(run_dir(config), args.shard)
    print((directory / "summary.md").read_text(encoding="utf-8"))
    print(f"results: {directory} ({summary['wall_s']:.1f}s)")
    missed = {m: c for m, c in summary.get("unconverged_steps", {}).items() if c["steps"]}
    for m, c in missed.items():
        print(f"align-jax cage: warning: {m}: {c['steps']} of {c['decoded_tokens']} equilibrium solves did not "
              f"converge within solver_max_iters={config.solver_max_iters} (they used the last iterate)",
              file=sys.stderr)
    return 0


def _align_alias(args) -> int:
    print("align-jax: warning: 'align-jax align' is deprecated and will be removed: it is the CAGE run, "
          "now 'align-jax cage' (the ALIGN method is 'align-jax reason')", file=sys.stderr)
    return _cage_command(args)


def add_cage_subcommand(subparsers) -> None:
    """Adds ``cage CONFIG`` and its deprecated alias ``align CONFIG`` to an ``argparse``
    subparsers object (the ``align-jax`` CLI)."""
    for name, func, help_text in (
        ("cage", _cage_command, "CAGE multi-objective decoding: weight sweep vs baselines"),
        ("align", _align_alias, "deprecated alias of 'cage'"),
    ):
        parser = subparsers.add_parser(name, help=help_text,
                                       description=help_text + " (see configs/cage_small.yaml)")
        runner.add_run_arguments(parser, overrides=_OVERRIDES, shards=True)
        parser.set_defaults(func=func, run_directory=lambda args: run_dir(_cage_config(args)))
