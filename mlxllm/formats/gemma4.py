"""Gemma 4 in llama.cpp's GGUF layout (architecture ``gemma4``).

llama.cpp states per-layer sizes as arrays (the feed-forward width, doubled on KV-sharing layers; key/value
heads, their own on full-attention layers), the layer kinds as a per-layer flag list, the full layers'
head size as ``key_length`` beside the sliding ones' ``key_length_swa``, and the full layers' proportional
RoPE as a ``rope_freqs`` tensor (1 for the pairs that turn, 1e30 for the rest). Experts are one gate|up
stack ``[experts, 2 x width, hidden]`` beside ``ffn_down_exps``; the router's input scale and the
per-expert scales ride as ``.scale`` tensors of ``ffn_gate_inp`` and ``ffn_down_exps``.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..model.config import ModelConfig

# llama.cpp's per-layer names -> ours (beside Gemma's sandwich norms).
LAYER_NAMES = {"pre_ffw_norm_2": "pre_feedforward_layernorm_2", "post_ffw_norm_1": "post_feedforward_layernorm_1",
               "post_ffw_norm_2": "post_feedforward_layernorm_2", "ffn_gate_inp": "router.proj",
               "ffn_gate_up_exps": "experts.switch_glu.gate_up_proj", "ffn_down_exps": "experts.switch_glu.down_proj",
               "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
               "post_norm": "post_per_layer_input_norm"}
TOP_NAMES = {"per_layer_token_embd": "model.embed_tokens_per_layer",
             "per_layer_model_proj": "model.per_layer_model_projection",
             "per_layer_proj_norm": "model.per_layer_projection_norm"}
_SCALES = {"ffn_gate_inp": "router.scale", "ffn_down_exps": "router.per_expert_scale",
           "layer_output_scale": "layer_scalar"}  # parameters llama.cpp stores as tensors of other modules
_SHARED_KV = ("attn_k", "attn_v", "attn_k_norm")


def layer_name(layer: str, kind: str, leaf: list[str]) -> str | None:
    """Our name for ``blk.<layer>.<kind>.<leaf>``, where Gemma 4's differ from Gemma's (None: the same)."""
    if kind in _SCALES and leaf == (["weight"] if kind == "layer_output_scale" else ["scale"]):
        return f"model.layers.{layer}.{_SCALES[kind]}"
    if kind in LAYER_NAMES:
        return ".".join(["model.layers", layer, LAYER_NAMES[kind], *leaf])
    return None


def _per_layer(meta: Mapping[str, Any], key: str, n: int) -> list:
    value = meta.get(key)
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise UserError(f"GGUF '{key}' lists {len(values)} values for {n} layers")
    return values


def gguf_metadata(meta: Mapping[str, Any], arch: str, shapes: Mapping[str, tuple[int, ...]]
                  ) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``meta`` with the per-layer arrays and the full layers' sizes replaced by the sliding layers' (what
    the common reader takes), and the config fields Gemma 4 adds."""
    def key(name: str) -> str:
        return f"{arch}.{name}"

    n = meta.get(key("block_count"))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"GGUF '{key('block_count')}' is {n!r}, not a layer count")
    pattern = meta.get(key("attention.sliding_window_pattern"), 5)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in _per_layer(meta, key("attention.sliding_window_pattern"), n)]
    else:  # llama.cpp: the last of every ``pattern`` layers is full
        sliding = [i % pattern < pattern - 1 for i in range(n)] if isinstance(pattern, int) and pattern > 0 else []
    if len(sliding) != n or all(sliding):
        raise UserError(f"GGUF '{key('attention.sliding_window_pattern')}' is {pattern!r}, not a layer pattern "
                        "with a full-attention layer")
    widths = _per_layer(meta, key("feed_forward_length"), n)
    kv_heads = _per_layer(meta, key("attention.head_count_kv"), n)
    shared = meta.get(key("attention.shared_kv_layers"), 0)
    full = sliding.index(False)
    swa_dim = meta.get(key("attention.key_length_swa"), meta.get(key("attention.key_length")))
    keys_as_values = f"blk.{full}.attn_k.weight" in shapes and f"blk.{full}.attn_v.weight" not in shapes
    experts = meta.get(key("expert_count"), 0)
    overrides = {key("feed_forward_length"): widths[0], key("attention.head_count_kv"): kv_heads[sliding.index(True)]
                 if any(sliding) else kv_heads[0], key("attention.key_length"): swa_dim,
                 key("attention.value_length"): swa_dim, key("rope.dimension_count"): swa_dim,
                 key("expert_count"): 0}
    per_layer = meta.get(key("embedding_length_per_layer_input"), 0)
    config = {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": meta.get(key("attention.sliding_window")),
        "global_head_dim": meta.get(key("attention.key_length")), "attention_k_eq_v": keys_as_values,
        "num_global_key_value_heads": kv_heads[full] if keys_as_values else None,
        "num_kv_shared_layers": shared, "use_double_wide_mlp": bool(shared) and widths[-1] == 2 * widths[0],
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": shapes.get("per_layer_token_embd.weight", (None,))[0] if per_layer else None,
        "final_logit_softcapping": meta.get(key("final_logit_softcapping")) or None,
        "enable_moe_block": bool(experts), "num_experts": experts or None,
        "top_k_experts": meta.get(key("expert_used_count")) if experts else None,
        "moe_intermediate_size": meta.get(key("expert_feed_forward_length")) if experts else None,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": meta.get(key("rope.freq_base_swa"), 10000.0)},
            "full_attention": {"rope_type": "default", "rope_theta": meta.get(key("rope.freq_base"), 1e6)}},
    }
    return ChainMap(overrides, meta), config


def proportional_rope(factors: list[float], cfg: ModelConfig) -> dict[str, Any] | None:
    """The full layers' RoPE from llama.cpp's ``rope_freqs`` (None: factors that are not its 1 / 1e30 form)."""
    turned = sum(f == 1.0 for f in factors)
    if any(f != 1.0 for f in factors[:turned]) or any(f < 1e20 for f in factors[turned:]):
        return None
    return {"rope_type": "proportional", "partial_rotary_factor": 2 * turned / cfg.global_head_dim,
            "rope_theta": cfg.rope_theta}


def unused(name: str, cfg: ModelConfig) -> bool:
    """Key/value tensors a KV-sharing layer still carries (llama.cpp does not read them either)."""
    parts = name.split(".")
    return parts[0] == "blk" and parts[2] in _SHARED_KV and cfg.kv_source(int(parts[1])) is not None


