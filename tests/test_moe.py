"""Mixture of experts: routing rules and edge cases, the gathered expert matmuls against a plain
per-token loop, the expert-sorted prefill path, quantized experts, and loading HF per-expert tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.tools import benchmark as bm
from mlxllm.formats.loader import load_model
from mlxllm.model import moe
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model

CFG = dict(model_type="qwen3_moe", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=50, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
           max_position_embeddings=128)  # fmt: skip


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.from_hf({**CFG, **kw})


def _random_moe(cfg: ModelConfig) -> moe.MoE:
    mx.random.seed(1)
    block = moe.MoE(cfg, lambda gate, up: nn.silu(gate) * up, lambda h: None)
    block.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(block.parameters())]))
    return block


def _naive(block: moe.MoE, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The definition, token by token in numpy: route, run the chosen experts densely, mix."""
    p = {k: np.array(v) for k, v in tree_flatten(block.parameters())}
    out = np.zeros_like(x)
    for t, row in enumerate(x):
        logits = p["gate.weight"] @ row
        order = np.argsort(-logits, kind="stable")[: cfg.num_experts_per_tok]
        if cfg.router == "topk_softmax":
            w = np.exp(logits[order] - logits[order].max())
            w /= w.sum()
        else:
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            w = probs[order] / (probs[order].sum() if cfg.norm_topk_prob else 1.0)
        for e, we in zip(order, w):
            g = p["switch_mlp.gate_proj.weight"][e] @ row
            u = p["switch_mlp.up_proj.weight"][e] @ row
            out[t] += we * (p["switch_mlp.down_proj.weight"][e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("router, norm", [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False)])
@pytest.mark.parametrize("tokens", [5, 50])  # 50 x 2 pairs takes the expert-sorted path
def test_moe_equals_per_token_definition(router, norm, tokens):
    cfg = _cfg(norm_topk_prob=norm)
    cfg.router = router
    block = _random_moe(cfg)
    x = np.random.default_rng(0).normal(size=(tokens, 32)).astype(np.float32)
    got = np.array(block(mx.array(x)))
    np.testing.assert_allclose(got, _naive(block, x, cfg), atol=1e-4, rtol=1e-4)


def test_the_three_expert_paths_agree(monkeypatch):
    """Per-expert matmuls (CPU prefill), sorted gathered matmuls (Metal/CUDA prefill), unsorted (decode)."""
    block = _random_moe(_cfg())
    x = mx.random.normal((3, 20, 32))
    per_expert = block(x)
    monkeypatch.setattr(moe.backend, "device_name", lambda: "metal")
    gathered_sorted = block(x)
    monkeypatch.setattr(moe, "SORT_FROM", 10**9)
    unsorted = block(x)
    assert mx.allclose(per_expert, gathered_sorted, atol=1e-5).item()
    assert mx.allclose(per_expert, unsorted, atol=1e-5).item()


def test_route_edge_cases():
    cfg = _cfg(num_experts_per_tok=3, norm_topk_prob=True)
    tied = mx.zeros((4, 6))  # every expert equally likely
    w, ids = moe.route(tied, cfg)
    assert all(len(set(row)) == 3 for row in ids.tolist())  # never the same expert twice
    assert mx.allclose(w, mx.full(w.shape, 1 / 3)).item()
    one = mx.array([[0.0, 0, 0, 50, 0, 0]] * 4)  # all tokens to expert 3
    w, ids = moe.route(one, cfg)
    assert all(3 in row for row in ids.tolist())
    assert mx.allclose(w.sum(-1), mx.ones(4)).item()


def test_all_tokens_to_one_expert_is_that_experts_mlp():
    cfg = _cfg(num_experts_per_tok=1)
    block = _random_moe(cfg)
    block.gate.weight = mx.zeros_like(block.gate.weight).at[2].add(100.0)  # expert 2 wins for x > 0
    x = mx.abs(mx.random.normal((70, 32)))
    e = block.switch_mlp
    g, u = x @ e.gate_proj.weight[2].T, x @ e.up_proj.weight[2].T
    want = (nn.silu(g) * u) @ e.down_proj.weight[2].T
    assert mx.allclose(block(x), want, atol=1e-4).item()


def test_quantized_experts_match_dequantized(tmp_path):
    block = _random_moe(_cfg())
    x = mx.random.normal((40, 32))
    nn.quantize(block, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, moe.ExpertLinear))
    q = block.switch_mlp.gate_proj
    assert isinstance(q, moe.QuantizedExpertLinear) and q.weight.shape[0] == 6 and q.top_k == 2
    got = block(x)
    for name in ("gate_proj", "up_proj", "down_proj"):
        m = block.switch_mlp[name]
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        block.switch_mlp[name] = moe.ExpertLinear(w.shape[2], w.shape[1], 6, 2)
        block.switch_mlp[name].weight = w
    assert mx.allclose(got, block(x), atol=1e-4).item()


def test_decode_bytes_count_active_experts_only():
    model = Model(_cfg())
    mx.eval(model.parameters())
    experts = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".switch_mlp." in k)
    rest = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".switch_mlp." not in k)
    embed = model.model.embed_tokens.weight
    one_row = embed.nbytes // embed.shape[0]
    assert bm.decode_weight_bytes(model) == rest - embed.nbytes + one_row + round(experts * 2 / 6)


def test_hf_per_expert_tensors_are_stacked_at_load(tmp_path):
    """A Hugging Face MoE checkpoint stores experts one by one (Mixtral as w1/w3/w2); loading stacks them."""
    cfg = dict(CFG, model_type="mixtral", num_local_experts=3, tie_word_embeddings=False)
    cfg.pop("num_experts")
    mx.random.seed(3)
    ours = Model(ModelConfig.from_hf(cfg))
    flat = {k: mx.random.normal(v.shape) * 0.2 for k, v in tree_flatten(ours.parameters())}
    ours.update(tree_unflatten(list(flat.items())))
    hf = {}
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for k, v in flat.items():
        if ".switch_mlp." in k:
            prefix, proj = k.split(".switch_mlp.")
            proj = proj.split(".")[0]
            for e in range(3):
                hf[f"{prefix}.experts.{e}.{names[proj]}.weight"] = v[e]
        else:
            hf[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), hf, metadata={"format": "pt"})
    loaded = load_model(tmp_path, compute="float32")
    tokens = mx.array([[1, 5, 9, 13, 2]])
    assert mx.allclose(loaded(tokens), ours(tokens), atol=1e-5).item()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dots1"])
def test_quantized_moe_dir_loads_in_mlxllm_and_mlx_lm(family, tmp_path):
    """A 4-bit MoE model written in the mlx-community layout (stacked, quantized switch_mlp) reads back
    in mlxllm and in mlx-lm with the same logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlxllm.formats.save import save_model

    from test_parity_mlx_lm import FAMILIES, _random_pair

    ours, _ = _random_pair(FAMILIES[family])
    nn.quantize(ours, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and
                m.weight.shape[-1] % 32 == 0 and "embed" not in p)  # fmt: skip
    ffn = ours.layers[-1][ours.config.ffn_name]
    assert isinstance(ffn[ffn.stack_name].up_proj, moe.QuantizedExpertLinear)
    path = save_model(ours, tmp_path / family)
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    want = ours(tokens)
    assert mx.allclose(load_model(path, compute="native")(tokens), want, atol=1e-5).item()
    # the CPU default dequantizes to float32; quantized linears with their own bias (Qwen2-MoE's q/k/v) included
    assert mx.allclose(load_model(path, compute="float32")(tokens), want, atol=1e-3).item()
    theirs, _ = mlx_lm_utils.load_model(path)
    assert mx.allclose(theirs(tokens), want, atol=1e-4).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_expert_dequantize_is_mlx_dequantize(bits):
    from mlxllm.formats.weights import Quantized

    q = Quantized.of(mx.random.normal((3, 64, 128)), 32, bits)
    assert mx.array_equal(q.dequantize(), mx.dequantize(q.weight, q.scales, q.biases, 32, bits)).item()


def test_sigmoid_group_routing_definition():
    """DeepSeek-V3 routing written out in numpy: choose by sigmoid + bias within the best groups (a group
    scores the sum of its two best), weight by the plain sigmoid, renormalise, scale."""
    cfg = _cfg(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
    cfg.router, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor = "sigmoid_group", 4, 2, 2.5
    rng = np.random.default_rng(0)
    logits, bias = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32) * 0.5
    w, ids = moe.route(mx.array(logits), cfg, mx.array(bias))
    for t in range(20):
        s = 1 / (1 + np.exp(-logits[t]))
        choice = (s + bias).reshape(4, 2)
        best_groups = np.argsort(-np.sort(choice, axis=1)[:, -2:].sum(1))[:2]
        masked = np.zeros_like(choice)
        masked[best_groups] = choice[best_groups]
        want = np.argsort(-masked.reshape(-1))[:3]
        assert set(np.array(ids[t]).tolist()) == set(want.tolist())
        got = dict(zip(np.array(ids[t]).tolist(), np.array(w[t]).tolist()))
        for e in want:
            assert got[e] == pytest.approx(2.5 * s[e] / s[want].sum(), rel=1e-5)


def test_dots1_per_expert_tensors_are_stacked_under_experts(tmp_path):
    from test_parity_mlx_lm import FAMILIES, _random_pair

    ours, _ = _random_pair(FAMILIES["dots1"])
    hf = {}
    for k, v in tree_flatten(ours.parameters()):
        if ".mlp.experts." in k:
            prefix, rest = k.split(".mlp.experts.")
            for e in range(v.shape[0]):
                hf[f"{prefix}.mlp.experts.{e}.{rest}"] = v[e]
        else:
            hf[k] = v
    (tmp_path / "config.json").write_text(json.dumps(FAMILIES["dots1"]))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), hf, metadata={"format": "pt"})
    tokens = mx.array([[1, 5, 9, 13, 2]])
    assert mx.allclose(load_model(tmp_path, compute="float32")(tokens), ours(tokens), atol=1e-5).item()


def test_info_counts_active_parameters(tmp_path):
    from mlxllm.formats.save import save_model
    from mlxllm.formats.loader import describe_model

    model = Model(_cfg())
    mx.eval(model.parameters())
    flat = tree_flatten(model.parameters())
    routed = sum(v.size for k, v in flat if ".switch_mlp." in k)
    facts = describe_model(save_model(model, tmp_path / "m"))
    assert facts["experts"] == "6 (2 active per token)"
    assert facts["active_parameters"] == sum(v.size for _, v in flat) - routed + routed * 2 // 6
