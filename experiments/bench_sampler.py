"""Sampler throughput: our jitted JAX sampler vs transformers' PyTorch ``generate``, same machine, one run.

For each batch size B, the first B GSM8K test questions go through the model's chat
template; both implementations decode greedily exactly ``--new-tokens`` tokens per row
(EOS ignored: ours ``ignore_eos=True``, torch ``min_new_tokens``) from the same token ids
and the same (dequantised) weights, copied into a ``transformers`` model.

Quantized weights: ``--quantized`` runs our model with the GGUF's block-quantized weight
matrices kept as int8 codes + per-block scales (``load_pretrained(quantized=True)``), the
same weight values as the float32 conversion torch gets; only the bytes streamed per step
differ (1.125-1.25 per weight instead of 4). Greedy tokens must still agree with torch.

Precision: the default compares float32 with float32. ``--param-dtype bfloat16
--torch-dtype bfloat16`` compares our mixed-precision mode (bfloat16 weights, float32
activations and KV cache, bfloat16 matmuls accumulated in float32) with torch's
bfloat16 model (bfloat16 weights *and* activations) on the same bfloat16 weight values.

Reported per B:
  * prefill tok/s: real prompt tokens / time of the prompt pass (ours: the jitted prefill;
    torch: one forward with ``use_cache=True, logits_to_keep=1``);
  * decode tok/s: B * new tokens / decode time (ours: the jitted decode loop; torch:
    ``generate`` wall time minus its prefill);
  * end-to-end tok/s: B * new tokens / (prefill + decode), and the ratio ours / torch;
  * compile time of our prefill and decode (first call minus a timed steady call; the
    persistent compilation cache is off unless ``--compilation-cache``, so this is a real compile);
  * peak RSS of the process (``ru_maxrss``) after our runs and after torch's;
  * the memory-bandwidth roofline of decode: every decode step reads all weights once
    (the tied LM head reads the whole embedding table; an untied model's embedding table is
    only gathered, so it is left out), so decode cannot exceed
    ``B * bandwidth / weight bytes`` tok/s. The bandwidth is measured in the same run
    (a multi-threaded NumPy sum over a 1 GiB array, best of 3); each side's decode is
    reported as a fraction of that bound (KV-cache reads are left out, so the bound is
    loose at large B and long contexts). ``--peak-gbps`` replaces the measurement with a given
    figure (an accelerator's HBM bandwidth, e.g. 3350 for an H100 SXM; ``experiments/device_check.sh``
    passes it), so the roofline is weight bytes per decode step / that bandwidth.

Prompts: the first B GSM8K test questions; ``--allow-synthetic`` falls back to templated
arithmetic questions of similar length when the data directory is missing (a machine with
no datasets; decode throughput hardly depends on the prompt text).

Usage::

    python experiments/bench_sampler.py                               # qwen2.5-coder-0.5b, B = 1, 8, 32
    python experiments/bench_sampler.py --model smollm2-135m --batches 1,8 --new-tokens 64
    python experiments/bench_sampler.py --skip-torch --out /tmp/bench.json
    python experiments/bench_sampler.py --param-dtype bfloat16 --torch-dtype bfloat16   # bf16 weights on both sides
    python experiments/bench_sampler.py --quantized                   # int8 codes + scales vs torch float32
    python experiments/bench_sampler.py --quantized --param-dtype bfloat16 --torch-dtype bfloat16
    python experiments/bench_sampler.py --skip-torch --peak-gbps 3350 --allow-synthetic   # GPU, roofline at HBM bw

The machine is shared: the script prints the 1-minute load average before and after each
measurement so disturbed figures can be recognised and re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import numpy as np

from align_jax.llm.sampler import Sampler, enable_compilation_cache

PROMPT_TEMPLATE = "Solve the following math problem step by step. End with 'The answer is N.'\n\n{question}"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Sustained memory read bandwidth in bytes/s over a ``gib`` GiB array (best of ``repeats``).

    The larger of two streaming reductions: NumPy sums of a float64 view, one thread per
    CPU on its own slice (little arithmetic per byte), and a jitted ``jnp.sum`` (XLA's
    own threads).
    """
    from concurrent.futures import ThreadPoolExecutor

    import jax.numpy as jnp

    threads = max(os.cpu_count() or 1, 1)
    data = np.ones(int(gib * 2**30) // 8, np.float64)
    parts = np.array_split(data, threads)

    def best_of(fn) -> float:
        fn()  # touch the pages / compile
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return data.nbytes / best

    with ThreadPoolExecutor(threads) as pool:
        numpy_bw = best_of(lambda: list(pool.map(np.sum, parts)))
    device = jnp.asarray(data.view(np.float32))
    total = jax.jit(jnp.sum)
    xla_bw = best_of(lambda: total(device).block_until_ready())
    del device
    return max(numpy_bw, xla_bw)


def weight_bytes(loaded) -> int:
    """Bytes one decode step streams: every parameter except, when the LM head is untied,
    the embedding table (a step gathers one row of it per token; Qwen2.5's GGUF has its own
    ``output.weight``, so its 136M-entry table is not read by the matmuls)."""
    from flax import nnx

    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param)))
    if not loaded.config.tie_word_embeddings:
        total -= sum(x.nbytes for x in jax.tree.leaves(nnx.state(loaded.model.embed_tokens, nnx.Param)))
    return int(total)


def synthetic_questions(count: int) -> list[str]:
    """``count`` templated word problems of about GSM8K's length (for machines without the data)."""
    rng = np.random.default_rng(0)
    names = ["Natalia", "Weng", "Betty", "Julie", "James", "Mark", "Albert", "Ken"]
    items = ["clips", "eggs", "books", "apples", "marbles", "stamps", "pencils", "cookies"]
    out = []
    for i in range(count):
        a, b, c = (int(x) for x in rng.integers(2, 99, 3))
        n, it = names[i % len(names)], items[(i // len(names)) % len(items)]
        out.append(f"{n} has {a} {it}. On Monday {n} buys {b} more {it}, and on Tuesday gives away {c} of "
                   f"them to friends. Then {n} doubles what is left. How many {it} does {n} have at the end?")
    return out


def load_questions(data_dir: str | None, count: int, allow_synthetic: bool = False) -> list[str]:
    """The first ``count`` GSM8K test questions (the library's loader and data-dir resolution);
    with ``allow_synthetic``, :func:`synthetic_questions` when the dataset is not found."""
    from align_jax.data.datasets import DatasetError, load_dataset

    try:
        problems = load_dataset("gsm8k", "test", data_dir, limit=count)
    except DatasetError as err:
        if allow_synthetic:
            print(f"GSM8K not found ({err}); using {count} synthetic questions", flush=True)
            return synthetic_questions(count)
        raise SystemExit(f"{err} (set --data-dir to the folder holding gsm8k/test.jsonl)")
    if len(problems) < count:
        raise SystemExit(f"GSM8K test has only {len(problems)} questions, need {count}")
    return [p.question for p in problems]


def torch_model_from_ours(loaded):
    """A transformers ``*ForCausalLM`` holding exactly our (float32) weights."""
    import torch
    import transformers
    from flax import nnx

    cfg = loaded.config
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.arch == "llama":
        hf_cfg = transformers.LlamaConfig(head_dim=cfg.head_dim, **common)
        cls = transformers.LlamaForCausalLM
    else:
        hf_cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    model = cls(hf_cfg)
    state = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    sd = {"model.embed_tokens.weight": state["embed_tokens"]["embedding"], "model.norm.weight": state["norm"]["scale"]}
    for i in range(cfg.num_layers):
        layer = state["layers"][i]
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{proj}.weight"] = np.asarray(layer["self_attn"][proj]["kernel"]).T
            if "bias" in layer["self_attn"][proj]:
                sd[pre + f"self_attn.{proj}.bias"] = layer["self_attn"][proj]["bias"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sd[pre + f"mlp.{proj}.weight"] = np.asarray(layer["mlp"][proj]["kernel"]).T
        sd[pre + "input_layernorm.weight"] = layer["input_layernorm"]["scale"]
        sd[pre + "post_attention_layernorm.weight"] = layer["post_attention_layernorm"]["scale"]
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = np.asarray(state["lm_head"]["kernel"]).T
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy to torch failed: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval().float()


def timed_prefill_decode(sampler: Sampler, batch, spec, key) -> tuple:
    """``(prefill s, decode s, DecodeResult)`` of one prepared batch, each stage blocked on."""
    t0 = time.perf_counter()
    cache, logits = sampler.prefill(batch)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    result = sampler.decode(batch, cache, logits, key, spec=spec)
    jax.block_until_ready(result.tokens)
    return t1 - t0, time.perf_counter() - t1, result


def bench_ours(sampler: Sampler, prompt_ids, new_tokens: int, reps: int) -> dict:
    batch = sampler.prepare(prompt_ids, max_new_tokens=new_tokens, temperature=0.0)
    spec = sampler.make_spec(batch, ignore_eos=True)
    key = jax.random.key(0)

    def run():
        return timed_prefill_decode(sampler, batch, spec, key)

    first_prefill, first_decode, _ = run()
    prefill_s, decode_s = [], []
    for _ in range(reps):
        p, d, result = run()
        prefill_s.append(p)
        decode_s.append(d)
    lengths = np.asarray(result.lengths)
    assert np.all(lengths == new_tokens), lengths
    p, d = min(prefill_s), min(decode_s)
    b = len(prompt_ids)
    return dict(
        prefill_s=p, decode_s=d, prompt_bucket=int(batch.tokens.shape[1]),
        compile_prefill_s=max(first_prefill - p, 0.0), compile_decode_s=max(first_decode - d, 0.0),
        prefill_tok_s=float(batch.prompt_lengths.sum()) / p, decode_tok_s=b * new_tokens / d,
        e2e_tok_s=b * new_tokens / (p + d), tokens=np.asarray(result.tokens),
    )


def bench_torch(model, pad_id: int, prompt_ids, new_tokens: int, reps: int) -> dict:
    import torch

    b = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id, eos_token_id=None, temperature=None, top_p=None, top_k=None)
    prefill_s, gen_s = [], []
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            out = model.generate(ids, **kw)
            t2 = time.perf_counter()
            prefill_s.append(t1 - t0)
            gen_s.append(t2 - t1)
    assert out.shape[1] == width + new_tokens, out.shape
    p, g = min(prefill_s), min(gen_s)
    d = max(g - p, 1e-9)
    return dict(
        prefill_s=p, decode_s=d, generate_s=g, prefill_tok_s=float(mask.sum()) / p,
        decode_tok_s=b * new_tokens / d, e2e_tok_s=b * new_tokens / g,
        tokens=out[:, width:].numpy(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="short name, .gguf file or model dir")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions after the compile call (min taken)")
    parser.add_argument("--data-dir", default=None, help="default: $ALIGN_JAX_DATA_DIR, else ../shared/data")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="our activation / KV-cache dtype")
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                        help="our weight dtype (default: --dtype); bfloat16 with --dtype float32 is mixed precision")
    parser.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the torch reference model")
    parser.add_argument("--quantized", action="store_true",
                        help="ours keeps the GGUF's block-quantized weights as int8 codes + scales "
                             "(the same weight values; torch gets them dequantized to --torch-dtype)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--compilation-cache", action="store_true",
                        help="use the persistent compilation cache (then 'compile' may be a cache load)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="memory bandwidth in GB/s for the roofline (default: measured on this host); "
                             "pass the accelerator's HBM figure on a GPU, e.g. 3350 for an H100 SXM")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="use templated questions when the GSM8K data directory is missing")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1 or args.new_tokens < 1:
        parser.error("--batches needs positive ints and --new-tokens must be >= 1")

    if args.compilation_cache:
        enable_compilation_cache()
    from align_jax.llm.weights import load_pretrained

    header = dict(
        jax=jax.__version__, device=str(jax.devices()[0]), backend=jax.default_backend(),
        cpu_count=os.cpu_count(), platform=platform.platform(), python=sys.version.split()[0],
        model=args.model, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype, quantized=args.quantized,
        torch_dtype=args.torch_dtype, new_tokens=args.new_tokens, reps=args.reps,
        compilation_cache=bool(args.compilation_cache),
    )
    t0 = time.perf_counter()
    loaded = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.param_dtype, quantized=args.quantized)
    header["load_s"] = time.perf_counter() - t0
    tok = loaded.tokenizer
    questions = load_questions(args.data_dir, max(batches), args.allow_synthetic)
    prompt_ids = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT_TEMPLATE.format(question=q)}]))
        for q in questions
    ]
    print(f"jax {jax.__version__} on {header['device']} ({header['cpu_count']} CPUs); model {args.model} "
          f"(dtype {args.dtype}, weights {header['param_dtype']}, loaded in {header['load_s']:.1f}s); load avg {os.getloadavg()[0]:.2f}", flush=True)

    if args.peak_gbps is not None:
        header["read_bandwidth_gb_s"], header["bandwidth_source"] = float(args.peak_gbps), "--peak-gbps"
    else:
        header["read_bandwidth_gb_s"], header["bandwidth_source"] = measure_read_bandwidth() / 1e9, "measured"
    header["weight_bytes"] = weight_bytes(loaded)
    bound_b1 = header["read_bandwidth_gb_s"] * 1e9 / header["weight_bytes"]
    weight_kind = "block-quantized int8 + float32 scales" if args.quantized else header["param_dtype"]
    print(f"memory read bandwidth {header['read_bandwidth_gb_s']:.1f} GB/s ({header['bandwidth_source']}); weights {header['weight_bytes'] / 2**20:.0f} MiB "
          f"({weight_kind}) -> decode roofline {bound_b1:.1f} tok/s per row", flush=True)

    sampler = Sampler(loaded)
    rows = []
    for b in batches:
        load_before = os.getloadavg()[0]
        ours = bench_ours(sampler, prompt_ids[:b], args.new_tokens, args.reps)
        row = dict(batch=b, prompt_tokens=int(sum(len(p) for p in prompt_ids[:b])), roofline_decode_tok_s=b * bound_b1,
                   load_avg_before=load_before, load_avg_after=os.getloadavg()[0],
                   ours={k: v for k, v in ours.items() if k != "tokens"})
        print(f"B={b:>3} ours : prefill {ours['prefill_tok_s']:8.1f} tok/s  decode {ours['decode_tok_s']:7.1f} tok/s  "
              f"e2e {ours['e2e_tok_s']:7.1f} tok/s  compile prefill {ours['compile_prefill_s']:.1f}s "
              f"decode {ours['compile_decode_s']:.1f}s  roofline {b * bound_b1:.0f} tok/s "
              f"({100 * ours['decode_tok_s'] / (b * bound_b1):.0f}%)  (load {load_before:.1f}->{row['load_avg_after']:.1f})",
              flush=True)
        rows.append((row, ours["tokens"]))
    header["peak_rss_mb_after_ours"] = peak_rss_mb()

    if not args.skip_torch:
        import torch
        import transformers

        header["torch"] = torch.__version__
        header["transformers"] = transformers.__version__
        header["torch_threads"] = torch.get_num_threads()
        # Same weight values as ours (bfloat16 weights are exact in float32); then torch's dtype.
        dense = loaded if args.dtype == "float32" and not args.quantized else load_pretrained(
            args.model, dtype="float32", param_dtype=args.param_dtype)
        header["torch_weight_bytes"] = weight_bytes(dense) * (2 if args.torch_dtype == "bfloat16" else 4) // (
            2 if dense.config.jnp_param_dtype == jax.numpy.bfloat16 else 4)
        tmodel = torch_model_from_ours(dense)
        del dense
        if args.torch_dtype == "bfloat16":
            tmodel = tmodel.to(torch.bfloat16)
        for row, our_tokens in rows:
            b = row["batch"]
            load_before = os.getloadavg()[0]
            ref = bench_torch(tmodel, tok.pad_token_id, prompt_ids[:b], args.new_tokens, args.reps)
            agree = float(np.mean(ref["tokens"] == our_tokens.reshape(b, -1)))
            row["torch"] = {k: v for k, v in ref.items() if k != "tokens"}
            row["torch_load_avg"] = [load_before, os.getloadavg()[0]]
            row["greedy_token_agreement"] = agree
            row["ratio"] = {k: row["ours"][k] / ref[k] for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")}
            print(f"B={b:>3} torch: prefill {ref['prefill_tok_s']:8.1f} tok/s  decode {ref['decode_tok_s']:7.1f} tok/s  "
                  f"e2e {ref['e2e_tok_s']:7.1f} tok/s  -> ratio decode {row['ratio']['decode_tok_s']:.2f}x "
                  f"e2e {row['ratio']['e2e_tok_s']:.2f}x  (greedy tokens agree {agree:.1%}; "
                  f"load {load_before:.1f}->{os.getloadavg()[0]:.1f})", flush=True)
        header["peak_rss_mb_total"] = peak_rss_mb()

    table = [r for r, _ in rows]
    # torch's weights: the same values, in its own dtype (bfloat16 halves the bytes it reads)
    torch_bound = header["read_bandwidth_gb_s"] * 1e9 / header.get("torch_weight_bytes", header["weight_bytes"])
    for r in table:
        r["ours"]["roofline_fraction"] = r["ours"]["decode_tok_s"] / r["roofline_decode_tok_s"]
        if "torch" in r:
            r["torch"]["roofline_decode_tok_s"] = r["batch"] * torch_bound
            r["torch"]["roofline_fraction"] = r["torch"]["decode_tok_s"] / (r["batch"] * torch_bound)
    print()
    print(f"{'B':>3} | {'prompt tok':>10} | {'ours prefill':>12} | {'torch prefill':>13} | {'ours decode':>11} | "
          f"{'torch decode':>12} | {'decode x':>8} | {'e2e x':>6} | {'compile (s)':>11} | {'ours % roofline':>15} | {'torch % roofline':>16}")
    for r in table:
        t = r.get("torch")
        print(f"{r['batch']:>3} | {r['prompt_tokens']:>10} | {r['ours']['prefill_tok_s']:>12.1f} | "
              f"{(t['prefill_tok_s'] if t else float('nan')):>13.1f} | {r['ours']['decode_tok_s']:>11.1f} | "
              f"{(t['decode_tok_s'] if t else float('nan')):>12.1f} | "
              f"{(r['ratio']['decode_tok_s'] if t else float('nan')):>8.2f} | "
              f"{(r['ratio']['e2e_tok_s'] if t else float('nan')):>6.2f} | "
              f"{r['ours']['compile_prefill_s'] + r['ours']['compile_decode_s']:>11.1f} | "
              f"{100 * r['ours']['roofline_fraction']:>14.0f}% | "
              f"{(100 * t['roofline_fraction'] if t else float('nan')):>15.0f}%")
    print(f"peak RSS: {header['peak_rss_mb_after_ours']:.0f} MiB after ours"
          + (f", {header['peak_rss_mb_total']:.0f} MiB after torch" if "peak_rss_mb_total" in header else ""))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"header": header, "rows": table}, fh, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
