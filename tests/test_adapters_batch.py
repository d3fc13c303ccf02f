"""Adapters per request: several LoRA adapters loaded side by side on one base model, rows with
different adapters (or none) in one batch, each row's logits equal to a model with only its adapter
applied the ordinary way; and the server's ``--adapter NAME=PATH`` with ``model: "<name>:NAME"``."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import ServerProcess
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.prefix_cache import PrefixCache
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.errors import UserError
from mlxllm.model.adapters import (LoRALinear, adapter_config, apply_adapters, load_adapter_set, load_adapters,
                                   save_adapters, target_keys)
from test_batching import _random_model, _run, _tokens, tokenizer  # noqa: F401  (the fixture)
from test_parity_mlx_lm import FAMILIES

SHAPES = {"a": (["q", "v", "down"], 4, 2.0), "b": (["q", "o", "up"], 8, 0.5)}  # targets, rank, scale


def _write_adapter(folder, vocab: int, targets: list[str], rank: int, scale: float, seed: int):
    model = _random_model(FAMILIES["llama"], vocab=vocab)
    layers = len(model.layers)
    keys = target_keys(model, targets, layers)
    apply_adapters(model, layers, keys, rank, scale)
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    save_adapters(model, folder, adapter_config(layers, keys, rank, scale, 0.0, False))
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    return {name: _write_adapter(root / name, tokenizer.vocab_size, *spec, seed=i)
            for i, (name, spec) in enumerate(SHAPES.items())}


def test_rows_with_different_adapters_match_each_adapter_alone(tokenizer, adapter_dirs):
    prompts = [tokenizer.encode(t) for t in ("Hello there", "A longer prompt about the sea", "1 2 3", "Tell me")]
    choice = [1, 0, 2, 1]  # adapter per request (0: the base model)
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0)
    alone = []
    for prompt, k in zip(prompts, choice):
        model = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
        if k:
            load_adapters(model, adapter_dirs[list(SHAPES)[k - 1]])
        request = Request(prompt, params)
        alone.append(_run(BatchEngine(model, tokenizer), [request])[request.id])
    base = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    before = dict(tree_flatten(base.parameters()))
    served = load_adapter_set(base, [(n, adapter_dirs[n]) for n in SHAPES])
    assert served.names == list(SHAPES) and served.index("b") == 2
    requests = [Request(p, params, adapter=k) for p, k in zip(prompts, choice)]
    together = _run(BatchEngine(base, tokenizer, max_step_tokens=8, adapters=served), requests[:2], requests[2:], join_at=2)
    for r, want in zip(requests, alone):
        assert _tokens(together[r.id]) == _tokens(want)
        got = [x.logprob for e in together[r.id] for x in e.logprobs]
        assert got == pytest.approx([x.logprob for e in want for x in e.logprobs], abs=1e-4)
    assert all(mx.array_equal(before[k], v) for k, v in tree_flatten(base.parameters()) if k in before)
    plain = Request(prompts[0], params)  # the adapters do change the answer: prompt 0 on the base model
    plain_lp = [x.logprob for e in _run(BatchEngine(base, tokenizer), [plain])[plain.id] for x in e.logprobs]
    assert plain_lp != pytest.approx([x.logprob for e in alone[0] for x in e.logprobs], abs=1e-3)


def test_adapter_rows_skip_the_prefix_cache_and_bad_adapters(tokenizer, adapter_dirs):
    base = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    served = load_adapter_set(base, [("a", adapter_dirs["a"])])
    engine = BatchEngine(base, tokenizer, prefix_cache=PrefixCache(1 << 30), adapters=served)
    prompt = tokenizer.encode("The same prompt, asked twice over")
    runs = [_run(engine, [Request(prompt, SamplingParams(max_tokens=2), adapter=k)]) for k in (0, 0, 1, 1)]
    cached = [next(iter(r.values()))[-1].cached_tokens for r in runs]
    assert cached[1] > 0 and cached[2:] == [0, 0]  # the base model's KV never serves an adapter's row
    with pytest.raises(UserError, match="not loaded"):
        engine.submit(Request(prompt, SamplingParams(), adapter=2), lambda e: None)
    with pytest.raises(UserError, match="distinct"):
        load_adapter_set(_random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size),
                         [("a", adapter_dirs["a"]), ("a", adapter_dirs["b"])])


def test_server_serves_adapters_by_model_name(tiny_chat_dir, tmp_path):
    openai = pytest.importorskip("openai")
    from mlxllm.formats.loader import load

    model, _ = load(str(tiny_chat_dir))
    layers = len(model.layers)
    keys = target_keys(model, ["q", "v"], layers)
    apply_adapters(model, layers, keys, 4, 4.0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1))
    save_adapters(model, tmp_path / "style", adapter_config(layers, keys, 4, 4.0, 0.0, False))
    server = ServerProcess("-m", str(tiny_chat_dir), "--model-name", "tiny", "--adapter", f"style={tmp_path / 'style'}")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny:style"]
        ask = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        base = client.chat.completions.create(model="tiny", **ask).choices[0].message.content
        styled = client.chat.completions.create(model="tiny:style", **ask).choices[0].message.content
        assert styled != base
        assert client.chat.completions.create(model="tiny", **ask).choices[0].message.content == base
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tiny:nope", **ask)
    finally:
        server.stop()
