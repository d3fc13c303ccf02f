"""Gated DeltaNet: the linear-attention layers of Qwen3-Next and Qwen3.5.

Each head keeps a ``[Dk, Dv]`` state ``S`` instead of keys and values. Per token, with a decay
``g = exp(-exp(A_log) * softplus(a + dt_bias))`` and a write strength ``beta = sigmoid(b)``:

    S <- g S;   u = beta (v - S^T k);   S <- S + k u^T;   y = S^T q

(q and k L2-normalised, q also scaled by ``Dk ** -0.5``). The inputs come through a causal depthwise
convolution (kernel ``linear_conv_kernel_dim``) with SiLU, so the layer's cache is that convolution's
last ``kernel - 1`` inputs plus ``S`` (``cache/recurrent.py``); the output is RMS-normed per head,
gated by ``silu(z)`` and projected back.

A prompt is not run token by token: ``delta_chunked`` takes chunks of ``CHUNK`` tokens and solves
each chunk's recurrence at once (the WY/UT form: with cumulative decays ``G``, the chunk's writes
``U`` satisfy ``(I + tril(beta k k^T e^(G_i - G_j), -1)) U = beta (V - e^G K S)``, one triangular
solve), then passes the state from chunk to chunk; ``delta_recurrent`` is the plain loop it is
tested against, and the decode step.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache.batch import FusedStep
from .config import ModelConfig

CHUNK = 64  # tokens per chunk of the chunked prefill
LOOP_UP_TO = 4  # shorter inputs run the plain recurrence (a chunk would be mostly padding)


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis (as ``rms_norm`` computes it)."""
    d = x.shape[-1]
    return mx.fast.rms_norm(x, None, eps / d) * (d**-0.5)


@mx.custom_function
def solve_lower(a: mx.array, b: mx.array) -> mx.array:
    """``a^-1 b`` for lower-triangular ``a`` (MLX's triangular solve runs on the CPU stream), with a
    gradient (MLX has none for it): ``db = a^-T g``, ``da = -tril(db x^T)``."""
    return mx.linalg.solve_triangular(a, b, upper=False, stream=mx.cpu)


@solve_lower.vjp
def _solve_lower_vjp(primals, cotangent, output):
    a, _ = primals
    g = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    x = output[0] if isinstance(output, (list, tuple)) else output
    db = mx.linalg.solve_triangular(a.swapaxes(-1, -2), g, upper=True, stream=mx.cpu)
    return mx.tril(-(db @ x.swapaxes(-1, -2))), db


def delta_recurrent(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array, state: mx.array,
                    record_from: int | None = None) -> tuple[mx.array, mx.array, list[tuple[int, mx.array]]]:
    """The recurrence token by token. ``q, k [B, L, H, Dk]``, ``v [B, L, H, Dv]``, ``log_g, beta [B, L, H]``
    (float32), ``state [B, H, Dk, Dv]``. Returns ``(y [B, L, H, Dv], final state, recorded)``: with
    ``record_from = t0``, ``recorded`` lists ``(t, state after t tokens)`` for t = t0..L."""
    recorded = [(0, state)] if record_from == 0 else []
    outs = []
    for t in range(k.shape[1]):
        state = state * mx.exp(log_g[:, t])[..., None, None]
        kt = k[:, t]
        read = (kt[..., None, :] @ state)[..., 0, :]
        u = (v[:, t] - read) * beta[:, t][..., None]
        state = state + kt[..., :, None] * u[..., None, :]
        outs.append((q[:, t][..., None, :] @ state)[..., 0, :])
        if record_from is not None and t + 1 >= record_from:
            recorded.append((t + 1, state))
    return mx.stack(outs, axis=1), state, recorded


def delta_chunked(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array, state: mx.array,
                  size: int = CHUNK) -> tuple[mx.array, mx.array]:
    """The same recurrence chunk by chunk (arguments as ``delta_recurrent``); returns ``(y, state)``."""
    B, L, H, _ = k.shape
    Dv = v.shape[-1]
    pad = -L % size
    n = (L + pad) // size

    def blocks(x: mx.array) -> mx.array:  # [B, L, H, ...] -> [B, H, n, size, ...]; padding writes nothing
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return mx.moveaxis(x.reshape(B, n, size, H, *x.shape[3:]), 3, 1)

    q, k, v, log_g, beta = (blocks(x) for x in (q, k, v, log_g, beta))
    G = mx.cumsum(log_g, axis=-1)  # decay from the chunk's start through each token
    causal = mx.tril(mx.ones((size, size), dtype=mx.bool_))
    decay = mx.where(causal, mx.exp(mx.where(causal, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
    kt = k.swapaxes(-1, -2)
    kb = k * beta[..., None]
    lower = mx.where(mx.tril(causal, -1), (kb @ kt) * decay, 0.0) + mx.eye(size)
    rhs = mx.concatenate([v * beta[..., None], kb * mx.exp(G)[..., None]], axis=-1)
    solved = solve_lower(lower, rhs)
    written, through_state = solved[..., :Dv], solved[..., Dv:]  # U = written - through_state @ S
    inner = (q @ kt) * decay
    q_decayed = q * mx.exp(G)[..., None]
    last = G[..., -1:]
    k_to_end = (k * mx.exp(last - G)[..., None]).swapaxes(-1, -2)
    end_decay = mx.exp(last)[..., None]
    outs = []
    for c in range(n):
        u = written[:, :, c] - through_state[:, :, c] @ state
        outs.append(q_decayed[:, :, c] @ state + inner[:, :, c] @ u)
        state = state * end_decay[:, :, c] + k_to_end[:, :, c] @ u
    y = mx.stack(outs, axis=2).reshape(B, H, n * size, Dv)[:, :, :L]
    return y.transpose(0, 2, 1, 3), state


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, times ``silu(z)``."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(x, self.weight, self.eps)
        return (nn.silu(z.astype(mx.float32)) * normed.astype(mx.float32)).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer; ``cache`` a ``RecurrentCache`` / ``BatchRecurrentCache`` (or None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel = cfg.linear_conv_kernel_dim
        key, value = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * key + value
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.fused = cfg.model_type == "qwen3_next"  # in_proj_qkvz + in_proj_ba, grouped by key head
        if self.fused:
            self.in_proj_qkvz = nn.Linear(cfg.hidden_size, 2 * key + 2 * value, bias=False)
            self.in_proj_ba = nn.Linear(cfg.hidden_size, 2 * self.nv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(cfg.hidden_size, 2 * key + value, bias=False)
            self.in_proj_z = nn.Linear(cfg.hidden_size, value, bias=False)
            self.in_proj_b = nn.Linear(cfg.hidden_size, self.nv, bias=False)
            self.in_proj_a = nn.Linear(cfg.hidden_size, self.nv, bias=False)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value, cfg.hidden_size, bias=False)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """(convolution inputs q|k|v ``[B, L, conv_dim]``, z ``[B, L, nv, dv]``, b, a ``[B, L, nv]``)."""
        B, L, _ = x.shape
        if not self.fused:
            z = self.in_proj_z(x).reshape(B, L, self.nv, self.dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        per = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.nk, -1)
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + per * self.dv], axis=-1)
        ba = self.in_proj_ba(x).reshape(B, L, self.nk, 2 * per)
        qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        return (qkv, z.reshape(B, L, self.nv, self.dv), ba[..., :per].reshape(B, L, self.nv),
                ba[..., per:].reshape(B, L, self.nv))

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        B, L, _ = x.shape
        qkv, z, b, a = self._project(x)
        if isinstance(cache, FusedStep):  # decode rows over the batch, then the prompt chunk over its cache
            n = cache.rows
            decode = self._mix(*(t[0, :n, None] for t in (qkv, z, b, a)), cache.batch)  # [rows, 1, nv, dv]
            chunk = self._mix(*(t[:, n:] for t in (qkv, z, b, a)), cache.chunk)
            out = mx.concatenate([decode.swapaxes(0, 1), chunk], axis=1)
        else:
            out = self._mix(qkv, z, b, a, cache)
        return self.out_proj(out.reshape(B, L, -1))

    def _mix(self, qkv: mx.array, z: mx.array, b: mx.array, a: mx.array, cache) -> mx.array:
        """Convolution, delta rule and gated norm: ``[B, L, nv, dv]``; ``cache`` is updated."""
        B, L, _ = qkv.shape
        held = None if cache is None else cache.conv_state
        if held is None:
            held = mx.zeros((B, self.kernel - 1, self.conv_dim), dtype=qkv.dtype)
        window = mx.concatenate([held, qkv], axis=1)
        mixed = nn.silu(self.conv1d(window))
        key = self.nk * self.dk
        q = mixed[..., :key].reshape(B, L, self.nk, self.dk)
        k = mixed[..., key : 2 * key].reshape(B, L, self.nk, self.dk)
        v = mixed[..., 2 * key :].reshape(B, L, self.nv, self.dv).astype(mx.float32)
        q = l2_normalize(q.astype(mx.float32)) * (self.dk**-0.5)
        k = l2_normalize(k.astype(mx.float32))
        if self.nv != self.nk:  # value heads grouped by key head
            q, k = (mx.repeat(t, self.nv // self.nk, axis=2) for t in (q, k))
        log_g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus((a + self.dt_bias).astype(mx.float32))
        beta = mx.sigmoid(b.astype(mx.float32))
        state = None if cache is None else cache.delta_state
        if state is None:
            state = mx.zeros((B, self.nv, self.dk, self.dv), dtype=mx.float32)
        keep = 0 if cache is None else cache.keep
        split = max(0, L - keep) if keep else (0 if L <= LOOP_UP_TO else L)
        parts, recorded = [], []
        if split:
            y, state = delta_chunked(q[:, :split], k[:, :split], v[:, :split], log_g[:, :split], beta[:, :split], state)
            parts.append(y)
        if split < L:
            y, state, recorded = delta_recurrent(q[:, split:], k[:, split:], v[:, split:], log_g[:, split:],
                                                 beta[:, split:], state, 0 if keep else None)
            parts.append(y)
            recorded = [(split + t, s) for t, s in recorded]
        if cache is not None:
            cache.update(window, state, L, recorded)
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        return self.norm(y.astype(qkv.dtype), z)
