"""One side-by-side trial in a fresh process, printed as one JSON line:

    python bench/peer_trial.py --runtime {mlxllm,mlx-lm,llama.cpp} --model M --prompt-tokens P --gen-tokens G

``mlxllm bench --compare`` runs this once per runtime per trial, alternating runtimes, so no two
runtimes share a process, a heap or a warm cache. Every runtime is timed the same way, from outside:
the prompt goes in as token ids (the peers' tokenizers differ), TTFT = first token - call start,
prefill tok/s = prompt tokens / TTFT, decode tok/s = (n - 1) / (last token - first token).
It lives in bench/ because it imports the peers, which mlxllm itself never does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Iterable


def prompt_ids(n: int, vocab: int) -> list[int]:
    """A fixed pseudo-random prompt: the same ids for every runtime, clear of low special ids."""
    state, ids = 12345, []
    for _ in range(n):
        state = (1103515245 * state + 12345) % 2**31
        ids.append(100 + state % (min(vocab, 30000) - 100))
    return ids


def _measure(stream: Iterable[Any], n_prompt: int) -> dict[str, Any]:
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream]
    n = len(stamps)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n,
        "ttft_s": stamps[0] - start,
        "prefill_tps": n_prompt / (stamps[0] - start),
        "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
    }


def _mlx_steps(generate_step, model, ids: list[int], n: int, **kw):
    import mlx.core as mx

    for _ in generate_step(mx.array(ids[:16]), model, max_tokens=2):  # warm-up
        pass
    mx.synchronize()
    mx.reset_peak_memory()
    return generate_step(mx.array(ids), model, max_tokens=n, **kw)


def _memory() -> dict[str, float]:
    """Peak memory since the warm-up, in GB."""
    import mlx.core as mx

    return {"peak_memory_gb": mx.get_peak_memory() / 1e9}


def _weights_gb(model) -> float:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def _kv_args(args: argparse.Namespace) -> dict[str, Any]:
    kw = {"prefill_step_size": args.prefill_step_size} if args.prefill_step_size else {}
    if args.kv_bits:
        kw.update(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    return kw


def run_mlxllm(args: argparse.Namespace) -> dict[str, Any]:
    from mlxllm import backend
    from mlxllm.engine.steps import generate_step
    from mlxllm.formats.loader import load_model

    t = time.perf_counter()
    model = load_model(args.model, compute=args.compute)
    load_s = time.perf_counter() - t
    ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    kw = _kv_args(args)
    if args.kv_bits:
        from mlxllm.model.cache import KVSettings

        kw["prompt_cache"] = model.make_cache(KVSettings(kw.pop("kv_bits"), kw.pop("kv_group_size")))
    weights_gb = _weights_gb(model)
    result = _measure(_mlx_steps(generate_step, model, ids, args.gen_tokens, **kw), len(ids))
    return {**result, **_memory(), "weights_gb": weights_gb, "load_s": load_s, "weights": model.load_report.target,
            "blas": backend.blas_library}


def run_mlx_lm(args: argparse.Namespace) -> dict[str, Any]:
    if args.openblas:  # give the peer the same BLAS mlxllm preloads
        import ctypes

        ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
    from pathlib import Path

    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    t = time.perf_counter()
    model, config = load_model(Path(args.model))
    load_s = time.perf_counter() - t
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 32000)
    ids = prompt_ids(args.prompt_tokens, vocab)
    kw = _kv_args(args)
    if args.kv_bits:
        kw["quantized_kv_start"] = 0  # quantized from the first token, as mlxllm's cache
    weights_gb = _weights_gb(model)
    result = _measure(_mlx_steps(generate_step, model, ids, args.gen_tokens, **kw), len(ids))
    return {**result, **_memory(), "weights_gb": weights_gb, "load_s": load_s,
            "blas": "openblas" if args.openblas else "bundled"}


def run_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=args.prompt_tokens + args.gen_tokens + 64, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt_ids(args.prompt_tokens, llm.n_vocab())

    def stream(tokens: list[int], n: int):
        llm.reset()  # else generate() reuses the KV cache of a matching prefix and skips the prefill
        for i, token in enumerate(llm.generate(tokens, temp=0.0, top_k=1, reset=True)):
            yield token
            if i + 1 == n:
                break

    for _ in stream(ids, 2):  # warm-up at full prompt length (first large batch allocates buffers)
        pass
    result = _measure(stream(ids, args.gen_tokens), len(ids))
    return {**result, "load_s": load_s, "threads": args.threads}


RUNNERS = {"mlxllm": run_mlxllm, "mlx-lm": run_mlx_lm, "llama.cpp": run_llama_cpp}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=sorted(RUNNERS), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--compute", default="auto", help="mlxllm weight representation")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--openblas", action="store_true", help="mlx-lm: preload the system OpenBLAS as mlxllm does")
    p.add_argument("--kv-bits", type=int, default=None, help="mlxllm, mlx-lm: quantized KV cache")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--prefill-step-size", type=int, default=None, help="mlxllm, mlx-lm: prompt chunk (default: each one's own)")
    args = p.parse_args(argv)
    out = RUNNERS[args.runtime](args)
    out.update(runtime=args.runtime, model=args.model)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
