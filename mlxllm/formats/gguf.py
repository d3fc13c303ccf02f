"""GGUF (llama.cpp) files: metadata -> ``ModelConfig``, tensors -> Hugging Face names and MLX layouts.

Why a reader of our own rather than ``mx.load`` or ``gguf.GGUFReader``:
  * ``mx.load(path.gguf)`` converts Q4_0/Q4_1/Q8_0 into MLX's quantized layout, but refuses the whole
    file as soon as one tensor has another type ("gguf_tensor_to_f16 failed": every Q4_K_M file, e.g.
    Gemma 3 270M) and reads every tensor eagerly.
  * ``GGUFReader`` builds a numpy view per vocabulary string, slow for vocabularies of 100k+ tokens.
The header is parsed by ``mlxllm.gguf_file`` (shared with the tokenizer, which gets the same parsed
file from ``mlxllm.load``; vocabulary arrays stay undecoded here); this module maps its tensors and
decodes one tensor at a time:

  * Q4_0, Q4_1, Q8_0: repacked into MLX affine triples (group 32) bit for bit as ``mx.load`` does
    (``tests/test_load_gguf.py`` checks the equality): no loss. Q4_0 ``d*(q-8)`` -> scale d, bias -8d;
    Q4_1 ``d*q+m`` -> scale d, bias m; Q8_0 ``d*q`` with int8 q -> uint8 q+128, bias -128d.
    MXFP4 (gpt-oss's experts) is the same OCP format MLX's mxfp4 holds: nibbles repacked, scales kept.
  * every other block type ``gguf.quants`` can decode (Q5_0/Q5_1, K-quants Q2_K..Q6_K, IQ*, ...):
    dequantized to float32 with ``gguf.quants.dequantize``. Kept as float32 on the float32 path;
    when weights stay quantized the ``kquant`` policy applies (MLX has no kernel for these blocks):
      'q8' (default): MLX 8-bit, group 32, 1.125 bytes/weight: a small added error.
      'q4': MLX 4-bit, group 32, 0.625 bytes/weight: adds about as much error as the file's own
            quantization. Only for when nothing else fits.
      'float': unquantized in the 16-bit native type (2 bytes/weight), no added error.
    What each costs is measured in the README ("GGUF quantization policy").
  * F32/F16/BF16 as they are.

Tensors are decoded one at a time and evaluated before the next, so loading never holds more than
the final model plus one tensor's temporaries (GGUF cannot be lazy the way safetensors is: MLX has no
lazy reader for GGUF block data).

Facts about llama.cpp's converter this relies on:
  * For the llama architecture (Llama, Mistral, SmolLM) it permutes the rows of Q and K within each
    head so its interleaved ("GPT-J") RoPE equals HF's half-split RoPE; we undo it (rows of weight,
    scales and biases alike, since quantization groups run along columns). qwen2/qwen3/gemma3 are
    stored unpermuted.
  * Gemma stores RMSNorm weights with +1 already added; our RMSNorm adds 1 itself, so we subtract it.
  * Gemma 3: the GGUF has the window size but not the layer pattern (llama.cpp hard-codes every 6th
    layer global) nor the local RoPE base (hard-coded 10000); the attention scale is
    1/sqrt(key_length), except the 62-layer 27B which uses 1/sqrt(hidden/heads), as llama.cpp does.
  * Llama 3.x long-context RoPE is stored as a ``rope_freqs`` tensor of per-frequency divisors rather
    than as metadata; we build the RoPE from it.
  * No ``output.weight`` means the head is tied to the embeddings.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ..errors import UserError
from ..gguf_file import GGUFFile, GGUFTensor, read_gguf
from ..model.config import ModelConfig, family_of
from . import gemma4, hybrid
from .gguf_families import family_metadata
from .gguf_names import DEEPSEEK_ROUTED, hf_name
from .weights import Quantized, REQUANT_GROUP, Tensor, TensorSpec, finish, fold_latent_maps, split_gate_up

T = GGMLQuantizationType
_FLOAT_BITS = {T.F32: 32, T.F16: 16, T.BF16: 16}
_AFFINE_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}  # stored exactly as MLX affine triples, group 32
_MX_BITS = {T.MXFP4: 4}  # stored exactly as MLX mxfp4 (e8m0 scale per 32, e2m1 values)
# llama.cpp's converter permutes Q/K rows for LlamaModel and its subclasses
_PERMUTED_ARCHS = {"llama", "smollm3", "mistral3"}

# llama.cpp's default renormalisation of the top-k expert weights per architecture (norm_w in its
# graph); a file may say otherwise with `<arch>.expert_weights_norm`.
_MOE_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False, "dots1": False, "glm4moe": True,
             "gpt-oss": False, "qwen3next": True, "qwen35moe": True, "deepseek2": False, "llama4": False,
             "mistral4": False}


# Our (Hugging Face) field -> the GGUF metadata key it is read from (under ``<arch>.``), so a wrong value
# is reported under the name the file uses.
_KEYS = {
    "hidden_size": "embedding_length", "num_hidden_layers": "block_count", "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length", "vocab_size": "vocab_size",
    "num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length", "n_shared_experts": "expert_shared_count",
    "first_k_dense_replace": "leading_dense_block_count", "routed_scaling_factor": "expert_weights_scale",
    "n_group": "expert_group_count", "topk_group": "expert_group_used_count",
    "sliding_window": "attention.sliding_window", "rope_local_base_freq": "rope.freq_base_swa",
    "rope_scaling.factor": "rope.scaling.factor",
    "rope_scaling.original_max_position_embeddings": "rope.scaling.original_context_length",
}  # fmt: skip


def config_from_gguf(meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     where: str = "GGUF") -> ModelConfig:
    """Build the model config from GGUF metadata, checked (``ModelConfig.from_hf``) against the tensors'
    ``shapes`` (GGUF names); raises ``UnsupportedArchitecture`` for unknown archs."""
    split = meta.get("split.count", 1)
    if split != 1 and (not isinstance(split, int) or split > 1):
        raise UserError(f"{where}: split GGUF files are not supported: merge them first (llama-gguf-split --merge)")
    arch = meta.get("general.architecture")
    if arch is None:
        raise UserError(f"{where}: GGUF metadata has no general.architecture")
    family = family_of(arch)
    extra: dict[str, Any] = {}
    if family == "gemma4_text":  # per-layer arrays and kinds (see gemma4.py)
        meta, extra = gemma4.gguf_metadata(meta, arch, shapes)

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise UserError(f"{where}: GGUF metadata lacks '{arch}.{key}'")
        if isinstance(value, list):  # per-layer arrays: supported only when uniform
            if not value or any(isinstance(v, list) for v in value):
                raise UserError(f"{where}: GGUF '{arch}.{key}' is an empty or nested array, not a value per layer")
            if len(set(value)) != 1:
                raise UserError(f"{where}: GGUF '{arch}.{key}' varies per layer, which this decoder does not support")
            value = value[0]
        return value

    if (get("final_logit_softcapping", 0.0) and not extra) or get("attn_logit_softcapping", 0.0):
        raise UserError("GGUF models with logit soft-capping are not supported")
    config: dict[str, Any] = {
        "model_type": arch,
        **{ours: get(_KEYS[ours]) for ours in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                "num_attention_heads", "rms_norm_eps", "vocab_size")},
        "num_key_value_heads": get("attention.head_count_kv", None),
        "head_dim": get("attention.key_length", None),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
    }
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length", None),
        }
    if get("expert_count", 0):
        if arch not in _MOE_NORM:
            raise UserError(f"GGUF mixture-of-experts models of architecture '{arch}' are not supported")
        config.update(
            num_experts=get("expert_count"),
            num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length", None),
            shared_expert_intermediate_size=get("expert_shared_feed_forward_length", None),
            norm_topk_prob=bool(get("expert_weights_norm", _MOE_NORM[arch])),
        )
        if family == "llama":  # Mixtral is stored as a llama with experts
            config["model_type"] = "mixtral"
        if family in DEEPSEEK_ROUTED:  # DeepSeek-V3-style routing (n_shared_experts and first_k_dense_replace: from_hf's)
            config.update(n_shared_experts=get("expert_shared_count", 0),
                          first_k_dense_replace=get("leading_dense_block_count", 0),
                          routed_scaling_factor=get("expert_weights_scale", 1.0),
                          n_group=get("expert_group_count", 1), topk_group=get("expert_group_used_count", 1))
    family_metadata(family, get, config, shapes)
    if extra:
        config.pop("rope_theta")  # Gemma 4's is per layer kind, in rope_parameters
        config.update(extra)
    if family in hybrid.FAMILIES:
        config.update(hybrid.gguf_config(get, config["head_dim"], config["hidden_size"], config["num_attention_heads"]))
    sliding = None
    if family == "gemma3_text":
        sliding = get("attention.sliding_window", None)
        config.update(sliding_window=sliding, rope_local_base_freq=get("rope.freq_base_swa", 10000.0))
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6)
        if sliding is None:
            config["sliding_window_pattern"] = 1  # every layer global
        elif isinstance(pattern, list):  # per-layer flags, true = sliding
            config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            config["sliding_window_pattern"] = pattern
    names = {ours: f"{arch}.{key}" for ours, key in _KEYS.items()}
    names["sliding_window_pattern"] = f"{arch}.attention.sliding_window_pattern"
    final = family_of(config["model_type"])
    cfg = ModelConfig.from_hf({k: v for k, v in config.items() if v is not None}, where=where, names=names,
                              weights=lambda: {hf_name(name, final): shape for name, shape in shapes.items()})
    if not cfg.kv_lora_rank and get("attention.value_length", cfg.head_dim) != cfg.head_dim:
        raise UserError("GGUF models with different key and value head sizes are not supported")
    rope_dims = get("rope.dimension_count", cfg.head_dim)
    if rope_dims != cfg.rope_dims and not cfg.kv_lora_rank:  # partial rotary embeddings (Phi-4-mini, GLM-4.5)
        if not isinstance(rope_dims, int) or isinstance(rope_dims, bool) or not 0 < rope_dims <= cfg.head_dim or rope_dims % 2:
            raise UserError(f"{where}: {arch}.rope.dimension_count is {rope_dims!r}, not an even number of "
                            f"features up to the head size {cfg.head_dim}")
        cfg.partial_rotary_factor = rope_dims / cfg.head_dim
    if family == "gemma3_text":  # llama.cpp's attention scale; its sliding window when the file has one
        wide = cfg.num_hidden_layers == 62  # the 27B
        cfg.query_pre_attn_scalar = cfg.hidden_size // cfg.num_attention_heads if wide else cfg.head_dim
        cfg.sliding_window = sliding
    return cfg


def _unpermute_qk(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of Q/K (rows ordered [head, i, half] -> [head, half, i])."""
    shape = rows.shape
    return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _repack(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, ...]:
    """Q4_0/Q4_1/Q8_0 blocks of one tensor [rows, row_bytes] -> MLX (packed uint32, scales, biases);
    MXFP4 blocks -> MLX mxfp4 (packed uint32, e8m0 scales)."""
    rows = raw.shape[0]
    if qtype == T.MXFP4:  # 1 scale byte, then 16 bytes whose nibbles hold elements i (low) and i + 16 (high)
        blocks = raw.reshape(rows, -1, 17)
        return _pack_nibbles(blocks[..., 1:], rows), np.ascontiguousarray(blocks[..., 0])
    if qtype == T.Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        packed = np.ascontiguousarray(blocks[..., 2:] ^ 0x80)  # int8 q -> uint8 q + 128
        return packed.reshape(rows, -1).view(np.uint32), d, d * np.float16(-128)
    head = 4 if qtype == T.Q4_1 else 2
    blocks = raw.reshape(rows, -1, head + 16)
    dm = np.ascontiguousarray(blocks[..., :head]).view(np.float16)
    biases = dm[..., 1] if qtype == T.Q4_1 else dm[..., 0] * np.float16(-8)
    return _pack_nibbles(blocks[..., head:], rows), dm[..., 0], biases


def _pack_nibbles(qs: np.ndarray, rows: int) -> np.ndarray:
    """GGUF's 16-byte nibble blocks (byte i: elements i and i + 16) -> MLX's packing (8 nibbles per uint32,
    element order, low first)."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed = np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))
    return packed.reshape(rows, -1).view(np.uint32)


class GGUFSource:
    """A GGUF file ready to be sized (``specs``, header only) and read (``tensors``)."""

    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.file: GGUFFile = read_gguf(path)  # kept: ``mlxllm.load`` hands it to the tokenizer too
        if self.file.byteorder != "<":
            raise UserError(f"{self.path.name} is a big-endian GGUF file, whose tensors cannot be loaded")
        by_name = {t.name: t for t in self.file.tensors}
        meta = self.file.metadata
        arch = meta.get("general.architecture")
        embed = by_name.get("token_embd.weight")
        if f"{arch}.vocab_size" not in meta and embed is not None and embed.shape:  # older converters omit it
            meta = ChainMap({f"{arch}.vocab_size": embed.shape[0]}, meta)
        self.config = config_from_gguf(meta, {t.name: t.shape for t in self.file.tensors}, path.name)
        self.arch = arch
        for t in [t for t in by_name.values() if t.name.startswith("blk.")]:
            if int(t.name.split(".")[1]) >= self.config.num_hidden_layers:  # GLM-4.5's multi-token prediction
                del by_name[t.name]
            elif self.config.model_type == "gemma4_text" and gemma4.unused(t.name, self.config):
                del by_name[t.name]
        factors = {name: self._rope_factors(by_name.pop(f"{name}.weight")) for name in
                   ("rope_freqs", "rope_factors_long", "rope_factors_short") if f"{name}.weight" in by_name}
        if "rope_freqs" in factors and self.config.model_type == "gemma4_text":
            self.config.rope_scaling = gemma4.proportional_rope(factors["rope_freqs"], self.config) or {
                "rope_type": "freq_factors", "factors": factors["rope_freqs"]}
        elif "rope_freqs" in factors:  # Llama 3.x long-context RoPE, stored as computed divisors
            self.config.rope_scaling = {"rope_type": "freq_factors", "factors": factors["rope_freqs"]}
        elif "rope_factors_long" in factors:  # Phi-3's LongRoPE
            self.config.rope_scaling = {
                "rope_type": "longrope", "long_factor": factors["rope_factors_long"],
                "short_factor": factors.get("rope_factors_short", factors["rope_factors_long"]),
                "attention_factor": meta.get(f"{arch}.rope.scaling.attn_factor"),
                "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length", 4096),
                "max_position_embeddings": self.config.max_position_embeddings}
        self._tensors = list(by_name.values())
        self.requant_errors: dict[str, list[float]] = {}  # block type -> relative RMS error per tensor
        # 16-bit type of the 'native' path: Gemma 3's residual stream overflows float16.
        self.native_dtype = mx.bfloat16 if self.config.model_type in ("gemma3_text", "gemma4_text") else mx.float16

    def _rope_factors(self, t: GGUFTensor) -> list[float]:
        with np.errstate(all="ignore"):
            factors = self._floats(t, self.raw(t)).reshape(-1)
        dims = int((self.config.global_head_dim or self.config.head_dim) * self.config.partial_rotary_factor)
        if factors.size != dims // 2 or not np.all(np.isfinite(factors) & (factors > 0)):
            raise UserError(f"{self.path.name}: tensor '{t.name}' holds {factors.size} values, not "
                            f"{dims // 2} positive finite RoPE frequency factors")
        return factors.tolist()

    @property
    def specs(self) -> list[TensorSpec]:
        family = self.config.model_type
        out = []
        for t in self._tensors:
            elements = math.prod(t.shape)
            if t.qtype in _FLOAT_BITS:
                form, bits, group = "float", _FLOAT_BITS[t.qtype], 0
            elif t.qtype in _AFFINE_BITS or t.qtype in _MX_BITS:
                form, bits, group = "affine", {**_AFFINE_BITS, **_MX_BITS}[t.qtype], 32
            else:
                form, bits, group = "other", 0, 0
            out.append(TensorSpec(hf_name(t.name, family), elements, t.qtype.name, t.nbytes, form, bits, group))
        return out

    def tensors(self, target: str, kquant: str) -> Iterator[tuple[str, Tensor]]:
        """Decode, fix up and convert tensor by tensor, evaluating each before the next."""
        requant_bits = None if target == "float32" or kquant == "float" else int(kquant[1:])
        family, held = self.config.model_type, {}
        for t in self._tensors:
            name = hf_name(t.name, family)
            value = self._decode(t, self.raw(t))
            if family in hybrid.FAMILIES and t.name.startswith("blk."):
                value = hybrid.fix_gguf(t.name.split(".")[2], value, self.config, self.arch)
            if requant_bits and isinstance(value, mx.array) and t.qtype not in _FLOAT_BITS:
                exact, value = value, Quantized.of(value, REQUANT_GROUP, requant_bits)
                error = mx.linalg.norm(value.dequantize() - exact) / mx.linalg.norm(exact)
                self.requant_errors.setdefault(t.qtype.name, []).append(error.item())
            value = finish(value, target, self.native_dtype)
            mx.eval(value if isinstance(value, mx.array) else list(value.arrays.values()))
            if ".self_attn.embed_q." in name or ".self_attn.unembed_out." in name:  # DeepSeek's attn_k_b/v_b
                held[name] = value
                yield from fold_latent_maps(held, name, self.config, target, self.native_dtype)
            elif family == "qwen3_next":  # attn_qkv + attn_gate -> in_proj_qkvz
                yield from hybrid.merge_qkvz(held, name, value, self.config)
            elif name.endswith(".gate_up_proj.weight") and len(t.shape) == 3:  # ffn_gate_up_exps: gate, then up
                yield from split_gate_up(name, value)
            else:
                yield name, value

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's stored bytes, one row per output row (memory-mapped, not read yet)."""
        rows = math.prod(t.shape[:-1])  # at least 1: the container refuses empty dimensions
        return self.file.tensor_bytes(t).reshape(rows, t.nbytes // rows)

    def _decode(self, t: GGUFTensor, raw: np.ndarray) -> Tensor:
        # Stored values may be anything (an f16 scale times -128 overflows to -inf, as in mx.load): data,
        # not a reason for numpy to print floating-point warnings.
        with np.errstate(all="ignore"):
            if t.qtype in _AFFINE_BITS:  # rows of a stacked [experts, out, in] tensor regain their stack
                parts = [self._fix(t, a.reshape(*t.shape[:-1], -1)) for a in _repack(raw, t.qtype)]
                return Quantized(*(mx.array(a) for a in parts), group_size=32, bits=_AFFINE_BITS[t.qtype])
            if t.qtype in _MX_BITS:
                weight, scales = (mx.array(a.reshape(*t.shape[:-1], -1)) for a in _repack(raw, t.qtype))
                return Quantized(weight, scales, None, group_size=32, bits=4, mode="mxfp4")
            return mx.array(self._fix(t, self._floats(t, raw).reshape(t.shape)))

    def _floats(self, t: GGUFTensor, raw: np.ndarray) -> np.ndarray:
        try:
            if t.qtype == T.F16:
                return raw.view(np.float16)
            if t.qtype == T.F32:
                return raw.view(np.float32)
            return gguf_dequantize(raw, t.qtype)  # BF16 and every block type gguf can decode, to float32
        except NotImplementedError:
            raise UserError(f"tensor '{t.name}' has type {t.qtype.name}, which cannot be decoded") from None

    def _fix(self, t: GGUFTensor, rows: np.ndarray) -> np.ndarray:
        """Undo the converter's transformations (Q/K row permutation, Gemma's norm +1)."""
        if self.arch in _PERMUTED_ARCHS:
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if kind == "attn_q":
                return _unpermute_qk(rows, self.config.num_attention_heads)
            if kind == "attn_k":
                return _unpermute_qk(rows, self.config.num_key_value_heads)
        if self.config.norm_plus_one and t.name.endswith("norm.weight"):
            return rows.astype(np.float32) - 1.0
        if t.name.endswith("ffn_gate_inp_shexp.weight"):  # stored as a vector; HF's is a [1, hidden] map
            return rows.reshape(1, -1)
        return rows
