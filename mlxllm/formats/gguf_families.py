"""GGUF metadata only some architectures carry, read into the Hugging Face config fields ``from_hf`` takes
(the common keys are ``gguf.py``'s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _latent_metadata(get, config: dict[str, Any], family: str) -> None:
    """DeepSeek-V2/V3 as llama.cpp's converter writes them (``deepseek2``, and Mistral 4 on the same loader):
    latent attention stored as one-head MQA (key_length = kv_lora_rank + rope dims) with the per-head sizes
    under ``*_mla``; sigmoid gating means V3's routing; the YaRN multiplier written as 0.1 x mscale_all_dim
    (HF's mscale equals it in every DeepSeek release)."""
    rope = get("rope.dimension_count")
    config.update(num_key_value_heads=None, head_dim=get("attention.key_length_mla"),
                  kv_lora_rank=get("attention.kv_lora_rank"), q_lora_rank=get("attention.q_lora_rank", None),
                  qk_rope_head_dim=rope, qk_nope_head_dim=get("attention.key_length_mla") - rope,
                  v_head_dim=get("attention.value_length_mla"))
    if family == "mistral4":  # its own routing; Llama 4's query scale as the temperature keys
        if get("attention.temperature_scale", None) is not None:
            config["query_scale_beta"] = get("attention.temperature_scale")
            config["query_scale_length"] = get("attention.temperature_length", 8192)
    else:
        sigmoid = get("expert_gating_func", 1) == 2
        config["model_type"] = "deepseek_v3" if sigmoid else "deepseek_v2"
        groups = config.get("n_group", 1) > 1
        config["topk_method"] = "noaux_tc" if sigmoid else "group_limited_greedy" if groups else "greedy"
    if "rope_scaling" in config and get("rope.scaling.yarn_log_multiplier", None) is not None:
        config["rope_scaling"]["mscale"] = config["rope_scaling"]["mscale_all_dim"] = get(
            "rope.scaling.yarn_log_multiplier") / 0.1


def _llama4_metadata(get, config: dict[str, Any]) -> None:
    """Llama 4 as llama.cpp reads it: Hugging Face's names for the widths (``feed_forward_length`` is the
    dense layers', the experts' and shared expert's is ``expert_feed_forward_length``), chunks of 8192 on
    3 of every 4 layers unless the file sets a window of 0 (then every layer takes RoPE, attends fully),
    and the q/k norms on every model but the 128-expert one (Maverick), as llama.cpp decides."""
    if config.get("num_experts"):
        config.update(num_local_experts=config.pop("num_experts"), intermediate_size_mlp=config["intermediate_size"],
                      intermediate_size=get("expert_feed_forward_length"),
                      interleave_moe_layer_step=get("interleave_moe_layer_step", 1))
    config["use_qk_norm"] = config.get("num_local_experts") != 128
    if get("attention.sliding_window", None) == 0:
        config["no_rope_layers"] = [1] * config["num_hidden_layers"]
    else:
        config["attention_chunk_size"] = 8192


def family_metadata(family: str, get, config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Metadata only some architectures carry: GLM-4.5's q/k norms (present or not) and multi-token-
    prediction layers (counted in block_count, not part of the decoder), Phi-3's window (0: none), Ministral 3's query scale and YaRN
    multiplier (llama.cpp keeps one: HF's mscale and mscale_all_dim alike)."""
    if family in ("deepseek_v2", "mistral4"):
        _latent_metadata(get, config, family)
    if family == "llama4_text":
        _llama4_metadata(get, config)
    if family == "glm4_moe":
        config["use_qk_norm"] = "blk.0.attn_q_norm.weight" in shapes
    if family == "glm4_moe" and get("nextn_predict_layers", 0):
        config["num_nextn_predict_layers"] = get("nextn_predict_layers")
        config["num_hidden_layers"] -= config["num_nextn_predict_layers"]
    elif family == "gpt_oss":  # llama.cpp alternates window and full layers itself; HF's YaRN is untruncated
        config["sliding_window"] = get("attention.sliding_window")
        if "rope_scaling" in config:
            config["rope_scaling"]["truncate"] = False
    elif family == "phi3":
        window = get("attention.sliding_window", 0)
        config["sliding_window"] = window or None
    elif family == "ministral3" and get("attention.temperature_scale", None) is not None:
        config["query_scale_beta"] = get("attention.temperature_scale")
        config["query_scale_length"] = get("rope.scaling.original_context_length", 8192)
        if "rope_scaling" in config and get("rope.scaling.yarn_log_multiplier", None) is not None:
            config["rope_scaling"]["mscale"] = config["rope_scaling"]["mscale_all_dim"] = get(
                "rope.scaling.yarn_log_multiplier")
