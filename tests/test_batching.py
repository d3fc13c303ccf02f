"""Continuous batching: batched caches for every cache kind, batch invariance on tiny float32 models
of each family, the engine's scheduling, and the prefix cache (trie, trimming, snapshots, files)."""

from __future__ import annotations

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import QueueFull, Request, SamplingParams
from mlxllm.engine.prefix_cache import PrefixCache
from mlxllm.engine.stream import stream_generate
from mlxllm.errors import UserError
from mlxllm.model.cache import KVCache, KVSettings, QuantizedKVCache, RotatingKVCache
from mlxllm.model.cache.batch import BatchChunkedCache, BatchKVCache, BatchRingCache, BatchRowsCache, batch_cache
from mlxllm.model.cache.recurrent import BatchRecurrentCache
from mlxllm.model.cache.snapshot import load_caches, save_caches
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model
from test_parity_mlx_lm import FAMILIES

QUANTIZED = KVSettings(8, 32, 0, 4)  # a small float prefix, so decoding crosses into packed storage


def _random_model(config: dict, vocab: int | None = None) -> Model:
    mx.random.seed(0)
    config = config.get("text_config", config)  # a multimodal wrapper's text model
    vocab = vocab or config["vocab_size"]
    per_layer = {"vocab_size_per_layer_input": vocab} if "vocab_size_per_layer_input" in config else {}  # Gemma 4
    model = Model(ModelConfig.from_hf(dict(config, vocab_size=vocab, **per_layer)))
    weights = [(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model


CASES = [pytest.param(f, None, id=f) for f in FAMILIES] + [
    pytest.param(f, QUANTIZED, id=f"{f}-kv8") for f in ("llama", "gemma3_text", "gemma4")]


@pytest.mark.parametrize("family, kv", CASES)
def test_batched_decode_logits_equal_each_row_alone(family, kv):
    """Rows of different lengths decode together; two join late and one leaves midway; at every step
    each row's logits equal those of the same row decoded alone, and the row handed back out of the
    batch holds the same positions as the cache decoded alone."""
    model = _random_model(FAMILIES[family])
    lengths = [3, 11, 7, 1]
    prompts = [mx.random.randint(0, 97, (n,), key=mx.random.key(n)).tolist() for n in lengths]
    alone, rows = [], []
    for p in prompts:
        caches = [model.make_cache(kv), model.make_cache(kv)]
        for c in caches:
            logits = model(mx.array([p]), c)[:, -1]
        alone.append(caches[0])
        rows.append(caches[1])
    next_ids = [int(mx.argmax(model(mx.array([p]))[0, -1])) for p in prompts]
    batch = [batch_cache(c) for c in rows[0]]
    kinds = {type(b) for b in batch}
    assert kinds <= {BatchKVCache, BatchRingCache, BatchRowsCache, BatchChunkedCache, BatchRecurrentCache}
    if kv is not None:
        assert BatchRowsCache in kinds
    for layer, b in enumerate(batch):
        b.extend([r[layer] for r in rows[:2]])
    active, worst = [0, 1], 0.0
    tol = 1e-3 if kv is not None else 1e-4  # a quantized cache rounds keys that differ in the last bits
    for step in range(14):
        if step == 4:
            for layer, b in enumerate(batch):
                b.extend([r[layer] for r in rows[2:]])
            active += [2, 3]
        if step == 9:
            keep = [i for i, a in enumerate(active) if a != 1]
            for b in batch:
                b.filter(keep)
            active = [active[i] for i in keep]
        batched = model(mx.array([next_ids[a] for a in active])[:, None], batch)[:, -1]
        for i, a in enumerate(active):
            single = model(mx.array([[next_ids[a]]]), alone[a])[0, -1]
            worst = max(worst, mx.abs(batched[i] - single).max().item())
            assert mx.argmax(batched[i]).item() == mx.argmax(single).item()
        for i, a in enumerate(active):
            next_ids[a] = int(mx.argmax(batched[i]))
    assert worst < tol, worst
    for i, a in enumerate(active):
        out = [b.row(i) for b in batch]
        assert [c.offset for c in out] == [c.offset for c in alone[a]]
        probe = mx.array([[5]])
        assert mx.allclose(model(probe, out), model(probe, alone[a]), atol=tol).item()


def test_finished_rows_release_their_memory():
    model = _random_model(FAMILIES["llama"])
    rows = []
    for n in (300, 40, 40):
        c = model.make_cache()
        model(mx.array([list(range(n))]) % 97, c)
        rows.append(c)
    batch = [batch_cache(c) for c in rows[0]]
    for layer, b in enumerate(batch):
        b.extend([r[layer] for r in rows])
    full = sum(b.nbytes for b in batch)
    for b in batch:
        b.filter([1, 2])  # the long row leaves: the storage narrows to the short rows
    mx.eval([b.state for b in batch])
    assert sum(b.nbytes for b in batch) == full * (2 * 256) // (3 * 512)  # 2 of 3 rows, 256 of 512 columns
    for b in batch:
        b.filter([])
    assert sum(b.nbytes for b in batch) == 0


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from mlxllm.tokenize import Tokenizer

    return Tokenizer.from_gguf(smollm2_path)


def _run(engine: BatchEngine, requests: list[Request], late: list[Request] = (), join_at: int = 3) -> dict:
    events: dict[str, list] = {}
    for r in requests:
        engine.submit(r, lambda e: events.setdefault(e.request_id, []).append(e))
    steps = 0
    while not engine.idle:
        engine.step()
        steps += 1
        if steps == join_at:
            for r in late:
                engine.submit(r, lambda e: events.setdefault(e.request_id, []).append(e))
    return events


def _tokens(events: list) -> list[int]:
    return [t for e in events for t in e.tokens]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe", "deepseek_v3", "qwen3_next", "gemma4"])
def test_engine_output_alone_equals_output_in_a_mixed_batch(family, tokenizer):
    """Greedy and seeded-sampled requests of mixed prompt lengths, some arriving while others run,
    some with logprobs and penalties: every one produces the tokens it produces alone."""
    model = _random_model(FAMILIES[family], vocab=tokenizer.vocab_size)
    prompts = [tokenizer.encode(t) for t in ("Hello there", "A much longer prompt about the sea and the sky",
                                             "1 2 3", "x", "Tell me")]
    params = [SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=9, temp=0.9, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=7, temp=1.0, top_k=20, seed=11, presence_penalty=0.5, ignore_eos=True),
              SamplingParams(max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.2, ignore_eos=True)]
    requests = [Request(p, s) for p, s in zip(prompts, params)]
    together = _run(BatchEngine(model, tokenizer, max_step_tokens=8), requests[:2], requests[2:])
    for r in requests:
        alone = _run(BatchEngine(model, tokenizer, max_step_tokens=64), [Request(r.prompt, r.params)])
        (events,) = alone.values()
        assert _tokens(together[r.id]) == _tokens(events), r.params
        assert len(_tokens(events)) == r.params.max_tokens
        if r.params.logprobs:
            for a, b in zip([x for e in together[r.id] for x in e.logprobs], [x for e in events for x in e.logprobs]):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_engine_matches_stream_generate_on_smollm2(smollm2, tokenizer):
    model = smollm2
    questions = ["The capital of France is", "Write a poem about the sea.", "1, 2, 3, 4,"]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    reference = [[r.token for r in stream_generate(model, tokenizer, p, 12)] for p in prompts]
    requests = [Request(p, SamplingParams(max_tokens=12)) for p in prompts]
    events = _run(BatchEngine(model, tokenizer, max_step_tokens=16), requests[:1], requests[1:], join_at=2)
    for r, want in zip(requests, reference):
        assert _tokens(events[r.id]) == want
        assert events[r.id][-1].finish_reason in ("stop", "length")
        assert "".join(e.text for e in events[r.id]) == tokenizer.decode([t for t in want if t not in tokenizer.eos_token_ids])


def test_step_budget_interleaves_a_long_prompt_with_running_streams(tokenizer):
    """With a budget of 16 tokens a step, a 200-token prompt arrives over many steps while the
    running stream gets a token every step."""
    model = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    engine = BatchEngine(model, tokenizer, max_step_tokens=16)
    seen: list = []
    engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True)), seen.append)
    engine.step()
    long = Request(list(range(100, 300)), SamplingParams(max_tokens=2, ignore_eos=True))
    long_events: list = []
    engine.submit(long, long_events.append)
    steps_to_first = 0
    while not long_events:
        before = len(seen)
        engine.step()
        steps_to_first += 1
        assert len(seen) == before + 1  # the running stream never stalls
    assert steps_to_first >= 200 // 16


def test_prompt_chunk_takes_its_share_of_a_decode_step_in_whole_row_blocks(tokenizer):
    """With streams running, a step's prompt chunk is worth ``prefill_share`` of a decode step (here a
    decode step is measured at 100 prompt tokens' time) per request waiting for its first token, cut
    so rows + chunk fill 16-row blocks; share 0 leaves only --max-step-tokens; no streams: the whole
    step budget."""
    model = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    pacing = BatchEngine(model, tokenizer, max_step_tokens=512).pacing
    assert pacing.prompt_tokens(0, 0) == 512
    pacing.decode_s, pacing.token_s = 0.2, 0.002
    assert pacing.prompt_tokens(4, 1) == 76  # 0.8 x 100 = 80 tokens; 4 rows + 76 = 80 = 5 blocks
    assert pacing.prompt_tokens(4, 3) == 236  # three waiting: 240 -> 4 + 236 = 240
    pacing.prefill_share = 1.5
    assert pacing.prompt_tokens(4, 1) == 140  # 150 -> 4 + 140 = 144
    pacing.prefill_share = 0.1
    assert pacing.prompt_tokens(4, 1) == 16  # 10 tokens: below the floor, so no cut
    pacing.prefill_share = 0
    assert pacing.prompt_tokens(4, 1) == 508
    with pytest.raises(UserError):
        BatchEngine(model, tokenizer, prefill_share=-1)


def test_cancel_and_queue_limits(tokenizer):
    model = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    engine = BatchEngine(model, tokenizer, max_batch=2, max_queue=2)
    got: dict[str, list] = {}
    reqs = [Request([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True)) for _ in range(4)]
    for i, r in enumerate(reqs):
        engine.submit(r, lambda e: got.setdefault(e.request_id, []).append(e))
        if i == 1:
            engine.step()  # the first two are admitted (max_batch); the next two wait
    with pytest.raises(QueueFull):
        engine.submit(Request([1], SamplingParams(max_tokens=1)), lambda e: None)
    for _ in range(2):
        engine.step()
    assert engine.running == 2 and engine.queued == 2
    engine.cancel(reqs[0].id)
    engine.cancel(reqs[3].id)  # still waiting
    engine.step()
    assert got[reqs[0].id][-1].finish_reason == "cancelled"
    assert got[reqs[3].id][-1].finish_reason == "cancelled" and not _tokens(got[reqs[3].id])
    while not engine.idle:
        engine.step()
    assert [len(_tokens(got[r.id])) for r in reqs[1:3]] == [50, 50]
    assert engine.kv_cache_bytes == 0 and engine.reserved == 0


def test_memory_limit_makes_requests_wait_and_refuses_one_that_never_fits(tokenizer):
    from mlxllm.model.cache import kv_bytes

    model = _random_model(FAMILIES["llama"], vocab=tokenizer.vocab_size)
    one = kv_bytes(model, 4 + 60)
    engine = BatchEngine(model, tokenizer, max_memory=int(2.5 * one), max_batch=8)
    with pytest.raises(UserError, match="needs .* GB of KV cache"):
        engine.submit(Request([1, 2, 3, 4], SamplingParams(max_tokens=200)), lambda e: None)
    got: dict[str, list] = {}
    reqs = [Request([1, 2, 3, 4], SamplingParams(max_tokens=60, ignore_eos=True)) for _ in range(5)]
    for r in reqs:
        engine.submit(r, lambda e: got.setdefault(e.request_id, []).append(e))
    most = 0
    while not engine.idle:
        engine.step()
        most = max(most, engine.running + engine.prefilling)
        assert engine.reserved <= 2.5 * one
    assert most == 2
    assert all(len(_tokens(got[r.id])) == 60 for r in reqs)


# -- the prefix cache ------------------------------------------------------------------------------

def _filled(model: Model, tokens: list[int], kv: KVSettings | None = None) -> list:
    cache = model.make_cache(kv)
    model(mx.array([tokens]), cache)
    mx.eval([c.state for c in cache])
    return cache


def test_prefix_cache_reuses_the_longest_prefix_and_trims_longer_entries():
    model = _random_model(FAMILIES["llama"])
    pc = PrefixCache(1 << 30)
    assert pc.lookup([1, 2, 3]) == (None, 0)
    pc.insert([1, 2, 3, 4, 5, 6], _filled(model, [1, 2, 3, 4, 5, 6]))
    pc.insert([1, 2, 9], _filled(model, [1, 2, 9]))
    caches, n = pc.lookup([1, 2, 3, 4, 7, 8])  # shares 4 tokens with the first entry: trimmed copy
    assert n == 4 and caches[0].offset == 4
    caches, n = pc.lookup([1, 2, 9, 9])
    assert n == 3
    caches, n = pc.lookup([1, 2, 3, 4, 5, 6])  # the whole prompt cached: all but the last token
    assert n == 5
    assert pc.lookup([7, 7]) == (None, 0)
    # the copy handed out is independent: decoding into it leaves the entry as it was
    model(mx.array([[42]]), caches)
    again, n = pc.lookup([1, 2, 3, 4, 5, 6])
    assert n == 5 and again[0].offset == 5
    probe = mx.array([[6]])
    assert mx.allclose(model(probe, again), model(probe, _filled(model, [1, 2, 3, 4, 5])), atol=1e-5).item()


def test_prefix_cache_keeps_to_its_byte_budget_lru_first():
    model = _random_model(FAMILIES["llama"])
    one = sum(a.nbytes for c in _filled(model, [1] * 10) for a in c.state)
    pc = PrefixCache(int(2.5 * one))
    for first in (1, 2, 3):
        pc.insert([first] * 10, _filled(model, [first] * 10))
        if first == 2:
            pc.lookup([1] * 11)  # 1 becomes the most recently used
    assert len(pc) == 2 and pc.nbytes <= 2.5 * one
    assert pc.lookup([2] * 11) == (None, 0) and pc.lookup([1] * 11)[1] == 10
    assert pc.release(one) >= one and len(pc) == 1


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4", "qwen3_5"])
def test_an_untrimmable_cache_is_reused_only_from_an_exact_boundary(family, tokenizer):
    """Caches that cannot forget their last positions: Gemma-style layers with a window of 5 (Gemma 4's
    with KV-sharing layers, which hold no cache) and Qwen3.5's linear-attention states. An entry that
    would need trimming is not usable, a boundary snapshot is: the engine snapshots at message
    boundaries for such models, so a second turn resumes from the first turn's prefix with the logits
    of a cold prefill and produces what it produces uncached."""
    model = _random_model(FAMILIES[family], vocab=tokenizer.vocab_size)
    pc = PrefixCache(1 << 30)
    pc.insert(list(range(1, 21)), _filled(model, list(range(1, 21))))
    assert pc.lookup(list(range(1, 15)) + [99]) == (None, 0)  # 20 -> 14 would need trimming
    first_turn = tokenizer.encode("System: be kind. User: hi there, how are you today?")
    boundary = len(first_turn)
    second = first_turn + tokenizer.encode(" Assistant: fine. User: and now?")
    engine = BatchEngine(model, tokenizer, prefix_cache=pc, max_step_tokens=64)
    assert not engine.trims
    _run(engine, [Request(first_turn + [7, 8], SamplingParams(max_tokens=3, ignore_eos=True), (boundary,))])
    caches, n = pc.lookup(second)
    assert n == boundary
    warm = model(mx.array([second[n:]]), caches)
    cold = model(mx.array([second]))[:, n:]
    assert mx.allclose(warm, cold, atol=1e-4).item(), float(mx.abs(warm - cold).max())
    r = Request(second, SamplingParams(max_tokens=6, ignore_eos=True), (boundary,))
    events = _run(engine, [r])[r.id]
    assert events[0].cached_tokens == boundary
    plain = _run(BatchEngine(model, tokenizer), [Request(second, r.params)])
    assert _tokens(events) == _tokens(next(iter(plain.values())))


@pytest.mark.parametrize("kv", [None, QUANTIZED], ids=["float", "quantized"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "deepseek_v2", "gemma4"])
def test_cache_files_round_trip_and_damaged_files_are_refused(family, kv, tmp_path):
    if kv is not None and family == "deepseek_v2":
        pytest.skip("latent attention has no quantized cache")
    model = _random_model(FAMILIES[family])
    tokens = list(range(3, 23))
    cache = [c.copy() for c in _filled(model, tokens, kv)]
    path = tmp_path / "entry.safetensors"
    save_caches(path, cache, {"tokens": "x"})
    loaded, meta = load_caches(path)
    assert meta["tokens"] == "x" and [type(c) for c in loaded] == [type(c) for c in cache]
    probe = mx.array([[4]])
    assert mx.allclose(model(probe, loaded), model(probe, [c.copy() for c in cache]), atol=1e-5).item()
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], (10**9).to_bytes(8, "little") + data[8:], b"not a safetensors file"):
        path.write_bytes(damaged)
        with pytest.raises(Exception):
            load_caches(path)
    cache[1].offset += 1  # arrays that disagree with the offset the file states
    save_caches(path, cache, {})
    with pytest.raises(ValueError, match="positions"):
        load_caches(path)


def test_prefix_cache_directory_survives_a_restart_and_skips_damaged_files(tmp_path, caplog):
    model = _random_model(FAMILIES["llama"])
    pc = PrefixCache(1 << 30, tmp_path, model_key="m1")
    pc.insert([1, 2, 3, 4], [c.copy() for c in _filled(model, [1, 2, 3, 4])])
    pc.insert([5, 6, 7], [c.copy() for c in _filled(model, [5, 6, 7])])
    files = sorted(tmp_path.glob("prefix-*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:100])
    (tmp_path / "prefix-junk.safetensors").write_bytes(b"\x00" * 50)
    with caplog.at_level("WARNING"):
        again = PrefixCache(1 << 30, tmp_path, model_key="m1")
    assert len(again) == 1 and "ignoring" in caplog.text
    other = PrefixCache(1 << 30, tmp_path, model_key="another model")
    assert len(other) == 0
    survivor = [t for t in ([1, 2, 3, 4], [5, 6, 7]) if again.lookup(t + [0])[1]]
    assert len(survivor) == 1
