"""The recurrent state of linear-attention layers (``gated_delta.py``): the causal convolution's last
``kernel - 1`` inputs plus each head's delta-rule state, per sequence and batched.

Unlike keys and values, a recurrent state cannot be trimmed: the state after position ``n`` is gone
once position ``n + 1`` is folded in. The contract every user relies on:

  * ``trim(0)`` always works; ``trim(n > 0)`` works only while the cache *keeps steps*
    (``keep_steps(caches, n)``, which speculative decoding sets for its draft window): then the states
    after each of the last ``keep`` positions are kept (references, no copies) and a trim restores one.
    Otherwise ``trim`` returns False, and the callers that fall back on snapshots do so (the prefix
    cache stores states at message boundaries and reuses them only on an exact prefix match; a
    ``PromptCache`` starts over).
  * ``copy`` shares the arrays (MLX arrays are never written in place here) and no kept steps.

The kept steps are indexed by how many tokens the cache has been fed (``_fed``), which every row of
a batch shares, so a batch rolls each row back by its own count.
"""

from __future__ import annotations

import mlx.core as mx

from ..config import ModelConfig


class _Recurrent:
    """What the per-sequence and the batched forms share: the state and its kept steps."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None  # [B, kernel - 1, conv_dim]
        self.delta_state: mx.array | None = None  # [B, heads, Dk, Dv], float32
        self.keep = 0  # positions trim may take back (0: none)
        self._fed = 0
        self._steps: dict[int, tuple[mx.array, mx.array]] = {}

    def mask(self, n_queries: int) -> None:
        return None  # causal by construction

    def update(self, window: mx.array, state: mx.array, n: int, recorded: list[tuple[int, mx.array]]) -> None:
        """After ``n`` tokens: ``window`` the convolution's inputs ``[B, kernel - 1 + n, C]``, ``state``
        the final delta state, ``recorded`` ``(t, state after t of the n tokens)`` (kept when keeping steps)."""
        held = window.shape[1] - n
        if self.keep:
            for t, s in recorded:
                self._steps[self._fed + t] = (window[:, t : t + held], s)
        self._fed += n
        self._steps = {at: s for at, s in self._steps.items() if at >= self._fed - self.keep} if self.keep else {}
        self.conv_state, self.delta_state = window[:, n:], state
        self._advance(n)

    def _advance(self, n: int) -> None:
        raise NotImplementedError

    def _kept(self, back: int) -> tuple[mx.array, mx.array] | None:
        return self._steps.get(self._fed - back) if back else (self.conv_state, self.delta_state)

    def _forget_steps(self) -> None:
        self._steps = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv_state, self.delta_state) if a is not None]


class RecurrentCache(_Recurrent):
    """One sequence's state; ``offset`` counts the positions folded into it."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0

    def _advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> bool:
        """Forget the last ``n`` positions: only within the kept steps (see the module docstring)."""
        kept = self._kept(n)
        if kept is None:
            return False
        self.conv_state, self.delta_state = kept
        self.offset -= n
        self._fed -= n
        self._steps = {at: s for at, s in self._steps.items() if at <= self._fed}
        return True

    def copy(self) -> "RecurrentCache":
        new = RecurrentCache()
        new.conv_state, new.delta_state, new.offset = self.conv_state, self.delta_state, self.offset
        return new


class BatchRecurrentCache(_Recurrent):
    """Rows of recurrent states side by side (``batch.py``'s conventions: ``extend``, ``filter``,
    ``row``, ``trim_rows``). Every row takes the same number of tokens per step, so no padding."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths, dtype=mx.int32)

    def _advance(self, n: int) -> None:
        self.lengths = [length + n for length in self.lengths]

    def extend(self, caches: list[RecurrentCache]) -> None:
        held = [self.conv_state] if self.conv_state is not None else []
        self.conv_state = mx.concatenate(held + [c.conv_state for c in caches], axis=0)
        held = [self.delta_state] if self.delta_state is not None else []
        self.delta_state = mx.concatenate(held + [c.delta_state for c in caches], axis=0)
        self.lengths = self.lengths + [c.offset for c in caches]
        self._forget_steps()

    def filter(self, rows: list[int]) -> None:
        self._forget_steps()
        if not rows:
            self.conv_state = self.delta_state = None
            self.lengths = []
            return
        index = mx.array(rows, dtype=mx.int32)
        self.conv_state, self.delta_state = (mx.take(x, index, axis=0) for x in (self.conv_state, self.delta_state))
        self.lengths = [self.lengths[r] for r in rows]

    def row(self, i: int) -> RecurrentCache:
        cache = RecurrentCache()
        cache.conv_state, cache.delta_state = (mx.contiguous(x[i : i + 1]) for x in (self.conv_state, self.delta_state))
        cache.offset = self.lengths[i]
        return cache

    def trim_rows(self, counts: list[int]) -> None:
        """Roll row b back ``counts[b]`` positions (within the kept steps; ValueError otherwise)."""
        kept = [self._kept(c) for c in counts]
        if any(k is None for k in kept):
            raise ValueError(f"a recurrent state keeps {self.keep} steps; cannot roll back {max(counts)}")
        self.conv_state = mx.concatenate([conv[b : b + 1] for b, (conv, _) in enumerate(kept)], axis=0)
        self.delta_state = mx.concatenate([delta[b : b + 1] for b, (_, delta) in enumerate(kept)], axis=0)
        self.lengths = [length - c for length, c in zip(self.lengths, counts)]
        self._forget_steps()  # rows now stand at different steps; the next update records afresh


def keep_steps(caches: list, n: int) -> None:
    """Let the recurrent caches among ``caches`` roll back up to ``n`` positions (0: stop keeping)."""
    for c in caches:
        if isinstance(c, _Recurrent):
            c.keep = n
            if not n:
                c._forget_steps()


def recurrent_bytes(cfg: ModelConfig, dtype: mx.Dtype) -> int:
    """Bytes one sequence's recurrent state holds in one linear-attention layer, whatever its length:
    the convolution window in ``dtype``, the delta state in float32."""
    conv = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    delta = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return (cfg.linear_conv_kernel_dim - 1) * conv * dtype.size + delta * 4
