"""Token generation: chunked prefill, a pipelined decode loop, streaming responses (mlx-lm's API).

MLX is lazy: ``_step`` only *builds* a graph. The decode loop builds step t+1 from step t's still
unevaluated token and hands it to ``mx.async_eval`` before reading step t's id, so the Python side
of one step overlaps the device work of the previous one and the only host sync is the token id.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import mlx.core as mx

from . import backend
from .cache import kv_settings
from .errors import UserError
from .sample import (LogitsProcessor, Sampler, apply_processors, make_distribution, make_logits_processors,
                     make_sampler)

DEFAULT_PREFILL_STEP = 512


@dataclass
class GenerationResponse:
    """One streamed step; field names match mlx-lm's so callers can switch."""

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while streaming
    ttft: float = 0.0  # seconds from the call to the first token, tokenization included
    from_draft: bool = False  # speculative decoding: a draft token the target kept
    draft_acceptance: float | None = None  # speculative decoding: draft tokens kept / proposed so far


@contextlib.contextmanager
def wired_limit(model: Any) -> Iterator[None]:
    """On Metal, wire the model's memory so macOS does not page it out between tokens."""
    if backend.device_name() != "metal":
        yield
        return
    from mlx.utils import tree_flatten

    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    limit = int(mx.metal.device_info()["max_recommended_working_set_size"])
    old = mx.set_wired_limit(min(limit, max(size, 0)))
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)


def prefill(model: Any, prompt: mx.array, cache: list, step: int = DEFAULT_PREFILL_STEP) -> mx.array:
    """Run all but the last ``step`` or fewer tokens of ``prompt [B, L]`` through ``model`` into
    ``cache`` in chunks of ``step`` (evaluated one by one, so memory stays bounded); return the rest."""
    if prompt.size == 0:
        raise UserError("the prompt is empty")
    while prompt.shape[1] > step:
        model.hidden(prompt[:, :step], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[:, step:]
        mx.clear_cache()
    return prompt


def generate_tokens(
    prompt: mx.array,
    model: Any,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prompt_cache: list | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield unevaluated ``(tokens [B], logprobs [B, vocab])`` for ``prompt [B, L]``, one step at a time.

    The next step is already queued with ``mx.async_eval`` when a step is yielded, so the caller's
    read of the ids (the one host sync) overlaps the device computing the following token.
    """
    sampler = sampler or make_sampler()
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    history = prompt if logits_processors else None

    def _step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model.head(model.hidden(tokens, cache)[:, -1, :])
        if logits_processors:
            logits = apply_processors(logits_processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token[:, None]], axis=1)
        return token, logprobs

    token, logprobs = _step(prefill(model, prompt, cache, prefill_step_size))
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_token, next_logprobs = _step(token[:, None])
            mx.async_eval(next_token, next_logprobs)
        yield token, logprobs
        if n + 1 < max_tokens:
            token, logprobs = next_token, next_logprobs


def generate_step(prompt: mx.array, model: Any, **kwargs: Any) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token_id, logprobs [vocab])`` for up to ``max_tokens`` steps after ``prompt`` (1-D ids);
    keyword arguments as ``generate_tokens``."""
    for token, logprobs in generate_tokens(prompt[None], model, **kwargs):
        yield token.item(), logprobs[0]


def _encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):
        bos = tokenizer.bos_token_id
        bos_text = tokenizer.decode([bos]) if bos is not None else None
        add_special = not (bos_text and prompt.startswith(bos_text))  # a chat template may have written it
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt.astype(mx.int32)


class PromptCache:
    """A KV cache kept across calls (chat turns): each new prompt recomputes only what differs from
    the tokens already cached, after trimming the cache back to the common prefix."""

    def __init__(self, model: Any, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = 0) -> None:
        self.model, self.kv = model, kv_settings(model.config, kv_bits, kv_group_size, quantized_kv_start)
        self.cache = model.make_cache(**self.kv)
        self.tokens: list[int] = []  # the tokens whose K/V the cache holds, in order

    def suffix(self, ids: list[int]) -> list[int]:
        """Trim the cache to its longest common prefix with ``ids``; return the ids still to feed."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # at least one token must go through the model to get logits
        if not all(c.trim(len(self.tokens) - n) for c in self.cache):
            self.cache, n = self.model.make_cache(**self.kv), 0  # a sliding window wrapped: start over
        self.tokens = self.tokens[:n]
        return ids[n:]

    def record(self, ids: list[int]) -> None:
        """After generating from ``suffix`` output: ``ids`` = prompt + generated tokens seen so far."""
        self.tokens = ids[: self.cache[0].offset]


def _stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    prompt_cache: list | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    draft_model: Any | None = None,
    num_draft_tokens: int = 3,
) -> Iterator[GenerationResponse]:
    """Stream ``GenerationResponse`` objects; ``text`` holds only newly completed UTF-8 text.

    ``sampler``/``logits_processors`` take precedence over the convenience arguments (temp, top_p,
    top_k, min_p, repetition_penalty). Generation ends at any EOS id, a stop string (not included in
    the text), ``max_tokens``, or the model's context length. With ``draft_model`` (same tokenizer)
    tokens come from speculative decoding with ``num_draft_tokens`` drafted per round: the same output
    distribution (greedy: the same text), fewer target passes.
    """
    start = time.perf_counter()
    if max_tokens < 0:
        raise UserError(f"max_tokens must be >= 0, got {max_tokens}")
    if draft_model is not None and sampler is not None:
        raise UserError("speculative decoding needs the sampling settings (temp, top_p, ...), not a sampler function")
    sampler = sampler or make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty)
    if seed is not None:
        mx.random.seed(seed)
    kv = kv_settings(model.config, kv_bits, kv_group_size, quantized_kv_start) if kv_bits or quantized_kv_start else {}
    if prompt_cache is None and kv:  # a fresh cache with the global layers' K/V quantized
        prompt_cache = model.make_cache(**kv)
    ids = _encode_prompt(tokenizer, prompt)
    n_prompt = ids.size
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None:
        held = prompt_cache[0].offset if prompt_cache else 0  # tokens already in a reused cache
        if held + n_prompt >= context:
            raise UserError(f"the prompt is {held + n_prompt} tokens; the model's context is {context} tokens")
        max_tokens = min(max_tokens, context - held - n_prompt)
    if max_tokens == 0:
        return
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    pending = ""  # text held back because it may be the start of a stop string
    with wired_limit(model):
        prefill_start = time.perf_counter()
        stats: dict[str, int] = {}
        if draft_model is not None:
            from .speculative import speculative_generate_step

            steps = speculative_generate_step(
                ids, model, draft_model, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
                distribution=make_distribution(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p),
                logits_processors=logits_processors, prompt_cache=prompt_cache,
                prefill_step_size=prefill_step_size, stats=stats,
            )
        else:
            steps = ((t, lp, False) for t, lp in generate_step(
                ids, model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
            ))
        for n, (token, logprobs, from_draft) in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                ttft = now - start
                prompt_tps = n_prompt / (now - prefill_start)
                decode_start = now
            gen_tps = n / (now - decode_start) if n else 0.0
            finish = None
            if token in eos:
                finish, piece = "stop", detok.finalize()
            else:
                piece = detok.add_token(token)
                if n + 1 == max_tokens:
                    finish, piece = "length", piece + detok.finalize()
            pending += piece
            if stop:
                hit = min((pending.find(s) for s in stop if s in pending), default=-1)
                if hit >= 0:
                    pending, finish = pending[:hit], "stop"
            hold = _stop_hold(pending, stop) if stop and finish is None else 0
            text, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
            yield GenerationResponse(
                text=text, token=token, logprobs=logprobs, prompt_tokens=n_prompt, prompt_tps=prompt_tps,
                generation_tokens=n + 1, generation_tps=gen_tps, peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish, ttft=ttft, from_draft=from_draft,
                draft_acceptance=stats["accepted"] / stats["proposed"] if stats.get("proposed") else None,
            )
            if finish is not None:
                break


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a whole completion and return its text; ``verbose`` streams it and prints the speeds."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens-per-sec (TTFT {r.ttft * 1000:.0f} ms)\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens-per-sec\n"
        + (f"Draft tokens accepted: {r.draft_acceptance:.1%}\n" if r.draft_acceptance is not None else "") +
        f"Peak memory: {r.peak_memory:.3f} GB"
    )
