"""GGUF conversion facts on tiny synthetic files written the way llama.cpp's converter writes them.

The writer below encodes the converter's conventions independently of the loader: its tensor names,
Q/K row permutation for the llama architecture, Gemma's norm weights stored +1, Llama 3 RoPE as a
``rope_freqs`` tensor, Gemma 3 metadata without the layer pattern. Weights cycle through the
block types ``gguf`` can quantize, so each family exercises several decoders. The loaded model must
reproduce the HF-layout model holding the file's exact (dequantized) values.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import mlx.core as mx
from gguf import GGMLQuantizationType as T
from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.errors import UserError
from mlxllm.formats.loader import describe_model, load_model
from mlxllm.model.config import ModelConfig, UnsupportedArchitecture
from mlxllm.model.decoder import Model

BASE = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "llama": (dict(BASE, model_type="llama"), "llama"),
    "llama3.1": (
        dict(BASE, model_type="llama", tie_word_embeddings=True, head_dim=32,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=16)),
        "llama",
    ),  # fmt: skip
    "qwen2": (dict(BASE, model_type="qwen2", tie_word_embeddings=True), "qwen2"),
    # SmolLM3: llama.cpp keeps no NoPE metadata and takes every 4th layer as one
    "smollm3": (dict(BASE, model_type="smollm3", num_hidden_layers=4), "smollm3"),
    "qwen3": (dict(BASE, model_type="qwen3", head_dim=32, num_key_value_heads=1), "qwen3"),
    "gemma3": (
        dict(BASE, model_type="gemma3_text", num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
             sliding_window=4, sliding_window_pattern=6, rope_local_base_freq=10000.0, rope_theta=1e6,
             rope_scaling=dict(rope_type="linear", factor=8.0), rms_norm_eps=1e-6, tie_word_embeddings=True),
        "gemma3",
    ),  # fmt: skip
    # Mixture of experts, as llama.cpp stores them: stacked expert tensors, Mixtral as a llama.
    "mixtral": (dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2), "llama"),
    "qwen2moe": (dict(BASE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64), "qwen2moe"),
    "qwen3moe": (dict(BASE, model_type="qwen3_moe", head_dim=32, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True), "qwen3moe"),
    "olmoe": (dict(BASE, model_type="olmoe", num_key_value_heads=4, num_experts=4, num_experts_per_tok=2), "olmoe"),
    # Phi-3 as llama.cpp stores it: fused attn_qkv, gate and up stacked in ffn_up, LongRoPE factor tensors,
    # RoPE over 3/4 of each head (Phi-4-mini).
    "phi3": (dict(BASE, model_type="phi3", partial_rotary_factor=0.75, original_max_position_embeddings=64,
                  rope_scaling=dict(type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                    long_factor=[1.0, 2.0, 3.0, 5.0, 8.0, 13.0])), "phi3"),
    # GLM-4.5: half-rotary heads, biases, q/k norms, sigmoid routing; one multi-token-prediction layer
    # after the decoder's, as the converter writes it (counted in block_count).
    "glm4moe": (dict(BASE, model_type="glm4_moe", head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                     routed_scaling_factor=2.0, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
                     num_nextn_predict_layers=1), "glm4moe"),
    # Ministral 3: llama.cpp's LlamaModel layout (permuted Q/K) under the mistral3 architecture, YaRN and
    # the query scale as metadata.
    "mistral3": (dict({k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="ministral3", head_dim=32,
                      tie_word_embeddings=False,
                      rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                           original_max_position_embeddings=4, beta_fast=32.0, beta_slow=1.0,
                                           mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)), "mistral3"),
    # gpt-oss: MXFP4 experts with biases, sinks, a biased router; llama.cpp alternates the window itself.
    "gpt-oss": (dict(BASE, model_type="gpt_oss", head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=4, rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                                         original_max_position_embeddings=4, truncate=False)),
                "gpt-oss"),
    # DeepSeek-V2 / V3 as llama.cpp's converter writes them (arch deepseek2): one-head MQA metadata with the
    # per-head sizes under *_mla, kv_b_proj split into attn_k_b (transposed) and attn_v_b, YaRN's multiplier
    # as 0.1 x mscale_all_dim, the gating function telling V3's sigmoid routing from V2's softmax.
    "deepseek2-v2": (dict(BASE, model_type="deepseek_v2", num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                          topk_method="greedy", kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16,
                          qk_nope_head_dim=32, v_head_dim=32,
                          rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                                            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)), "deepseek2"),
    "deepseek2-v3": (dict(BASE, model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                          n_group=4, topk_group=2, norm_topk_prob=True, kv_lora_rank=64, q_lora_rank=32,
                          qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, topk_method="noaux_tc",
                          rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                                            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)), "deepseek2"),
    # Llama 4 as llama.cpp stores it: unpermuted interleaved-RoPE Q/K, llama3 RoPE as rope_freqs, experts and
    # shared expert under feed_forward; llama.cpp fixes the chunks (8192), the NoPE step (4) and the
    # temperature (0.1 over 8192) itself.
    "llama4": (dict(BASE, model_type="llama4_text", num_hidden_layers=4, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size_mlp=96, attention_chunk_size=8192,
                    use_qk_norm=True, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=16)),
               "llama4"),
    # Mistral 4 on llama.cpp's deepseek2 loader: the same latent layout, the query scale as temperature keys,
    # the experts' gate and up fused in one ffn_gate_up_exps as its HF checkpoints hold them.
    "mistral4": (dict({k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="mistral4", num_key_value_heads=4,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                      first_k_dense_replace=1, routed_scaling_factor=1.5, n_group=4, topk_group=2, norm_topk_prob=True,
                      kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                      rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=4,
                                           beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                           llama_4_scaling_beta=0.1)), "mistral4"),
    "dots1": (dict(BASE, model_type="dots1", head_dim=32, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                   routed_scaling_factor=2.0), "dots1"),
}
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.F16, T.BF16, T.Q5_1]
TOKENS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]]

# llama.cpp's tensor names (gguf-py's tensor map), written out here independently of the loader.
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
         "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
         "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
         "self_attn.k_b_proj": "attn_k_b", "self_attn.v_b_proj": "attn_v_b", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps", "mlp.switch_mlp.up_proj": "ffn_up_exps",
         "mlp.switch_mlp.down_proj": "ffn_down_exps", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
         "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
         "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}  # fmt: skip
GEMMA_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm",
                   post_feedforward_layernorm="post_ffw_norm")  # fmt: skip
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}  # fmt: skip


OSS_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm", **{
    "mlp.router": "ffn_gate_inp", "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps"})  # fmt: skip


GLM_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm")


LLAMA4_LAYER = dict(LAYER, **{f"feed_forward.{k.split('.', 1)[1]}": v for k, v in LAYER.items() if k.startswith("mlp.")},
                    **{"feed_forward.router": "ffn_gate_inp", "feed_forward.experts.gate_proj": "ffn_gate_exps",
                       "feed_forward.experts.up_proj": "ffn_up_exps", "feed_forward.experts.down_proj": "ffn_down_exps"})


def gguf_name(name: str, arch: str) -> str:
    if name in TOP:
        return TOP[name]
    if arch == "gpt-oss":
        if name.endswith(".self_attn.sinks"):
            return f"blk.{name.split('.')[2]}.attn_sinks.weight"
        layer, module, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
        return f"blk.{layer}.{OSS_LAYER[module]}.{leaf}"
    name = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.experts.", ".mlp.switch_mlp.")
    name = name.replace(".shared_experts.", ".shared_expert.")
    if name.endswith(".gate.e_score_correction_bias"):
        return f"blk.{name.split('.')[2]}.exp_probs_b.bias"
    layer, module, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
    table = {"gemma3": GEMMA_LAYER, "glm4moe": GLM_LAYER, "llama4": LLAMA4_LAYER}.get(arch, LAYER)
    return f"blk.{layer}.{table[module]}.{leaf}"


def _latent_metadata(w: GGUFWriter, cfg: dict) -> None:
    """DeepseekV2Model's keys: MQA with one head of kv_lora_rank + rope features, the real sizes as *_mla."""
    rank, rope, nope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"]
    w.add_head_count_kv(1)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_kv_lora_rank(rank)
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_rope_dimension_count(rope)
    w.add_expert_group_count(cfg.get("n_group", 1))
    w.add_expert_group_used_count(cfg.get("topk_group", 1))
    s = cfg.get("rope_scaling") or cfg["rope_parameters"]
    if "llama_4_scaling_beta" in s:
        w.add_attn_temperature_scale(s["llama_4_scaling_beta"])
        w.add_attn_temperature_length(s["original_max_position_embeddings"])
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(s["factor"])
    w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_log_mul(0.1 * s["mscale_all_dim"])


def _split_kv_b(weights: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """The converter's split of each kv_b_proj into k_b ``[heads, rank, nope]`` (transposed) and v_b."""
    out, nope, heads = {}, cfg["qk_nope_head_dim"], cfg["num_attention_heads"]
    for name, value in weights.items():
        if name.endswith("kv_b_proj.weight"):
            per_head = value.reshape(heads, -1, value.shape[-1])
            out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2))
            out[name.replace("kv_b_proj", "v_b_proj")] = np.ascontiguousarray(per_head[:, nope:])
        else:
            out[name] = value
    return out


def _join_kv_b(exact: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Back to kv_b_proj from the values the file holds for k_b and v_b."""
    for name in [n for n in exact if n.endswith("k_b_proj.weight")]:
        k, v = exact.pop(name), exact.pop(name.replace("k_b_proj", "v_b_proj"))
        exact[name.replace("k_b_proj", "kv_b_proj")] = np.concatenate([k.swapaxes(1, 2), v], axis=1).reshape(-1, k.shape[1])
    return exact


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (rows of each head interleaved for its GPT-J style RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(cfg: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs for rope_type llama3."""
    s, dims = cfg["rope_scaling"], cfg["head_dim"]
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * cfg["rope_theta"] ** (i / dims)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, cfg: dict, arch: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write ``weights`` (HF names and layout) as llama.cpp would; return the exact values the file holds,
    back in HF layout (quantization works row by row, so it commutes with the row permutation)."""
    w = GGUFWriter(str(path), arch)
    w.add_tokenizer_model("none")  # no vocabulary: llama.cpp then runs on token ids alone
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    rope = cfg.get("rope_parameters", cfg)
    w.add_block_count(cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg.get("intermediate_size_mlp", cfg["intermediate_size"]))
    w.add_head_count(heads)
    if arch in ("deepseek2", "mistral4"):
        _latent_metadata(w, cfg)
    else:
        w.add_head_count_kv(kv_heads)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(int(head_dim * cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in cfg:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        if arch in ("dots1", "glm4moe", "deepseek2", "mistral4"):  # DeepSeek-V3-style metadata
            w.add_expert_shared_count(cfg["n_shared_experts"])
            w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
            w.add_expert_weights_scale(cfg["routed_scaling_factor"])
            w.add_expert_weights_norm(cfg.get("norm_topk_prob", False))
            softmax = cfg["model_type"] in ("deepseek_v2", "mistral4")
            w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX if softmax else ExpertGatingFuncType.SIGMOID)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_factors(cfg))
    if arch == "gpt-oss":  # GptOssModel: the window, the experts' width, YaRN
        w.add_sliding_window(cfg["sliding_window"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if arch == "llama4":  # Llama4Model: the widths under HF's names swapped back, the MoE step
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_interleave_moe_layer_step(cfg["interleave_moe_layer_step"])
    if arch == "phi3":  # Phi3MiniModel's extra tensors and keys
        w.add_sliding_window(0)
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
        scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg["original_max_position_embeddings"])))
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], np.float32))
    if arch == "mistral3":  # Ministral3Model: YaRN, its log multiplier, the query scale
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
        w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
    if cfg.get("num_nextn_predict_layers"):  # GLM-4.5's MTP layer: a whole layer (the last one's tensors
        w.add_nextn_predict_layers(cfg["num_nextn_predict_layers"])  # here) plus its own; not the decoder's
        last, extra = f"model.layers.{cfg['num_hidden_layers'] - 1}.", f"blk.{cfg['num_hidden_layers']}."
        for name, value in weights.items():
            if name.startswith(last):
                w.add_tensor(extra + gguf_name(name, arch).split(".", 2)[2], value)
        hidden = cfg["hidden_size"]
        w.add_tensor(extra + "nextn.eh_proj.weight", np.zeros((hidden, 2 * hidden), np.float32))
        for norm in ("enorm", "hnorm", "shared_head_norm"):
            w.add_tensor(f"{extra}nextn.{norm}.weight", np.ones(hidden, np.float32))
    exact = {}
    if arch in ("deepseek2", "mistral4"):
        weights = _split_kv_b(weights, cfg)
    for i, (name, value) in enumerate(weights.items()):
        stored = value + 1 if arch == "gemma3" and "norm" in name else value  # Gemma: norms stored +1
        quantizable = value.ndim >= 2 and value.shape[-1] % 32 == 0 and not name.endswith(".bias")  # biases stay F32
        qtype = TYPES[i % len(TYPES)] if quantizable else T.F32
        if arch == "gpt-oss" and ".mlp.experts." in name and value.ndim == 3:
            qtype = T.MXFP4  # as the converter writes OpenAI's blocks
        if arch == "mistral4" and ".switch_mlp.up_proj." in name:
            continue  # written with its gate_proj
        if arch == "mistral4" and ".switch_mlp.gate_proj." in name:  # one ffn_gate_up_exps: gate rows, then up
            up = name.replace(".gate_proj.", ".up_proj.")
            data = quantize(np.concatenate([value, weights[up]], axis=1), qtype)
            back = dequantize(data, qtype).reshape(value.shape[0], -1, value.shape[2])
            exact[name], exact[up] = back[:, : value.shape[1]], back[:, value.shape[1]:]
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_gate_up_exps.weight", data, raw_dtype=None if qtype == T.F32 else qtype)
            continue
        data = quantize(stored, qtype)
        exact[name] = dequantize(data, qtype).reshape(value.shape) - (stored - value)
        if arch in ("llama", "smollm3", "mistral3") and (".q_proj." in name or ".k_proj." in name):  # LlamaModel
            data = converter_permute(data, heads if ".q_proj." in name else kv_heads)
        if name.endswith("shared_expert_gate.weight"):
            data = data.reshape(-1)  # llama.cpp keeps this [1, hidden] map as a vector
        w.add_tensor(gguf_name(name, arch), data, raw_dtype=None if qtype == T.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return _join_kv_b(exact) if arch in ("deepseek2", "mistral4") else exact


def random_weights(cfg: dict) -> dict[str, np.ndarray]:
    mx.random.seed(0)
    shapes = tree_flatten(Model(ModelConfig.from_hf(cfg)).parameters())
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in shapes}


def reference_logits(cfg: dict, weights: dict[str, np.ndarray]) -> np.ndarray:
    model = Model(ModelConfig.from_hf(cfg))
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    return np.array(model(mx.array(TOKENS)))


@pytest.fixture(scope="module", params=list(FAMILIES))
def synthetic(request, tmp_path_factory):
    cfg, arch = FAMILIES[request.param]
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    exact = write_gguf(path, cfg, arch, random_weights(cfg))
    return path, reference_logits(cfg, exact)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_synthetic_files_agree_with_llama_cpp(family, tmp_path):
    """llama.cpp itself reads these files as the loader does: the layout facts above are llama.cpp's
    (names, Q/K permutation only for the llama architecture incl. Mixtral, stacked experts, norms)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if family == "deepseek2-v2":
        pytest.skip("llama.cpp takes a deepseek2 file without q_lora_rank only when it has V2-Lite's 27 layers")
    cfg, arch = FAMILIES[family]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    assert_agrees_with_llama_cpp(llama_cpp, path)


def assert_agrees_with_llama_cpp(llama_cpp, path) -> None:
    """The file's logits on ``TOKENS`` in mlxllm and in llama.cpp agree within llama.cpp's rounding."""
    ours = np.array(load_model(path, compute="float32")(mx.array(TOKENS)))[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS[0])
    ref = np.array(llm.scores[: len(TOKENS[0])], dtype=np.float32)
    # llama.cpp rounds activations to 8 bits inside quantized matmuls: small differences (growing with
    # depth: 0.01 after 2 layers, 0.11 after Gemma's 6 sandwich-normed ones), rare near-tie flips
    assert np.abs(ours - ref).max() < 0.04 * np.abs(ref).max()
    assert min(np.corrcoef(ours[i], ref[i])[0, 1] for i in range(len(ref))) > 0.999
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - ref).max()  # not a near-tie within the error
    assert clear.sum() >= 6 and (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def test_gguf_round_trip_float32(synthetic):
    path, ref = synthetic
    model = load_model(path, compute="float32")
    np.testing.assert_allclose(np.array(model(mx.array(TOKENS))), ref, atol=1e-4)


def test_gguf_round_trip_native(synthetic):
    path, ref = synthetic
    model = load_model(path, compute="native")
    assert model.load_report.target == "native"
    out = np.array(model(mx.array(TOKENS)).astype(mx.float32))  # 16-bit activations, re-quantized Q5_x
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_gemma3_metadata_facts(tmp_path):
    """No pattern key: every 6th layer is global; no local-base key: 10000; scale from key_length."""
    cfg, arch = FAMILIES["gemma3"]
    path = tmp_path / "g.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    model = load_model(path)
    c = model.config
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert (c.rope_local_base_freq, c.query_pre_attn_scalar, c.sliding_window) == (10000.0, 32, 4)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0, "original_max_position_embeddings": None}


def test_describe_synthetic(synthetic):
    path, _ = synthetic
    facts = describe_model(path)
    assert facts["parameters"] == sum(v["parameters"] for v in facts["tensor_types"].values())
    assert facts["format"] == "gguf" and facts["compute_auto"] == "float32"


def _minimal_gguf(path, arch: str) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_tokenizer_model("none")  # no vocabulary: llama.cpp then runs on token ids alone
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_architecture(tmp_path):
    _minimal_gguf(tmp_path / "foo.gguf", "foo")
    with pytest.raises(UnsupportedArchitecture, match=r"'foo'.*supported: .*gemma3_text.*llama"):
        load_model(tmp_path / "foo.gguf")


def test_truncated_gguf(tmp_path):
    cfg, arch = FAMILIES["llama"]
    path = tmp_path / "t.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match=r"t\.gguf is truncated: tensor '.*' ends at byte"):
        load_model(path)
    path.write_bytes(data[:100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="neither a GGUF file"):
        load_model(path)


def test_info_lists_the_layers_without_rope(tmp_path):
    """SmolLM3 written as llama.cpp writes it: ``info`` names its NoPE layers (every 4th)."""
    cfg, arch = FAMILIES["smollm3"]
    path = tmp_path / "smollm3.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    assert describe_model(path)["layers_without_rope"] == [3]


@pytest.mark.parametrize("family, facts", [
    ("phi3", {"rope_features_per_head": "12 of 16", "rope_scaling": "longrope",
              "fused_projections": ["qkv_proj", "gate_up_proj"]}),
    ("glm4moe", {"rope_features_per_head": "16 of 32", "experts": "4 (2 active per token)", "layers": 2}),
    ("mistral3", {"rope_scaling": "yarn", "query_scale": "1 + 0.1 * log(1 + floor(position / 4))"}),
])
def test_info_shows_the_family_specifics(family, facts, tmp_path):
    cfg, arch = FAMILIES[family]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    described = describe_model(path)
    assert {k: described.get(k) for k in facts} == facts


def test_phi3_longrope_comes_from_the_factor_tensors(tmp_path):
    """The long factors and attention factor llama.cpp stores reach the RoPE (as mlx-lm, the long factors
    at every length), and a factor tensor of the wrong size is one clear error."""
    cfg, arch = FAMILIES["phi3"]
    path = tmp_path / "phi3.gguf"
    write_gguf(path, cfg, arch, random_weights(cfg))
    scaling = load_model(path).config.rope_scaling
    assert scaling["long_factor"] == cfg["rope_scaling"]["long_factor"]
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))
    bad = dict(cfg, rope_scaling=dict(cfg["rope_scaling"], long_factor=[1.0] * 5, short_factor=[1.0] * 5))
    with pytest.raises(UserError, match=r"rope_factors_long.weight' holds 5 values, not 6 positive"):
        write_gguf(path, bad, arch, random_weights(cfg))
        load_model(path)


# Gemma 4 as llama.cpp's Gemma4Model converter writes it: per-layer width and K/V-head arrays, the layer kinds as
# flags, the full layers' head size as key_length (the sliding ones' as key_length_swa), proportional RoPE as a
# rope_freqs tensor, norms as stored, one gate|up expert stack, the router's scales as .scale tensors, and the
# KV-sharing layers' key maps still in the file.
GEMMA4_LAYER = dict(GEMMA_LAYER, **{
    "pre_feedforward_layernorm_2": "pre_ffw_norm_2", "post_feedforward_layernorm_1": "post_ffw_norm_1",
    "post_feedforward_layernorm_2": "post_ffw_norm_2", "router.proj": "ffn_gate_inp",
    "experts.switch_glu.down_proj": "ffn_down_exps", "per_layer_input_gate": "inp_gate",
    "per_layer_projection": "proj", "post_per_layer_input_norm": "post_norm"})  # fmt: skip
GEMMA4_TOP = dict(TOP, **{"model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
                          "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
                          "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight"})
GEMMA4_SCALES = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
                 "layer_scalar": "layer_output_scale.weight"}


def gemma4_gguf_name(name: str) -> str:
    if name in GEMMA4_TOP:
        return GEMMA4_TOP[name]
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    if rest in GEMMA4_SCALES:
        return f"blk.{layer}.{GEMMA4_SCALES[rest]}"
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{GEMMA4_LAYER[module]}.{leaf}"


def write_gemma4_gguf(path, text: dict, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n, shared = text["num_hidden_layers"], text.get("num_kv_shared_layers", 0)
    swa = [t == "sliding_attention" for t in text["layer_types"]]
    width, dims, full_dims = text["intermediate_size"], text["head_dim"], text["global_head_dim"]
    w = GGUFWriter(str(path), "gemma4")
    w.add_tokenizer_model("none")
    w.add_block_count(n)
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_feed_forward_length([2 * width if text.get("use_double_wide_mlp") and i >= n - shared else width
                               for i in range(n)])
    w.add_head_count(text["num_attention_heads"])
    if text.get("num_global_key_value_heads"):
        w.add_head_count_kv([text["num_key_value_heads"] if s else text["num_global_key_value_heads"] for s in swa])
    else:
        w.add_head_count_kv(text["num_key_value_heads"])
    w.add_key_length(full_dims)
    w.add_value_length(full_dims)
    w.add_key_length_swa(dims)
    w.add_value_length_swa(dims)
    w.add_rope_dimension_count(full_dims)
    w.add_rope_dimension_count_swa(dims)
    rope = text["rope_parameters"]
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_vocab_size(text["vocab_size"])
    w.add_sliding_window(text["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(text.get("hidden_size_per_layer_input") or 0)
    w.add_final_logit_softcapping(text["final_logit_softcapping"])
    if text.get("enable_moe_block"):
        w.add_expert_count(text["num_experts"])
        w.add_expert_used_count(text["top_k_experts"])
        w.add_expert_feed_forward_length(text["moe_intermediate_size"])
    turned = int(full_dims * rope["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * turned + [1e30] * (full_dims // 2 - turned), np.float32))
    exact = {}
    stored = dict(weights)
    for i in range(n - shared, n):  # transformers checkpoints keep them; the converter maps them too
        rows = text["num_key_value_heads"] * (dims if swa[i] else full_dims)
        stored[f"model.layers.{i}.self_attn.k_proj.weight"] = np.zeros((rows, text["hidden_size"]), np.float32)
    for i, (name, value) in enumerate(stored.items()):
        if ".switch_glu.up_proj." in name:
            continue
        qtype = TYPES[i % len(TYPES)] if value.ndim >= 2 and value.shape[-1] % 32 == 0 else T.F32
        if ".switch_glu.gate_proj." in name:
            up = name.replace(".gate_proj.", ".up_proj.")
            data = quantize(np.concatenate([value, stored[up]], axis=1), qtype)
            back = dequantize(data, qtype).reshape(value.shape[0], -1, value.shape[2])
            exact[name], exact[up] = back[:, : value.shape[1]], back[:, value.shape[1]:]
            gguf = f"blk.{name.split('.')[2]}.ffn_gate_up_exps.weight"
        else:
            data = quantize(value, qtype)
            exact[name] = dequantize(data, qtype).reshape(value.shape)
            gguf = gemma4_gguf_name(name)
        w.add_tensor(gguf, data, raw_dtype=None if qtype == T.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v for k, v in exact.items() if k in weights}


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe"])
def test_gemma4_file_in_llama_cpp_layout_matches_the_hf_weights(family, tmp_path):
    from test_parity_mlx_lm import FAMILIES as PARITY

    text = dict(PARITY[family].get("text_config", PARITY[family]), model_type="gemma4_text")
    exact = write_gemma4_gguf(tmp_path / "g4.gguf", text, random_weights(text))
    model = load_model(tmp_path / "g4.gguf", compute="float32")
    cfg = model.config
    assert cfg.model_type == "gemma4_text" and cfg.layer_types == text["layer_types"]
    assert cfg.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    assert (cfg.rope_local_base_freq, cfg.global_head_dim, cfg.head_dim) == (10000.0, 32, 16)
    np.testing.assert_allclose(np.array(model(mx.array(TOKENS))), reference_logits(text, exact), atol=1e-4)


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe"])
def test_gemma4_files_agree_with_llama_cpp(family, tmp_path):
    """llama.cpp reads our Gemma 4 files as the loader does. Two facts of llama.cpp shape the test models:
    its sharing layers reuse the last KV layer (full) and the one before (sliding), so the E2B-like model
    puts its kinds that way (real E2B/E4B do); and its 8-bit activations flip near-tied routing, so the
    router's input scale is 1 (random scales near 0 make every expert tie)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from test_parity_mlx_lm import FAMILIES as PARITY

    text = dict(PARITY[family].get("text_config", PARITY[family]), model_type="gemma4_text")
    if text.get("num_kv_shared_layers"):
        text["layer_types"] = ["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"]
    weights = {k: (np.ones_like(v) if k.endswith("router.scale") else v) for k, v in random_weights(text).items()}
    write_gemma4_gguf(tmp_path / "g4.gguf", text, weights)
    assert_agrees_with_llama_cpp(llama_cpp, tmp_path / "g4.gguf")
