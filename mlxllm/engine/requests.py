"""What a request to the batching engine is: its sampling settings, the events it receives, and the
state the engine keeps for it while it runs (its prompt, tokens, text stream, random key, timing)."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .grammar import Constraint, Grammar
from .reasoning import Reasoning, ThinkingBudget
from .sample import apply_processors, check_sampling, make_distribution, make_logits_processors
from .stream import TextStream


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: try again later (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings (the names mlx-lm and the OpenAI API use)."""

    max_tokens: int | None = None  # None: up to the model's context
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's log-probability and the n most likely
    ignore_eos: bool = False  # generate through end-of-sequence tokens up to max_tokens (benchmarks)
    grammar: Grammar | None = None  # constrained decoding: the text must match it, and ends where it does
    reasoning: Reasoning | None = None  # a thinking model's markers; with a budget, long thoughts are closed

    def check(self) -> None:
        check_sampling(self.temp, self.top_p, self.top_k, self.min_p, self.repetition_penalty, seed=self.seed,
                       stop=self.stop)
        make_logits_processors(presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        if self.max_tokens is not None and self.max_tokens < 0:
            raise UserError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise UserError(f"top_logprobs must be from 0 to 20, got {self.logprobs}")
        budget = self.reasoning.budget if self.reasoning is not None else None
        if budget is not None and (budget < 0 or self.grammar is not None):
            raise UserError("a reasoning budget must be >= 0, and cannot be combined with a grammar yet")


@dataclass
class Request:
    """A prompt as token ids and how to continue it; ``boundaries`` are prompt lengths (message ends)
    where a prefix snapshot is worth keeping for models whose caches cannot be trimmed."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    boundaries: tuple[int, ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    adapter: int = 0  # which of the engine's adapters its rows use (0: none; see ``AdapterSet.index``)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely (token, logprob) pairs, best first


@dataclass
class Event:
    """What a request receives after a step: the text completed since the last event, the ids behind
    it, and on the last one ``finish_reason`` ("stop", "length", "cancelled" or "error")."""

    request_id: str
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    ttft: float | None = None  # seconds from submission to the first token, on the event that carries it
    stop_sequence: str | None = None  # the stop string that ended generation


Callback = Callable[[Event], None]


class SequenceState:
    """The engine's state for one request: made on the thread that submits it (no MLX there), used
    on the engine's thread from admission to its last event."""

    def __init__(self, request: Request, on_event: Callback, max_tokens: int, reserve: int, tokenizer: Any,
                 vocab_size: int | None = None):
        self.request, self.on_event, self.max_tokens, self.reserve = request, on_event, max_tokens, reserve
        params = request.params
        # compiled here, on the submitting thread: a grammar no text satisfies is refused before it queues
        self.constraint = Constraint(params.grammar, tokenizer, vocab_size) if params.grammar is not None else None
        thinking = params.reasoning
        self.budget = ThinkingBudget(thinking) if thinking is not None and thinking.budget is not None else None
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.ids = request.prompt
        self.cache: list | None = None  # per-sequence caches while the prompt is read
        self.fed = 0  # prompt positions in the cache
        self.cached = 0  # of which came from the prefix cache
        self.generated: list[int] = []
        self.text = TextStream(tokenizer, params.stop, ignore_eos=params.ignore_eos)
        self.distribution = make_distribution(params.temp, params.top_p, params.min_p, params.top_k)
        self.processors = make_logits_processors(params.repetition_penalty, presence_penalty=params.presence_penalty,
                                                 frequency_penalty=params.frequency_penalty, prompt_tokens=len(self.ids))
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.key: mx.array | None = None  # made on the engine's thread, at the first draw
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish: str | None = None

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust or report: the whole batch can share one argmax."""
        return self.distribution is None and not self.processors and self.request.params.logprobs is None

    def allowed(self) -> np.ndarray | None:
        """The ids that may come next (boolean ``[vocab]``) when something narrows them: the closing
        marker of a thought past its budget, or the grammar; None when any id may."""
        forced = self.budget.forced() if self.budget is not None else None
        if forced is not None:
            only = np.zeros(self.vocab_size, dtype=bool)
            only[forced] = True
            return only
        return self.constraint.allowed() if self.constraint is not None else None

    def advance(self, token: int) -> bool:
        """Follow ``token`` in the grammar and the thought; whether the grammar is now complete."""
        if self.budget is not None:
            self.budget.push(token)
        if self.constraint is None:
            return False
        self.constraint.consume(token)
        return self.constraint.complete

    def pick(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """The next token for ``logits [1, V]`` (already masked by the grammar, if any; and the
        log-probabilities it came from, when asked)."""
        if self.processors:
            history = mx.array(self.ids + self.generated, dtype=mx.int32)[None]
            logits = apply_processors(self.processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.distribution is None:
            token = mx.argmax(logprobs, axis=-1)
        else:
            if self.key is None:
                self.key = mx.random.key(self.seed)
            self.key, sub = mx.random.split(self.key)
            token = mx.random.categorical(self.distribution(logprobs), axis=-1, key=sub)
        return token, logprobs if self.request.params.logprobs is not None else None

    def logprob_record(self, token: int, logprobs: mx.array) -> TokenLogprob:
        """What the API reports for ``token`` drawn from ``logprobs [1, V]``: its log-probability and
        the ``params.logprobs`` most likely alternatives."""
        row, n = logprobs[0], self.request.params.logprobs
        top = []
        if n:
            order = mx.argsort(-row)[:n]
            top = list(zip(order.tolist(), row[order].tolist()))
        return TokenLogprob(token, row[token].item(), top)
