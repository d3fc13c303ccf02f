"""Timed generations for ``mlxllm bench``: one trial, the trials at one prompt length turned into
medians, bandwidth and FLOP/s, speculative decoding alternated with plain decoding, and the checks
that a prompt length fits the model's context and the memory left after the weights.

A trial is timed the way a user sees generation: from the call, tokenization included, to the last
token, with one host sync per step, as in ``generate``. Decode tok/s runs from the first token to the
last, so prefill never leaks into it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import mlx.core as mx

from ... import backend
from ...engine.steps import generate_tokens, wired_limit
from ...errors import UserError
from ...model.cache import KVSettings
from .cost import decode_weight_bytes, kv_bytes, prefill_flops


@dataclass
class Trial:
    prompt_tokens: int
    generated_tokens: int
    tokenize_s: float
    ttft_s: float
    prefill_tps: float
    decode_tps: float | None
    peak_memory_gb: float


@dataclass
class LengthResult:
    prompt_tokens: int
    ttft_s: dict[str, float]
    prefill_tps: dict[str, float]
    decode_tps: dict[str, float] | None
    peak_memory_gb: dict[str, float]
    weight_bytes_per_step: int
    kv_bytes_per_step: int  # at the middle of the decode run
    decode_gbps: float | None
    decode_pct_of_peak: float | None
    prefill_gflops: float
    prefill_pct_of_peak: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def prompt_text(tokenizer: Any, tokens: int) -> str:
    """Natural text that tokenizes to about ``tokens`` ids (so timing the tokenizer is realistic)."""
    base = ("The history of computing is a story of memory: every generation of machines found that "
            "moving data cost more than computing on it, and every clever design since has tried to "
            "keep the arithmetic units fed. Caches, prefetchers, wide buses and unified memory are all "
            "answers to the same question. ")
    per_copy = len(tokenizer.encode(base, add_special_tokens=False))
    copies = tokens // max(per_copy, 1) + 2
    ids = tokenizer.encode(base * copies, add_special_tokens=False)
    while len(ids) < tokens:  # a tokenizer that merges across copies: add text until long enough
        copies *= 2
        ids = tokenizer.encode(base * copies, add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def run_trial(model: Any, tokenizer: Any, text: str, gen_tokens: int, batch: int = 1,
              prefill_step_size: int = 512, kv: KVSettings | None = None) -> Trial:
    """One greedy generation of exactly ``gen_tokens`` steps (EOS ignored, as llama-bench does),
    timed from the call, tokenization included, to the last token."""
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    tokenized = time.perf_counter()
    prompt = mx.array([ids] * batch, dtype=mx.int32)
    stamps = []
    with wired_limit(model):
        cache = model.make_cache(kv)
        for tokens, _ in generate_tokens(prompt, model, max_tokens=gen_tokens, prefill_step_size=prefill_step_size,
                                         prompt_cache=cache):
            tokens.tolist()  # the one host sync per step, as in generation
            stamps.append(time.perf_counter())
    n = len(stamps)
    return Trial(
        prompt_tokens=len(ids),
        generated_tokens=n,
        tokenize_s=tokenized - start,
        ttft_s=stamps[0] - start,
        prefill_tps=batch * len(ids) / (stamps[0] - tokenized),
        decode_tps=batch * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def speculative_trial(model: Any, draft: Any, tokenizer: Any, text: str, gen_tokens: int,
                      num_draft_tokens: int) -> dict[str, float]:
    """One greedy speculative generation of ``gen_tokens`` (EOS ignored): decode tok/s from the first
    token to the last, and the share of draft tokens the model kept."""
    from ...engine.speculative import speculative_generate_step

    mx.synchronize()
    start = time.perf_counter()
    stats: dict[str, int] = {}
    stamps = []
    with wired_limit(model):
        for _ in speculative_generate_step(mx.array(tokenizer.encode(text), dtype=mx.int32), model, draft,
                                           num_draft_tokens=num_draft_tokens, max_tokens=gen_tokens, stats=stats):
            stamps.append(time.perf_counter())
    return {"ttft_s": stamps[0] - start, "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "acceptance": stats["accepted"] / max(stats["proposed"], 1)}


def bench_speculative(model: Any, draft: Any, tokenizer: Any, lengths: list[int], gen_tokens: int, trials: int,
                      num_draft_tokens: int, on_trial: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Decode speed with and without the draft model, alternated trial by trial (medians), per prompt."""
    rows = []
    for p in lengths:
        text = prompt_text(tokenizer, p)
        run_trial(model, tokenizer, text, 2)
        speculative_trial(model, draft, tokenizer, text, 2, num_draft_tokens)  # warm-up
        plain, spec = [], []
        for _ in range(trials):
            plain.append(run_trial(model, tokenizer, text, gen_tokens).decode_tps)
            spec.append(speculative_trial(model, draft, tokenizer, text, gen_tokens, num_draft_tokens))
            if on_trial:
                on_trial()
        base = statistics.median(plain)
        fast = statistics.median(t["decode_tps"] for t in spec)
        rows.append({"prompt_tokens": p, "decode_tps": base, "speculative_decode_tps": fast, "speedup": fast / base,
                     "acceptance": statistics.median(t["acceptance"] for t in spec),
                     "num_draft_tokens": num_draft_tokens})
    return rows


def summary(values: Iterable[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def bench_length(model: Any, tokenizer: Any, prompt_tokens: int, gen_tokens: int, trials: int,
                 peaks: dict[str, Any], batch: int = 1, on_trial: Callable[[], None] | None = None,
                 kv: KVSettings | None = None) -> LengthResult:
    """Warm up once, then ``trials`` timed runs at one prompt length, with bandwidth and FLOP/s."""
    text = prompt_text(tokenizer, prompt_tokens)
    run_trial(model, tokenizer, text, min(gen_tokens, 2), batch, kv=kv)  # warm-up: kernels, allocator
    runs = []
    for _ in range(trials):
        runs.append(run_trial(model, tokenizer, text, gen_tokens, batch, kv=kv))
        if on_trial:
            on_trial()
    p = runs[0].prompt_tokens
    weights = decode_weight_bytes(model, batch)
    kv_step = kv_bytes(model, p + gen_tokens // 2, batch, kv=kv)
    decode = summary(r.decode_tps for r in runs)
    steps_per_s = decode["median"] / batch if decode else None
    gbps = (weights + kv_step) * steps_per_s / 1e9 if steps_per_s else None
    prefill = summary(r.prefill_tps for r in runs)
    gflops = prefill_flops(model, p) / p * prefill["median"] / 1e9  # tok/s counts every row of the batch
    return LengthResult(
        prompt_tokens=p,
        ttft_s=summary(r.ttft_s for r in runs),
        prefill_tps=prefill,
        decode_tps=decode,
        peak_memory_gb=summary(r.peak_memory_gb for r in runs),
        weight_bytes_per_step=weights,
        kv_bytes_per_step=kv_step,
        decode_gbps=gbps,
        decode_pct_of_peak=100 * gbps / peaks["read_gbps"] if gbps else None,
        prefill_gflops=gflops,
        prefill_pct_of_peak=100 * gflops / peaks["matmul_gflops"],
        trials=[asdict(r) for r in runs],
    )


def _memory_for_kv(model: Any) -> float:
    """Bytes left for the KV cache: 80 % of the device's memory minus the weights."""
    return backend.device_memory() * 0.8 - decode_weight_bytes(model)


def sweep_lengths(model: Any, batch: int = 1, top: int = 32768, kv: KVSettings | None = None) -> list[int]:
    """Default context sweep: powers of two from 1K up to 32K, the model's context, or what the KV
    cache can hold in the memory left after the weights."""
    cfg = model.config
    free = _memory_for_kv(model)
    lengths, c = [], 1024
    while c <= min(top, cfg.max_position_embeddings - 64):
        if kv_bytes(model, c, batch, kv=kv) > free:
            break
        lengths.append(c)
        c *= 2
    return lengths


def check_lengths(model: Any, lengths: list[int], gen_tokens: int, batch: int, kv: KVSettings | None = None) -> None:
    """Refuse prompt lengths the model's context or the memory cannot take, in one line."""
    cfg = model.config
    free = _memory_for_kv(model)
    for p in lengths:
        if p <= 0:
            raise UserError(f"prompt lengths must be positive, got {p}")
        if p + gen_tokens > cfg.max_position_embeddings:
            raise UserError(f"{p} prompt + {gen_tokens} generated tokens exceed the model's context "
                            f"of {cfg.max_position_embeddings}")
        need = kv_bytes(model, p + gen_tokens, batch, kv=kv)
        if need > free:
            raise UserError(f"a {p}-token prompt needs {need / 2**30:.1f} GiB of KV cache; "
                            f"about {max(free, 0) / 2**30:.1f} GiB is free after the weights")
