"""Hugging Face safetensors directories: plain (fp32/fp16/bf16) or mlx-community quantized.

Safetensors headers are read and checked up front (a truncated shard is one clear error here, not
a failure at the first forward pass, because ``mx.load`` reads lazily); the data is then loaded
lazily with ``mx.load``, so nothing is read until it is used.

mlx-community quantized directories carry ``quantization: {group_size, bits, <module>: {...} | false}``
in config.json; exactly the modules whose ``<module>.scales`` tensor exists are quantized, with
their per-module override when there is one (mlx-lm's rule).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig, check_quantization_block, layer_index
from . import hybrid
from .weights import Quantized, Tensor, TensorSpec, finish, fold_latent_maps, unfuse_experts

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
# Checkpoint parts the text decoder does not use (multimodal towers, buffers some exporters save).
_UNUSED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                    "vision_model.", "model.vision_model.", "model.audio_tower.", "model.embed_audio.",
                    "model.embed_vision.", "model.vision_embedder.", *hybrid.UNUSED_PREFIXES)
# Gemma 4 checkpoints keep key/value maps in the layers that share another layer's (unused, as in transformers).
_SHARED_KV = (".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.k_norm.", ".self_attn.v_norm.")
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)
# Multimodal wrappers (e.g. Gemma3ForConditionalGeneration) nest the text model.
_RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."), ("language_model.", ""))


# Hugging Face MoE checkpoints store experts one by one; the decoder holds them stacked (switch_mlp).
_EXPERT = re.compile(r"^(.+)\.experts\.([0-9]{1,9})\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def expert_stacks(names: list[str], stack: str = "switch_mlp") -> dict[str, list[str]]:
    """Stacked name (``...<stack>.gate_proj.weight``) -> the per-expert names, in expert order."""
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            prefix, e, proj, leaf = m.groups()
            groups.setdefault(f"{prefix}.{stack}.{_MIXTRAL_PROJ.get(proj, proj)}.{leaf}", {})[int(e)] = name
    for stacked, members in groups.items():
        if sorted(members) != list(range(len(members))):
            raise UserError(f"experts for '{stacked}' are not numbered 0..{len(members) - 1}")
    return {stacked: [members[e] for e in range(len(members))] for stacked, members in groups.items()}


# gpt-oss, Llama 4 and Gemma 4 keep each layer's experts as two stacks, gate|up and down. gpt-oss interleaves
# gate and up (gate rows even, up rows odd); OpenAI's release holds MXFP4 blocks + e8m0 scales ([experts, out,
# in/32, 16] bytes), dequantized exports float maps [experts, in, out]. Llama 4: float maps [experts, in,
# out], gate then up. Gemma 4: float maps [experts, out, in], gate then up, beside the MLP (``switch_glu``).
_FUSED_EXPERTS = re.compile(r"^(.+\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales|_bias)?$")


def _fused_experts(prefix: str, proj: str, part: Callable[[str], mx.array | None],
                   family: str) -> Iterator[tuple[str, Tensor]]:
    """One fused expert stack (``part(suffix)`` reads it) as the decoder's stacked gate/up/down maps:
    MXFP4 stays MXFP4 (MLX's mxfp4 packs the same nibbles and scales), float maps are transposed
    unless already [experts, out, in] (Gemma 4)."""
    interleaved = family == "gpt_oss"
    blocks, bias = part("_blocks"), part("_bias")
    if blocks is not None:
        packed, scales = blocks.view(mx.uint32).flatten(-2), part("_scales")

        def rows(r: slice) -> Tensor:
            return Quantized(mx.contiguous(packed[..., r, :]), mx.contiguous(scales[..., r, :]), None, 32, 4, "mxfp4")
    else:
        dense = part("") if family == "gemma4_text" else part("").swapaxes(-1, -2)

        def rows(r: slice) -> Tensor:
            return mx.contiguous(dense[..., r, :])

    if proj == "down_proj":
        maps = [("down_proj", slice(None))]
    elif interleaved:
        maps = [("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))]
    else:
        half = (blocks if blocks is not None else dense).shape[1] // 2
        maps = [("gate_proj", slice(0, half)), ("up_proj", slice(half, None))]
    if family == "gemma4_text":
        prefix += ".switch_glu"
    for name, r in maps:
        yield f"{prefix}.{name}.weight", rows(r)
        if bias is not None:
            yield f"{prefix}.{name}.bias", mx.contiguous(bias[..., r])


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor index of one safetensors file, every entry checked: a known dtype, a shape of whole
    numbers, data offsets that agree with the shape and lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"its header length {n:,} runs past the end of the {size:,}-byte file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path.name} is not a readable safetensors file ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path.name} is not a readable safetensors file (its header is a JSON "
                        f"{type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path.name, name, info, 8 + n, size)
    return header


def _check_entry(file: str, name: str, info: Any, data_start: int, size: int) -> None:
    def bad(problem: str) -> UserError:
        return UserError(f"{file}: tensor '{name}' {problem}")

    if not isinstance(info, dict):
        raise bad(f"is described by {info!r}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise bad(f"has unknown dtype {dtype!r} (known: {', '.join(_DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    count = math.prod(shape)
    if count * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise bad(f"has shape {shape} of {dtype} ({count * _DTYPE_BYTES[dtype]:,} bytes) but data_offsets "
                  f"{offsets} span {offsets[1] - offsets[0]:,} bytes")
    if data_start + offsets[1] > size:
        raise UserError(f"{file} is truncated: tensor '{name}' ends at byte {data_start + offsets[1]:,} "
                        f"but the file has {size:,}")


def _normalize(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _shard_name(name: Any) -> bool:
    """A file name inside the model directory (no absolute path, no '..', no NUL)."""
    return isinstance(name, str) and bool(name) and "\0" not in name and not name.startswith("/") and (
        ".." not in Path(name).parts)


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, RecursionError, AttributeError) as e:
            detail = "not a JSON object" if isinstance(e, AttributeError) else e
            raise UserError(f"{index} is not a valid safetensors index ({detail})") from None
        if not isinstance(weight_map, dict) or not all(_shard_name(name) for name in weight_map.values()):
            raise UserError(f"{index} is not a valid safetensors index "
                            "(its weight_map must map tensor names to shard files)")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).exists():
                raise UserError(f"shard '{name}' listed in {index.name} is missing from {path}")
        return [path / name for name in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UserError(f"no *.safetensors weights in {path}")
    return shards


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise UserError(f"{path} has no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(file.read_text())
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} is a JSON {type(config).__name__}, not an object")
    return config


class HFSource:
    """A Hugging Face model directory ready to be sized (``specs``, headers only) and read (``tensors``)."""

    format = "safetensors"
    native_dtype = None  # 'native' keeps the checkpoint's own dtypes

    def __init__(self, path: Path):
        self.path = path
        raw = _read_config(path)
        stored: dict[str, tuple[Path, str, dict[str, Any]]] = {}  # our name -> (file, file name, info)

        def shapes() -> dict[str, tuple[int, ...]]:  # the headers, read once the family is known
            for file in _shards(path):
                for name, info in read_safetensors_header(file).items():
                    ours = _normalize(name)
                    if not (ours.startswith(_UNUSED_PREFIXES) or ours.endswith(_UNUSED_SUFFIXES)):
                        stored[ours] = (file, name, info)
            return {ours: tuple(info["shape"]) for ours, (_, _, info) in stored.items()}

        self.config = ModelConfig.from_hf(raw, weights=shapes)
        self.arch = raw.get("model_type")
        quant = raw.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method == "mxfp4" and self.config.model_type == "gpt_oss":
            method = None  # OpenAI's MXFP4 experts: read as MLX mxfp4 (``_fused_experts``)
        if method and not self.config.quantization:  # GPTQ, AWQ, bitsandbytes, FP8...: other tensor layouts
            raise UserError(f"{method} checkpoints are not supported: use an unquantized or an MLX-quantized one")
        mtp_layers = raw.get("num_nextn_predict_layers", 0)
        self.index = {}
        for ours, entry in stored.items():
            if self.config.tie_word_embeddings and ours.startswith("lm_head."):
                continue
            if mtp_layers and (layer_index(ours) or 0) >= self.config.num_hidden_layers:
                continue  # DeepSeek-V3's multi-token-prediction layers (speculative heads, not the decoder)
            layer = layer_index(ours)
            if layer is not None and layer < self.config.num_hidden_layers and any(p in ours for p in _SHARED_KV) and (
                    self.config.kv_source(layer) is not None):
                continue
            self.index[ours] = entry
        self.quant = self._quantized_modules(raw)
        self.stacks = expert_stacks(list(self.index), self.config.expert_stack_name)
        self.hybrid = self.config.model_type in hybrid.FAMILIES
        self.original = self.hybrid and hybrid.original_layout({n: tuple(e[2]["shape"]) for n, e in self.index.items()})
        self.fused_experts = self.config.model_type in ("gpt_oss", "llama4_text", "gemma4_text")

    def _quantized_modules(self, raw: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
        """Module path -> (group_size, bits, mode) for every module stored with ``.scales``."""
        prefixes = [name[: -len(".scales")] for name in self.index if name.endswith(".scales")]
        if not prefixes:
            return {}
        q = self.config.quantization or raw.get("quantization_config")
        if not q:
            raise UserError(f"tensor '{prefixes[0]}.scales' is quantized but config.json has no 'quantization' block")
        key = "quantization" if self.config.quantization else "quantization_config"
        check_quantization_block(q, "config.json", key)
        overrides = {_normalize(k): v for k, v in q.items() if isinstance(v, (dict, bool))}
        out = {}
        for p in prefixes:
            params = overrides.get(p, q)
            if params is False:
                raise UserError(f"tensor '{p}.scales' exists but config.json marks '{p}' as not quantized")
            if not isinstance(params, dict):  # an override of `true` means the defaults
                params = q
            mode = params.get("mode", q.get("mode", "affine"))  # checked by check_quantization_block
            out[p] = group, bits, _ = (params.get("group_size", q["group_size"]), params.get("bits", q["bits"]), mode)
            self._check_packing(p, group, bits)
        return out

    def _check_packing(self, prefix: str, group: int, bits: int) -> None:
        """The stored triple must be what ``bits``-bit groups of ``group`` make: ``in * bits / 32`` words and
        ``in / group`` scales (and biases) per row, so a wrong quantization block is refused here, not
        deep inside dequantization."""
        shape = {leaf: self.index[f"{prefix}.{leaf}"][2]["shape"] for leaf in ("weight", "scales", "biases")
                 if f"{prefix}.{leaf}" in self.index}
        w, s = shape.get("weight"), shape["scales"]
        if w is None:
            return  # reported as a missing tensor
        if not w or len(w) != len(s) or w[:-1] != s[:-1] or w[-1] * 32 != s[-1] * group * bits or (
                shape.get("biases", s) != s):
            raise UserError(f"config.json: quantization (group_size {group}, bits {bits}) does not fit tensor "
                            f"'{prefix}': weight {tuple(w)}, scales {tuple(s)}")

    @property
    def specs(self) -> list[TensorSpec]:
        out = []
        for name, (_, _, info) in self.index.items():
            prefix, _, leaf = name.rpartition(".")
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            count = math.prod(info["shape"])
            if name.endswith("_scales") and _FUSED_EXPERTS.match(name):
                continue  # accounted with their blocks
            if name.endswith("_blocks") and _FUSED_EXPERTS.match(name):  # two 4-bit weights per byte
                nbytes += self._bytes(name[: -len("_blocks")] + "_scales")
                out.append(TensorSpec(name, 2 * count, "mxfp4/g32", nbytes, "affine", 4, 32))
            elif prefix in self.quant:
                if leaf != "weight":
                    continue  # scales and biases are accounted with their weight
                group, bits, mode = self.quant[prefix]
                count = count * 32 // bits
                aux = sum(self._bytes(f"{prefix}.{k}") for k in ("scales", "biases"))
                out.append(TensorSpec(name, count, f"{mode}{bits}/g{group}", nbytes + aux, "affine", bits, group))
            else:
                out.append(TensorSpec(name, count, info["dtype"], nbytes, "float", 8 * _DTYPE_BYTES[info["dtype"]]))
        return out

    def _bytes(self, name: str) -> int:
        start, end = self.index[name][2]["data_offsets"] if name in self.index else (0, 0)
        return end - start

    def tensors(self, target: str, kquant: str) -> Iterator[tuple[str, Tensor]]:
        """Lazily loaded tensors (nothing is read before the first evaluation)."""
        loaded: dict[Path, dict[str, mx.array]] = {}

        def array(name: str) -> mx.array:
            file, stored, _ = self.index[name]
            if file not in loaded:
                try:
                    loaded[file] = mx.load(str(file))
                except (RuntimeError, ValueError) as e:
                    raise UserError(f"cannot read {file.name}: {e}") from None
            return loaded[file][stored]

        def stacked(name: str) -> mx.array:
            members = self.stacks.get(name)
            return mx.stack([array(m) for m in members]) if members else array(name)

        in_stacks = {m for members in self.stacks.values() for m in members}
        fused = {m.group(1, 2) for m in map(_FUSED_EXPERTS.match, self.index) if m} if self.fused_experts else set()
        for prefix, proj in sorted(fused):
            yield from ((n, finish(t, target, self.native_dtype)) for n, t in _fused_experts(
                prefix, proj, lambda suffix: array(f"{prefix}.{proj}{suffix}") if f"{prefix}.{proj}{suffix}" in self.index
                else None, self.config.model_type))
        latent_maps: dict[str, Tensor] = {}
        for name in [n for n in self.index if n not in in_stacks and not (self.fused_experts and _FUSED_EXPERTS.match(n))
                     ] + list(self.stacks):
            prefix, _, leaf = name.rpartition(".")
            quant = self.quant.get(self.stacks[name][0].rpartition(".")[0] if name in self.stacks else prefix)
            if quant and leaf in ("scales", "biases"):
                continue  # read with their weight
            if quant and leaf == "weight":
                has_biases = f"{prefix}.biases" in self.index or f"{prefix}.biases" in self.stacks
                if quant[2] == "affine" and not has_biases:
                    raise UserError(f"quantized tensor '{prefix}.weight' has scales but no biases")
                biases = stacked(f"{prefix}.biases") if has_biases else None
                value: Tensor = Quantized(stacked(name), stacked(f"{prefix}.scales"), biases, *quant)
            else:
                value = stacked(name)
            if ".self_attn.embed_q." in name or ".self_attn.unembed_out." in name:
                latent_maps[name] = value
                yield from fold_latent_maps(latent_maps, name, self.config, target, self.native_dtype)
                continue
            for ours, v in hybrid.from_hf(name, value, self.original) if self.hybrid else unfuse_experts(name, value):
                yield ours, finish(v, target, self.native_dtype)
