"""Continuous batching: requests join and leave one running batch at step boundaries.

Each ``BatchEngine.step`` runs one decode step for every running sequence at once (the weights are
read once for all rows; ``model/cache/batch.py`` keeps each row's own positions) and, within the
per-step token budget (``max_step_tokens``, the decode rows counted first; while streams run, also
no more prompt than a share of one decode step's measured time for each request waiting for its first
token), chunks of newcomers' prompts, so a long prompt is read a little per step while the streams
keep flowing. A sequence whose prompt is in samples its first token and joins the batch; one that
finishes or is cancelled leaves it before the next step and its KV memory goes with it.

Every request carries its own sampling settings, stop strings, token limit and seed (its own
random key, so a seeded request draws the same tokens alone or batched). Prompts reuse the longest
prefix the ``PrefixCache`` holds, and admission holds weights + the KV that running requests may
grow to + the prefix cache under a memory limit: a request that does not fit waits, and a full
queue refuses new ones (``QueueFull``). Events go out through each request's callback as plain
Python values; nothing outside the engine's thread touches an MLX array.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.adapters import AdapterSet
from ..model.cache import KVSettings, activation_dtype, kv_bytes
from ..model.cache.batch import FusedStep, batch_cache
from .batch_draft import BatchDraft
from .grammar import masked
from .pacing import StepPacing
from .prefix_cache import PrefixCache
from .requests import Callback, Event, QueueFull, Request, SequenceState


class BatchEngine:
    """The scheduler and batched decode loop around one model. ``submit``/``cancel`` may be called from
    any thread; ``step`` and ``wait`` only from the one thread that owns the model."""

    def __init__(self, model: Any, tokenizer: Any, *, kv: KVSettings | None = None, max_batch: int = 32,
                 max_step_tokens: int = 512, max_queue: int = 256, max_memory: int | None = None,
                 prefix_cache: PrefixCache | None = None, weights_bytes: int = 0, prefill_share: float = 0.8,
                 adapters: AdapterSet | None = None, draft: BatchDraft | None = None) -> None:
        if max_batch < 1 or max_step_tokens < 1 or max_queue < 0 or not prefill_share >= 0:
            raise UserError("--max-batch and --max-step-tokens must be >= 1, --max-queue and --prefill-share >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.kv = kv.checked(model.config) if kv is not None else None
        self.max_batch, self.max_step_tokens, self.max_queue = max_batch, max_step_tokens, max_queue
        self.pacing = StepPacing(max_step_tokens, prefill_share)
        self.prefix_cache = prefix_cache
        self.adapters = adapters  # per-request LoRA adapters (model/adapters.py: load_adapter_set)
        self.draft = draft  # speculative decoding in the batch (batch_draft.py)
        self.context = model.config.max_position_embeddings
        self.max_memory, self.weights_bytes = max_memory, weights_bytes
        self._dtype = activation_dtype(model)
        self.trims = model.config.trims  # else the prefix cache keeps snapshots at message boundaries
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._waiting: collections.deque[SequenceState] = collections.deque()
        self._prefilling: collections.deque[SequenceState] = collections.deque()
        self._running: list[SequenceState] = []
        self._batch: list | None = None  # one batched cache per layer
        self._wake = threading.Event()
        self.reserved = 0  # KV bytes admitted requests may grow to
        self.queued = 0  # requests submitted and not yet admitted
        self.kv_bytes_now = 0  # KV bytes held after the last step (read by metrics from other threads)

    # -- any thread -------------------------------------------------------------------------
    def submit(self, request: Request, on_event: Callback) -> None:
        """Queue ``request``; its events go to ``on_event``, called on the engine's thread (at once, on
        this thread, for a request with nothing to generate). Raises ``UserError`` for a request that
        can never run and ``QueueFull`` when the queue is full."""
        request.params.check()
        n = len(request.prompt)
        if n == 0:
            raise UserError("the prompt is empty")
        if n >= self.context:
            raise UserError(f"the prompt is {n} tokens; the model's context is {self.context} tokens")
        vocab = self.model.config.vocab_size
        if not 0 <= request.adapter <= (len(self.adapters.names) if self.adapters is not None else 0):
            raise UserError(f"adapter {request.adapter} is not loaded")
        if any(not 0 <= t < vocab for t in request.prompt):
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        limit = request.params.max_tokens
        max_tokens = self.context - n if limit is None else min(limit, self.context - n)
        reserve = kv_bytes(self.model, n + max_tokens, dtype=self._dtype, kv=self.kv)
        if self.max_memory is not None and self.weights_bytes + reserve > self.max_memory:
            raise UserError(f"the request needs {reserve / 1e9:.2f} GB of KV cache for {n} + {max_tokens} tokens; "
                            f"the memory limit leaves {(self.max_memory - self.weights_bytes) / 1e9:.2f} GB "
                            "(lower max_tokens)")
        if max_tokens == 0:
            on_event(Event(request.id, "", [], None, n, 0, 0, "length"))
            return
        seq = SequenceState(request, on_event, max_tokens, reserve, self.tokenizer, vocab)
        with self._lock:
            if self.queued >= self.max_queue:
                raise QueueFull(f"{self.queued} requests are waiting")
            self._inbox.put(seq)
            self.queued += 1
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` at the next step boundary (its KV is freed; it gets a "cancelled" event)."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def prefilling(self) -> int:
        return len(self._prefilling)

    @property
    def kv_cache_bytes(self) -> int:
        batch = sum(c.nbytes for c in self._batch) if self._batch else 0
        return batch + sum(sum(c.nbytes for c in s.cache) for s in list(self._prefilling) if s.cache)

    @property
    def idle(self) -> bool:
        return not (self._running or self._prefilling or self._waiting) and self._inbox.empty()

    # -- the engine thread ----------------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        """Sleep until a request arrives or is cancelled, or ``timeout`` seconds pass."""
        self._wake.wait(timeout)
        self._wake.clear()

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        self._take_inbox()
        self._apply_cancels()
        self._admit()
        if not (self._running or self._prefilling):
            return False
        started, decoding = time.perf_counter(), bool(self._running)
        budget = self.pacing.prompt_tokens(len(self._running), len(self._prefilling) + len(self._waiting))
        if decoding and not self._prefilling and self._drafting():
            with self._select([s.request.adapter for s in self._running], (len(self._running), 1)):
                done = self.draft.decode(self.model, self._batch, self._running, lambda s, t: self._emit(s, t, None))
            self._leave(done, None)  # a round is not a decode step's time: the pacing is left as it is
            self.kv_bytes_now = self.kv_cache_bytes
            return True
        if decoding and self._prefilling:
            decode, fed, joining = self._fused_step(budget)
        else:
            decode = self._decode_graph() if decoding else None
            fed, joining = self._prefill(budget)
        if decode is not None:
            self._finish_decode(*decode)
        self._join(joining)
        self.pacing.record(time.perf_counter() - started, decoding, fed)
        self.kv_bytes_now = self.kv_cache_bytes
        return True

    def _take_inbox(self) -> None:
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._waiting.append(seq)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for pool in (self._waiting, self._prefilling):
            for seq in [s for s in pool if s.request.id in cancelled]:
                pool.remove(seq)
                if pool is self._waiting:
                    self._dequeued()
                else:
                    self.reserved -= seq.reserve
                self._end(seq, "cancelled")
        self._leave([i for i, s in enumerate(self._running) if s.request.id in cancelled], "cancelled")

    def _dequeued(self) -> None:
        with self._lock:
            self.queued -= 1

    def _fits(self, seq: SequenceState) -> bool:
        if self.max_memory is None:
            return True
        short = self.weights_bytes + self.reserved + seq.reserve - self.max_memory
        cached = self.prefix_cache.nbytes if self.prefix_cache is not None else 0
        if short + cached > 0 and self.prefix_cache is not None:
            self.prefix_cache.release(short + cached)
            cached = self.prefix_cache.nbytes
        return short + cached <= 0

    SHARED_PREFIX = 64  # prompt tokens two requests must share for the later one to wait for the first's KV

    def _reading_same_prefix(self, seq: SequenceState) -> bool:
        """Whether a request being prefilled starts with the same tokens (a shared system prompt): then
        ``seq`` waits for it and reuses its KV from the prefix cache instead of computing it again."""
        if self._prefix(seq) is None or len(seq.ids) <= self.SHARED_PREFIX:
            return False
        head = seq.ids[: self.SHARED_PREFIX]
        return any(p.ids[: self.SHARED_PREFIX] == head and p.fed < len(p.ids) for p in self._prefilling)

    def _admit(self) -> None:
        held: list[SequenceState] = []
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            seq = self._waiting[0]
            if self._reading_same_prefix(seq):
                held.append(self._waiting.popleft())
                continue
            if not self._fits(seq):
                break
            self._waiting.popleft()
            self._dequeued()
            self.reserved += seq.reserve
            if self._prefix(seq) is not None:
                seq.cache, seq.cached = self.prefix_cache.lookup(seq.ids)
                seq.fed = seq.cached
            if seq.cache is None:
                seq.cache = self.model.make_cache(self.kv)
            self._prefilling.append(seq)
        self._waiting.extendleft(reversed(held))

    def _drafting(self) -> bool:
        """Whether this decode step can be a speculative round: a draft, caches that roll back, and
        greedy rows with room for ``k + 1`` more positions and nothing that narrows their tokens."""
        if self.draft is None or not self.draft.supports(self._batch):
            return False
        room = self.context - self.draft.k - 1
        return all(s.plain and s.constraint is None and s.budget is None and len(s.ids) + len(s.generated) < room
                   for s in self._running)

    def _prefix(self, seq: SequenceState) -> PrefixCache | None:
        """The prefix cache, for requests without an adapter (an adapter's KV differs from the base's)."""
        return self.prefix_cache if seq.request.adapter == 0 else None

    def _select(self, adapters: list[int], shape: tuple[int, int]) -> contextlib.AbstractContextManager:
        """Which adapter each token of the forward pass built inside uses (see ``AdapterSet.selecting``)."""
        return self.adapters.selecting(adapters, shape) if self.adapters is not None else contextlib.nullcontext()

    def _chunk_end(self, seq: SequenceState, budget: int) -> int:
        """Where this step's chunk of ``seq``'s prompt ends: ``budget`` tokens on, or at the next message
        boundary when the model's caches cannot be trimmed (a snapshot is taken there)."""
        end = min(len(seq.ids), seq.fed + budget)
        if not self.trims:
            end = min([b for b in seq.request.boundaries if seq.fed < b < end] + [end])
        return end

    def _prefill(self, budget: int) -> tuple[int, list[SequenceState]]:
        """Feed prompt chunks (oldest request first) until ``budget`` tokens; return how many were fed
        and the sequences whose first token was just sampled and that continue."""
        joining, total = [], budget
        while budget > 0 and self._prefilling:
            seq = self._prefilling[0]
            end = self._chunk_end(seq, budget)
            with self._select([seq.request.adapter], (1, 1)):
                h = self.model.hidden(mx.array(seq.ids[seq.fed:end], dtype=mx.int32)[None], seq.cache)
            budget -= end - seq.fed
            seq.fed = end
            joining += self._chunk_done(seq, h[:, -1, :])
        return total - budget, joining

    def _fused_step(self, budget: int) -> tuple[tuple[mx.array, list], int, list[SequenceState]]:
        """The decode step and the oldest prompt's next chunk as one pass through the model."""
        seq, rows = self._prefilling[0], len(self._running)
        end = self._chunk_end(seq, budget)
        tokens = [s.generated[-1] for s in self._running] + seq.ids[seq.fed:end]
        caches = [FusedStep(b, c, rows) for b, c in zip(self._batch, seq.cache)]
        chosen = [s.request.adapter for s in self._running] + [seq.request.adapter] * (end - seq.fed)
        with self._select(chosen, (1, len(tokens))):
            h = self.model.hidden(mx.array(tokens, dtype=mx.int32)[None], caches)[0]
        if self.draft is not None:
            self.draft.follow(mx.array(tokens[:rows], dtype=mx.int32)[:, None])
        decode = self._sample_rows(self.model.head(h[:rows]))
        fed, seq.fed = end - seq.fed, end
        return decode, fed, self._chunk_done(seq, h[None, -1])

    def _chunk_done(self, seq: SequenceState, last: mx.array) -> list[SequenceState]:
        """After a chunk of ``seq``'s prompt (``last``: its final hidden state ``[1, hidden]``): a
        boundary snapshot, or, once the prompt is in, the first token; ``[seq]`` if it joins the batch."""
        if seq.fed < len(seq.ids):
            mx.eval([c.state for c in seq.cache])
            if seq.fed in seq.request.boundaries and not self.trims and self._prefix(seq) is not None:
                self.prefix_cache.insert(seq.ids[: seq.fed], [c.copy() for c in seq.cache])
            return []
        self._prefilling.popleft()
        logits = self.model.head(last)
        allowed = seq.allowed()
        token, logprobs = seq.pick(logits if allowed is None else masked(logits, allowed))
        mx.eval(token, logprobs, [c.state for c in seq.cache])
        if self._prefix(seq) is not None:  # the prompt, for requests that share it and arrive meanwhile
            self.prefix_cache.insert(seq.ids, [c.copy() for c in seq.cache])
        if self._emit(seq, token.item(), logprobs):
            return [seq]
        self._snapshot(seq, seq.cache)
        self.reserved -= seq.reserve
        return []

    def _decode_graph(self) -> tuple[mx.array, list]:
        inputs = mx.array([s.generated[-1] for s in self._running], dtype=mx.int32)[:, None]
        with self._select([s.request.adapter for s in self._running], (len(self._running), 1)):
            h = self.model.hidden(inputs, self._batch)
        if self.draft is not None:
            self.draft.follow(inputs)
        return self._sample_rows(self.model.head(h[:, -1, :]))

    def _sample_rows(self, logits: mx.array) -> tuple[mx.array, list]:
        """The running rows' next tokens from ``logits [rows, vocab]`` (queued, not yet evaluated)."""
        seqs = self._running
        if any(s.constraint is not None or s.budget is not None for s in seqs):
            mx.async_eval(logits)  # the device computes these while the masks are computed
            masks = [s.allowed() for s in seqs]
            if any(m is not None for m in masks):
                free = np.ones(logits.shape[-1], dtype=bool)
                allowed = np.stack([free if m is None else m for m in masks])
                logits = masked(logits, allowed)
        if all(s.plain for s in seqs):
            tokens, logprobs = mx.argmax(logits, axis=-1), [None] * len(seqs)
        else:
            picks = [s.pick(logits[i : i + 1]) for i, s in enumerate(seqs)]
            tokens = mx.concatenate([t for t, _ in picks])
            logprobs = [lp for _, lp in picks]
        mx.async_eval(tokens, [lp for lp in logprobs if lp is not None], [c.state for c in self._batch])
        return tokens, logprobs

    def _finish_decode(self, tokens: mx.array, logprobs: list) -> None:
        ids = tokens.tolist()
        done = [i for i, (s, t, lp) in enumerate(zip(self._running, ids, logprobs)) if not self._emit(s, t, lp)]
        self._leave(done, None)

    def _emit(self, seq: SequenceState, token: int, logprobs: mx.array | None) -> bool:
        """Record ``token``, send its event; whether the sequence goes on."""
        seq.generated.append(token)
        complete = seq.advance(token)
        text, finish = seq.text.push(token, len(seq.generated) >= seq.max_tokens, complete)
        ttft = None
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            ttft = seq.first_token_at - seq.submitted
        record = [seq.logprob_record(token, logprobs)] if logprobs is not None else None
        seq.finish = finish
        seq.on_event(Event(seq.request.id, text, [token], record, len(seq.ids), seq.cached, len(seq.generated),
                           finish, ttft=ttft, stop_sequence=seq.text.matched))
        return finish is None

    def _end(self, seq: SequenceState, reason: str) -> None:
        seq.on_event(Event(seq.request.id, "", [], None, len(seq.ids), seq.cached, len(seq.generated), reason))

    def _snapshot(self, seq: SequenceState, caches: list) -> None:
        """Keep what ``caches`` hold (prompt + all generated tokens but the last, never fed) for reuse."""
        if self._prefix(seq) is not None:
            held = (seq.ids + seq.generated)[: caches[0].offset]
            self.prefix_cache.insert(held, caches, replaces_prefixes=self.trims)

    def _leave(self, rows: list[int], reason: str | None) -> None:
        """Take ``rows`` out of the running batch (snapshotting them; ``reason``: tell them why)."""
        if not rows:
            return
        gone = set(rows)
        for i in rows:
            seq = self._running[i]
            if reason is None:
                self._snapshot(seq, [c.row(i) for c in self._batch])
            else:
                self._end(seq, reason)
            self.reserved -= seq.reserve
        keep = [i for i in range(len(self._running)) if i not in gone]
        for c in self._batch:
            c.filter(keep)
        if self.draft is not None:
            self.draft.filter(keep)
        mx.eval([c.state for c in self._batch])  # the rows that left are released now, not at the next step
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._batch = None
        mx.clear_cache()

    def _join(self, seqs: list[SequenceState]) -> None:
        if not seqs:
            return
        if self._batch is None:
            self._batch = [batch_cache(c) for c in seqs[0].cache]
        if self.draft is not None:
            self.draft.join([s.ids for s in seqs])
        for layer, c in enumerate(self._batch):
            c.extend([s.cache[layer] for s in seqs])
        for s in seqs:
            s.cache = None
        self._running.extend(seqs)

    def fail_all(self, message: str) -> None:
        """After an error inside a step: end every request with it and start from an empty batch."""
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            seq.on_event(Event(seq.request.id, "", [], None, len(seq.ids), seq.cached, len(seq.generated), "error",
                               error=message))
        self._waiting.clear()
        self._prefilling.clear()
        self._running, self._batch, self.reserved = [], None, 0
        if self.draft is not None:
            self.draft.reset()
        with self._lock:
            self.queued = 0
        mx.clear_cache()

