"""Samplers and logits processors, with the names and shapes mlx-lm uses.

A sampler maps log-probabilities ``[B, V]`` to token ids ``[B]``; a logits processor maps
``(tokens_so_far, logits)`` to new logits. Everything stays on the device: no host sync per token.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx

from ..errors import UserError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def check_sampling(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float | None = None,
    *, seed: int | None = None, stop: Sequence[str] = (),
) -> None:
    """Reject values no sampler can honour (and a seed or stop strings generation cannot use) with one
    clear message."""
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise UserError(f"--seed must be an integer from 0 to 2^64 - 1, got {seed}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise UserError("--stop strings must not be empty")
    if not (temp >= 0 and math.isfinite(temp)):
        raise UserError(f"--temp must be a finite number >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 disables it), got {top_k}")
    if not 0 <= min_p < 1:
        raise UserError(f"--min-p must be in [0, 1), got {min_p}")
    if repetition_penalty is not None and not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise UserError(f"--repetition-penalty must be a finite number > 0, got {repetition_penalty}")


def _keep_top_k(logprobs: mx.array, k: int) -> mx.array:
    if k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]  # value of the k-th largest
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def _keep_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    mass_before = mx.cumsum(mx.exp(sorted_lp), axis=-1) - mx.exp(sorted_lp)
    keep_sorted = mass_before < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def _keep_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least ``min_p`` times as likely as the most likely one."""
    threshold = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def make_distribution(temp: float = 0.0, top_p: float = 1.0, min_p: float = 0.0,
                      top_k: int = 0) -> Callable[[mx.array], mx.array] | None:
    """The distribution a sampler draws from, as a map from log-probabilities to filtered, renormalized
    log-probabilities (temperature, then top-k, top-p, min-p, as Hugging Face orders them); None for
    greedy. Speculative decoding needs these distributions themselves, not only draws from them."""
    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if temp == 0:
        return None

    def distribution(logprobs: mx.array) -> mx.array:
        logprobs = logprobs * (1.0 / temp)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if top_k > 0:
            logprobs = _keep_top_k(logprobs, top_k)
        if top_p < 1.0:
            logprobs = _keep_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = _keep_min_p(logprobs, min_p)
        return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)

    return distribution


def make_sampler(temp: float = 0.0, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> Sampler:
    """Greedy at ``temp == 0``; otherwise a categorical draw from ``make_distribution``."""
    distribution = make_distribution(temp, top_p, min_p, top_k)
    if distribution is None:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    return lambda logprobs: mx.random.categorical(distribution(logprobs), axis=-1)


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """CTRL-style penalty on the last ``context_size`` tokens: positive logits divided, negative multiplied."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[..., -context_size:]
        picked = mx.take_along_axis(logits, recent, axis=-1)
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        return mx.put_along_axis(logits, recent, picked, axis=-1)

    return process


def make_presence_frequency_penalty(presence: float, frequency: float, prompt_tokens: int) -> LogitsProcessor:
    """OpenAI's penalties: each token already generated (the tokens after the first ``prompt_tokens``)
    loses ``presence`` once and ``frequency`` per time it occurred."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[..., prompt_tokens:]
        if generated.size == 0:
            return logits
        counts = _counts(generated, logits.shape)
        penalty = presence * (counts > 0) + frequency * counts
        return logits - penalty.astype(logits.dtype)

    return process


def _counts(tokens: mx.array, shape: tuple[int, ...]) -> mx.array:
    """How often each vocabulary id occurs in each row of ``tokens [B, T]``: ``[B, V]``."""
    rows = mx.broadcast_to(mx.arange(shape[0])[:, None], tokens.shape)
    return mx.zeros(shape, dtype=mx.float32).at[rows, tokens].add(1.0)


def make_logits_processors(
    repetition_penalty: float | None = None, repetition_context_size: int = 20, *,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, prompt_tokens: int = 0,
) -> list[LogitsProcessor]:
    """The processors these settings ask for (none for the neutral values); the presence and
    frequency penalties count only tokens after the first ``prompt_tokens`` of the history."""
    check_sampling(repetition_penalty=repetition_penalty)
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not (math.isfinite(value) and -2 <= value <= 2):
            raise UserError(f"{name} must be a number from -2 to 2, got {value}")
    processors = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty or frequency_penalty:
        processors.append(make_presence_frequency_penalty(presence_penalty, frequency_penalty, prompt_tokens))
    return processors


def apply_processors(processors: Sequence[LogitsProcessor], tokens: mx.array, logits: mx.array) -> mx.array:
    for process in processors:
        logits = process(tokens, logits)
    return logits
