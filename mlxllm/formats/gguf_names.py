"""llama.cpp's GGUF tensor names -> the decoder's (Hugging Face) parameter names, per family."""

from __future__ import annotations

from . import gemma4, hybrid

# DeepSeek-V3-style routing (sigmoid scores, groups, scaled weights, leading dense layers, shared_experts).
DEEPSEEK_ROUTED = ("dots1", "glm4_moe", "deepseek_v2", "deepseek_v3", "mistral4")

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    # DeepSeek's latent attention; kv_b_proj comes split (k_b transposed) as mlx-lm also stores it.
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.embed_q",
    "attn_v_b": "self_attn.unembed_out",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",  # GLM-4.5's name for the same norm
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixture of experts: the router, the stacked experts, the shared expert and its gate.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
    "ffn_gate_up_exps": "mlp.switch_mlp.gate_up_proj",  # gate and up stacked (split at load)
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "exp_probs_b": "mlp.gate",
}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the norm *before* the MLP there.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


# gpt-oss: norms named as in Gemma's table, its router and experts under their own names, the sinks.
_GPT_OSS_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.router",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


# Llama 4: the feed-forward is named feed_forward, its router router, its experts experts.
_LLAMA4_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_gate": "feed_forward.gate_proj",
    "ffn_up": "feed_forward.up_proj",
    "ffn_down": "feed_forward.down_proj",
    "ffn_gate_inp": "feed_forward.router",
    "ffn_gate_exps": "feed_forward.experts.gate_proj",
    "ffn_up_exps": "feed_forward.experts.up_proj",
    "ffn_down_exps": "feed_forward.experts.down_proj",
    "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
    "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
    "ffn_down_shexp": "feed_forward.shared_expert.down_proj",
}


def hf_name(name: str, family: str) -> str:
    """GGUF tensor name -> our (Hugging Face) parameter name; unknown names pass through unchanged."""
    parts = name.split(".")
    top = {**_TOP_NAMES, **gemma4.TOP_NAMES} if family == "gemma4_text" else _TOP_NAMES
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    if family == "gemma4_text" and parts[0] == "blk" and len(parts) >= 4:
        ours = gemma4.layer_name(parts[1], parts[2], parts[3:])
        if ours is not None:
            return ours
    table = {"gemma3_text": _GEMMA_LAYER_NAMES, "gemma4_text": _GEMMA_LAYER_NAMES, "gpt_oss": _GPT_OSS_LAYER_NAMES,
             "llama4_text": _LLAMA4_LAYER_NAMES}.get(family, _LAYER_NAMES)
    if family == "gpt_oss" and parts[0] == "blk" and parts[2:] == ["attn_sinks", "weight"]:
        return f"model.layers.{parts[1]}.self_attn.sinks"
    if family in hybrid.FAMILIES and parts[0] == "blk" and len(parts) >= 3:
        ours = hybrid.gguf_name(parts[1], parts[2], parts[3:])
        if ours is not None:
            return ours
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in table:
        module = table[parts[2]]
        if family == "mixtral" and module.startswith("mlp.") and parts[2].endswith(("_inp", "_exps")):
            module = "block_sparse_moe." + module[len("mlp."):]
        if family in DEEPSEEK_ROUTED:  # DeepSeek names: shared_experts, the router's selection bias
            module = module.replace("mlp.shared_expert.", "mlp.shared_experts.")
            if family == "dots1":
                module = module.replace("mlp.switch_mlp.", "mlp.experts.")
            if parts[2] == "exp_probs_b":
                return f"model.layers.{parts[1]}.mlp.gate.e_score_correction_bias"
        if family == "phi3" and parts[2] == "ffn_up":  # gate and up stacked, as the HF checkpoint holds them
            module = "mlp.gate_up_proj"
        return ".".join(["model.layers", parts[1], module, *parts[3:]])
    return name
