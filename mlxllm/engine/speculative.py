"""Speculative decoding: a small draft model proposes ``k`` tokens one at a time, the target model
scores all of them in one forward pass, and a rejection rule keeps a prefix of them plus one token of
its own. Decode on a Mac is bound by reading the weights, so one target pass over ``k + 1`` tokens
costs about as much as one over a single token: every accepted draft token is a target step saved.

The rule (Leviathan et al. 2023; Chen et al. 2023): draft token ``d`` drawn from the draft's
distribution ``q`` is kept with probability ``min(1, p(d) / q(d))`` under the target's distribution
``p``; at the first rejection the replacement is drawn from ``max(0, p - q)`` renormalized, and when
all ``k`` are kept a bonus token comes from ``p`` at the next position. The emitted tokens are then
distributed exactly as the target's own sampling (the same temperature, top-k, top-p, min-p and
logits processors); greedy keeps the draft tokens equal to the target's argmax, so its output is the
target's greedy output.

The draft chain stays lazy: the ``k`` draft steps and the verifying pass are one MLX graph, and the
only host sync per round is reading how many tokens were kept.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from ..errors import UserError
from ..model.cache.recurrent import keep_steps
from .steps import DEFAULT_PREFILL_STEP, prefill
from .sample import LogitsProcessor, apply_processors

Distribution = Callable[[mx.array], mx.array] | None  # ``sample.make_distribution``; None = greedy


def accept(target: mx.array, draft: mx.array, drafted: mx.array, greedy: bool) -> tuple[mx.array, mx.array]:
    """The rejection rule for a batch of rounds.

    target: log-probabilities ``[B, k + 1, V]`` of the target's sampling distribution at the ``k``
        drafted positions and the one after them; draft: ``[B, k, V]`` the draft's, from which
        ``drafted [B, k]`` were drawn. Returns ``(kept [B], next_token [B])``: how many drafted
        tokens are kept, and the token that follows them (the replacement or the bonus).
    """
    k = drafted.shape[1]
    if greedy:
        best = mx.argmax(target, axis=-1)
        ok = best[:, :k] == drafted
    else:
        p = mx.take_along_axis(target[:, :k], drafted[..., None], axis=-1)[..., 0]
        q = mx.take_along_axis(draft, drafted[..., None], axis=-1)[..., 0]
        ok = mx.log(mx.random.uniform(shape=drafted.shape)) < p - q  # probability min(1, p / q)
    kept = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1) if k else mx.zeros((target.shape[0],), mx.int32)
    if greedy:
        return kept, mx.take_along_axis(best, kept[:, None], axis=1)[:, 0]
    at = kept[:, None, None]
    p_row = mx.exp(mx.take_along_axis(target, at, axis=1)[:, 0])
    q_all = mx.concatenate([mx.exp(draft), mx.zeros_like(target[:, :1])], axis=1)  # no draft after the last
    residual = mx.maximum(p_row - mx.take_along_axis(q_all, at, axis=1)[:, 0], 0.0)
    # p == q leaves nothing (a rejection there has probability 0, but rounding may produce one)
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p_row)
    return kept, mx.random.categorical(mx.log(residual), axis=-1)


def fit_vocab(logits: mx.array, vocab: int) -> mx.array:
    """The draft's logits over the target's vocabulary (tables padded to different sizes)."""
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    if logits.shape[-1] < vocab:
        pad = mx.full((*logits.shape[:-1], vocab - logits.shape[-1]), -mx.inf, logits.dtype)
        return mx.concatenate([logits, pad], axis=-1)
    return logits


def check_draft(model: Any, draft_model: Any, positions: int) -> None:
    """Reject a pair speculative decoding cannot run: a draft whose cache cannot be rolled back past a
    sliding window, or whose context is shorter than ``positions``."""
    for name, m in (("model", model), ("draft model", draft_model)):
        cfg = m.config
        if any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)) and positions > cfg.sliding_window:
            raise UserError(f"speculative decoding: the {name} has a sliding window of {cfg.sliding_window} tokens "
                            f"and this generation needs {positions}; rejected drafts cannot be rolled back past it")
        if positions > cfg.max_position_embeddings:
            raise UserError(f"speculative decoding: {positions} positions exceed the {name}'s context "
                            f"({cfg.max_position_embeddings})")


def _logprobs(logits: mx.array, processors: Sequence[LogitsProcessor], history: mx.array | None) -> mx.array:
    if processors:
        logits = apply_processors(processors, history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _draft(draft_model: Any, cache: list, step_in: mx.array, k: int, vocab: int, distribution: Distribution,
           processors: Sequence[LogitsProcessor], history: mx.array | None
           ) -> tuple[mx.array, mx.array, mx.array | None]:
    """``k`` draft tokens ``[1, k]``, the distributions they were drawn from ``[1, k, vocab]``, and the
    history extended by them; all lazy."""
    drafted, lps = [], []
    for _ in range(k):
        lp = _logprobs(fit_vocab(draft_model.head(draft_model.hidden(step_in, cache)[:, -1, :]), vocab),
                       processors, history)
        if distribution is None:
            token = mx.argmax(lp, axis=-1)
        else:
            lp = distribution(lp)
            token = mx.random.categorical(lp, axis=-1)
        drafted.append(token)
        lps.append(lp)
        if history is not None:
            history = mx.concatenate([history, token[:, None]], axis=1)
        step_in = token[:, None]
    if not k:
        return mx.zeros((1, 0), mx.int32), mx.zeros((1, 0, vocab)), history
    return mx.stack(drafted, axis=1).astype(mx.int32), mx.stack(lps, axis=1), history


def _verify(model: Any, cache: list, fresh: mx.array, drafted: mx.array, processors: Sequence[LogitsProcessor],
            history: mx.array | None) -> mx.array:
    """The target's log-probabilities ``[1, k + 1, vocab]`` after each drafted position, from one pass
    over the not yet cached tokens ``fresh`` and the ``k`` drafted ones."""
    k = drafted.shape[1]
    logits = model.head(model.hidden(mx.concatenate([fresh, drafted], axis=1), cache)[:, -(k + 1):, :])
    rows = []
    for i in range(k + 1):  # each position's processors see the tokens before it
        before = None if history is None else history[:, : history.shape[1] - k + i]
        rows.append(_logprobs(logits[:, i, :], processors, before))
    return mx.stack(rows, axis=1)


def speculative_generate_step(
    prompt: mx.array,
    model: Any,
    draft_model: Any,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    distribution: Distribution = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prompt_cache: list | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield ``(token_id, logprobs [vocab], from_draft)`` for up to ``max_tokens`` tokens after
    ``prompt`` (1-D ids); ``logprobs`` are the target's, as ``generate_step`` yields them. ``stats``
    (when given) counts ``proposed`` and ``accepted`` draft tokens as the rounds go."""
    if num_draft_tokens < 1:
        raise UserError(f"--num-draft-tokens must be at least 1, got {num_draft_tokens}")
    check_draft(model, draft_model, prompt.size + max_tokens)  # the last round drafts no further
    vocab = model.config.vocab_size
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    draft_cache = draft_model.make_cache()
    seq = prompt.tolist()
    # positions of ``seq`` each cache holds (everything before is in it, nothing after)
    held = len(seq) - prefill(model, prompt[None], cache, prefill_step_size).shape[1]
    draft_held = len(seq) - prefill(draft_model, prompt[None], draft_cache, prefill_step_size).shape[1]
    keep_steps(cache + draft_cache, num_draft_tokens + 1)  # recurrent states roll back through kept steps
    stats = stats if stats is not None else {}
    stats.setdefault("proposed", 0)
    stats.setdefault("accepted", 0)
    emitted = 0
    while emitted < max_tokens:
        k = min(num_draft_tokens, max_tokens - emitted - 1)
        history = mx.array(seq, dtype=mx.int32)[None] if logits_processors else None
        draft_in = mx.array(seq[draft_held:], dtype=mx.int32)[None]
        drafted_ids, draft_dist, history = _draft(draft_model, draft_cache, draft_in, k, vocab, distribution,
                                                  logits_processors, history)
        fresh = mx.array(seq[held:], dtype=mx.int32)[None]
        target_lps = _verify(model, cache, fresh, drafted_ids, logits_processors, history)
        target_dist = target_lps if distribution is None else distribution(target_lps)
        kept, nxt = accept(target_dist, draft_dist, drafted_ids, distribution is None)
        mx.eval(kept, nxt, drafted_ids, target_lps)
        n = kept.item()
        new = drafted_ids[0, :n].tolist() + [nxt.item()]
        stats["proposed"] += k
        stats["accepted"] += n
        # roll both caches back to the kept tokens
        draft_fed = max(k - 1, 0)  # the last drafted token was never fed to the draft
        draft_keep = min(n, draft_fed)
        if not all(c.trim(k - n) for c in cache) or not all(c.trim(draft_fed - draft_keep) for c in draft_cache):
            raise UserError("speculative decoding: a cache could not be rolled back")  # check_draft rules this out
        if k:
            draft_held = len(seq) + draft_keep
        held = len(seq) + n
        seq.extend(new)
        for i, token in enumerate(new):
            yield token, target_lps[0, i], i < n
            emitted += 1
            if emitted == max_tokens:
                return
