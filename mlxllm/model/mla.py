"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2), a drop-in for ``decoder.Attention``.

Each token caches one ``kv_lora_rank``-wide latent plus one shared ``qk_rope_head_dim``-wide RoPE
key (576 numbers per layer for DeepSeek-V3, against 2 x 128 heads x 128-192 when expanded).
``kv_b_proj`` (Hugging Face's name, kept so checkpoints load and convert as they are) maps the
latent to every head's no-RoPE key part and value. Two equivalent ways to attend, picked by FLOPs:

* expanded (a fresh prompt): expand the latent into per-head keys and values, ordinary attention;
* absorbed (decode, short chunks over a long cache): fold the key map into the queries and the value
  map after the output, so attention runs directly over the cached latent as one shared KV head and
  the cache is never expanded.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache.batch import FusedStep
from ..errors import UserError
from .config import ModelConfig
from .rope import make_rope, query_scale, yarn_mscale


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dims, self.v_dims = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        q_dims = self.n_heads * (self.nope + self.rope_dims)
        bias = cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_dims, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_dims, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_dims, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dims), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dims, cfg.hidden_size, bias=bias)
        self.scale = (self.nope + self.rope_dims) ** -0.5
        scaling = cfg.rope_scaling or {}
        if scaling.get("mscale_all_dim"):  # YaRN's temperature, applied to the whole score
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.rope = make_rope(self.rope_dims, cfg.rope_theta, cfg.rope_scaling, traditional=True)
        self.query_scale = None if cfg.query_scale_beta is None else (cfg.query_scale_beta, cfg.query_scale_length)

    def _kv_map(self, part: str, x: mx.array, transpose: bool = True) -> mx.array:
        """``x`` times one head-split half of ``kv_b_proj``: ``part`` 'k' (``[heads, nope, rank]``) or
        'v' (``[heads, v, rank]``); the weight is sliced by rows, so quantized groups stay whole."""
        m = self.kv_b_proj
        if "lora_a" in m:  # a LoRA adapter on it (training, or loaded): its merged map (input dropout aside)
            m = m.fused(dequantize=True)
        elif "linear" in m:
            raise UserError("per-request adapters cannot adapt latent attention's kv_b_proj (target 'v')")
        rows = slice(0, self.nope) if part == "k" else slice(self.nope, None)

        def split(a: mx.array) -> mx.array:
            return a.reshape(self.n_heads, self.nope + self.v_dims, -1)[:, rows]

        if "scales" not in m:
            w = split(m.weight)
            return x @ (w.swapaxes(-1, -2) if transpose else w)
        biases = split(m["biases"]) if "biases" in m else None
        return mx.quantized_matmul(x, split(m.weight), split(m.scales), biases, transpose=transpose,
                                   group_size=m.group_size, bits=m.bits, mode=m.mode)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if "q_a_proj" in self else self.q_proj(x)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., : self.rank])[:, None]  # [B, 1, L, rank]
        k_pe = kv[..., self.rank :][:, None]  # [B, 1, L, rope]: one RoPE key shared by all heads
        if isinstance(cache, FusedStep):  # decode rows and a prompt chunk in one pass
            out = cache.split((q_nope, q_pe, latent, k_pe), self._attend)
        else:
            out = self._attend(q_nope, q_pe, latent, k_pe, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend(self, q_nope: mx.array, q_pe: mx.array, latent: mx.array, k_pe: mx.array, mask, cache) -> mx.array:
        """Positions, the cache update and attention for one batch's queries and new latents."""
        B, L = q_nope.shape[0], q_nope.shape[2]
        offset = 0 if cache is None else cache.offset
        q_pe, k_pe = self.rope(q_pe, offset=offset), self.rope(k_pe, offset=offset)
        if self.query_scale is not None:  # Mistral 4: Llama 4's position scale on the whole query
            scale = query_scale(L, offset, *self.query_scale).astype(q_pe.dtype)
            q_nope, q_pe = q_nope * scale, q_pe * scale
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
        if self._absorb(L, latent.shape[2]):
            q_lat = self._kv_map("k", q_nope, transpose=False)  # [B, H, L, rank]
            queries = mx.concatenate([q_lat, q_pe], axis=-1)
            keys = mx.concatenate([latent, k_pe], axis=-1)
            out = mx.fast.scaled_dot_product_attention(queries, keys, latent, scale=self.scale, mask=mask)
            out = self._kv_map("v", out)
        else:
            k_pe = mx.broadcast_to(k_pe, (B, self.n_heads, latent.shape[2], self.rope_dims))
            keys = mx.concatenate([self._kv_map("k", latent), k_pe], axis=-1)
            queries = mx.concatenate([q_nope, q_pe], axis=-1)
            values = self._kv_map("v", latent)
            out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return out

    def _absorb(self, n_queries: int, n_keys: int) -> bool:
        """Whether attending over the latent costs fewer multiply-adds than expanding it."""
        per_head_map = self.rank * (self.nope + self.v_dims)
        expanded = n_keys * per_head_map + n_queries * n_keys * (self.nope + self.rope_dims + self.v_dims)
        absorbed = n_queries * per_head_map + n_queries * n_keys * (2 * self.rank + self.rope_dims)
        return absorbed < expanded
