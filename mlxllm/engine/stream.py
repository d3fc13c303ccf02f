"""Streaming generation (mlx-lm's ``stream_generate`` / ``generate``): prompt encoding, detokenized
text, stop strings, speeds, and the choice between plain and speculative decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import mlx.core as mx

from ..errors import UserError
from ..model.cache import KVSettings
from .grammar import Constraint, Grammar
from .sample import (LogitsProcessor, Sampler, check_sampling, make_distribution, make_logits_processors,
                     make_sampler)
from .speculative import speculative_generate_step
from .steps import DEFAULT_PREFILL_STEP, generate_step, wired_limit


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


def check_utf8(text: str, what: str = "the prompt") -> str:
    """``text``, once it is known to be encodable: lone surrogates (bytes that were not UTF-8 in argv,
    stdin or a JSON escape) are refused with one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 text (position {e.start})") from None
    return text


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of prompt text: special tokens added unless a chat template already wrote the BOS."""
    check_utf8(text)
    bos = tokenizer.bos_token_id
    bos_text = tokenizer.decode([bos]) if bos is not None else None
    add_special = not (bos_text and text.startswith(bos_text))  # a chat template may have written it
    return tokenizer.encode(text, add_special_tokens=add_special)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | mx.array) -> mx.array:
    """Prompt text (as ``prompt_ids``) or ids as int32."""
    if isinstance(prompt, str):
        prompt = prompt_ids(tokenizer, prompt)
    return mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt.astype(mx.int32)


def held_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class TextStream:
    """Token ids in, finished text out: UTF-8 completed by the detokenizer, stop strings cut (and held
    back while they may still be forming), the finish reason decided."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], ignore_eos: bool = False) -> None:
        self.eos, self.stop = set() if ignore_eos else set(tokenizer.eos_token_ids), stop
        self.detok = tokenizer.detokenizer()
        self.pending = ""  # text held back because it may be the start of a stop string
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, token: int, last: bool, complete: bool = False) -> tuple[str, str | None]:
        """The text ``token`` completes and the finish reason: "stop" at an EOS id, a stop string or
        (``complete``) the end of a grammar, "length" when it is the ``last`` one allowed."""
        finish = None
        if token in self.eos:
            finish, piece = "stop", self.detok.finalize()
        else:
            piece = self.detok.add_token(token)
            if complete or last:
                finish, piece = "stop" if complete else "length", piece + self.detok.finalize()
        pending = self.pending + piece
        if self.stop:
            hits = [(pending.find(s), s) for s in self.stop if s in pending]
            if hits:
                hit, self.matched = min(hits)
                pending, finish = pending[:hit], "stop"
        hold = held_tail(pending, self.stop) if self.stop and finish is None else 0
        text, self.pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        return text, finish


def _fit_context(model: Any, n_prompt: int, prompt_cache: list | None, max_tokens: int) -> int:
    """``max_tokens`` cut to the model's context; a prompt that does not fit is refused."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None:
        return max_tokens
    held = prompt_cache[0].offset if prompt_cache else 0  # tokens already in a reused cache
    if held + n_prompt >= context:
        raise UserError(f"the prompt is {held + n_prompt} tokens; the model's context is {context} tokens")
    return min(max_tokens, context - held - n_prompt)


def _check_arguments(max_tokens: int, sampler: Sampler | None, draft_model: Any, grammar: Grammar | None,
                     kv: KVSettings | None, kv_bits: int | None, quantized_kv_start: int) -> None:
    """``stream_generate``'s combinations that cannot work, refused in one line each."""
    if max_tokens < 0:
        raise UserError(f"max_tokens must be >= 0, got {max_tokens}")
    if draft_model is not None and sampler is not None:
        raise UserError("speculative decoding needs the sampling settings (temp, top_p, ...), not a sampler function")
    if kv is not None and (kv_bits is not None or quantized_kv_start):
        raise UserError("pass the KV-cache settings either as kv= or as kv_bits/kv_group_size/quantized_kv_start")
    if grammar is not None and draft_model is not None:
        raise UserError("a grammar and a draft model cannot be combined yet")


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
    kv: KVSettings | None = None,
    draft_model: Any | None = None,
    num_draft_tokens: int = 3,
    grammar: Grammar | None = None,
) -> Iterator[GenerationResponse]:
    """Stream ``GenerationResponse`` objects; ``text`` holds only newly completed UTF-8 text.

    ``sampler``/``logits_processors`` take precedence over the convenience arguments (temp, top_p,
    top_k, min_p, repetition_penalty). Generation ends at any EOS id, a stop string (not included in
    the text), ``max_tokens``, or the model's context length. A fresh cache is quantized as ``kv``
    says, or as mlx-lm's ``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start`` say. With
    ``draft_model`` (same tokenizer) tokens come from speculative decoding with ``num_draft_tokens``
    drafted per round: the same output distribution (greedy: the same text), fewer target passes.
    With ``grammar`` (a ``Grammar``: JSON schema, JSON object, regex, Lark / GBNF) every token is drawn
    from those the grammar allows next, and generation ends where the grammar does.
    """
    start = time.perf_counter()
    _check_arguments(max_tokens, sampler, draft_model, grammar, kv, kv_bits, quantized_kv_start)
    kv = kv or KVSettings(kv_bits, kv_group_size, quantized_kv_start)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty)
    check_sampling(seed=seed, stop=stop)
    if seed is not None:
        mx.random.seed(seed)
    if prompt_cache is None and (kv.quantized or kv.start):
        prompt_cache = model.make_cache(kv.checked(model.config))
    ids = encode_prompt(tokenizer, prompt)
    max_tokens = _fit_context(model, ids.size, prompt_cache, max_tokens)
    if max_tokens == 0:
        return
    text_stream = TextStream(tokenizer, stop)
    constraint = Constraint(grammar, tokenizer, model.config.vocab_size) if grammar is not None else None
    mx.reset_peak_memory()
    with wired_limit(model):
        prefill_start = time.perf_counter()
        stats: dict[str, int] = {}
        if draft_model is not None:
            steps = speculative_generate_step(
                ids, model, draft_model, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
                distribution=make_distribution(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p),
                logits_processors=logits_processors, prompt_cache=prompt_cache,
                prefill_step_size=prefill_step_size, stats=stats,
            )
        else:
            steps = ((t, lp, False) for t, lp in generate_step(
                ids, model, max_tokens=max_tokens, logits_processors=logits_processors, prompt_cache=prompt_cache,
                sampler=sampler or make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p),
                prefill_step_size=prefill_step_size, constraint=constraint,
            ))
        for n, (token, logprobs, from_draft) in enumerate(steps):
            now = time.perf_counter()
            if n == 0:
                ttft, prompt_tps, decode_start = now - start, ids.size / (now - prefill_start), now
            text, finish = text_stream.push(token, n + 1 == max_tokens)
            yield GenerationResponse(
                text=text, token=token, logprobs=logprobs, prompt_tokens=ids.size, prompt_tps=prompt_tps,
                generation_tokens=n + 1, generation_tps=n / (now - decode_start) if n else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, ttft=ttft, from_draft=from_draft,
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
