"""Writing a model as an mlx-community directory that mlxllm and mlx-lm both read.

The directory holds ``config.json`` (with mlx-community's ``quantization`` block, per-layer entries
included), safetensors shards with an index, the tokenizer files and a model card, under Hugging Face
parameter names. Everything is written into a temporary directory that is renamed at the end, so an
interrupted or failed save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from ..files import replacing_dir
from ..model.config import ModelConfig
from ..model.decoder import Model

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                  "dots1": "Dots1ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                  "deepseek_v3": "DeepseekV3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
                  "glm4_moe": "Glm4MoeForCausalLM", "ministral3": "Ministral3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
                  "llama4_text": "Llama4ForCausalLM", "mistral4": "Mistral4ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                  "qwen3_5": "Qwen3_5ForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
                  "gemma4_text": "Gemma4ForCausalLM"}
_MOE = ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers")
_LINEAR = ("layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
           "linear_value_head_dim", "linear_conv_kernel_dim", "partial_rotary_factor")
_LATENT = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_COMMON = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
           "max_position_embeddings", "tie_word_embeddings", "attention_bias")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` a Hugging Face checkpoint of this family would carry."""
    if (cfg.rope_scaling or {}).get("rope_type") == "freq_factors":
        raise UserError("RoPE frequency factors from a GGUF rope_freqs tensor have no config.json form")
    out: dict[str, Any] = {"architectures": [_ARCHITECTURES[cfg.model_type]]}
    out.update({k: getattr(cfg, k) for k in _COMMON})
    if cfg.model_type == "gemma3_text":
        first_global = next((i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)), cfg.num_hidden_layers)
        out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                   rope_local_base_freq=cfg.rope_local_base_freq, layer_types=cfg.layer_types,
                   sliding_window_pattern=first_global + 1, hidden_activation="gelu_pytorch_tanh")
    elif cfg.sliding_window is not None:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    if cfg.kv_lora_rank:
        out.update({k: getattr(cfg, k) for k in _LATENT})
    if cfg.no_rope_layers is not None:
        out["no_rope_layers"] = cfg.no_rope_layers
    if cfg.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.linear_num_key_heads:  # mlx-lm takes Qwen3.5's RoPE from rope_parameters only
        out.update({k: getattr(cfg, k) for k in _LINEAR})
        interval = cfg.layer_types.index("full_attention") + 1 if "full_attention" in cfg.layer_types else 0
        if interval and all(t == ("linear_attention" if (i + 1) % interval else "full_attention")
                            for i, t in enumerate(cfg.layer_types)):
            out["full_attention_interval"] = interval  # what mlx-lm reads
        if cfg.model_type != "qwen3_next":
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                      "partial_rotary_factor": cfg.partial_rotary_factor, **(cfg.rope_scaling or {})}
    if cfg.num_experts and (cfg.router == "sigmoid_group" or cfg.model_type.startswith("deepseek")
                            or cfg.model_type == "mistral4"):
        sigmoid = cfg.router == "sigmoid_group"  # DeepSeek-style names
        out.update(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   n_shared_experts=(cfg.shared_expert_intermediate_size or 0) // cfg.moe_intermediate_size,
                   first_k_dense_replace=len(cfg.mlp_only_layers), routed_scaling_factor=cfg.routed_scaling_factor,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, moe_layer_freq=1,
                   scoring_func="sigmoid" if sigmoid else "softmax",
                   topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if cfg.n_group > 1 else "greedy")
    elif cfg.num_experts:
        out.update({k: getattr(cfg, k) for k in _MOE})
        out["num_local_experts" if cfg.model_type in ("mixtral", "gpt_oss") else "num_experts"] = cfg.num_experts
    _family_fields(cfg, out)
    return {k: v for k, v in out.items() if v is not None or k in ("q_lora_rank", "rope_scaling", "final_logit_softcapping")}


def _family_fields(cfg: ModelConfig, out: dict[str, Any]) -> None:
    """Where a family's config.json spells a setting its own way: GLM's ``use_qk_norm``, Phi-3's LongRoPE
    (``type`` and the original context beside it), gpt-oss's layer types, Llama 4's wrapper and names,
    Ministral 3's ``rope_parameters`` with the query scale."""
    scaling = dict(cfg.rope_scaling or {})
    if cfg.model_type == "glm4_moe":
        out["use_qk_norm"] = cfg.qk_norm
    elif cfg.model_type == "phi3" and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        out["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        scaling.pop("max_position_embeddings", None)
        out["rope_scaling"] = {"type": scaling.pop("rope_type", scaling.pop("type", "longrope")), **scaling}
    elif cfg.model_type == "gpt_oss":
        out["layer_types"] = cfg.layer_types
        out.pop("use_sliding_window", None)
    elif cfg.model_type == "llama4_text":  # as shipped: the text model inside Llama 4's multimodal wrapper
        text = {k: v for k, v in out.items() if k != "architectures"}
        for k in ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                  "norm_topk_prob", "mlp_only_layers"):
            text.pop(k, None)
        if cfg.num_experts:
            text.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size,
                        intermediate_size_mlp=cfg.intermediate_size, interleave_moe_layer_step=cfg.decoder_sparse_step)
        text.update(attention_chunk_size=cfg.attention_chunk_size, use_qk_norm=cfg.qk_rms_after_rope,
                    no_rope_layers=cfg.no_rope_layers, layer_types=cfg.layer_types,
                    attn_temperature_tuning=cfg.query_scale_beta is not None,
                    floor_scale=cfg.query_scale_length, attn_scale=cfg.query_scale_beta or 0.1)
        out.clear()
        out.update(architectures=["Llama4ForConditionalGeneration"], model_type="llama4", text_config=text)
    elif cfg.model_type == "gemma4_text":
        _gemma4_fields(cfg, out)
    elif cfg.model_type in ("ministral3", "mistral4"):
        params = {"rope_type": "default", **scaling, "rope_theta": out.pop("rope_theta")}
        if cfg.query_scale_beta is not None:
            params.update(llama_4_scaling_beta=cfg.query_scale_beta,
                          original_max_position_embeddings=cfg.query_scale_length)
        out.pop("rope_scaling")
        out.update(rope_parameters=params, **({} if cfg.kv_lora_rank else {"layer_types": cfg.layer_types}))
        out.pop("use_sliding_window", None)


def _gemma4_fields(cfg: ModelConfig, out: dict[str, Any]) -> None:
    """Gemma 4's names: RoPE per layer kind in ``rope_parameters``, experts beside the MLP as
    ``enable_moe_block`` / ``top_k_experts``, and every field whose default differs between transformers
    and mlx-lm stated (soft-capping, KV sharing, double-wide MLPs, per-layer inputs)."""
    for key in ("rope_theta", "rope_scaling", "use_sliding_window", *_MOE):
        out.pop(key, None)
    out.update(
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq},
                         "full_attention": {"rope_type": "default", **(cfg.rope_scaling or {}),
                                            "rope_theta": cfg.rope_theta}},
        layer_types=cfg.layer_types, sliding_window=cfg.sliding_window, hidden_activation="gelu_pytorch_tanh",
        global_head_dim=cfg.global_head_dim, attention_k_eq_v=cfg.attention_k_eq_v,
        num_global_key_value_heads=cfg.num_global_key_value_heads, num_kv_shared_layers=cfg.num_kv_shared_layers,
        use_double_wide_mlp=cfg.use_double_wide_mlp, hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input, final_logit_softcapping=cfg.final_logit_softcapping,
        enable_moe_block=cfg.enable_moe_block)
    if cfg.enable_moe_block:
        out.update(num_experts=cfg.num_experts, top_k_experts=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size)


SHARD_BYTES = 5 * 2**30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx-community's ``quantization`` entry: the most common (group_size, bits, mode) as the default
    and an override for every quantized module that differs."""
    found = {name: (m.group_size, m.bits, getattr(m, "mode", "affine")) for name, m in model.named_modules()
             if "scales" in m and hasattr(m, "bits")}  # fmt: skip
    if not found:
        return None
    group, bits, mode = Counter(found.values()).most_common(1)[0][0]
    block: dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for name, (g, b, m) in sorted(found.items()):
        if (g, b, m) != (group, bits, mode):
            block[name] = {"group_size": g, "bits": b, "mode": m}
    return block


def _write_shards(weights: dict[str, mx.array], out: Path, shard_bytes: int) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if shards[-1] and size + w.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model: Model, out: str | Path, tokenizer_files: Path | None = None, *,
               shard_bytes: int = SHARD_BYTES, card: str | None = None, keep: tuple[str, ...] = ()) -> Path:
    """Write ``model`` to the directory ``out`` (replaced if it exists): config, safetensors shards
    of at most ``shard_bytes``, the tokenizer files found in ``tokenizer_files``, and ``card`` as
    README.md. Written to a fresh folder renamed at the end, so a failure leaves no partial directory;
    the entries named in ``keep`` (a training checkpoint) move from the old ``out`` to the new one."""
    out = Path(out)
    with replacing_dir(out) as tmp:
        config = hf_config(model.config)
        prefix = "language_model." if "text_config" in config else ""  # a wrapper holds the text model there
        quant = quantization_block(model)
        if quant:
            config["quantization"] = {f"{prefix}{k}" if isinstance(v, dict) else k: v for k, v in quant.items()}
        _write_shards({prefix + k: v for k, v in tree_flatten(model.parameters())}, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES if tokenizer_files is not None else ():
            if (tokenizer_files / name).exists():
                shutil.copy(tokenizer_files / name, tmp / name)
        if card:
            (tmp / "README.md").write_text(card)
        for name in keep:
            if (out / name).exists():
                os.replace(out / name, tmp / name)
    return out


def model_card(source: str, model: Model, weights: str) -> str:
    """A short README.md saying where the weights came from and how to run them."""
    from importlib.metadata import version

    cfg = model.config
    return (f"# {Path(source).name}\n\nConverted from `{source}` by mlxllm {version('mlxllm')} "
            f"(`mlxllm convert`).\n\n- architecture: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
            f"hidden size {cfg.hidden_size}\n- weights: {weights}\n\n"
            "```bash\nmlxllm generate --model <this directory> --prompt \"Hello\"\n"
            "mlx_lm.generate --model <this directory> --prompt \"Hello\"\n```\n")


