"""Gated DeltaNet (Qwen3-Next / Qwen3.5): the chunked delta rule against the plain recurrence, and the
recurrent cache's contract (no trim but through kept steps, copies, batch rows, files)."""

from __future__ import annotations

import pytest

import mlx.core as mx

from mlxllm.model.cache.batch import batch_cache
from mlxllm.model.cache.recurrent import BatchRecurrentCache, RecurrentCache, keep_steps
from mlxllm.model.cache.snapshot import load_caches, save_caches
from mlxllm.model.gated_delta import delta_chunked, delta_recurrent, l2_normalize
from test_batching import _random_model
from test_parity_mlx_lm import FAMILIES

HYBRID = ["qwen3_next", "qwen3_5", "qwen3_5_moe"]


def _inputs(L: int, decay: float, similar: float, seed: int = 0):
    """Delta-rule inputs for 2 sequences x 3 heads; ``similar`` pulls the keys together (large
    intra-chunk coupling), ``decay`` bounds the per-token log decay."""
    key = mx.random.key(seed)
    ks = mx.random.split(key, 6)
    B, H, Dk, Dv = 2, 3, 32, 16
    k = l2_normalize(mx.random.normal((B, 1, H, Dk), key=ks[0]) * similar + mx.random.normal((B, L, H, Dk), key=ks[1]))
    q = l2_normalize(mx.random.normal((B, L, H, Dk), key=ks[2])) * Dk**-0.5
    v = mx.random.normal((B, L, H, Dv), key=ks[3])
    log_g = -mx.random.uniform(0, decay, (B, L, H), key=ks[4])
    beta = mx.random.uniform(0, 1, (B, L, H), key=ks[5])
    return q, k, v, log_g, beta, mx.random.normal((B, H, Dk, Dv), key=key) * 0.5


@pytest.mark.parametrize("decay, similar", [(0.1, 0.0), (6.0, 0.0), (0.0, 30.0), (1e-3, 100.0)],
                         ids=["mild", "strong-decay", "no-decay-similar-keys", "near-identical-keys"])
@pytest.mark.parametrize("L", [1, 63, 64, 203])
def test_chunked_delta_rule_equals_the_recurrence(decay, similar, L):
    """Across chunk edges, padded last chunks, a nonzero initial state, decays that underflow within a
    chunk and keys so alike that the triangular system is badly conditioned for a series expansion."""
    args = _inputs(L, decay, similar)
    y_loop, s_loop, _ = delta_recurrent(*args)
    y_chunk, s_chunk = delta_chunked(*args)
    assert mx.allclose(y_chunk, y_loop, atol=1e-5).item(), float(mx.abs(y_chunk - y_loop).max())
    assert mx.allclose(s_chunk, s_loop, atol=1e-5).item(), float(mx.abs(s_chunk - s_loop).max())
    assert float(mx.abs(y_loop).max()) > 0.05  # outputs are not trivially small


def test_recorded_states_are_the_states_after_each_token():
    q, k, v, log_g, beta, s0 = _inputs(5, 0.5, 0.0)
    _, final, recorded = delta_recurrent(q, k, v, log_g, beta, s0, record_from=2)
    assert [t for t, _ in recorded] == [2, 3, 4, 5]
    for t, state in recorded:
        _, alone = delta_chunked(q[:, :t], k[:, :t], v[:, :t], log_g[:, :t], beta[:, :t], s0)
        assert mx.allclose(state, alone, atol=1e-5).item()
    assert recorded[-1][1] is final


def _fed(model, tokens, cache=None):
    cache = cache if cache is not None else model.make_cache()
    logits = model(mx.array([tokens]), cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, logits


@pytest.mark.parametrize("family", HYBRID)
def test_recurrent_cache_cannot_trim_unless_it_keeps_steps(family):
    model = _random_model(FAMILIES[family])
    tokens = [5, 17, 2, 44, 8, 71, 23, 9]
    cache, _ = _fed(model, tokens)
    kinds = [type(c) for c in cache]
    assert RecurrentCache in kinds and len(set(kinds)) == 2
    recurrent = [c for c in cache if isinstance(c, RecurrentCache)]
    assert all(c.trim(0) for c in recurrent) and not any(c.trim(1) for c in recurrent)
    copy = [c.copy() for c in cache]
    keep_steps(copy, 3)
    _fed(model, [60, 31, 12], copy)  # three more positions, kept step by step
    assert all(c.trim(2) for c in copy) and copy[0].offset == len(tokens) + 1
    assert not all(c.trim(3) for c in copy)  # only 1 position is kept before the current one now...
    probe = mx.array([[4]])
    assert mx.allclose(model(probe, copy), model(probe, _fed(model, tokens + [60])[0]), atol=1e-5).item()
    # ...and the original, which the copy shares arrays with, is untouched
    assert cache[0].offset == len(tokens)
    assert mx.allclose(model(probe, cache)[0, -1], _fed(model, tokens + [4])[1][0, -1], atol=1e-5).item()


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_batch_rows_roll_back_each_by_its_own_count(family):
    model = _random_model(FAMILIES[family])
    prompts = [[5, 17, 2], [44, 8, 71, 23, 9, 60]]
    rows = [_fed(model, p)[0] for p in prompts]
    batch = [batch_cache(c) for c in rows[0]]
    assert any(isinstance(b, BatchRecurrentCache) for b in batch)
    for layer, b in enumerate(batch):
        b.extend([r[layer] for r in rows])
    keep_steps(batch, 4)
    extra = [[31, 12, 77], [4, 19, 50]]
    model(mx.array(extra), batch)  # three tokens per row, as a verification pass feeds them
    for b in batch:
        b.trim_rows([2, 0])
    probe = mx.array([[66], [66]])
    got = model(probe, batch)[:, -1]
    for i, (p, e, back) in enumerate(zip(prompts, extra, [2, 0])):
        want = _fed(model, p + e[: len(e) - back] + [66])[1][0, -1]
        assert mx.allclose(got[i], want, atol=1e-4).item(), i
    keep_steps(batch, 0)
    with pytest.raises(ValueError, match="roll back"):
        next(b for b in batch if isinstance(b, BatchRecurrentCache)).trim_rows([1, 0])


@pytest.mark.parametrize("family", HYBRID)
def test_recurrent_cache_files_round_trip(family, tmp_path):
    model = _random_model(FAMILIES[family])
    cache = [c.copy() for c in _fed(model, list(range(3, 23)))[0]]
    path = tmp_path / "entry.safetensors"
    save_caches(path, cache, {"tokens": "x"})
    loaded, _ = load_caches(path)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    probe = mx.array([[4]])
    assert mx.allclose(model(probe, loaded), model(probe, [c.copy() for c in cache]), atol=1e-5).item()
    recurrent = next(c for c in cache if isinstance(c, RecurrentCache))
    recurrent.conv_state = recurrent.conv_state[:, :, :, None]  # a state of the wrong shape is refused
    save_caches(path, cache, {})
    with pytest.raises(ValueError, match="recurrent layer"):
        load_caches(path)


def test_chunked_delta_rule_has_the_recurrences_gradients():
    """Fine-tuning backpropagates through the chunked form (its triangular solve has a hand-written VJP)."""
    def loss(fn):
        def f(*args):
            y, state = fn(*args)[:2]
            return (y * mx.cos(y)).sum() + (state**2).sum()
        return f

    args = _inputs(90, 0.3, 3.0)
    want = mx.grad(loss(delta_recurrent), argnums=tuple(range(6)))(*args)
    got = mx.grad(loss(delta_chunked), argnums=tuple(range(6)))(*args)
    for a, b in zip(got, want):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), float(mx.abs(a - b).max())
