"""Sampling distributions under a fixed seed: each filter keeps exactly the tokens it should, in proportion."""

import math

import numpy as np
import pytest

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlxllm.errors import UserError
from mlxllm.engine.sample import make_logits_processors, make_sampler

PROBS = np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
N = 20000


def _frequencies(sampler) -> np.ndarray:
    mx.random.seed(1234)
    logprobs = mx.log(mx.array(np.tile(PROBS, (N, 1)), dtype=mx.float32))
    ids = np.array(sampler(logprobs))
    return np.bincount(ids, minlength=len(PROBS)) / N


def _expected(keep: np.ndarray, temp: float = 1.0) -> np.ndarray:
    p = PROBS ** (1 / temp)
    p = p / p.sum()
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def _assert_matches(freq: np.ndarray, expected: np.ndarray) -> None:
    assert np.all(freq[expected == 0] == 0), freq  # filtered tokens never drawn
    sigma = np.sqrt(expected * (1 - expected) / N)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-9), (freq, expected)


def test_greedy_is_argmax():
    assert np.array(make_sampler(0.0)(mx.log(mx.array(PROBS[None, ::-1].copy())))).tolist() == [5]


@pytest.mark.parametrize("temp", [1.0, 0.5, 2.0])
def test_temperature(temp):
    _assert_matches(_frequencies(make_sampler(temp)), _expected(np.ones(6, bool), temp))


def test_top_k():
    _assert_matches(_frequencies(make_sampler(1.0, top_k=3)), _expected(np.arange(6) < 3))


def test_top_p_keeps_smallest_set_reaching_p():
    # 0.40 + 0.25 = 0.65 < 0.7, so the third token is needed; the fourth is not.
    _assert_matches(_frequencies(make_sampler(1.0, top_p=0.7)), _expected(np.arange(6) < 3))


def test_top_p_applies_after_temperature():
    # At temp 0.5 the probabilities sharpen to ~[.58,.23,.08,...]: 0.7 is reached with two tokens.
    _assert_matches(_frequencies(make_sampler(0.5, top_p=0.7)), _expected(np.arange(6) < 2, 0.5))


def test_min_p():
    # Keep p >= 0.3 * 0.40 = 0.12: the first three tokens.
    _assert_matches(_frequencies(make_sampler(1.0, min_p=0.3)), _expected(PROBS >= 0.12))


def test_filters_compose():
    _assert_matches(_frequencies(make_sampler(1.0, top_k=4, top_p=0.5)), _expected(np.arange(6) < 2))


def test_seed_reproducible():
    a, b = _frequencies(make_sampler(1.0)), _frequencies(make_sampler(1.0))
    assert np.array_equal(a, b)


def test_repetition_penalty():
    (process,) = make_logits_processors(repetition_penalty=2.0)
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    out = np.array(process(mx.array([[0, 1]]), logits))[0]
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert make_logits_processors(repetition_penalty=1.0) == []


@pytest.mark.parametrize(
    "kwargs", [dict(temp=-1), dict(temp=math.nan), dict(temp=1, top_p=0), dict(temp=1, top_p=1.5),
               dict(temp=1, top_k=-2), dict(temp=1, min_p=1.0)],
)
def test_invalid_values_are_user_errors(kwargs):
    with pytest.raises(UserError):
        make_sampler(**kwargs)
