"""Splitting the one decoder over the ranks of an ``mx.distributed`` group, written once for every family:
tensor parallel (``shard_model``: heads and hidden columns per rank) or pipeline parallel
(``pipeline_model``: runs of layers per rank, hidden states passed on by ``decoder.Model.hidden``).

Each rank keeps ``1/N`` of the attention heads and of the MLP and expert hidden columns: q/k/v and
gate/up are split by output rows (column-parallel; fused ``qkv_proj`` / ``gate_up_proj`` part by part),
o and down by input columns (row-parallel), so attention and the MLP end in one all-reduce each (a MoE
block in one for its experts and one for its shared expert). Key/value heads split with their queries,
so GQA holds per rank; with fewer key/value heads than ranks each rank keeps the one its query heads
read. Embeddings, norms, routers and the head are replicated. Quantized weights shard as they are stored
(MLX's sharded quantized linears; expert stacks sliced along rows, or along whole quantization groups
of columns). Layers this does not cover yet (latent attention, linear attention, Gemma 4's KV sharing,
norms over all heads' projections) are refused with one line.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..errors import UserError
from .moe import ExpertMLPs, MoE


def shard_model(model: nn.Module, group: mx.distributed.Group) -> None:
    """Split ``model`` (a ``decoder.Model``) across the ranks of ``group`` in place; a model whose heads
    or hidden widths do not divide by the rank count is refused, naming the dimension and counts that work."""
    n, cfg = group.size(), model.config
    if n == 1:
        return
    check_shardable(cfg, n)
    for block in model.layers:
        _shard_attention(block.self_attn, n, group)
        ffn = block[cfg.ffn_name]
        if isinstance(ffn, MoE):
            _shard_moe(ffn, n, group)
        else:
            _shard_mlp(ffn, group)


def _divisors(count: int) -> str:
    return ", ".join(str(d) for d in range(1, count + 1) if count % d == 0)


class Stage:
    """One rank's part of a pipeline: layers ``[first, end)`` of the model, in ``group``."""

    def __init__(self, first: int, end: int, group: mx.distributed.Group) -> None:
        self.first, self.end, self.group, self.rank = first, end, group, group.rank()


def pipeline_model(model: nn.Module, group: mx.distributed.Group) -> None:
    """Pipeline parallel, in place: each rank keeps a contiguous run of layers (as even as the count
    allows) and drops the others' weights; hidden states go rank to rank, and every rank gets the last
    stage's to apply the (replicated) head. Layers that pass state sideways are refused."""
    n, cfg = group.size(), model.config
    if n == 1:
        return
    layers = cfg.num_hidden_layers
    if layers < n:
        raise UserError(f"{n} pipeline ranks need at least {n} layers; the model has {layers}")
    if cfg.num_kv_shared_layers:
        raise UserError("pipeline parallelism does not cover KV-sharing layers (Gemma 4) yet: run it on one rank")
    bounds = [i * layers // n for i in range(n + 1)]
    first, end = bounds[group.rank()], bounds[group.rank() + 1]
    for i in range(layers):
        if not first <= i < end:
            model.model.layers[i] = nn.Module()  # another rank's: nothing held here
    model.pipeline = Stage(first, end, group)


def replicated(name: str) -> bool:
    """Whether every rank keeps the whole of this parameter (embeddings, norms, routers, the head)."""
    return any(part in name for part in ("embed_tokens", "norm", "lm_head", ".gate.", ".router.", "sinks",
                                         "shared_expert_gate"))


def check_shardable(cfg, n: int) -> None:
    """Refuse, in one line naming the dimension and the rank counts that work, a model ``n`` ranks cannot split."""
    refused = [(cfg.kv_lora_rank, "latent attention (DeepSeek, Mistral 4)"),
               (any(cfg.is_linear(i) for i in range(cfg.num_hidden_layers)), "linear-attention layers (Qwen3.5)"),
               (cfg.num_kv_shared_layers, "KV-sharing layers (Gemma 4)"),
               (cfg.qk_norm and not cfg.qk_norm_per_head, "q/k norms over all heads (OLMoE)")]
    for present, what in refused:
        if present:
            raise UserError(f"tensor parallelism does not cover {what} yet: run it on one rank")
    kv = cfg.num_key_value_heads
    if kv % n and (n % kv or cfg.fused_qkv):
        can = _divisors(kv) + ("" if cfg.fused_qkv else f", or multiples of {kv}")
        raise UserError(f"num_key_value_heads is {kv}: {n} ranks can neither split nor replicate them (rank counts "
                        f"that can: {can})")
    sizes = {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}
    if cfg.num_experts:
        sizes["moe_intermediate_size"] = cfg.moe_intermediate_size or cfg.intermediate_size
        if cfg.shared_expert_intermediate_size:
            sizes["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    for name, value in sizes.items():
        if value % n:
            raise UserError(f"{name} is {value}, which {n} ranks cannot split evenly (rank counts that can: "
                            f"{_divisors(value)})")


def _shard_attention(attn: nn.Module, n: int, group: mx.distributed.Group) -> None:
    r, kv_heads = group.rank(), attn.n_kv_heads
    if "qkv_proj" in attn:  # q, k and v rows split each by itself
        q, k, _ = attn.widths
        attn.qkv_proj = shard_linear(attn.qkv_proj, "all-to-sharded", segments=[q, q + k], group=group)
    else:
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        for name in ("k_proj", "v_proj"):
            if kv_heads % n == 0:
                attn[name] = shard_linear(attn[name], "all-to-sharded", group=group)
            else:  # fewer key/value heads than ranks: each rank keeps the one its query heads read
                head = r * kv_heads // n
                _keep_rows(attn[name], slice(head * attn.head_dim, (head + 1) * attn.head_dim))
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.widths = [w // n for w in attn.widths]
    attn.n_heads, attn.n_kv_heads = attn.n_heads // n, max(kv_heads // n, 1)
    if "sinks" in attn:  # one logit per query head: this rank's heads'
        r = group.rank()
        attn.sinks = attn.sinks[r * attn.n_heads:(r + 1) * attn.n_heads]


def _keep_rows(layer: nn.Module, rows: slice) -> None:
    """A (quantized) linear map cut to some of its output rows, in place: no communication."""
    for key in ("weight", "scales", "biases", "bias"):
        if key in layer:
            layer[key] = mx.contiguous(layer[key][rows])


def _shard_mlp(mlp: nn.Module, group: mx.distributed.Group) -> None:
    """Column-parallel gate/up, row-parallel down (which all-reduces)."""
    if "gate_up_proj" in mlp:
        mlp.gate_up_proj = shard_linear(mlp.gate_up_proj, "all-to-sharded", segments=2, group=group)
    else:
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def _shard_moe(moe: MoE, n: int, group: mx.distributed.Group) -> None:
    r = group.rank()
    experts: ExpertMLPs = moe[moe.stack_name]
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
        layer = experts[name]
        for key in ("weight", "scales", "biases", "bias"):
            if key not in layer or (key == "bias" and axis == 2):
                continue
            a = layer[key]
            step = a.shape[axis] // n
            if axis == 2 and key in ("scales", "biases") and a.shape[axis] % n:
                raise UserError(f"{name}: {a.shape[axis]} quantization groups per row cannot split over {n} ranks")
            index = [slice(None)] * a.ndim
            index[axis] = slice(r * step, (r + 1) * step)
            layer[key] = mx.contiguous(a[tuple(index)])
        if axis == 2 and "bias" in layer and r:  # the row-parallel bias is added once, by rank 0
            layer.bias = mx.zeros_like(layer.bias)
    if moe.shared_name:  # reduces its own output (before Qwen2-MoE's gate multiplies it)
        _shard_mlp(moe[moe.shared_name], group)
    moe.reduce_group = group
