"""Checkpoint layouts of the hybrid linear-attention families (Qwen3-Next, Qwen3.5 dense and MoE).

The decoder holds these models as mlx-lm does (mlx-community checkpoints load as they are): RMSNorm
weights are the scales themselves, the depthwise convolution is ``[channels, kernel, 1]``, experts
are stacked. The other layouts are converted once, at load time:

Hugging Face checkpoints (recognised, as mlx-lm does, by a convolution stored ``[channels, 1, kernel]``)
store the decoder's RMSNorm weights as ``w`` for a scale of ``1 + w`` (not the gated norm inside the
linear layers); Qwen3.5-MoE stores each layer's experts fused (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``); MTP heads and the vision tower are not the text decoder's.

llama.cpp's converter (``convert_hf_to_gguf.py``, Qwen3NextModel and its Qwen3.5 subclasses) writes:
  * ``ssm_a = -exp(A_log)``, ``ssm_dt.bias = dt_bias``, ``ssm_conv1d`` squeezed to ``[channels, kernel]``,
    the norms with the 1 already added (so, as we hold them);
  * Qwen3-Next's ``in_proj_qkvz`` (grouped by key head: ``[q, k, v, z]`` per head) regrouped into
    ``attn_qkv`` (all q, all k, all v) and ``attn_gate`` (z); older files keep it whole as ``ssm_in``;
    ``in_proj_ba`` as ``ssm_ba`` with every head's beta first, then every head's alpha (llama.cpp reads
    it so: a file written per key head, as the checkpoint holds it, disagrees with llama.cpp's logits);
  * Qwen3.5 (``qwen35`` / ``qwen35moe``): ``attn_qkv``, ``attn_gate``, ``ssm_beta``, ``ssm_alpha``, and
    when there are more value heads than key heads, every value-head axis reordered from grouped
    (by key head) to tiled order (``_LinearAttentionVReorderBase``), which we undo;
  * ``ssm.conv_kernel``, ``ssm.state_size`` (key head size), ``ssm.group_count`` (key heads),
    ``ssm.time_step_rank`` (value heads), ``ssm.inner_size`` (value heads x value head size),
    ``full_attention_interval`` and ``rope.dimension_count`` (the partial rotary) as metadata.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig
from .weights import Quantized, Tensor, unfuse_experts

FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
UNUSED_PREFIXES = ("mtp.", "model.visual.", "visual.")
_PLUS_ONE = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight",
             "self_attn.q_norm.weight", "self_attn.k_norm.weight")

# GGUF tensor kinds -> our module names (under model.layers.N.)
LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_in": "linear_attn.in_proj_qkvz",
    "ssm_ba": "linear_attn.in_proj_ba",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_dt": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}


def gguf_name(layer: str, kind: str, rest: list[str]) -> str | None:
    """Our name for GGUF tensor ``blk.<layer>.<kind>.<rest>`` of these families, or None (not theirs)."""
    if kind not in LAYER_NAMES:
        return None
    if kind in ("ssm_a", "ssm_dt"):  # parameters, not modules: ``ssm_a`` / ``ssm_dt.bias``
        rest = []
    return ".".join(["model.layers", layer, LAYER_NAMES[kind], *rest])


def original_layout(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether these are Hugging Face's own tensors (a convolution ``[C, 1, K]``), not mlx-community's."""
    return any(name.endswith("conv1d.weight") and len(s) == 3 and s[-1] != 1 for name, s in shapes.items())


def from_hf(name: str, value: Tensor, original: bool) -> Iterator[tuple[str, Tensor]]:
    """One checkpoint tensor -> the decoder's tensor(s) under their names."""
    if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        yield from unfuse_experts(name, value)
    elif original and name.endswith("conv1d.weight"):
        yield name, value.moveaxis(2, 1)
    elif original and name.endswith(_PLUS_ONE):
        yield name, value.astype(mx.float32) + 1.0
    else:
        yield name, value


def gguf_config(get: Callable[..., Any], head_dim: int | None, hidden: int, heads: int) -> dict[str, Any]:
    """Our config fields from a qwen3next / qwen35 / qwen35moe file's metadata (``get(key, default)``)."""
    value_heads = get("ssm.time_step_rank")
    inner = get("ssm.inner_size")
    if not isinstance(value_heads, int) or not isinstance(inner, int) or value_heads < 1 or inner % value_heads:
        raise UserError(f"GGUF ssm.inner_size {inner!r} is not a multiple of ssm.time_step_rank {value_heads!r}")
    rotary = get("rope.dimension_count", None)
    dims = head_dim or hidden // heads
    return {"linear_conv_kernel_dim": get("ssm.conv_kernel"), "linear_key_head_dim": get("ssm.state_size"),
            "linear_num_key_heads": get("ssm.group_count"), "linear_num_value_heads": value_heads,
            "linear_value_head_dim": inner // value_heads,
            "full_attention_interval": get("full_attention_interval", 4),
            "partial_rotary_factor": 1.0 if rotary is None else rotary / dims}


def _each(value: Tensor, fn: Callable[[mx.array], mx.array]) -> Tensor:
    """``fn`` on a float tensor, or on every array of a quantized one (row-wise operations only)."""
    if isinstance(value, Quantized):
        biases = None if value.biases is None else fn(value.biases)
        return Quantized(fn(value.weight), fn(value.scales), biases, value.group_size, value.bits, value.mode)
    return fn(value)


def _grouped(x: mx.array, axis: int, per: int, key_heads: int) -> mx.array:
    """Value heads along ``axis`` from llama.cpp's tiled order back to grouped by key head."""
    shape = x.shape
    x = x.reshape(*shape[:axis], per, key_heads, -1, *shape[axis + 1 :])
    return x.swapaxes(axis, axis + 1).reshape(shape)


def fix_gguf(kind: str, value: Tensor, cfg: ModelConfig, arch: str) -> Tensor:
    """Undo the converter's changes to one linear-layer tensor (``kind``: ``ssm_a``, ``attn_qkv`` ...)."""
    if kind == "ssm_a":
        value = mx.log(-value.astype(mx.float32))
    per, nk = cfg.linear_num_value_heads // cfg.linear_num_key_heads, cfg.linear_num_key_heads
    key = 2 * nk * cfg.linear_key_head_dim
    if arch in ("qwen35", "qwen35moe") and per > 1:
        if kind in ("attn_qkv", "ssm_conv1d"):
            value = _each(value, lambda x: mx.concatenate([x[:key], _grouped(x[key:], 0, per, nk)]))
        elif kind in ("attn_gate", "ssm_beta", "ssm_alpha", "ssm_dt", "ssm_a"):
            value = _each(value, lambda x: _grouped(x, 0, per, nk))
        elif kind == "ssm_out":  # columns: packed groups move with their heads only if no group spans two
            if isinstance(value, Quantized) and cfg.linear_value_head_dim % value.group_size:
                value = value.dequantize()
            value = _each(value, lambda x: _grouped(x, x.ndim - 1, per, nk))
    if arch == "qwen3next" and kind == "ssm_ba":  # stored all b, then all a; held b then a per key head
        value = _each(value, lambda x: x.reshape(2, nk, per, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape))
    if kind == "ssm_conv1d":
        value = value[..., None]
    return value


def merge_qkvz(held: dict[str, Tensor], name: str, value: Tensor, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Qwen3-Next: once a layer's ``in_proj_qkv`` and ``in_proj_z`` are both read, yield the
    ``in_proj_qkvz`` they were cut from; every other tensor passes through."""
    if not name.endswith((".linear_attn.in_proj_qkv.weight", ".linear_attn.in_proj_z.weight")):
        yield name, value
        return
    held[name] = value
    prefix = name.rsplit(".", 2)[0]
    qkv, z = held.get(f"{prefix}.in_proj_qkv.weight"), held.get(f"{prefix}.in_proj_z.weight")
    if qkv is None or z is None:
        return
    del held[f"{prefix}.in_proj_qkv.weight"], held[f"{prefix}.in_proj_z.weight"]
    nk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim

    def fused(rows: mx.array, gate: mx.array) -> mx.array:
        q, k, v = rows[: nk * dk], rows[nk * dk : 2 * nk * dk], rows[2 * nk * dk :]
        parts = [t.reshape(nk, -1, *t.shape[1:]) for t in (q, k, v, gate)]
        return mx.concatenate(parts, axis=1).reshape(-1, *rows.shape[1:])

    if isinstance(qkv, Quantized) != isinstance(z, Quantized):
        raise UserError(f"'{prefix}': attn_qkv and attn_gate must be stored alike to be fused")
    if isinstance(qkv, Quantized):
        biases = None if qkv.biases is None else fused(qkv.biases, z.biases)
        yield f"{prefix}.in_proj_qkvz.weight", Quantized(fused(qkv.weight, z.weight), fused(qkv.scales, z.scales),
                                                         biases, qkv.group_size, qkv.bits, qkv.mode)
    else:
        yield f"{prefix}.in_proj_qkvz.weight", fused(qkv, z)
