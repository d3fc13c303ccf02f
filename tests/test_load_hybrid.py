"""Qwen3-Next / Qwen3.5 checkpoints in the layouts others write them: Hugging Face's own (norms as
``w`` for ``1 + w``, convolution ``[C, 1, K]``, Qwen3.5's multimodal wrapper and fused experts, MTP
and vision tensors beside the decoder) and GGUF as llama.cpp's converter writes it (``ssm_a =
-exp(A_log)``, ``in_proj_qkvz`` regrouped into ``attn_qkv`` + ``attn_gate``, Qwen3.5's value heads
in tiled order). The transforms below follow the converter independently of the loader; each file
must give the logits of the model holding the file's exact values."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_unflatten

from mlxllm.formats.loader import describe_model, load_model
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model
from test_load_gguf import LAYER, TOKENS, assert_agrees_with_llama_cpp, random_weights
from test_parity_mlx_lm import FAMILIES

ARCH = {"qwen3_next": "qwen3next", "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}
PLUS_ONE = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
            "k_norm.weight")
GGUF_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm", **{
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_ba": "ssm_ba",
    "linear_attn.in_proj_b": "ssm_beta", "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.conv1d": "ssm_conv1d",
    "linear_attn.norm": "ssm_norm", "linear_attn.out_proj": "ssm_out"})


def _logits(cfg: dict, weights: dict[str, np.ndarray]) -> np.ndarray:
    model = Model(ModelConfig.from_hf(cfg))
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    return np.array(model(mx.array(TOKENS)))


def hf_layout(family: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our (mlx-lm) tensors as the Hugging Face checkpoint holds them."""
    out = {}
    for name, w in weights.items():
        if name.endswith(PLUS_ONE) and "linear_attn" not in name:
            w = w - 1
        if name.endswith("conv1d.weight"):
            w = w.transpose(0, 2, 1)
        if ".switch_mlp." in name and family == "qwen3_next":  # one tensor per expert
            for e in range(w.shape[0]):
                out[name.replace(".switch_mlp.", f".experts.{e}.")] = w[e]
            continue
        if ".switch_mlp." in name:  # Qwen3.5-MoE: gate and up fused, no .weight
            stem = name.split(".switch_mlp.")[0] + ".experts."
            if "down_proj" in name:
                out[stem + "down_proj"] = w
            elif "gate_proj" in name:
                out[stem + "gate_up_proj"] = np.concatenate([w, weights[name.replace("gate_proj", "up_proj")]], axis=-2)
            continue
        out[name] = w
    return out


@pytest.mark.parametrize("family", list(ARCH))
def test_hugging_face_layout_loads_as_mlx_lm_holds_it(family, tmp_path):
    cfg = dict(FAMILIES[family], num_hidden_layers=4)
    weights = random_weights(cfg)
    tensors = hf_layout(family, weights)
    config = dict(cfg)
    if family != "qwen3_next":  # the multimodal wrapper, its tensors under model.language_model.
        config = {"model_type": family, "text_config": dict(cfg, model_type=f"{family}_text"),
                  "tie_word_embeddings": False}
        tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
        tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = np.array(load_model(tmp_path, compute="float32")(mx.array(TOKENS)))
    np.testing.assert_allclose(got, _logits(cfg, weights), atol=1e-4)


def _tiled(x: np.ndarray, axis: int, per: int, nk: int) -> np.ndarray:
    """The converter's _reorder_v_heads: value heads grouped by key head -> tiled."""
    shape = x.shape
    x = x.reshape(*shape[:axis], nk, per, -1, *shape[axis + 1 :])
    return np.swapaxes(x, axis, axis + 1).reshape(shape)


def _grouped(x: np.ndarray, axis: int, per: int, nk: int) -> np.ndarray:
    shape = x.shape
    x = x.reshape(*shape[:axis], per, nk, -1, *shape[axis + 1 :])
    return np.swapaxes(x, axis, axis + 1).reshape(shape)


def _converted(family: str, cfg: dict, name: str, w: np.ndarray):
    """[(gguf name, stored value, inverse)] for one of our tensors, as llama.cpp's converter writes it
    (``inverse`` maps the stored values back to our layout)."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, per = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], nv // nk
    key = 2 * nk * dk
    tiled = family != "qwen3_next" and per > 1
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return [({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}[name], w, lambda x: x)]
    layer, rest = name.split(".", 3)[2], name.split(".", 3)[3]
    blk = f"blk.{layer}."
    back = (lambda x: _grouped(x, 0, per, nk)) if tiled else (lambda x: x)
    if rest == "linear_attn.A_log":
        return [(blk + "ssm_a", -np.exp(_tiled(w, 0, per, nk) if tiled else w), lambda x: back(np.log(-x)))]
    if rest == "linear_attn.dt_bias":
        return [(blk + "ssm_dt.bias", _tiled(w, 0, per, nk) if tiled else w, back)]
    if rest == "linear_attn.in_proj_qkvz.weight":  # [q, k, v, z] per key head -> all q | all k | all v, and z
        g = w.reshape(nk, -1, w.shape[-1])
        q, k, v, z = np.split(g, [dk, 2 * dk, 2 * dk + per * dv], axis=1)
        qkv = np.concatenate([t.reshape(-1, w.shape[-1]) for t in (q, k, v)])
        return [(blk + "attn_qkv.weight", qkv, None), (blk + "attn_gate.weight", z.reshape(-1, w.shape[-1]), None)]
    stored, inverse = w, (lambda x: x)
    if rest == "linear_attn.in_proj_ba.weight":  # Qwen3-Next: b, a per key head -> all b, then all a
        stored = w.reshape(nk, 2, per, -1).swapaxes(0, 1).reshape(w.shape)
        inverse = lambda x: x.reshape(2, nk, per, -1).swapaxes(0, 1).reshape(x.shape)  # noqa: E731
    if tiled and rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
        stored = np.concatenate([w[:key], _tiled(w[key:], 0, per, nk)])
        inverse = lambda x: np.concatenate([x[:key], _grouped(x[key:], 0, per, nk)])  # noqa: E731
    elif tiled and rest.split(".")[1] in ("in_proj_z", "in_proj_b", "in_proj_a"):
        stored, inverse = _tiled(w, 0, per, nk), (lambda x: _grouped(x, 0, per, nk))
    elif tiled and rest == "linear_attn.out_proj.weight":
        stored, inverse = _tiled(w, 1, per, nk), (lambda x: _grouped(x, 1, per, nk))
    if rest == "linear_attn.conv1d.weight":
        stored, base = stored[..., 0], inverse
        inverse = lambda x: base(x)[..., None]  # noqa: E731
    module, leaf = rest.rsplit(".", 1)
    if name.endswith("shared_expert_gate.weight"):
        stored, inverse = stored.reshape(-1), (lambda x: x.reshape(1, -1))
    return [(f"{blk}{GGUF_LAYER[module]}.{leaf}", stored, inverse)]


def write_hybrid_gguf(path, family: str, cfg: dict, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file llama.cpp's converter writes for these weights; returns the exact values it holds, in our layout."""
    w = GGUFWriter(str(path), ARCH[family])
    w.add_tokenizer_model("none")
    head_dim = cfg["head_dim"]
    rotary = cfg.get("partial_rotary_factor") or cfg["rope_parameters"]["partial_rotary_factor"]
    for add, value in [(w.add_block_count, cfg["num_hidden_layers"]), (w.add_context_length, cfg["max_position_embeddings"]),
                       (w.add_embedding_length, cfg["hidden_size"]), (w.add_feed_forward_length, cfg["intermediate_size"]),
                       (w.add_head_count, cfg["num_attention_heads"]), (w.add_head_count_kv, cfg["num_key_value_heads"]),
                       (w.add_key_length, head_dim), (w.add_value_length, head_dim),
                       (w.add_rope_dimension_count, int(head_dim * rotary)), (w.add_rope_freq_base, 10000.0),
                       (w.add_layer_norm_rms_eps, cfg["rms_norm_eps"]), (w.add_vocab_size, cfg["vocab_size"]),
                       (w.add_ssm_conv_kernel, cfg["linear_conv_kernel_dim"]), (w.add_ssm_state_size, cfg["linear_key_head_dim"]),
                       (w.add_ssm_group_count, cfg["linear_num_key_heads"]),
                       (w.add_ssm_time_step_rank, cfg["linear_num_value_heads"]),
                       (w.add_ssm_inner_size, cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]),
                       (w.add_full_attention_interval, cfg["full_attention_interval"])]:
        add(value)
    if family != "qwen3_next":  # Qwen3.5's multimodal RoPE sections (text positions use them all alike)
        w.add_rope_dimension_sections([*cfg["rope_parameters"]["mrope_section"], 0][:4])
    if cfg.get("num_experts"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    exact, parts = {}, {}
    for i, (name, value) in enumerate(weights.items()):
        for gname, stored, inverse in _converted(family, cfg, name, value):
            stored = np.ascontiguousarray(stored, dtype=np.float32)
            qtype = (T.Q8_0, T.Q4_0, T.F16)[i % 3] if stored.ndim >= 2 and stored.shape[-1] % 32 == 0 else T.F32
            data = quantize(stored, qtype)
            held = dequantize(data, qtype).reshape(stored.shape)
            if inverse is None:
                parts[gname] = held
            else:
                exact[name] = inverse(held)
            w.add_tensor(gname, data, raw_dtype=None if qtype == T.F32 else qtype)
        if inverse is None:  # Qwen3-Next's qkvz, put back together from what the file holds
            nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
            qkv, z = parts.pop(gname.replace("attn_gate", "attn_qkv")), parts.pop(gname)
            q, k, v = np.split(qkv, [nk * dk, 2 * nk * dk])
            exact[name] = np.concatenate([t.reshape(nk, -1, qkv.shape[-1]) for t in (q, k, v, z)], axis=1).reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return exact


@pytest.mark.parametrize("family", list(ARCH))
def test_gguf_in_llama_cpp_layout_round_trips(family, tmp_path):
    cfg = dict(FAMILIES[family], num_hidden_layers=4, mlp_only_layers=[])  # llama.cpp: every Qwen3-Next layer MoE
    path = tmp_path / f"{family}.gguf"
    exact = write_hybrid_gguf(path, family, cfg, random_weights(cfg))
    model = load_model(path, compute="float32")
    assert model.config.layer_types == ["linear_attention", "full_attention"] * 2
    assert model.config.rope_dims == int(cfg["head_dim"] * (cfg.get("partial_rotary_factor") or 0.25))
    np.testing.assert_allclose(np.array(model(mx.array(TOKENS))), _logits(cfg, exact), atol=1e-4)
    facts = describe_model(path)
    assert facts["layer_pattern"] == "LFLF" and facts["linear_attention"].startswith("2 layers, 2 key heads x 16")
    assert f"RoPE on {model.config.rope_dims} of 16 features" in facts["full_attention"]


@pytest.mark.parametrize("family", list(ARCH))
def test_gguf_files_agree_with_llama_cpp(family, tmp_path):
    """llama.cpp reads these files as the loader does (its layout assumes value heads as wide as key heads,
    as every release has; Qwen3-Next's ssm_ba holds all betas, then all alphas)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    cfg = dict(FAMILIES[family], num_hidden_layers=4, mlp_only_layers=[], linear_value_head_dim=16)
    path = tmp_path / f"{family}.gguf"
    write_hybrid_gguf(path, family, cfg, random_weights(cfg))
    assert_agrees_with_llama_cpp(llama_cpp, path)


@pytest.mark.parametrize("family", list(ARCH))
def test_saved_directory_loads_in_mlxllm_and_mlx_lm(family, tmp_path):
    """What ``convert`` writes (mlx-community layout, a config mlx-lm reads: full_attention_interval,
    Qwen3.5's rope_parameters) gives the same logits in both, also 4-bit quantized."""
    import mlx.nn as nn

    from mlxllm.formats.save import save_model

    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    cfg = FAMILIES[family]
    weights = random_weights(cfg)
    model = Model(ModelConfig.from_hf(cfg))
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    for bits in (None, 4):
        if bits:
            nn.quantize(model, 32, bits, class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
        want = np.array(model(mx.array(TOKENS)))
        save_model(model, tmp_path / "out")
        ours = np.array(load_model(tmp_path / "out", compute="native")(mx.array(TOKENS)))
        ref, _ = mlx_lm_utils.load_model(tmp_path / "out")
        np.testing.assert_allclose(ours, want, atol=1e-4)
        np.testing.assert_allclose(np.array(ref(mx.array(TOKENS))), want, atol=1e-4)
