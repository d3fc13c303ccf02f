"""One generation measurement in this process, printed as one JSON line.

Run by ``bench/compare.py`` in a fresh process per trial so runtimes never share a process, a heap or
a warm cache. Every runtime is timed the same way, from outside: wall-clock time of each yielded token.
TTFT = first token - call start (prompt given as token ids, so no tokenization is timed); prefill
tok/s = prompt tokens / TTFT; decode tok/s = (n - 1) / (last token - first token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _prompt_ids(n: int, vocab: int) -> list[int]:
    # A fixed pseudo-random prompt: the same ids for every runtime, no EOS-heavy text.
    state, ids = 12345, []
    for _ in range(n):
        state = (1103515245 * state + 12345) % 2**31
        ids.append(100 + state % (min(vocab, 30000) - 100))
    return ids


def _measure(stream, n_prompt: int) -> dict:
    start = time.perf_counter()
    stamps = []
    for _ in stream:
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    n = len(stamps)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n,
        "ttft_s": ttft,
        "prefill_tps": n_prompt / ttft,
        "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
    }


def run_mlxllm(args) -> dict:
    import mlxllm  # preloads OpenBLAS before mlx.core
    import mlx.core as mx
    from mlxllm.generate import generate_step
    from mlxllm.load import load

    t = time.perf_counter()
    model, tok = load(args.model, compute=args.compute)
    load_s = time.perf_counter() - t
    ids = _prompt_ids(args.prompt_tokens, model.config.vocab_size)
    for _ in generate_step(mx.array(ids[:16]), model, max_tokens=4):  # warm-up
        pass
    result = _measure(generate_step(mx.array(ids), model, max_tokens=args.gen_tokens), len(ids))
    result.update(load_s=load_s, peak_memory_gb=mx.get_peak_memory() / 1e9,
                  weights=getattr(model, "compute_path", args.compute), blas=mlxllm.backend.blas_library)
    return result


def run_mlx_lm(args) -> dict:
    if args.openblas:
        import ctypes

        ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    t = time.perf_counter()
    model, tok = load(args.model)
    load_s = time.perf_counter() - t
    ids = _prompt_ids(args.prompt_tokens, tok.vocab_size)
    for _ in generate_step(mx.array(ids[:16]), model, max_tokens=4):
        pass
    result = _measure(generate_step(mx.array(ids), model, max_tokens=args.gen_tokens), len(ids))
    result.update(load_s=load_s, peak_memory_gb=mx.get_peak_memory() / 1e9, blas="openblas" if args.openblas else "bundled")
    return result


def run_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=args.prompt_tokens + args.gen_tokens + 64, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    ids = _prompt_ids(args.prompt_tokens, llm.n_vocab())

    def stream(tokens, n):
        llm.reset()
        for i, token in enumerate(llm.generate(tokens, temp=0.0, top_k=1, reset=True)):
            yield token
            if i + 1 == n:
                break

    for _ in stream(ids[:16], 4):
        pass
    result = _measure(stream(ids, args.gen_tokens), len(ids))
    result.update(load_s=load_s, threads=args.threads)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runtime", choices=["mlxllm", "mlx_lm", "llama.cpp"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--compute", default="auto", help="mlxllm weight representation")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--openblas", action="store_true", help="mlx_lm: preload the system OpenBLAS too")
    args = p.parse_args()
    run = {"mlxllm": run_mlxllm, "mlx_lm": run_mlx_lm, "llama.cpp": run_llama_cpp}[args.runtime]
    out = run(args)
    out.update(runtime=args.runtime, model=args.model)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
