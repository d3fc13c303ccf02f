"""Speculative decoding inside the batch: every running row gets ``k`` tokens from a small draft
model, one target pass verifies all rows' drafts at once (``k + 1`` tokens per row), and each row
keeps its own accepted prefix plus the target's next token; both models' caches then roll each row
back to what it kept.

The draft model keeps batched caches that mirror the target's rows: it reads each prompt when its
sequence joins and every token the batch decodes without drafting, so at a round's start both hold
the same positions. A round drafts ``k`` tokens and then feeds the ``k``-th as well, so every row
always moves by ``k + 1`` positions in both models before the roll-back, and no row needs a second
token in the next round. Rounds are greedy (the rows' outputs equal the target's greedy output);
a step with a sampled row, logits processors, log-probabilities, a grammar or a reasoning budget runs
without the draft.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from ..errors import UserError
from ..model.cache.batch import BatchKVCache, batch_cache
from ..model.cache.recurrent import BatchRecurrentCache, keep_steps
from .speculative import fit_vocab, accept
from .steps import prefill


class BatchDraft:
    """The draft model's side of batched speculative decoding: its rows, its rounds, its roll-backs."""

    def __init__(self, model: Any, draft_model: Any, num_draft_tokens: int = 3) -> None:
        if num_draft_tokens < 1:
            raise UserError(f"--num-draft-tokens must be at least 1, got {num_draft_tokens}")
        for name, m in (("model", model), ("draft model", draft_model)):
            if any(m.config.is_sliding(i) for i in range(m.config.num_hidden_layers)):
                raise UserError(f"--draft-model in the server: the {name} has sliding-window layers, whose batched "
                                "caches cannot roll rows back yet")
        self.model, self.k = draft_model, num_draft_tokens
        self.vocab = model.config.vocab_size
        self._batch: list | None = None
        self.proposed = self.accepted = 0  # draft tokens over all rounds (acceptance = accepted / proposed)

    def join(self, prompts: list[list[int]]) -> None:
        """Read the prompts of sequences joining the batch (in the order they join)."""
        caches = []
        for ids in prompts:
            cache = self.model.make_cache()
            rest = prefill(self.model, mx.array(ids, dtype=mx.int32)[None], cache)
            self.model.hidden(rest, cache)
            caches.append(cache)
        if self._batch is None:
            self._batch = [batch_cache(c) for c in caches[0]]
            keep_steps(self._batch, self.k + 1)
        for layer, c in enumerate(self._batch):
            c.extend([cache[layer] for cache in caches])
        mx.eval([c.state for c in self._batch])

    def filter(self, rows: list[int]) -> None:
        if self._batch is None:
            return
        if not rows:
            self._batch = None
            return
        for c in self._batch:
            c.filter(rows)

    def follow(self, tokens: mx.array) -> None:
        """Feed the tokens ``[rows, 1]`` the batch decodes in a step without drafting."""
        if self._batch is not None:
            self.model.hidden(tokens, self._batch)
            mx.async_eval([c.state for c in self._batch])

    def reset(self) -> None:
        self._batch = None

    def round(self, target: Any, target_batch: list, last: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """One greedy round for every row from its last token ``last [rows, 1]``: returns ``(drafted
        [rows, k], kept [rows], next [rows])`` (queued), both models' rows ``k + 1`` positions further."""
        keep_steps(target_batch, self.k + 1)  # recurrent rows roll back through their kept steps
        step_in, drafted = last, []
        for i in range(self.k + 1):
            h = self.model.hidden(step_in, self._batch)
            if i == self.k:  # the k-th drafted token is fed, its successor not needed
                break
            token = mx.argmax(fit_vocab(self.model.head(h[:, -1, :]), self.vocab), axis=-1)
            drafted.append(token)
            step_in = token[:, None].astype(mx.int32)
        drafted_ids = mx.stack(drafted, axis=1).astype(mx.int32)
        logits = target.head(target.hidden(mx.concatenate([last, drafted_ids], axis=1), target_batch))
        kept, nxt = accept(logits, logits[:, :0], drafted_ids, greedy=True)
        return drafted_ids, kept, nxt

    def decode(self, target: Any, target_batch: list, seqs: list, emit: Callable[[Any, int], bool]) -> list[int]:
        """A round for the running ``seqs``: each row's kept tokens go out through ``emit(seq, token)``
        (False: the sequence is done) until one ends it; both models then keep, per row, the positions
        of what went out. Returns the rows that are done."""
        last = mx.array([s.generated[-1] for s in seqs], dtype=mx.int32)[:, None]
        drafted, kept, nxt = self.round(target, target_batch, last)
        mx.eval(drafted, kept, nxt, [c.state for c in target_batch + self._batch])
        done, unkept = [], []
        for i, (seq, row, n, after) in enumerate(zip(seqs, drafted.tolist(), kept.tolist(), nxt.tolist())):
            sent = 0
            for token in row[:n] + [after]:
                sent += 1
                if not emit(seq, token):
                    done.append(i)
                    break
            unkept.append(self.k + 1 - sent)
            self.proposed, self.accepted = self.proposed + self.k, self.accepted + n
        for c in target_batch + self._batch:
            c.trim_rows(unkept)
        return done

    @staticmethod
    def supports(batch: list | None) -> bool:
        """Whether the target's batched caches can verify and roll back (float and latent KV, recurrent)."""
        return batch is not None and all(isinstance(c, (BatchKVCache, BatchRecurrentCache)) for c in batch)
