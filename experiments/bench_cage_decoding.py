"""Decoding overhead of CAGE: tokens/s with the CAGE logits processor vs plain sampling.

Same model, batch, prompts, max_new_tokens and key; EOS ignored so every row
decodes exactly T tokens.  Each variant is compiled first (timed separately),
then run ``--repeats`` times with ``block_until_ready``; we report the median.

    python experiments/bench_cage_decoding.py [--model smollm2-135m] [--batch 4] [--tokens 32]
        [--top-m 16] [--guide smollm2-135m|none]

Variants: plain sampling (the reference), CAGE with brevity + format (no model
in the loop: the solver overhead), CAGE with guide + brevity + format (the guide
runs a second model in lockstep), and linear mixing with the same three.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--guide", default="smollm2-135m", help="guide model, or 'none'")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top-m", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from align_jax.llm.sampler import Sampler
    from align_jax.llm.weights import load_pretrained
    from align_jax.methods import cage

    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({jax.default_backend()})")
    base = load_pretrained(args.model)
    sampler = Sampler(base)
    questions = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
                 "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?"]
    convs = [[{"role": "user", "content": questions[i % 2]}] for i in range(args.batch)]
    prompts = [base.tokenizer.apply_chat_template(c) for c in convs]
    vocab = base.config.vocab_size
    cheap = [cage.BrevityObjective(), cage.FormatObjective()]
    variants = {"plain": None}
    variants["cage[brevity,format]"] = (cheap, "cage", [1.0, 1.0])
    if args.guide != "none":
        guide = base if args.guide == args.model else load_pretrained(args.guide)
        full = [cage.GuideObjective(guide)] + cheap
        variants["cage[guide,brevity,format]"] = (full, "cage", [1.0, 1.0, 1.0])
        variants["linear[guide,brevity,format]"] = (full, "linear", [1.0, 1.0, 1.0])
    processors = {}
    key = jax.random.key(0)

    def run(name):
        t0 = time.perf_counter()
        kwargs = dict(key=key, max_new_tokens=args.tokens, ignore_eos=True, temperature=1.0, top_p=1.0)
        if variants[name] is not None:
            objs, method, w = variants[name]
            if name not in processors:
                processors[name] = cage.make_processor(objs, method=method, top_m=args.top_m, vocab_size=vocab)
            ctx = cage.DecodeContext(base.tokenizer, vocab, tuple(convs), 1, args.tokens,
                                     tuple(base.tokenizer.eos_token_ids))
            params, state = cage.init_cage(objs, ctx, w)
            jax.block_until_ready((params, state))
            t0 = time.perf_counter()  # objective set-up (guide prefill, tables) is not decoding
            proc, upd = processors[name]
            # as cage.decode_with_method: the state (the guide's KV cache) is donated, only the
            # per-row count of unconverged solves comes back to the host
            kwargs.update(logits_processor=proc, processor_update=upd, processor_state=state,
                          processor_params=params, donate_processor_state=True,
                          return_processor_state=lambda user: user.unconverged)
        out = sampler.generate(prompts, **kwargs)  # returns host arrays: already synchronised
        return time.perf_counter() - t0, out.generated_tokens

    rows = []
    for name in variants:
        compile_s, _ = run(name)
        times, toks = [], 0
        for _ in range(args.repeats):
            s, toks = run(name)
            times.append(s)
        med = statistics.median(times)
        rows.append((name, compile_s - med, med, toks / med))
    ref = rows[0][3]
    print(f"model {args.model}, batch {args.batch}, T={args.tokens}, M={args.top_m}, guide {args.guide}")
    print(f"{'variant':32s} {'compile s':>10s} {'run s':>8s} {'tokens/s':>9s} {'vs plain':>9s}")
    for name, comp, med, tps in rows:
        print(f"{name:32s} {comp:10.2f} {med:8.3f} {tps:9.1f} {tps / ref:9.3f}")


if __name__ == "__main__":
    main()
