"""Speculative decoding inside the batch: per-row drafts, one verifying pass for all rows, per-row
acceptance and roll-back. Greedy outputs equal the target's own, alone or batched, whatever the
draft proposes; a draft equal to the target has every token accepted."""

from __future__ import annotations

import pytest

from mlxllm.engine.batch_draft import BatchDraft
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.errors import UserError
from test_batching import _random_model, _run, _tokens, tokenizer  # noqa: F401  (the fixture)
from test_parity_mlx_lm import FAMILIES

PROMPTS = ("Hello there", "A much longer prompt about the sea and the sky", "1 2 3", "x")


def _requests(tok, stop_early: bool = False) -> list[Request]:
    limits = (14, 9, 17, 6)
    return [Request(tok.encode(p), SamplingParams(max_tokens=n, ignore_eos=not stop_early)) for p, n in zip(PROMPTS, limits)]


@pytest.mark.parametrize("family", ["llama", "deepseek_v3", "qwen3_5"])
@pytest.mark.parametrize("draft_kind", ["other", "same"])
def test_batched_drafts_keep_the_targets_greedy_output(family, draft_kind, tokenizer):
    target = _random_model(FAMILIES[family], vocab=tokenizer.vocab_size)
    plain = _requests(tokenizer)
    want = _run(BatchEngine(target, tokenizer, max_step_tokens=8), plain[:2], plain[2:], join_at=3)
    config = dict(FAMILIES["llama"], num_hidden_layers=2) if draft_kind == "other" else FAMILIES[family]
    draft_model = _random_model(config, vocab=tokenizer.vocab_size)
    if draft_kind == "other":  # a different draft: its own weights
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        draft_model.update(tree_unflatten([(k, v + 0.3 * mx.random.normal(v.shape, key=mx.random.key(7)))
                                           for k, v in tree_flatten(draft_model.parameters())]))
    draft = BatchDraft(target, draft_model, num_draft_tokens=3)
    drafted = _requests(tokenizer)
    got = _run(BatchEngine(target, tokenizer, max_step_tokens=8, draft=draft), drafted[:2], drafted[2:], join_at=3)
    for a, b in zip(plain, drafted):
        assert _tokens(got[b.id]) == _tokens(want[a.id])
        assert got[b.id][-1].finish_reason == "length" and got[b.id][-1].generation_tokens == a.params.max_tokens
    assert draft.proposed > 0
    if draft_kind == "same":
        assert draft.accepted == draft.proposed
    else:
        assert draft.accepted < draft.proposed


def test_draft_rounds_skip_rows_they_cannot_serve_and_bad_drafts(tokenizer):
    target = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    draft = BatchDraft(target, target, num_draft_tokens=2)
    engine = BatchEngine(target, tokenizer, draft=draft)
    sampled = Request(tokenizer.encode("Hi"), SamplingParams(max_tokens=6, temp=1.0, seed=3, ignore_eos=True))
    alone = _run(BatchEngine(target, tokenizer), [Request(sampled.prompt, sampled.params)])
    together = _run(engine, [sampled])
    assert _tokens(next(iter(together.values()))) == _tokens(next(iter(alone.values())))
    assert draft.proposed == 0  # a sampled row: plain steps only, the draft following along
    with pytest.raises(UserError, match="at least 1"):
        BatchDraft(target, target, num_draft_tokens=0)
    with pytest.raises(UserError, match="sliding"):
        BatchDraft(_random_model(FAMILIES["gemma3_text"], vocab=tokenizer.vocab_size), target)


def test_server_with_a_draft_model_answers_as_without(tiny_chat_dir):
    """``serve --draft-model``: four concurrent greedy requests get the same answers as from a server
    without the draft (the tiny model drafting for itself: every round keeps all its tokens)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    openai = pytest.importorskip("openai")
    from conftest import ServerProcess

    asks = [[{"role": "user", "content": f"Question {i}: say something."}] for i in range(4)]
    answers = []
    for extra in ((), ("--draft-model", str(tiny_chat_dir), "--num-draft-tokens", "3")):
        server = ServerProcess("-m", str(tiny_chat_dir), *extra)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            with ThreadPoolExecutor(4) as pool:
                answers.append(list(pool.map(lambda m: client.chat.completions.create(
                    model="tiny", messages=m, max_tokens=24, temperature=0).choices[0].message.content, asks)))
            metrics = httpx.get(server.url + "/metrics").text
            proposed = float(re.search(r"^mlxllm_draft_tokens_proposed (\S+)$", metrics, re.M).group(1))
            accepted = float(re.search(r"^mlxllm_draft_tokens_accepted (\S+)$", metrics, re.M).group(1))
            if extra:
                assert proposed > 0 and accepted == proposed  # the rounds ran, and kept every token
            else:
                assert proposed == accepted == 0
        finally:
            server.stop()
    assert answers[0] == answers[1] and all(answers[0])
