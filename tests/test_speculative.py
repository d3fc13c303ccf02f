"""Speculative decoding: greedy output equal to the target's own, the rejection rule's output
distribution equal to the target's (chi-square tests, on the rule alone and end to end on a tiny
model), cache rollback, and the API/CLI surface."""

import json
import math

import numpy as np
import pytest

import mlx.core as mx

import mlxllm
from mlxllm.errors import UserError
from mlxllm.engine.steps import generate_step
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model
from mlxllm.engine.sample import make_distribution, make_repetition_penalty
from mlxllm.engine.speculative import accept, speculative_generate_step
from mlxllm.train.students import prune_layers
from mlxllm.model.cache import KVSettings
from test_benchmark import tiny_dir  # noqa: F401  (fixture)
from test_cli import assert_one_line_error, run


def tiny(layers=4, hidden=64, vocab=48, seed=0, **kw):
    mx.random.seed(seed)
    cfg = ModelConfig(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, **kw)
    model = Model(cfg)
    # sharper than the default init, so greedy paths have clear winners and drafts partly agree
    model.update({"model": {"embed_tokens": {"weight": model.model.embed_tokens.weight * 4}}})
    mx.eval(model.parameters())
    return model


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's statistic (Wilson-Hilferty normal approximation), cells with
    expected count under 5 pooled."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert (obs[exp == 0] == 0).all(), "a token the target gives probability 0 was emitted"
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(exp) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def pair():
    target = tiny()
    draft = prune_layers(tiny(), [0, 3])  # the target's own blocks 0 and 3: it agrees often, not always
    return target, draft


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_equals_target_alone(pair, k):
    target, draft = pair
    prompt = mx.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=mx.int32)
    alone = [t for t, _ in generate_step(prompt, target, max_tokens=30)]
    stats = {}
    out = list(speculative_generate_step(prompt, target, draft, num_draft_tokens=k, max_tokens=30, stats=stats))
    assert [t for t, _, _ in out] == alone
    assert 0 < stats["accepted"] < stats["proposed"]  # the test exercises both kept and rejected drafts
    assert sum(d for _, _, d in out) == stats["accepted"]
    # the logprobs handed out are the target's at each position
    ref = [lp for _, lp in generate_step(prompt, target, max_tokens=30)]
    assert all(mx.allclose(a, b, atol=1e-4).item() for (_, a, _), b in zip(out, ref))


def test_greedy_with_processors_quantized_cache_and_small_prefill(pair):
    """Repetition penalty sees each position's own history; the target cache quantized (rolled back
    through trim) and a prompt prefilled in chunks."""
    target, draft = pair
    prompt = mx.array(list(range(1, 20)), dtype=mx.int32)
    procs = [make_repetition_penalty(1.5, 8)]
    alone = [t for t, _ in generate_step(prompt, target, max_tokens=25, logits_processors=procs, prefill_step_size=5,
                                         prompt_cache=target.make_cache(KVSettings(8, 32, float_prefix=4)))]
    out = [t for t, _, _ in speculative_generate_step(
        prompt, target, draft, num_draft_tokens=3, max_tokens=25, logits_processors=procs, prefill_step_size=5,
        prompt_cache=target.make_cache(KVSettings(8, 32, float_prefix=4)))]
    assert out == alone


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_recurrent_target_and_draft(k):
    """Qwen3.5-style hybrids on both sides: rejected drafts are rolled back through the recurrent
    layers' kept steps, and a prompt longer than a prefill step goes through the chunked path first."""
    from test_batching import _random_model
    from test_parity_mlx_lm import FAMILIES

    target = _random_model(FAMILIES["qwen3_5"])
    draft = _random_model(dict(FAMILIES["qwen3_5"], num_hidden_layers=2))
    draft.update({"model": {"embed_tokens": {"weight": target.model.embed_tokens.weight}}})
    _assert_greedy_with_kept_and_rejected_drafts(mx.array(list(range(1, 80)), dtype=mx.int32), target, draft, k, 32)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_a_kv_sharing_target(k):
    """Gemma 4 with KV-sharing layers (and a window longer than the generation): rejected drafts are
    trimmed from the layers that hold keys and values, which the sharing layers then see as well."""
    from test_batching import _random_model
    from test_parity_mlx_lm import FAMILIES

    from mlx.utils import tree_flatten, tree_unflatten

    config = dict(FAMILIES["gemma4"], sliding_window=64)
    target, draft = _random_model(config), _random_model(config)
    draft.update(tree_unflatten([(k, v + 0.05 * mx.random.normal(v.shape, key=mx.random.key(7)))
                                 for k, v in tree_flatten(draft.parameters())]))  # agrees often, not always
    for m in (target, draft):  # sharper than random logits, so greedy paths have clear winners
        m.update({"model": {"embed_tokens": {"weight": m.model.embed_tokens.weight * 4}}})
    _assert_greedy_with_kept_and_rejected_drafts(mx.array(list(range(1, 30)), dtype=mx.int32), target, draft, k, 8)


def _assert_greedy_with_kept_and_rejected_drafts(prompt: mx.array, target, draft, k: int, prefill_step: int) -> None:
    """20 speculative tokens equal the target's own greedy ones, with drafts both kept and rejected."""
    alone = [t for t, _ in generate_step(prompt, target, max_tokens=20, prefill_step_size=prefill_step)]
    stats = {}
    out = list(speculative_generate_step(prompt, target, draft, num_draft_tokens=k, max_tokens=20,
                                         prefill_step_size=prefill_step, stats=stats))
    assert [t for t, _, _ in out] == alone
    assert 0 < stats["accepted"] < stats["proposed"]


def test_draft_with_another_vocabulary_size(pair):
    """Draft and target embedding tables padded to different sizes (same tokenizer)."""
    target, _ = pair
    for vocab in (40, 64):
        draft = tiny(layers=1, hidden=32, vocab=vocab, seed=3)
        prompt = mx.array([5, 6, 7], dtype=mx.int32)
        alone = [t for t, _ in generate_step(prompt, target, max_tokens=12)]
        assert [t for t, _, _ in speculative_generate_step(prompt, target, draft, max_tokens=12)] == alone


def _random_logprobs(rng, shape, sharp):
    x = rng.normal(size=shape) * sharp
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("filtered", [False, True])
def test_rejection_rule_reproduces_target_distribution(filtered):
    """200k rounds of the rule with k = 3: the first emitted token follows p0, and, when the first draft
    was kept, the second follows p1 (independent positions here). ``filtered``: the target's
    distribution has zeros (top-k), which must never be emitted."""
    rng = np.random.default_rng(0)
    V, k, B = 8, 3, 200_000
    target = _random_logprobs(rng, (k + 1, V), 1.0)
    draft = _random_logprobs(rng, (k, V), 1.0)
    if filtered:
        target[:, :3] = -np.inf
        target = target - np.log(np.exp(target).sum(-1, keepdims=True))
    mx.random.seed(1)
    t = mx.broadcast_to(mx.array(target, dtype=mx.float32)[None], (B, k + 1, V))
    d = mx.broadcast_to(mx.array(draft, dtype=mx.float32)[None], (B, k, V))
    drafted = mx.random.categorical(d, axis=-1)
    kept, nxt = accept(t, d, drafted, greedy=False)
    kept, nxt, drafted = np.array(kept), np.array(nxt), np.array(drafted)
    first = np.where(kept >= 1, drafted[:, 0], nxt)
    p = np.exp(target)
    assert chi_square_p(np.bincount(first, minlength=V), p[0]) > 1e-3
    rows = kept >= 1
    second = np.where(kept[rows] >= 2, drafted[rows, 1], nxt[rows])
    assert chi_square_p(np.bincount(second, minlength=V), p[1]) > 1e-3
    # acceptance of the first draft token is sum(min(p, q)) in expectation
    expected_accept = np.minimum(p[0], np.exp(draft[0])).sum()
    assert abs((kept >= 1).mean() - expected_accept) < 0.01
    # a rule that ignores the residual (redraws from p) is caught by the same test
    bad_first = np.where(kept >= 1, drafted[:, 0], np.array(mx.random.categorical(t[:, 0], axis=-1)))
    assert chi_square_p(np.bincount(bad_first, minlength=V), p[0]) < 1e-6


def test_sampled_generation_matches_target_distribution():
    """End to end with temperature and top-k: the second generated token's frequencies over 1200 runs
    against the exact marginal sum_a p(a) p(b | a) computed from the target."""
    target = tiny(layers=2, hidden=32, vocab=12, seed=5)
    draft = tiny(layers=1, hidden=32, vocab=12, seed=6)
    dist = make_distribution(temp=1.5, top_k=8)
    prompt = [1, 2, 3]
    p_first = np.exp(np.array(dist(target(mx.array([prompt]))[0, -1])))
    p_second = np.zeros(12)
    for a in range(12):
        if p_first[a] > 0:
            p_second += p_first[a] * np.exp(np.array(dist(target(mx.array([prompt + [a]]))[0, -1])))
    mx.random.seed(7)
    counts, kept = np.zeros(12, int), 0
    for _ in range(1200):
        out = list(speculative_generate_step(mx.array(prompt, dtype=mx.int32), target, draft, num_draft_tokens=2,
                                             max_tokens=2, distribution=dist))
        counts[out[1][0]] += 1
        kept += out[0][2]
    assert chi_square_p(counts, p_second) > 1e-3
    assert 0 < kept < 1200


def test_fixed_seed_reproduces(pair):
    target, draft = pair
    model_tok = _Tok()
    runs = [[r.token for r in mlxllm.stream_generate(target, model_tok, "4 5 6", 20, temp=0.8, seed=11,
                                                     draft_model=draft, num_draft_tokens=3)] for _ in range(2)]
    assert runs[0] == runs[1]


class _Tok:
    """The least a tokenizer must offer stream_generate (ids in, text out)."""

    eos_token_ids: set[int] = set()
    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [int(x) for x in text.split()]

    def detokenizer(self):
        class D:
            def add_token(self, t):
                return f" {t}"

            def finalize(self):
                return ""

        return D()


def test_stream_generate_reports_acceptance(pair):
    target, draft = pair
    tok = _Tok()
    plain = list(mlxllm.stream_generate(target, tok, "3 1 4", 24))
    spec = list(mlxllm.stream_generate(target, tok, "3 1 4", 24, draft_model=draft, num_draft_tokens=3))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    stats = {}
    list(speculative_generate_step(mx.array([3, 1, 4]), target, draft, num_draft_tokens=3, max_tokens=24, stats=stats))
    assert spec[-1].draft_acceptance == pytest.approx(stats["accepted"] / stats["proposed"])
    assert sum(r.from_draft for r in spec) == stats["accepted"]
    assert plain[-1].draft_acceptance is None and not any(r.from_draft for r in plain)


def test_bad_draft_settings(pair):
    target, draft = pair
    with pytest.raises(UserError, match="num-draft-tokens"):
        list(speculative_generate_step(mx.array([1, 2]), target, draft, num_draft_tokens=0))
    sliding = tiny(layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(UserError, match="sliding window"):
        list(speculative_generate_step(mx.array(list(range(10))), sliding, draft, max_tokens=20))
    # inside the window it runs, and equals the model alone
    alone = [t for t, _ in generate_step(mx.array([1, 2, 3]), sliding, max_tokens=10)]
    assert [t for t, _, _ in speculative_generate_step(mx.array([1, 2, 3]), sliding, draft, max_tokens=10)] == alone


def test_cli_generate_with_draft(tmp_path, smollm2_path, capsys, monkeypatch):
    """The real SmolLM2 drafting for itself: --draft-model gives the target's greedy text with every
    draft token kept; a missing draft is one clear error line."""
    base = ["generate", "-m", str(smollm2_path), "-p", "Write the numbers from one to ten.", "-n", "24", "--json"]
    code, out, _ = run(base, capsys, monkeypatch)
    plain = json.loads(out)
    code, out, err = run(base + ["--draft-model", str(smollm2_path), "--num-draft-tokens", "4"], capsys, monkeypatch)
    assert code == 0, err
    spec = json.loads(out)
    assert spec["text"] == plain["text"]
    assert spec["draft_acceptance"] == 1.0
    code, _, err = run(base + ["--draft-model", str(tmp_path / "missing")], capsys, monkeypatch)
    assert_one_line_error(code, err, "missing")


def test_cli_rejects_draft_with_another_tokenizer(smollm2_path, gemma3_path, capsys, monkeypatch):
    code, _, err = run(["generate", "-m", str(smollm2_path), "-n", "2", "--draft-model", str(gemma3_path)],
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "different tokenizer")


def test_bench_reports_speculative_decoding(tiny_dir, tmp_path):  # noqa: F811
    """bench --draft-model: the tiny model drafting for itself keeps every draft token; both speeds
    and their ratio are reported."""
    from click.testing import CliRunner

    from mlxllm.cli import cli

    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["bench", "-m", str(tiny_dir), "-p", "16", "-g", "8", "-n", "2", "--sweep", "",
                                   "--draft-model", str(tiny_dir), "--num-draft-tokens", "2", "--json", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["speculative"]["rows"]
    assert len(rows) == 1 and rows[0]["acceptance"] == 1.0 and rows[0]["num_draft_tokens"] == 2
    assert rows[0]["decode_tps"] > 0 and rows[0]["speculative_decode_tps"] > 0
    assert rows[0]["speedup"] == pytest.approx(rows[0]["speculative_decode_tps"] / rows[0]["decode_tps"])
    assert "speculative decoding" in res.output
