"""What every checkpoint format turns into, the compute policy, the memory check, and model assembly.

A format reader (``gguf.py``, ``hf.py``) describes its tensors from the file's index alone
(``TensorSpec``: enough to size the model without reading data) and yields them under Hugging Face
names, as float arrays or ``Quantized`` MLX affine triples. This module decides the representation
they end in (``choose_target``), converts them (``finish``), and assembles the decoder (``build``).

Targets:
  ``float32``   every weight dequantized/cast to float32. The CPU default: on MLX's CPU backend float32
                GEMM/GEMV (through the preloaded OpenBLAS) is much faster than float16/bfloat16
                matmuls and ``quantized_matmul`` (README, "The Linux CPU fast path").
  ``native``    the file's representation: MLX-quantized weights stay quantized, 16-bit stays 16-bit.
                The Metal/CUDA default, where quantized kernels are fast and memory is the limit.
  ``quantized`` quantized weights stay quantized but scales, biases and all other tensors are float32:
                the CPU fallback when a float32 copy does not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import backend
from ..errors import UserError
from ..model.config import ModelConfig
from ..model.decoder import Model

COMPUTE_CHOICES = ("auto", "float32", "native")
KQUANT_CHOICES = ("q8", "q4", "float")
# GGUF tensors MLX cannot hold (K-quants, Q5_x, IQ*) are re-quantized with this group size: the
# finest MLX offers, and the sub-block size of most of those formats.
REQUANT_GROUP = 32
# Headroom on top of the weights: KV cache, activations, MLX and Python overhead.
MARGIN_FRACTION, MARGIN_BYTES = 0.10, 512 * 2**20


@dataclass
class Quantized:
    """An MLX-quantized tensor. ``affine``: ``w = scales * q + biases`` per group of ``group_size``
    columns; ``mxfp4``/``mxfp8``/``nvfp4``: small floats with a shared 8-bit scale per group, no biases."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    group_size: int
    bits: int
    mode: str = "affine"

    def dequantize(self) -> mx.array:
        """Float32 values; scales are widened first so no rounding beyond one float32 multiply-add.

        Affine 4- and 8-bit (every GGUF native type, most mlx-community files) unpack with plain array
        ops, faster than ``mx.dequantize`` on the CPU backend, with identical results.
        """
        if self.mode != "affine":
            return mx.dequantize(self.weight, self.scales, None, self.group_size, self.bits, mode=self.mode)
        scales, biases = self.scales.astype(mx.float32), self.biases.astype(mx.float32)
        if self.bits not in (4, 8):
            return mx.dequantize(self.weight, scales, biases, self.group_size, self.bits)
        rows = self.weight.shape[:-1]  # [out] or [experts, out]
        q = self.weight.view(mx.uint8)  # little-endian: element j of a uint32 sits in its low bits first
        if self.bits == 4:
            q = mx.stack([q & 0x0F, q >> 4], axis=-1)
        q = q.reshape(*rows, -1, self.group_size).astype(mx.float32)
        return (q * scales[..., None] + biases[..., None]).reshape(*rows, -1)

    def cast(self, dtype: mx.Dtype) -> "Quantized":
        """Float scales and biases in ``dtype`` (the MX/NV modes' 8-bit scales stay as they are)."""
        if self.mode != "affine":
            return self
        return Quantized(self.weight, self.scales.astype(dtype), self.biases.astype(dtype), self.group_size, self.bits)

    @property
    def arrays(self) -> dict[str, mx.array]:
        """The module's stored arrays by leaf name (no ``biases`` outside affine mode)."""
        out = {"weight": self.weight, "scales": self.scales}
        if self.biases is not None:
            out["biases"] = self.biases
        return out

    @classmethod
    def of(cls, w: mx.array, group_size: int, bits: int, mode: str = "affine") -> "Quantized":
        q, scales, *biases = mx.quantize(w, group_size, bits, mode=mode)
        return cls(q, scales, biases[0] if biases else None, group_size, bits, mode)


Tensor = mx.array | Quantized


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the file's index describes it (no data read).

    ``form`` is 'float' (``bits`` per element), 'affine' (MLX-quantizable as stored: ``bits`` and
    ``group_size``), or 'other' (a block format MLX cannot hold, e.g. Q4_K: dequantized on load and,
    when weights stay quantized, re-quantized following the ``kquant`` option).
    """

    name: str
    elements: int
    file_type: str
    file_bytes: int
    form: str
    bits: int
    group_size: int = 0

    def resident_bytes(self, target: str, kquant: str) -> int:
        """Bytes this tensor occupies once loaded for ``target``."""
        if target == "float32":
            return self.elements * 4
        scale_bytes = 4 if target == "quantized" else 2
        form, bits, group = self.form, self.bits, self.group_size
        if form == "other":
            if kquant == "float":
                return self.elements * scale_bytes
            form, bits, group = "affine", 8 if kquant == "q8" else 4, REQUANT_GROUP
        if form == "affine":
            return self.elements * bits // 8 + 2 * (self.elements // group) * scale_bytes
        return self.elements * (4 if target == "quantized" else bits // 8)


def model_bytes(specs: Iterable[TensorSpec], target: str, kquant: str) -> int:
    return sum(s.resident_bytes(target, kquant) for s in specs)


def needed_bytes(weights: int) -> int:
    return weights + int(weights * MARGIN_FRACTION) + MARGIN_BYTES


def choose_target(compute: str, specs: list[TensorSpec], kquant: str) -> str:
    """Pick the representation for ``compute`` and refuse, before reading any data, what cannot fit.

    'auto' means float32 on the CPU backend when a float32 copy fits (else 'quantized'), and the
    file's own representation on Metal/CUDA.
    """
    if compute not in COMPUTE_CHOICES:
        raise UserError(f"unknown compute mode '{compute}' (choose from {', '.join(COMPUTE_CHOICES)})")
    if kquant not in KQUANT_CHOICES:
        raise UserError(f"unknown kquant policy '{kquant}' (choose from {', '.join(KQUANT_CHOICES)})")
    available = backend.device_memory()
    fits = lambda target: needed_bytes(model_bytes(specs, target, kquant)) <= available  # noqa: E731
    if compute == "auto":
        if backend.device_name() != "cpu":
            candidates = ["native"]
        elif any(s.form != "float" for s in specs):
            candidates = ["float32", "quantized"]
        else:
            candidates = ["float32", "native"]
    else:
        candidates = [compute]
    for target in candidates:
        if fits(target):
            return target
    need = needed_bytes(model_bytes(specs, candidates[-1], kquant))
    raise UserError(
        f"the model needs about {need / 2**30:.1f} GiB ({candidates[-1]} weights plus margin) but only "
        f"{available / 2**30:.1f} GiB of {backend.device_name()} memory is available"
    )


def finish(value: Tensor, target: str, dtype: mx.Dtype | None) -> Tensor:
    """Convert one loaded tensor to ``target``; ``dtype`` is the float type of 'native' (None: keep)."""
    if target == "float32":
        return value.dequantize() if isinstance(value, Quantized) else value.astype(mx.float32)
    if target == "quantized":
        dtype = mx.float32
    if dtype is None:
        return value
    if isinstance(value, Quantized):
        return value.cast(dtype)
    return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value


def build(cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor]]) -> Model:
    """Assemble the decoder; quantize exactly the modules that came quantized; refuse any mismatch.

    The model is constructed before ``tensors`` is consumed, so config errors come before any
    decoding work. The check names the first offending tensor, so a config that does not match its
    weights is one clear line instead of a shape error deep inside the first forward pass.
    """
    model = Model(cfg)
    tensors = dict(tensors)
    plain = {path for path, m in model.named_modules() if not hasattr(m, "to_quantized")}
    for name, t in tensors.items():  # a quantized bias, or router DeepSeek-style MoE keeps as a float map
        prefix, _, leaf = name.rpartition(".")
        if isinstance(t, Quantized) and (leaf != "weight" or prefix in plain):
            tensors[name] = t.dequantize()
    quantized = {name.rsplit(".", 1)[0]: t for name, t in tensors.items() if isinstance(t, Quantized)}
    if quantized:
        nn.quantize(
            model,
            class_predicate=lambda path, _: (
                {"group_size": quantized[path].group_size, "bits": quantized[path].bits, "mode": quantized[path].mode}
                if path in quantized else False
            ),
        )
    flat: dict[str, mx.array] = {}
    for name, t in tensors.items():
        if isinstance(t, Quantized):
            prefix = name.rsplit(".", 1)[0]
            flat.update({f"{prefix}.{leaf}": a for leaf, a in t.arrays.items()})
        else:
            flat[name] = t
    _check_match(dict(tree_flatten(model.parameters())), flat, cfg)
    model.update(tree_unflatten(list(flat.items())))
    return model


def _check_match(expected: dict[str, mx.array], found: dict[str, mx.array], cfg: ModelConfig) -> None:
    what = f"a {cfg.model_type} model with {cfg.num_hidden_layers} layers"
    for name, param in expected.items():
        if name not in found:
            raise UserError(f"weights do not match the config: tensor '{name}' is missing ({what})")
        if tuple(found[name].shape) != tuple(param.shape):
            raise UserError(
                f"weights do not match the config: tensor '{name}' has shape {tuple(found[name].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )
    for name in found:
        if name not in expected:
            raise UserError(f"weights do not match the config: unexpected tensor '{name}' (not used by {what})")


def fold_latent_maps(held: dict[str, Tensor], name: str, cfg: ModelConfig, target: str,
                      dtype: mx.Dtype | None) -> Iterator[tuple[str, Tensor]]:
    """mlx-lm saves DeepSeek-V3's ``kv_b_proj`` split per head into ``embed_q`` ``[H, rank, nope]``
    (transposed) and ``unembed_out`` ``[H, v, rank]``, llama.cpp as ``attn_k_b`` / ``attn_v_b`` of the same
    shapes; once both of a layer are read, yield the ``kv_b_proj`` they came from. A quantized
    ``embed_q`` is quantized along the other axis, so it is dequantized, transposed and re-quantized like
    ``unembed_out`` (one more rounding, as mlx-lm's own conversion does the other way)."""
    prefix = name.rsplit(".", 2)[0]
    k_name, v_name = f"{prefix}.embed_q.weight", f"{prefix}.unembed_out.weight"
    if k_name not in held or v_name not in held:
        return
    k, v = held.pop(k_name), held.pop(v_name)

    def dense(t: Tensor) -> mx.array:
        return t.dequantize() if isinstance(t, Quantized) else t

    w = mx.concatenate([dense(k).swapaxes(-1, -2), dense(v)], axis=1).reshape(-1, cfg.kv_lora_rank)
    value: Tensor = Quantized.of(w, v.group_size, v.bits, v.mode) if isinstance(v, Quantized) else w.astype(v.dtype)
    yield f"{prefix}.kv_b_proj.weight", finish(value, target, dtype)


def split_gate_up(name: str, value: Tensor) -> Iterator[tuple[str, Tensor]]:
    """A fused expert stack ``...gate_up_proj.weight`` ``[experts, 2 x width, in]`` (rows: gate, then up;
    Gemma 4, Mistral 4, llama.cpp's ``ffn_gate_up_exps``) as the two stacks the decoder holds."""
    if not name.endswith(".gate_up_proj.weight"):
        yield name, value
        return
    prefix = name[: -len(".gate_up_proj.weight")]
    arrays = value.arrays if isinstance(value, Quantized) else {"weight": value}
    half = arrays["weight"].shape[1] // 2
    for proj, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None))):
        part = {k: mx.contiguous(a[:, rows]) for k, a in arrays.items()}
        yield f"{prefix}.{proj}.weight", (Quantized(part["weight"], part["scales"], part.get("biases"),
                                                    value.group_size, value.bits, value.mode)
                                          if isinstance(value, Quantized) else part["weight"])


def unfuse_experts(name: str, value: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Hugging Face's fused expert stacks ``mlp.experts.gate_up_proj [E, 2I, in]`` and
    ``mlp.experts.down_proj [E, out, I]`` (Qwen3.5-MoE, Mistral 4) under the decoder's ``switch_mlp``
    names; any other tensor passes through."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        yield from split_gate_up(name[: -len("experts.gate_up_proj")] + "switch_mlp.gate_up_proj.weight", value)
    elif name.endswith(".mlp.experts.down_proj"):
        yield name[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight", value
    else:
        yield name, value
