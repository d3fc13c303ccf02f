"""The one decoder stack. Every supported family is this code with different ``ModelConfig`` switches.

Parameter names follow Hugging Face (``model.layers.N.self_attn.q_proj.weight`` ...) so HF and
mlx-community checkpoints load as they are and GGUF tensors are renamed once, at load time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, KVSettings, QuantizedKVCache, RecurrentCache, RotatingKVCache, causal_mask
from .cache.batch import FusedStep
from .config import ModelConfig
from .gated_delta import GatedDeltaNet
from .mla import LatentAttention
from .moe import MoE
from .rope import NoRoPE, make_rope


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
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim * (2 if self.gated else 1), bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qk_norm_per_head = cfg.qk_norm_per_head
        if cfg.qk_norm:  # per head (Qwen3, Gemma 3) or over all heads' projections (OLMoE)
            q_dims, k_dims = (1, 1) if cfg.qk_norm_per_head else (self.n_heads, self.n_kv_heads)
            self.q_norm = RMSNorm(q_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(k_dims * self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
        sliding = cfg.is_sliding(layer)
        if not cfg.uses_rope(layer):
            self.rope = NoRoPE()
        elif sliding and cfg.rope_local_base_freq is not None:  # Gemma 3 local layers: own base, no scaling
            self.rope = make_rope(self.head_dim, cfg.rope_local_base_freq, None)
        else:
            self.rope = make_rope(cfg.rotary_dims, cfg.rope_theta, cfg.rope_scaling)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        B, L, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.gated:
            q, gate = mx.split(q.reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            q = q.reshape(B, L, -1)
        norm = "q_norm" in self
        if norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
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
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(k, tuple):  # a quantized cache hands back packed (weights, scales, biases)
            return cache.attend(q, k, v, self.scale, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


def _activation(cfg: ModelConfig):
    return nn.silu if cfg.activation == "silu" else nn.gelu_approx


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.hidden_size, bias=False)
        self.act = _activation(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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
        linear-attention layers a recurrent state."""
        cfg = self.config
        kv = kv or KVSettings()

        def full() -> KVCache:
            return QuantizedKVCache(kv.bits, kv.group_size, kv.start, kv.float_prefix) if kv.quantized else KVCache()

        def of(i: int) -> KVCache | RotatingKVCache | RecurrentCache:
            if cfg.is_linear(i):
                return RecurrentCache()
            return RotatingKVCache(cfg.sliding_window) if cfg.is_sliding(i) else full()

        return [of(i) for i in range(cfg.num_hidden_layers)]

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
        masks: dict[str, object] = {}  # one per layer kind
        for i, (layer, c) in enumerate(zip(self.layers, caches)):
            kind = self.config.layer_types[i]
            if kind not in masks:
                masks[kind] = _mask(c, L, self.config.sliding_window if kind == "sliding_attention" else None)
            h = layer(h, masks[kind], c)
        return self.model.norm(h)

    def head(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.head(self.hidden(inputs, cache))


def _mask(cache, n_queries: int, window: int | None):
    if cache is not None:
        return cache.mask(n_queries)
    if n_queries == 1:
        return None
    if window is not None and n_queries > window:
        return causal_mask(0, n_queries, 0, n_queries, window)
    return "causal"
