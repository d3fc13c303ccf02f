"""The one decoder stack. Every supported family is this code with different ``ModelConfig`` switches.

Parameter names follow Hugging Face (``model.layers.N.self_attn.q_proj.weight`` ...) so HF and
mlx-community checkpoints load as they are and GGUF tensors are renamed once, at load time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from functools import partial

from .cache import (ChunkedKVCache, KVCache, KVSettings, QuantizedKVCache, RecurrentCache, RotatingKVCache, SharedKV,
                    causal_mask, shared_view)
from .cache.batch import FusedStep
from ..errors import UserError
from .config import ModelConfig
from .gated_delta import GatedDeltaNet
from .mla import LatentAttention
from .moe import MoE, ScaledRouter, SideExperts
from .rope import NoRoPE, make_rope, query_scale


class RMSNorm(nn.Module):
    """RMSNorm; Gemma stores ``w`` and scales by ``1 + w`` (``plus_one``)."""

    def __init__(self, dims: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = mx.zeros((dims,)) if plus_one else mx.ones((dims,))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight if self.plus_one else self.weight, self.eps)


class Attention(nn.Module):
    """Attention over the layer's own keys and values or, in a KV-sharing layer (``shared``), over
    those its source layer fetched this step (Gemma 4; only queries are projected)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.layer_kv_heads(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        self.scale = cfg.attention_scale
        bias = cfg.attention_bias
        self.gated = cfg.attn_output_gate  # q_proj yields [query, gate] per head (Qwen3-Next)
        self.shared = cfg.kv_source(layer) is not None
        self.k_is_v = cfg.shares_k_as_v(layer)  # no v_proj: values are the keys before their norm and RoPE
        n_kv = 0 if self.shared else 1 if self.k_is_v else 2
        self.widths = [self.n_heads * self.head_dim * (2 if self.gated else 1)] + [self.n_kv_heads * self.head_dim] * n_kv
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.widths), bias=bias)
        else:
            for name, width in zip(("q_proj", "k_proj", "v_proj"), self.widths):
                setattr(self, name, nn.Linear(cfg.hidden_size, width, bias=bias))
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.attention_sinks:  # gpt-oss: a learned logit per head that takes a share of the softmax
            self.sinks = mx.zeros((self.n_heads,))
        self.qk_norm_per_head = cfg.qk_norm_per_head
        if cfg.qk_norm:  # per head (Qwen3, Gemma 3) or over all heads' projections (OLMoE)
            q_dims, k_dims = (1, 1) if cfg.qk_norm_per_head else (self.n_heads, self.n_kv_heads)
            self.q_norm = RMSNorm(q_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            if not self.shared:
                self.k_norm = RMSNorm(k_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.v_norm = cfg.rms_norm_eps if cfg.v_norm else None  # weightless, per head (Gemma 4)
        sliding, rope_dims = cfg.is_sliding(layer), int(self.head_dim * cfg.partial_rotary_factor)
        if not cfg.uses_rope(layer):
            self.rope = NoRoPE()
        elif sliding and cfg.rope_local_base_freq is not None:  # Gemma 3/4 local layers: own base, no scaling
            self.rope = make_rope(rope_dims, cfg.rope_local_base_freq, None)
        else:
            self.rope = make_rope(rope_dims, cfg.rope_theta, cfg.rope_scaling, cfg.rope_traditional)
        scaled = cfg.query_scale_beta is not None and not (cfg.query_scale_nope_only and cfg.uses_rope(layer))
        self.query_scale = (cfg.query_scale_beta, cfg.query_scale_length, cfg.query_scale_shift) if scaled else None
        self.rms_after_rope = cfg.rms_norm_eps if cfg.qk_rms_after_rope and cfg.uses_rope(layer) else None

    def _project(self, x: mx.array) -> list[mx.array | None]:
        if "qkv_proj" in self:
            return mx.split(self.qkv_proj(x), [self.widths[0], self.widths[0] + self.widths[1]], axis=-1)
        if self.shared:
            return [self.q_proj(x), None, None]
        k = self.k_proj(x)
        return [self.q_proj(x), k, k if self.k_is_v else self.v_proj(x)]

    def __call__(self, x: mx.array, mask, cache, keep: list[SharedKV] | None = None) -> mx.array:
        """``keep``: a list the keys, values and mask this step attends over are added to, for the
        layers that share them (a ``SharedKV`` per attention call)."""
        B, L, _ = x.shape
        q, k, v = self._project(x)
        if self.gated:
            q, gate = mx.split(q.reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            q = q.reshape(B, L, -1)
        norm = "q_norm" in self
        if norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        if norm and self.qk_norm_per_head:
            q = self.q_norm(q)
        if k is not None:
            k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
            v = v.reshape(B, L, self.n_kv_heads, self.head_dim)
            if norm and self.qk_norm_per_head:
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = mx.fast.rms_norm(v, None, self.v_norm)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q = q.transpose(0, 2, 1, 3)
        attend = self._attend if keep is None else partial(self._attend, keep=keep)
        if isinstance(cache, FusedStep):  # decode rows and a prompt chunk in one pass
            out = cache.split((q, k, v), attend)
        else:
            out = attend(q, k, v, mask, cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)) if self.gated else out)

    def _attend(self, q: mx.array, k: mx.array | None, v: mx.array | None, mask, cache,
                keep: list[SharedKV] | None = None) -> mx.array:
        """Positions, the cache update and attention for ``q, k, v [B, heads, L, head_dim]`` (k and v
        None in a sharing layer, whose ``cache`` hands back its source's)."""
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = None if k is None else self.rope(k, offset=offset)
        if self.rms_after_rope is not None:
            q, k = mx.fast.rms_norm(q, None, self.rms_after_rope), mx.fast.rms_norm(k, None, self.rms_after_rope)
        if self.query_scale is not None:
            beta, length, shift = self.query_scale
            q = q * query_scale(q.shape[2], offset + shift, beta, length).astype(q.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if keep is not None:
            keep.append(SharedKV(offset, k, v, mask, cache))
        if isinstance(k, tuple):  # a quantized cache hands back packed (weights, scales, biases)
            return cache.attend(q, k, v, self.scale, mask)
        sinks = self["sinks"].astype(q.dtype) if "sinks" in self else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask, sinks=sinks)


def _swiglu_oai(gate: mx.array, up: mx.array) -> mx.array:
    """gpt-oss's gated unit: the gate clipped from above at 7, up to +-7 and shifted by one, a sigmoid of
    1.702 x gate (a GELU approximation) in place of SiLU's."""
    gate, up = mx.minimum(gate, 7.0), mx.clip(up, -7.0, 7.0)
    return (up + 1.0) * gate * mx.sigmoid(1.702 * gate)


_GATED = {"silu": lambda gate, up: nn.silu(gate) * up, "gelu_tanh": lambda gate, up: nn.gelu_approx(gate) * up,
          "swiglu_oai": _swiglu_oai}


def _activation(cfg: ModelConfig):
    """``(gate, up) -> hidden`` of the family's gated MLP."""
    return _GATED[cfg.activation]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.intermediate_size
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * hidden, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, hidden, bias=False)
            self.up_proj = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.hidden_size, bias=False)
        self.act = _activation(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        if cfg.is_linear(layer):
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = LatentAttention(cfg) if cfg.kv_lora_rank else Attention(cfg, layer)
        self.ffn_name = cfg.ffn_name
        wide = 2 if cfg.use_double_wide_mlp and cfg.kv_source(layer) is not None else 1  # Gemma 4's sharing layers
        ffn = (MoE(cfg, _activation(cfg), lambda hidden: MLP(cfg, hidden)) if cfg.is_moe(layer)
               else MLP(cfg, cfg.intermediate_size * wide))
        setattr(self, cfg.ffn_name, ffn)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:  # Gemma: norms both before and after attention and MLP
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.side_experts = cfg.enable_moe_block
        if self.side_experts:  # Gemma 4: routed experts beside the MLP, each with its own norms
            self.router = ScaledRouter(cfg)
            self.experts = SideExperts(cfg, _activation(cfg))
            self.pre_feedforward_layernorm_2 = norm()
            self.post_feedforward_layernorm_1 = norm()
            self.post_feedforward_layernorm_2 = norm()
        if cfg.hidden_size_per_layer_input:  # Gemma 4: the layer's own input embedding gates a residual
            self.per_layer_input_gate = nn.Linear(cfg.hidden_size, cfg.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, cfg.hidden_size, bias=False)
            self.post_per_layer_input_norm = norm()
        if cfg.layer_scalar:
            self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, mask, cache, per_layer: mx.array | None = None,
                 keep: list[SharedKV] | None = None) -> mx.array:
        """``per_layer``: this layer's input embedding (Gemma 4); ``keep``: see ``Attention``."""
        h = self.input_layernorm(x)
        if "linear_attn" in self:
            r = self.linear_attn(h, mask, cache)
        else:
            r = self.self_attn(h, mask, cache) if keep is None else self.self_attn(h, mask, cache, keep)
        ffn = self[self.ffn_name]
        if not self.sandwich:
            h = x + r
            return h + ffn(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(r)
        y = ffn(self.pre_feedforward_layernorm(h))
        if self.side_experts:
            routed = self.experts(self.pre_feedforward_layernorm_2(h), *self.router(h))
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(routed)
        h = h + self.post_feedforward_layernorm(y)
        if per_layer is not None:
            gate = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar if "layer_scalar" in self else h


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        width = cfg.hidden_size_per_layer_input
        if width:  # Gemma 4's per-layer inputs: a token embedding per layer, mixed with a projection of h
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, cfg.num_hidden_layers * width)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, cfg.num_hidden_layers * width, bias=False)
            self.per_layer_projection_norm = RMSNorm(width, cfg.rms_norm_eps)

    def per_layer_inputs(self, tokens: mx.array, h: mx.array, cfg: ModelConfig) -> mx.array:
        """Each layer's input ``[B, L, layers, width]`` for ``tokens`` whose scaled embeddings are ``h``."""
        shape = (*tokens.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        own = self.embed_tokens_per_layer(tokens).reshape(shape) * shape[-1] ** 0.5
        mixed = self.per_layer_projection_norm((self.per_layer_model_projection(h) * cfg.hidden_size**-0.5).reshape(shape))
        return (mixed + own) * 2**-0.5


class Model(nn.Module):
    """``model(tokens [B, L], cache=None) -> logits [B, L, vocab]``, as in mlx-lm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pipeline = None  # set by shard.pipeline_model
        self.config = cfg
        self.model = DecoderBody(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Gemma scales embeddings by sqrt(hidden) rounded to the weights' dtype, as the reference does.
        self._embed_scale = cfg.hidden_size**0.5 if cfg.scale_embeddings else None
        self._sources = {cfg.kv_source(i) for i in range(cfg.num_hidden_layers)} - {None}

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def make_cache(self, kv: KVSettings | None = None) -> list:
        """One cache per layer that holds keys and values (all but KV-sharing ones): the global layers'
        K/V stored as ``kv`` says (float without it; user settings are checked first with
        ``KVSettings.checked``), sliding-window layers in a float ring, chunked ones in a chunk-masked
        float cache, linear-attention layers a recurrent state."""
        cfg = self.config
        kv = kv or KVSettings()
        if kv.quantized and cfg.attention_sinks:
            raise UserError("a quantized KV cache cannot be used with attention sinks (gpt-oss): drop --kv-bits")

        def layer(i: int) -> KVCache | RotatingKVCache | RecurrentCache:
            if cfg.is_linear(i):
                return RecurrentCache()
            if cfg.is_sliding(i):
                return RotatingKVCache(cfg.sliding_window)
            if cfg.is_chunked(i):
                return ChunkedKVCache(cfg.attention_chunk_size)
            return QuantizedKVCache(kv.bits, kv.group_size, kv.start, kv.float_prefix) if kv.quantized else KVCache()

        return [layer(i) for i in cfg.kv_layers]

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.model.embed_tokens(inputs)
        if self._embed_scale is not None:
            h = h * mx.array(self._embed_scale, dtype=h.dtype)
        return h

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """Final normed hidden states ``[B, L, hidden]``; generation applies the head to the last one only."""
        h = self.embed(inputs)
        L = h.shape[1]
        cfg, masks, kept = self.config, {}, {}
        caches = cache if cache is not None else [None] * len(cfg.kv_layers)
        per_layer = self.model.per_layer_inputs(inputs, h, cfg) if cfg.hidden_size_per_layer_input else None
        stage = self.pipeline  # this rank's layers when they are split over ranks (shard.Stage)
        if stage is not None and stage.rank > 0:
            h = mx.distributed.recv_like(h, stage.rank - 1, group=stage.group)
        for i, layer in enumerate(self.layers):
            if stage is not None and not stage.first <= i < stage.end:  # another rank's layer: count positions only
                if caches[i] is not None:
                    caches[i].offset += L
                continue
            kind, source = cfg.layer_types[i], cfg.kv_source(i)
            if source is None:
                c, keep = caches[i], kept.setdefault(i, []) if i in self._sources else None
            else:  # attends over what its source fetched this step
                c, keep = shared_view(caches[source], kept[source]), None
            if kind not in masks:
                masks[kind] = _mask(c, L, cfg.sliding_window if cfg.is_sliding(i) else None,
                                    cfg.attention_chunk_size if cfg.is_chunked(i) else None)
            mask = masks[kind] if source is None else c.mask(L)
            h = layer(h, mask, c, None if per_layer is None else per_layer[:, :, i], keep)
        return self.model.norm(h if stage is None else _pass_on(h, stage))

    def head(self, h: mx.array) -> mx.array:
        logits = self.model.embed_tokens.as_linear(h) if self.config.tie_word_embeddings else self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.head(self.hidden(inputs, cache))


def _pass_on(h: mx.array, stage) -> mx.array:
    """Pipeline parallel: hand this stage's hidden states to the next rank, and give every rank the
    last stage's (an all-reduce where only the last rank contributes)."""
    if stage.rank < stage.group.size() - 1:
        h = mx.depends(mx.zeros_like(h), mx.distributed.send(h, stage.rank + 1, group=stage.group))
    return mx.distributed.all_sum(h, group=stage.group)


def _mask(cache, n_queries: int, window: int | None, chunk: int | None):
    if cache is not None:
        return cache.mask(n_queries)
    if n_queries == 1:
        return None
    if window is not None and n_queries > window or chunk is not None and n_queries > chunk:
        return causal_mask(0, n_queries, 0, n_queries, window, chunk)
    return "causal"
