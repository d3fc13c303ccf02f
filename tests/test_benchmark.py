"""`mlxllm bench`: the byte and FLOP accounting against hand-computed sizes, the CLI on a tiny random
model, the peers' notes, and the GGUF -> directory conversion mlx-lm is compared on."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from click.testing import CliRunner

from mlxllm.tools import benchmark as bm
from mlxllm.tools import peers
from mlxllm.cli import cli
from mlxllm.formats.save import save_model
from mlxllm.formats.loader import describe_model, load_model
from mlxllm.tokenize import Tokenizer
from mlxllm.model.cache import KVSettings

from test_cli import assert_one_line_error, run
from test_load_hf import CONFIG, random_model

H, L, I, HEADS, KV, D, V = 64, 2, 128, 4, 2, 16, 96  # CONFIG's shapes


def _layer_floats() -> int:
    attn = H * HEADS * D + 2 * H * KV * D + HEADS * D * H
    return attn + 3 * H * I + 2 * H  # q k v o, gate up down, two norms


def test_dense_untied_bytes_hand_computed():
    model = random_model(CONFIG, mx.float32)
    expected = L * _layer_floats() + H + V * H + H  # layers, final norm, lm_head, one embedding row
    assert bm.decode_weight_bytes(model) == 4 * expected
    # batch 3 reads three embedding rows; everything else once
    assert bm.decode_weight_bytes(model, batch=3) == 4 * (expected + 2 * H)


def test_dense_tied_bytes_hand_computed():
    model = random_model({**CONFIG, "tie_word_embeddings": True}, mx.bfloat16)
    expected = L * _layer_floats() + H + V * H  # the tied table is read whole by the head
    assert bm.decode_weight_bytes(model) == 2 * expected


def test_quantized_bytes_hand_computed():
    model = random_model(CONFIG, mx.float32)
    nn.quantize(model, group_size=32, bits=4)

    def q(rows: int, cols: int) -> int:  # packed 4-bit weight + float32 scale and bias per 32 columns
        return rows * cols // 2 + 2 * 4 * rows * cols // 32

    layer = q(HEADS * D, H) + 2 * q(KV * D, H) + q(H, HEADS * D) + 2 * q(I, H) + q(H, I) + 4 * 2 * H
    expected = L * layer + 4 * H + q(V, H) + q(V, H) // V  # final norm, lm_head, one embedding row
    assert bm.decode_weight_bytes(model) == expected


class _Experts(nn.Module):
    """A stack of expert matrices, as a MoE layer holds them: ``[experts, out, in]``."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = mx.zeros((num_experts, 32, 64))


def test_moe_reads_only_active_experts():
    block = _Experts(8, 2)
    block.router = nn.Linear(64, 8, bias=False)
    stack, router = 8 * 32 * 64 * 4, 64 * 8 * 4
    assert bm.decode_weight_bytes(block) == router + stack * 2 // 8
    # two tokens touch 1 - (6/8)^2 = 7/16 of the experts on average
    assert bm.decode_weight_bytes(block, batch=2) == router + stack * 7 // 16
    assert bm._macs_per_token(block) == 2 * 32 * 64  # top_k experts' matmuls per token


GEMMA = dict(
    model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, vocab_size=96, rms_norm_eps=1e-6, rope_theta=1e6,
    max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=32,
)  # fmt: skip


@pytest.mark.parametrize("context", [5, 8, 30])
def test_kv_bytes_match_the_cache(context):
    model = random_model(GEMMA, mx.float32)
    cache = model.make_cache()
    model.hidden(mx.zeros((2, context), mx.int32), cache)
    mx.eval([c.state for c in cache])
    # hand count: 5 sliding layers hold min(context, 8) positions, 1 global layer holds all
    per_position = 2 * 1 * 32 * 4
    assert bm.kv_bytes(model, context, batch=2) == 2 * per_position * (5 * min(context, 8) + context)
    assert bm.kv_bytes(model, context, batch=2) == sum(c.nbytes for c in cache)


@pytest.mark.parametrize("context", [4, 30])
def test_kv_bytes_of_gemma4_count_only_the_layers_that_hold_keys_and_values(context):
    """Sliding layers: 16-wide heads, 2 K/V heads, a window of 5; full layers 32-wide with one K/V head
    (keys double as values, stored twice as the cache holds them); the last two layers hold nothing."""
    from test_parity_mlx_lm import FAMILIES

    config = dict(FAMILIES["gemma4-moe"]["text_config"], num_kv_shared_layers=2)
    model = random_model(config, mx.float32)
    cache = model.make_cache()
    assert len(cache) == 4
    model.hidden(mx.zeros((1, context), mx.int32), cache)
    mx.eval([c.state for c in cache])
    sliding, full = 2 * 2 * 16 * 4, 2 * 1 * 32 * 4  # bytes per position
    assert bm.kv_bytes(model, context) == 3 * sliding * min(context, 5) + full * context  # layers 0, 1, 3 and 2
    assert bm.kv_bytes(model, context) == sum(c.nbytes for c in cache)


def test_prefill_flops_hand_computed():
    model = random_model(CONFIG, mx.float32)
    matmul_macs = H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 3 * H * I
    tokens = 10
    attn_macs = L * 2 * HEADS * D * (tokens * (tokens + 1) // 2)
    assert bm.prefill_flops(model, tokens) == 2 * (L * matmul_macs * tokens + V * H + attn_macs)
    assert bm._keys_seen(10, 4) == 1 + 2 + 3 + 4 * 7


READ_METHODS = {"reduction", "matrix-vector", "vector-matrix", "vector-matrix, transposed", "GEMV chain x @ W.T",
                "GEMV chain W @ x"}


def test_read_peak_is_the_best_of_every_method():
    peaks = bm.measure_peaks(mbytes=32)  # small: this checks the structure, not the figures
    by_method = peaks["read_gbps_by_method"]
    threads = min(os.cpu_count() or 1, 8)
    expected = READ_METHODS | ({f"reduction, {threads} threads"} if mx.default_device() == mx.cpu and threads > 1
                               else set())
    assert set(by_method) == expected
    assert all(v > 0 for v in by_method.values())
    assert peaks["read_gbps"] == max(by_method.values()) == by_method[peaks["read_method"]]
    assert peaks["copy_gbps"] > 0 and peaks["matmul_gflops"] > 0 and peaks["buffer_mb"] == 32


def test_gemv_chain_reads_views_of_one_buffer():
    flat = mx.random.uniform(-0.1, 0.1, shape=(3 * 96 * 32 + 5,))
    blocks = bm.gemv_blocks(flat, (96, 32))
    assert [w.shape for w in blocks] == [(96, 32), (32, 96), (96, 32)]
    np.testing.assert_array_equal(np.array(blocks[1]).ravel(), np.array(flat[96 * 32 : 2 * 96 * 32]))
    x = mx.ones((2, 32))
    want = np.ones((2, 32), np.float32)
    for w in blocks:
        want = want @ np.array(w).T
    for orientation in ("x@W.T", "W@x"):
        np.testing.assert_allclose(np.array(bm.gemv_chain(blocks, x, orientation)), want, rtol=1e-4, atol=1e-6)


def _write_tokenizer(path):
    tk = pytest.importorskip("tokenizers")
    from mlxllm.tokenize import bpe

    vocab = {c: i for i, c in enumerate(bpe.BYTE_CHARS)}
    ref = tk.Tokenizer(tk.models.BPE(vocab, []))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tk.decoders.ByteLevel()
    ref.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random llama with a byte-level tokenizer (vocab 256 + padding), written by ``save_model``."""
    model = random_model({**CONFIG, "vocab_size": 260, "max_position_embeddings": 200, "head_dim": 32}, mx.float32)
    path = save_model(model, tmp_path_factory.mktemp("bench") / "tiny")
    _write_tokenizer(path)
    return path


def _bench(args):
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def test_bench_cli_json_has_every_field(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    res = _bench(["-m", str(tiny_dir), "-p", "16,40", "-g", "6", "-n", "2", "--sweep", "32,64", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in ("backend", "mlx", "processor", "cores", "memory_gb", "platform", "peaks"):
        assert machine[key] is not None
    for key in ("read_gbps", "copy_gbps", "matmul_gflops"):
        assert machine["peaks"][key] > 0
    assert report["model"]["weights"] in ("float32", "native", "quantized")
    assert [r["prompt_tokens"] for r in report["results"]] == [16, 40]
    for r in report["results"]:
        assert len(r["trials"]) == 2 and all(t["generated_tokens"] == 6 for t in r["trials"])
        for key in ("ttft_s", "prefill_tps", "decode_tps", "peak_memory_gb"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        assert r["weight_bytes_per_step"] == report["model"]["decode_weight_bytes"]
        assert r["decode_gbps"] > 0 and r["decode_pct_of_peak"] > 0 and r["prefill_gflops"] > 0
    assert [p["context"] for p in report["sweep"]] == [32, 64]
    assert "decode tok/s" in res.output and "% read peak" in res.output


def test_bench_plot_writes_a_png(tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    res = _bench(["-m", str(tiny_dir), "-p", "8", "-g", "3", "-n", "1", "--sweep", "16,32,64", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_plot_without_matplotlib_is_one_line(tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, _, err = run(["bench", "-m", str(tiny_dir), "--plot", "x.png"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--plot needs matplotlib")


@pytest.mark.parametrize("args, message", [
    (["-p", "12,x"], "comma-separated integers"),
    (["-p", "190"], "exceed the model's context of 200"),
    (["-p", "0"], "must be positive"),
    (["--compare", "vllm"], "unknown peer 'vllm'"),
    (["-p", "8", "--sweep", "1k"], "exceed the model's context"),
])  # fmt: skip
def test_bench_bad_input_is_one_line(tiny_dir, args, message, capsys, monkeypatch):
    code, _, err = run(["bench", "-m", str(tiny_dir), "-g", "16", "-n", "1", *args], capsys, monkeypatch)
    assert_one_line_error(code, err, message)


def test_compare_without_a_source_checkout_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peers, "TRIAL_SCRIPT", tmp_path / "bench" / "peer_trial.py")
    code, _, err = run(["bench", "-m", str(tiny_dir), "--compare", "mlx-lm"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--compare runs bench/peer_trial.py from a source checkout")


def test_compare_notes_missing_and_unsuitable_peers(tiny_dir, monkeypatch):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name == "mlx_lm" else real(name))
    res = _bench(["-m", str(tiny_dir), "-p", "8", "-g", "3", "-n", "1", "--compare", "mlx-lm,llama.cpp"])
    assert res.exit_code == 0, res.output
    assert "mlx-lm skipped: mlx-lm is not installed" in res.output
    assert "llama.cpp skipped" in res.output  # not installed, or a directory rather than a GGUF file


def test_compare_runs_mlx_lm_side_by_side(tiny_dir):
    pytest.importorskip("mlx_lm")
    report = peers.compare(tiny_dir, "hf", ["mlx-lm"], [8], gen_tokens=3, trials=1)
    row = report["rows"][0]
    assert set(row["runtimes"]) == {"mlxllm", "mlx-lm"}
    for r in row["runtimes"].values():
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and len(r["trials"]) == 1
    assert row["ratios"]["mlx-lm"]["decode_tps"] > 0


@pytest.mark.parametrize("which", ["smollm2_path", "gemma3_path"])
def test_gguf_conversion_is_what_mlx_lm_computes(which, request, tmp_path, monkeypatch):
    """The directory ``--compare`` hands mlx-lm holds the GGUF's own quantized weights: mlx-lm's model on
    it, and mlxllm reloading it, give the logits mlxllm computes from the GGUF file. (Weights are kept
    quantized with float32 scales, the CPU's low-memory path, so the test runs in seconds.)"""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    path = request.getfixturevalue(which)
    need = describe_model(path)["memory_needed_bytes"]
    monkeypatch.setattr("mlxllm.backend.device_memory", lambda: (need["quantized"] + need["float32"]) // 2)
    ours = load_model(path)
    assert ours.load_report.target == "quantized"
    out = save_model(ours, tmp_path / "converted")
    tokens = mx.array([[2, 504, 3458, 282, 4649, 314, 15, 1117]])
    want = ours(tokens)
    again = load_model(out)(tokens)
    assert np.array_equal(np.array(again), np.array(want))
    theirs, _ = mlx_lm_utils.load_model(out)
    if ours._embed_scale is not None:
        # mlx-lm rounds Gemma's sqrt(hidden) embedding scale to bfloat16 whatever the weights' dtype
        # (transformers rounds to the weights' dtype, as mlxllm does): 25.25 instead of 25.298 here.
        ours._embed_scale = mx.array(ours._embed_scale, dtype=mx.bfloat16).item()
        want = ours(tokens)
    got = theirs(tokens)
    assert np.abs(np.array(got, np.float32) - np.array(want, np.float32)).max() < 1e-4


def test_prompt_text_has_the_length_asked(smollm2_path):
    tok = Tokenizer.from_gguf(smollm2_path)
    for n in (16, 300):
        assert abs(len(tok.encode(bm.prompt_text(tok, n))) - n) <= 2


@pytest.mark.parametrize("bits, atol", [(8, 0.02), (4, 0.2)])
def test_quantized_kv_cache_decodes_like_the_float_cache(bits, atol):
    """Chunked prefill + token-by-token decode through a quantized KV cache (GQA) tracks the full
    forward pass; 8-bit keeps every argmax."""
    model = random_model({**CONFIG, "head_dim": 64}, mx.float32)
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])
    full = model(tokens)
    cache = model.make_cache(KVSettings(bits, 32))
    got = mx.concatenate([model(tokens[:, :5], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache)
                                                              for i in range(5, 13)], axis=1)  # fmt: skip
    assert float(mx.abs(got - full).max()) < atol
    if bits == 8:
        assert mx.array_equal(got.argmax(-1), full.argmax(-1)).item()


def test_quantized_kv_bytes_hand_computed_and_measured():
    model = random_model({**CONFIG, "head_dim": 64}, mx.float32)
    cache = model.make_cache(KVSettings(4, 32))
    model.hidden(mx.zeros((1, 100), mx.int32), cache)
    mx.eval([c.state for c in cache])
    # per layer, position and K/V head: 64 values at 4 bits + a float32 scale and bias per group of 32,
    # past the 64 positions held in float32
    hand = 2 * 2 * 2 * (36 * (64 * 4 // 8 + 2 * 2 * 4) + 64 * 64 * 4)  # layers x (K, V) x kv heads x bytes
    assert bm.kv_bytes(model, 100, dtype=mx.float32, kv=KVSettings(4, 32)) == hand
    assert sum(c.nbytes for c in cache) == hand
    # everything float until ``quantized_kv_start`` is crossed
    assert bm.kv_bytes(model, 30, dtype=mx.float32, kv=KVSettings(4, 32, 30)) == 2 * 2 * 2 * 30 * 64 * 4


def test_bench_kv_bits(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "kv.json"
    res = _bench(["-m", str(tiny_dir), "-p", "24", "-g", "4", "-n", "1", "--kv-bits", "8", "--kv-group-size", "32",
                  "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["settings"]["kv_bits"] == 8
    r = report["results"][0]
    assert r["kv_bytes_per_step"] == bm.kv_bytes(load_model(tiny_dir), 26, kv=KVSettings(8, 32))
    code, _, err = run(["bench", "-m", str(tiny_dir), "--kv-bits", "8", "--kv-group-size", "64"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--kv-group-size must be 32, 64 or 128 and at most the head size 32, got 64")
    code, _, err = run(["bench", "-m", str(tiny_dir), "--kv-bits", "7"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--kv-bits takes 2, 3, 4, 5, 6 or 8, not 7")


@pytest.mark.parametrize("family", ["phi3", "gpt_oss", "llama4", "glm4_moe", "qwen3_5", "mistral4"])
def test_bench_runs_on_the_newer_families(family, tmp_path):
    """``bench`` loads, times and prices (bytes per decode step, FLOPs per prefill) each family's tiny model."""
    pytest.importorskip("mlx_lm")
    from test_parity_mlx_lm import FAMILIES

    config = FAMILIES[family]
    text = dict(config.get("text_config", config), vocab_size=260)
    model = random_model(dict(config, text_config=text) if "text_config" in config else text, mx.float32)
    path = save_model(model, tmp_path / family)
    _write_tokenizer(path)
    out = tmp_path / "r.json"
    res = _bench(["-m", str(path), "-p", "16", "-g", "4", "-n", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["prompt_tokens"] == 16 and all(t["generated_tokens"] == 4 for t in result["trials"])
    assert result["weight_bytes_per_step"] == report["model"]["decode_weight_bytes"] > 0
    assert result["decode_gbps"] > 0 and result["prefill_gflops"] > 0
