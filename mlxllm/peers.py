"""One side-by-side trial in a fresh process: ``python -m mlxllm.peers --runtime R --model M ...``.

``mlxllm bench --compare`` runs this once per runtime per trial, alternating runtimes, so no two
runtimes share a process, a heap or a warm cache. Every runtime is timed the same way, from outside:
the prompt goes in as token ids (the peers' tokenizers differ), TTFT = first token - call start,
prefill tok/s = prompt tokens / TTFT, decode tok/s = (n - 1) / (last token - first token).
The peers (mlx-lm, llama-cpp-python) are imported only here, only in that child process, and only
when the user asked to compare against them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

PEERS = {"mlx-lm": "mlx_lm", "llama.cpp": "llama_cpp"}  # runtime name -> module it needs


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None when it can."""
    module = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        package = {"mlx_lm": "mlx-lm", "llama_cpp": "llama-cpp-python"}[module]
        return f"{peer} skipped: {package} is not installed (pip install {package})"
    return None


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


def _mlx_steps(generate_step, model, ids: list[int], n: int):
    import mlx.core as mx

    for _ in generate_step(mx.array(ids[:16]), model, max_tokens=2):  # warm-up
        pass
    return generate_step(mx.array(ids), model, max_tokens=n)


def run_mlxllm(args: argparse.Namespace) -> dict[str, Any]:
    from . import backend
    from .generate import generate_step
    from .load import load_model

    t = time.perf_counter()
    model = load_model(args.model, compute=args.compute)
    load_s = time.perf_counter() - t
    ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    result = _measure(_mlx_steps(generate_step, model, ids, args.gen_tokens), len(ids))
    return {**result, "load_s": load_s, "weights": model.load_report.target, "blas": backend.blas_library}


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
    result = _measure(_mlx_steps(generate_step, model, ids, args.gen_tokens), len(ids))
    return {**result, "load_s": load_s, "blas": "openblas" if args.openblas else "bundled"}


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


def trial(runtime: str, model: str, prompt_tokens: int, gen_tokens: int, extra: Iterable[str] = ()) -> dict[str, Any]:
    """Run one measurement of ``runtime`` in a child process and return its JSON record."""
    cmd = [sys.executable, "-m", "mlxllm.peers", "--runtime", runtime, "--model", model,
           "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{runtime} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def compare(model: Path, fmt: str, peers: list[str], lengths: list[int], gen_tokens: int, trials: int,
            compute: str = "auto", on_trial: Callable[[], None] | None = None) -> dict[str, Any]:
    """mlxllm against ``peers`` on the same weights: per prompt length, ``trials`` rounds in which every
    runtime runs once in its own process, the order rotating each round; medians and mlxllm/peer ratios.

    mlx-lm gets the same directory, or for a GGUF file mlxllm's lossless conversion of it (the file's
    quantized weights as MLX arrays); llama.cpp reads GGUF files only."""
    from . import backend

    notes: list[str] = []
    extra: dict[str, list[str]] = {"mlxllm": ["--compute", compute], "mlx-lm": [], "llama.cpp": []}
    if backend.blas_library:
        extra["mlx-lm"].append("--openblas")
    targets = {"mlxllm": str(model)}
    with tempfile.TemporaryDirectory(prefix="mlxllm-bench-") as tmp:
        for peer in peers:
            why = missing(peer)
            if why:
                notes.append(why)
            elif peer == "llama.cpp" and fmt != "gguf":
                notes.append("llama.cpp skipped: it reads GGUF files only")
            elif peer == "mlx-lm" and fmt == "gguf":
                from .convert import save_model
                from .load import load_model

                try:
                    targets[peer] = str(save_model(load_model(model, compute="native"), Path(tmp) / "mlx"))
                    notes.append("mlx-lm reads mlxllm's lossless conversion of the GGUF file (same quantized weights)")
                except Exception as e:  # a model mlx-lm's layout cannot express: say so, keep going
                    notes.append(f"mlx-lm skipped: the GGUF could not be converted for it ({e})")
            else:
                targets[peer] = str(model)
        rows = []
        for p in lengths:
            runs: dict[str, list[dict[str, Any]]] = {r: [] for r in targets}
            names = list(targets)
            for i in range(trials):
                for r in names[i % len(names):] + names[: i % len(names)]:
                    runs[r].append(trial(r, targets[r], p, gen_tokens, extra[r]))
                    if on_trial:
                        on_trial()
            row: dict[str, Any] = {"prompt_tokens": p, "runtimes": {}}
            for r, rs in runs.items():
                row["runtimes"][r] = {k: _median(rs, k) for k in ("ttft_s", "prefill_tps", "decode_tps", "load_s")}
                row["runtimes"][r]["trials"] = rs
            ours = row["runtimes"]["mlxllm"]
            row["ratios"] = {
                r: {k: ours[k] / v[k] if ours[k] and v[k] else None for k in ("prefill_tps", "decode_tps")}
                for r, v in row["runtimes"].items() if r != "mlxllm"
            }
            rows.append(row)
    return {"runtimes": list(targets), "notes": notes, "rows": rows, "gen_tokens": gen_tokens, "trials": trials}


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
    args = p.parse_args(argv)
    out = RUNNERS[args.runtime](args)
    out.update(runtime=args.runtime, model=args.model)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
