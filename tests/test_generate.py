"""Generation on the real SmolLM2: the API's contract, stop conditions, and the pipelined loop's
agreement with a plain full-sequence forward pass."""

import pytest

import mlx.core as mx

import mlxllm
from mlxllm.errors import UserError
from mlxllm.engine.stream import held_tail
from mlxllm.engine.steps import generate_step, generate_tokens


@pytest.fixture(scope="module")
def smol(smollm2, smollm2_path):
    from mlxllm.tokenize import Tokenizer

    return smollm2, Tokenizer.from_gguf(smollm2_path)


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_greedy_decode_equals_argmax_of_full_forward(smol):
    """The cached, pipelined loop must pick exactly what an uncached forward over the whole text picks."""
    model, tok = smol
    ids = tok.encode("The capital of France is")
    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=8, prefill_step_size=2)]
    logits = model(mx.array([ids + out]))
    expected = mx.argmax(logits[0, len(ids) - 1 : -1], axis=-1).tolist()
    assert out == expected
    assert tok.decode(out).startswith(" Paris")


def test_batched_rows_decode_like_single_prompts(smol):
    """``generate_tokens`` on a [B, L] batch (what bench --batch-size uses): each row is its own sequence."""
    model, tok = smol
    a = tok.encode("The capital of France is")
    b = tok.encode("Water boils at a temperature")[: len(a)]
    rows = [t.tolist() for t, _ in generate_tokens(mx.array([a, b]), model, max_tokens=6, prefill_step_size=3)]
    for i, ids in enumerate((a, b)):
        alone = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=6)]
        assert [r[i] for r in rows] == alone


def test_stream_matches_generate_and_reports(smol):
    model, tok = smol
    prompt = _chat(tok, "Name three colors.")
    responses = list(mlxllm.stream_generate(model, tok, prompt, max_tokens=40))
    text = mlxllm.generate(model, tok, prompt, max_tokens=40)
    assert "".join(r.text for r in responses) == text
    last = responses[-1]
    assert last.finish_reason in ("stop", "length")
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.generation_tokens == len(responses)
    assert last.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert last.prompt_tps > 0 and last.peak_memory > 0 and last.ttft > 0
    assert "\ufffd" not in text


def test_eos_ends_generation_with_stop(smol):
    model, tok = smol
    responses = list(mlxllm.stream_generate(model, tok, _chat(tok, "Say hi."), max_tokens=200))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token in tok.eos_token_ids
    assert len(responses) < 200


def test_max_tokens_and_length(smol):
    model, tok = smol
    responses = list(mlxllm.stream_generate(model, tok, "Once upon a time", max_tokens=5))
    assert len(responses) == 5 and responses[-1].finish_reason == "length"


def test_prompt_as_ids_equals_prompt_as_text(smol):
    model, tok = smol
    a = mlxllm.generate(model, tok, "The capital of France is", max_tokens=6)
    b = mlxllm.generate(model, tok, tok.encode("The capital of France is"), max_tokens=6)
    assert a == b


def test_stop_string_is_cut_and_ends(smol):
    model, tok = smol
    full = mlxllm.generate(model, tok, "The capital of France is", max_tokens=12)
    word = full.split()[1]  # a word from the middle of the greedy continuation
    stopped = list(mlxllm.stream_generate(model, tok, "The capital of France is", max_tokens=12, stop=[word]))
    text = "".join(r.text for r in stopped)
    assert text == full[: full.index(word)]
    assert stopped[-1].finish_reason == "stop"


def testheld_tail_keeps_possible_prefixes():
    assert held_tail("abc<|e", ["<|end|>"]) == 3
    assert held_tail("abc", ["<|end|>"]) == 0
    assert held_tail("x\n", ["\n\n", "zz"]) == 1


def test_seeded_sampling_is_reproducible(smol):
    model, tok = smol
    kw = dict(max_tokens=12, temp=0.9, top_p=0.95, seed=7)
    assert mlxllm.generate(model, tok, "Once upon a time", **kw) == mlxllm.generate(model, tok, "Once upon a time", **kw)


def test_repetition_penalty_changes_greedy_output(smol):
    model, tok = smol
    plain = mlxllm.generate(model, tok, "1, 2, 1, 2, 1, 2,", max_tokens=8)
    penalised = mlxllm.generate(model, tok, "1, 2, 1, 2, 1, 2,", max_tokens=8, repetition_penalty=5.0)
    assert plain != penalised


def test_prompt_longer_than_context_is_a_user_error(smol):
    model, tok = smol
    with pytest.raises(UserError, match="context"):
        next(mlxllm.stream_generate(model, tok, [1] * (model.config.max_position_embeddings + 1)))


def test_empty_prompt_is_a_user_error(smol):
    model, tok = smol
    with pytest.raises(UserError, match="empty"):
        next(mlxllm.stream_generate(model, tok, []))


def test_prompt_cache_reuses_the_common_prefix(smol):
    """A second chat turn feeds only the new tokens and generates what a fresh full prompt generates."""
    from mlxllm.engine.prompt_cache import PromptCache
    from mlxllm.engine.stream import encode_prompt

    model, tok = smol
    kept = PromptCache(model)
    history = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode_prompt(tok, tok.apply_chat_template(history, add_generation_prompt=True)).tolist()
    assert kept.suffix(ids) == ids
    first = [r.token for r in mlxllm.stream_generate(model, tok, ids, 8, prompt_cache=kept.cache)]
    kept.record(ids + first)
    # the cache holds the prompt and every generated token that was fed back (all but possibly the last)
    assert len(ids) + len(first) - 1 <= len(kept.tokens) <= len(ids) + len(first)
    assert kept.tokens == (ids + first)[: len(kept.tokens)]
    history += [{"role": "assistant", "content": tok.decode(first)}, {"role": "user", "content": "And of Italy?"}]
    ids2 = encode_prompt(tok, tok.apply_chat_template(history, add_generation_prompt=True)).tolist()
    todo = kept.suffix(ids2)
    assert len(todo) < len(ids2) - len(ids) + 3  # the first turn is not recomputed
    cached = [r.token for r in mlxllm.stream_generate(model, tok, todo, 8, prompt_cache=kept.cache)]
    fresh = [r.token for r in mlxllm.stream_generate(model, tok, ids2, 8)]
    assert cached == fresh


def test_rotating_cache_trim_and_refusal():
    from mlxllm.model.cache import KVCache, RotatingKVCache

    c = RotatingKVCache(window=4)
    c.update_and_fetch(mx.zeros((1, 1, 3, 2)), mx.zeros((1, 1, 3, 2)))
    assert c.trim(2) and c.offset == 1 and c.keys.shape[2] == 1
    c.update_and_fetch(mx.ones((1, 1, 5, 2)), mx.ones((1, 1, 5, 2)))  # 6 positions: the ring wrapped
    assert not c.trim(1)
    g = KVCache()
    g.update_and_fetch(mx.zeros((1, 1, 5, 2)), mx.zeros((1, 1, 5, 2)))
    assert g.trim(3) and g.offset == 2 and g.nbytes == 2 * 2 * 2 * 4


def test_smollm2_greedy_8bit_kv_cache_matches_float(smol):
    """64 greedy tokens per prompt: the 8-bit cache gives exactly the float cache's tokens."""
    from mlxllm import stream_generate

    model, tok = smol
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "List three prime numbers and explain why they are prime."]
    for prompt in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        runs = [[r.token for r in stream_generate(model, tok, text, 64, kv_bits=bits)] for bits in (None, 8)]
        assert runs[0] == runs[1], prompt
