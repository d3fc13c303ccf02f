"""The one decoder stack. Every supported family is this code with different ``ModelConfig`` switches.

Parameter names follow Hugging Face (``model.layers.N.self_attn.q_proj.weight`` ...) so HF and
mlx-community checkpoints load as they are and GGUF tensors are renamed once, at load time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import ChunkedKVCache, KVCache, KVSettings, QuantizedKVCache, RecurrentCache, RotatingKVCache, causal_mask
from .cache.batch import FusedStep
from ..errors import UserError
from .config import ModelConfig
from .gated_delta import GatedDeltaNet
from .mla import LatentAttention
from .moe import MoE
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
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        bias = cfg.attention_bias
        self.gated = cfg.attn_output_gate  # q_proj yields [query, gate] per head (Qwen3-Next)
        self.widths = [self.n_heads * self.head_dim * (2 if self.gated else 1)] + [self.n_kv_heads * self.head_dim] * 2
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.widths), bias=bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.hidden_size, w, bias=bias) for w in self.widths)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.attention_sinks:  # gpt-oss: a learned logit per head that takes a share of the softmax
            self.sinks = mx.zeros((self.n_heads,))
        self.qk_norm_per_head = cfg.qk_norm_per_head
        if cfg.qk_norm:  # per head (Qwen3, Gemma 3) or over all heads' projections (OLMoE)
            q_dims, k_dims = (1, 1) if cfg.qk_norm_per_head else (self.n_heads, self.n_kv_heads)
            self.q_norm = RMSNorm(q_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(k_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
        sliding = cfg.is_sliding(layer)
        if not cfg.uses_rope(layer):
            self.rope = NoRoPE()
        elif sliding and cfg.rope_local_base_freq is not None:  # Gemma 3 local layers: own base, no scaling
            self.rope = make_rope(cfg.rope_dims, cfg.rope_local_base_freq, None)
        else:
            self.rope = make_rope(cfg.rope_dims, cfg.rope_theta, cfg.rope_scaling, cfg.rope_traditional)
        scaled = cfg.query_scale_beta is not None and not (cfg.query_scale_nope_only and cfg.uses_rope(layer))
        self.query_scale = (cfg.query_scale_beta, cfg.query_scale_length, cfg.query_scale_shift) if scaled else None
        self.rms_after_rope = cfg.rms_norm_eps if cfg.qk_rms_after_rope and cfg.uses_rope(layer) else None

    def _project(self, x: mx.array) -> list[mx.array]:
        if "qkv_proj" in self:
            return mx.split(self.qkv_proj(x), [self.widths[0], self.widths[0] + self.widths[1]], axis=-1)
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self._project(x)
        if self.gated:
            q, gate = mx.split(q.reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            q = q.reshape(B, L, -1)
        norm = "q_norm" in self
        if norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if norm and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        if isinstance(cache, FusedStep):  # decode rows and a prompt chunk in one pass
            out = cache.split((q, k, v), self._attend)
        else:
            out = self._attend(q, k, v, mask, cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)) if self.gated else out)

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """Positions, the cache update and attention for ``q, k, v [B, heads, L, head_dim]``."""
        offset = 0 if cache is None else cache.offset
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if self.rms_after_rope is not None:
            q, k = mx.fast.rms_norm(q, None, self.rms_after_rope), mx.fast.rms_norm(k, None, self.rms_after_rope)
        if self.query_scale is not None:
            beta, length, shift = self.query_scale
            q = q * query_scale(q.shape[2], offset + shift, beta, length).astype(q.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
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
        ffn = MoE(cfg, _activation(cfg), lambda hidden: MLP(cfg, hidden)) if cfg.is_moe(layer) else MLP(cfg)
        setattr(self, cfg.ffn_name, ffn)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:  # Gemma: norms both before and after attention and MLP
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        r = (self.linear_attn if "linear_attn" in self else self.self_attn)(self.input_layernorm(x), mask, cache)
        ffn = self[self.ffn_name]
        if self.sandwich:
            h = x + self.post_attention_layernorm(r)
            return h + self.post_feedforward_layernorm(ffn(self.pre_feedforward_layernorm(h)))
        h = x + r
        return h + ffn(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)


class Model(nn.Module):
    """``model(tokens [B, L], cache=None) -> logits [B, L, vocab]``, as in mlx-lm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Gemma scales embeddings by sqrt(hidden) rounded to the weights' dtype, as the reference does.
        self._embed_scale = cfg.hidden_size**0.5 if cfg.scale_embeddings else None

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def make_cache(self, kv: KVSettings | None = None) -> list:
        """One cache per layer: the global layers' K/V stored as ``kv`` says (float without it; user
        settings are checked first with ``KVSettings.checked``), sliding-window layers in a float ring,
        chunked ones in a chunk-masked float cache, linear-attention layers a recurrent state."""
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

        return [layer(i) for i in range(cfg.num_hidden_layers)]

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.model.embed_tokens(inputs)
        if self._embed_scale is not None:
            h = h * mx.array(self._embed_scale, dtype=h.dtype)
        return h

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """Final normed hidden states ``[B, L, hidden]``; generation applies the head to the last one only."""
        h = self.embed(inputs)
        L = h.shape[1]
        caches = cache if cache is not None else [None] * len(self.layers)
        cfg, masks = self.config, {}
        for i, (layer, c) in enumerate(zip(self.layers, caches)):
            kind = cfg.layer_types[i]
            if kind not in masks:
                masks[kind] = _mask(c, L, cfg.sliding_window if cfg.is_sliding(i) else None,
                                    cfg.attention_chunk_size if cfg.is_chunked(i) else None)
            h = layer(h, masks[kind], c)
        return self.model.norm(h)

    def head(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.head(self.hidden(inputs, cache))


def _mask(cache, n_queries: int, window: int | None, chunk: int | None):
    if cache is not None:
        return cache.mask(n_queries)
    if n_queries == 1:
        return None
    if window is not None and n_queries > window or chunk is not None and n_queries > chunk:
        return causal_mask(0, n_queries, 0, n_queries, window, chunk)
    return "causal"
