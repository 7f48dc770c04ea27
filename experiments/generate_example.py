"""Answer a GSM8K test question with a chain of thought, through the model's chat template.

Usage::

    python experiments/generate_example.py                     # Qwen2.5-Coder 0.5B, question 0, greedy
    python experiments/generate_example.py --index 3 --num-samples 4 --temperature 0.7 --top-p 0.95
    python experiments/generate_example.py --model smollm2-135m --data-dir /path/to/data

Prints the prompt, each completion, its finish reason, token counts, timings and the
reference answer from the dataset.
"""

from __future__ import annotations

import argparse
import time

import jax

from align_jax.llm.sampler import Sampler, enable_compilation_cache

INSTRUCTION = (
    "Solve the following math problem step by step. "
    "At the end, write the final answer on its own line as 'The answer is N.'\n\n{question}"
)


def read_question(data_dir: str | None, index: int):
    """GSM8K test question ``index`` through the library's loader (``--data-dir``, else
    ``$ALIGN_JAX_DATA_DIR``, else ``../shared/data``); a clear exit on a missing file or bad record."""
    from align_jax.data.datasets import DatasetError, load_dataset

    try:
        problems = load_dataset("gsm8k", "test", data_dir, limit=1, offset=index)
    except DatasetError as err:
        raise SystemExit(f"{err} (set --data-dir to the folder holding gsm8k/test.jsonl)")
    if not problems:
        raise SystemExit(f"GSM8K test has no question at index {index}")
    return problems[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data-dir", default=None, help="default: $ALIGN_JAX_DATA_DIR, else ../shared/data")
    parser.add_argument("--index", type=int, default=0, help="GSM8K test question index")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                        help="weights (default: --dtype); bfloat16 with float32 --dtype is the mixed mode")
    parser.add_argument("--quantized", action="store_true", help="keep the GGUF's block-quantized weights")
    args = parser.parse_args(argv)

    enable_compilation_cache()
    from align_jax.llm.weights import load_pretrained

    record = read_question(args.data_dir, args.index)
    t0 = time.perf_counter()
    loaded = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.param_dtype, quantized=args.quantized)
    load_s = time.perf_counter() - t0
    sampler = Sampler(loaded)
    conversation = [{"role": "user", "content": INSTRUCTION.format(question=record.question)}]
    mode = f"dtype {args.dtype}, weights {args.param_dtype or args.dtype}" + (", quantized" if args.quantized else "")
    print(f"jax {jax.__version__} on {jax.devices()[0]}; {args.model} ({mode}) loaded in {load_s:.1f}s")
    print("=" * 80)
    print(loaded.tokenizer.apply_chat_template(conversation))
    t0 = time.perf_counter()
    out = sampler.generate_chat(
        [conversation], key=jax.random.key(args.seed), num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
    )
    gen_s = time.perf_counter() - t0
    for k, text in enumerate(out.text[0]):
        print("=" * 80)
        print(f"[sample {k}] finish={out.finish_reasons[0][k]} tokens={int(out.lengths[0, k])} "
              f"mean logprob={out.logprobs[0, k, : out.lengths[0, k]].mean():.3f}")
        print(text)
    print("=" * 80)
    print(f"reference ({record.id}): {record.gold}")
    print(f"prompt tokens {int(out.prompt_tokens[0])}, generated {out.generated_tokens} in {gen_s:.1f}s "
          f"(first call includes compilation; {out.num_steps} decode steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
