"""The prefill and decode steps: chunked prefill, then a pipelined decode loop.

MLX is lazy: ``_step`` only *builds* a graph. The decode loop builds step t+1 from step t's still
unevaluated token and hands it to ``mx.async_eval`` before reading step t's id, so the Python side
of one step overlaps the device work of the previous one and the only host sync is the token id.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import mlx.core as mx

from .. import backend
from ..errors import UserError
from .grammar import Constraint
from .sample import LogitsProcessor, Sampler, apply_processors, make_sampler

DEFAULT_PREFILL_STEP = 512


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
    constraint: Constraint | None = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield unevaluated ``(tokens [B], logprobs [B, vocab])`` for ``prompt [B, L]``, one step at a time.

    The next step is already queued with ``mx.async_eval`` when a step is yielded, so the caller's
    read of the ids (the one host sync) overlaps the device computing the following token. With a
    ``constraint`` (B = 1) each step's logits are queued first and the grammar's mask is computed from
    the previous token while the device computes them.
    """
    sampler = sampler or make_sampler()
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    history = prompt if logits_processors else None
    if constraint is not None and prompt.shape[0] != 1:
        raise UserError("a grammar constrains one sequence at a time here (the batch engine constrains rows)")

    def _step(tokens: mx.array, fed_back: bool = True) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model.head(model.hidden(tokens, cache)[:, -1, :])
        if constraint is not None:
            mx.async_eval(logits)
            if fed_back:
                constraint.consume(tokens.item())
            logits = constraint.apply(logits)
        if logits_processors:
            logits = apply_processors(logits_processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token[:, None]], axis=1)
        return token, logprobs

    token, logprobs = _step(prefill(model, prompt, cache, prefill_step_size), fed_back=False)
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
