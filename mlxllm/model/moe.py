"""Mixture-of-experts feed-forward: a router plus a stack of expert MLPs, a drop-in for ``MLP``.

Experts are stored stacked, ``[experts, out, in]`` per projection (mlx-community's ``switch_mlp``
layout), and run with MLX's gathered matmuls, so a token reads only the experts it was routed to.
For more than a few tokens (prefill) the (token, expert) pairs are sorted by expert first, so each
expert's weights are read once per chunk instead of once per token. On the CPU backend
``gather_mm`` still multiplies row by row, far below a float32 matmul, so there each expert's run of
sorted rows becomes one ordinary matmul.
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import mlx.nn as nn

from .. import backend
from .config import ModelConfig

SORT_FROM = 64  # (token, expert) pairs from which sorting by expert pays for itself


class ExpertLinear(nn.Module):
    """``num_experts`` stacked linear maps; ``x @ W[e].T (+ b[e])`` for each row's expert ``e``.

    ``top_k`` (experts per token) is kept so byte and FLOP counts can tell the active share."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, top_k: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:  # gpt-oss's experts
            self.bias = mx.zeros((num_experts, output_dims))
        self.num_experts, self.top_k = num_experts, top_k

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        if self.weight.dtype != mx.float32 and backend.device_name() == "cpu":
            # MLX's CPU gather_mm takes float32 only: gather the chosen experts' 16-bit weights instead
            return _biased(x @ self.weight[experts].swapaxes(-1, -2), self, experts)
        y = mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=sorted_experts)
        return _biased(y, self, experts)

    def one(self, x: mx.array, expert: int) -> mx.array:
        """``x @ W[expert].T`` for rows that all go to one expert."""
        y = x @ self.weight[expert].T
        return y + self["bias"][expert] if "bias" in self else y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedExpertLinear":
        q = QuantizedExpertLinear.of(self.weight, self.top_k, group_size, bits, mode)
        if "bias" in self:
            q.bias = self.bias
        return q


def _biased(y: mx.array, layer: nn.Module, experts: mx.array) -> mx.array:
    """``y [..., k, 1, out]`` plus each row's expert bias, when the layer has biases."""
    return y + mx.expand_dims(layer["bias"][experts], -2) if "bias" in layer else y


class QuantizedExpertLinear(nn.Module):
    """``ExpertLinear`` with MLX-quantized weights, run with ``gather_qmm``."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array | None, top_k: int,
                 group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.num_experts, self.top_k = weight.shape[0], top_k
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.freeze()

    @classmethod
    def of(cls, weight: mx.array, top_k: int, group_size: int, bits: int, mode: str = "affine") -> "QuantizedExpertLinear":
        q, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        return cls(q, scales, biases[0] if biases else None, top_k, group_size, bits, mode)

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool = False) -> mx.array:
        y = mx.gather_qmm(x, self.weight, self.scales, self.get("biases"), rhs_indices=experts, transpose=True,
                          group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_experts)
        return _biased(y, self, experts)

    def one(self, x: mx.array, expert: int) -> mx.array:
        biases = self["biases"][expert] if "biases" in self else None
        y = mx.quantized_matmul(x, self.weight[expert], self.scales[expert], biases, transpose=True,
                                group_size=self.group_size, bits=self.bits, mode=self.mode)
        return y + self["bias"][expert] if "bias" in self else y


class ExpertMLPs(nn.Module):
    """The experts' gated MLPs: ``down(act(gate(x), up(x)))`` with each token's chosen experts."""

    def __init__(self, dims: int, hidden: int, num_experts: int, top_k: int, act, bias: bool = False):
        super().__init__()
        self.gate_proj = ExpertLinear(dims, hidden, num_experts, top_k, bias)
        self.up_proj = ExpertLinear(dims, hidden, num_experts, top_k, bias)
        self.down_proj = ExpertLinear(hidden, dims, num_experts, top_k, bias)
        self.act = act

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """x ``[..., dims]``, experts ``[..., k]`` -> each expert's output ``[..., k, dims]``."""
        lead, k = experts.shape[:-1], experts.shape[-1]
        if experts.size < SORT_FROM:
            h = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, dims]: one row against k experts
            h = self._mlp(h, experts, False)
            return h.squeeze(-2)
        flat = experts.flatten()
        order = mx.argsort(flat)
        rows = x.reshape(-1, 1, x.shape[-1])[order // k]  # [n*k, 1, dims], grouped by expert
        if backend.device_name() == "cpu":
            h = self._per_expert(rows[:, 0], flat[order])[:, None]
        else:
            h = self._mlp(rows, flat[order], True)
        return h[mx.argsort(order)].reshape(*lead, k, -1)

    def _per_expert(self, rows: mx.array, experts: mx.array) -> mx.array:
        """Rows sorted by expert -> one plain matmul per expert's run of rows (costs one host sync)."""
        out, start = [], 0
        for e, run in itertools.groupby(experts.tolist()):
            seg = rows[start : (start := start + len(list(run)))]
            h = self.act(self.gate_proj.one(seg, e), self.up_proj.one(seg, e))
            out.append(self.down_proj.one(h, e))
        return mx.concatenate(out, axis=0)

    def _mlp(self, h: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
        gate = self.gate_proj(h, experts, sorted_experts)
        up = self.up_proj(h, experts, sorted_experts)
        return self.down_proj(self.act(gate, up), experts, sorted_experts)


def route(logits: mx.array, cfg: ModelConfig, bias: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Router logits ``[..., experts]`` -> (weights ``[..., k]``, expert ids ``[..., k]``).

    ``softmax_topk``: probabilities over all experts, keep the k largest (renormalised when
    ``norm_topk_prob``), from the ``topk_group`` groups with the best single expert when ``n_group``
    > 1 (DeepSeek-V2); ``topk_softmax`` (Mixtral): keep the k largest logits, softmax over them;
    ``sigmoid_group`` (DeepSeek-V3): sigmoid scores; experts are *chosen* by score + ``bias`` (the
    auxiliary-loss-free balancing bias) among the ``topk_group`` groups whose two best experts score
    highest, *weighted* by the plain scores (renormalised when ``norm_topk_prob``), times
    ``routed_scaling_factor``."""
    k = cfg.num_experts_per_tok
    if cfg.router == "sigmoid_input":
        ids = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        return mx.sigmoid(mx.take_along_axis(logits, ids, axis=-1).astype(mx.float32)).astype(logits.dtype), ids
    if cfg.router == "topk_softmax":
        ids = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        return mx.softmax(mx.take_along_axis(logits, ids, axis=-1), axis=-1, precise=True), ids
    if cfg.router == "sigmoid_group":
        probs = mx.sigmoid(logits.astype(mx.float32))
        choice = probs + bias
    else:
        probs = choice = mx.softmax(logits, axis=-1, precise=True)
    dropped = cfg.n_group - cfg.topk_group
    if dropped:
        groups = mx.unflatten(choice, -1, (cfg.n_group, -1))
        if cfg.router == "sigmoid_group" or cfg.group_by_top2:
            group_score = mx.topk(groups, 2, axis=-1).sum(axis=-1, keepdims=True)
        else:
            group_score = groups.max(axis=-1, keepdims=True)
        worst = mx.stop_gradient(mx.argpartition(group_score, kth=dropped - 1, axis=-2)[..., :dropped, :])
        choice = mx.flatten(mx.put_along_axis(groups, worst, mx.array(0.0, choice.dtype), axis=-2), -2, -1)
    ids = mx.stop_gradient(mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k])
    weights = mx.take_along_axis(probs, ids, axis=-1)
    if cfg.norm_topk_prob and k > 1:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else weights, ids


class Router(nn.Module):
    """DeepSeek-style router parameters: a plain score projection (never quantized, as DeepSeek
    checkpoints keep it) and, for sigmoid routing, the per-expert selection bias."""

    def __init__(self, dims: int, num_experts: int, selection_bias: bool):
        super().__init__()
        self.weight = mx.zeros((num_experts, dims))
        if selection_bias:
            self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


class MoE(nn.Module):
    """Router + experts (+ an always-on shared expert, sigmoid-gated as in Qwen2-MoE or not as in
    DeepSeek). Parameter names follow each family's checkpoints (``switch_mlp`` / ``experts``,
    ``shared_expert`` / ``shared_experts``)."""

    def __init__(self, cfg: ModelConfig, act, dense_mlp):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.moe_intermediate_size or cfg.intermediate_size
        self.router_name = cfg.router_name
        if cfg.router == "sigmoid_group" or cfg.float_router:
            router = Router(cfg.hidden_size, cfg.num_experts, cfg.router == "sigmoid_group")
        else:
            router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.expert_bias)
        setattr(self, self.router_name, router)
        self.stack_name = cfg.expert_stack_name
        setattr(self, self.stack_name, ExpertMLPs(cfg.hidden_size, hidden, cfg.num_experts, cfg.num_experts_per_tok, act,
                                                  cfg.expert_bias))
        self.reduce_group = None  # set by shard.py
        self.shared_name = None
        if cfg.shared_expert_intermediate_size:
            self.shared_name = cfg.shared_expert_name or ("shared_expert" if cfg.shared_expert_gate else "shared_experts")
            setattr(self, self.shared_name, dense_mlp(cfg.shared_expert_intermediate_size))
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        router = self[self.router_name]
        weights, experts = route(router(x), self.cfg, router.get("e_score_correction_bias"))
        experts = mx.stop_gradient(experts)
        if self.cfg.router == "sigmoid_input":  # one expert, its weight on the way in
            y = self[self.stack_name](x * weights, experts).sum(axis=-2)
        else:
            y = (self[self.stack_name](x, experts) * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if self.reduce_group is not None:  # tensor parallel: each rank holds a slice of every expert
            y = mx.distributed.all_sum(y, group=self.reduce_group)
        if self.shared_name:
            shared = self[self.shared_name](x)
            y = y + (mx.sigmoid(self.shared_expert_gate(x)) * shared if "shared_expert_gate" in self else shared)
        return y


class ScaledRouter(nn.Module):
    """Gemma 4's router: the RMS-normed input times a learned scale over sqrt(hidden), projected to
    expert logits, top-k softmax (``route``), each weight times its expert's learned scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = mx.fast.rms_norm(x, self.scale * self.cfg.hidden_size**-0.5, self.cfg.rms_norm_eps)
        weights, experts = route(self.proj(x), self.cfg)
        experts = mx.stop_gradient(experts)
        return weights * self.per_expert_scale[experts], experts


class SideExperts(nn.Module):
    """Gemma 4's routed experts, run beside the dense MLP on the weights ``ScaledRouter`` gives."""

    def __init__(self, cfg: ModelConfig, act):
        super().__init__()
        self.switch_glu = ExpertMLPs(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                     cfg.num_experts_per_tok, act)

    def __call__(self, x: mx.array, weights: mx.array, experts: mx.array) -> mx.array:
        return (self.switch_glu(x, experts) * weights[..., None]).sum(axis=-2).astype(x.dtype)
