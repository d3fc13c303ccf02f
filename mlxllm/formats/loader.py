"""Model loading: GGUF files, Hugging Face / mlx-community directories, Hub repos, the default model.

``load`` / ``load_model`` follow mlx-lm's names. ``compute`` picks the weights' representation
(see ``weights.py``): 'auto' is float32 on MLX's CPU backend, where float32 BLAS is far faster than
MLX's 16-bit and quantized CPU kernels (measured in the README, "The Linux CPU fast path"), and the
file's own representation on Metal/CUDA.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import backend
from ..errors import UserError
from ..model.config import ModelConfig
from ..model.decoder import Model
from ..model.shard import check_shardable, pipeline_model, replicated, shard_model
from .gguf import GGUFSource
from .hf import HFSource
from .hub import default_model_path, resolve
from .weights import COMPUTE_CHOICES, KQUANT_CHOICES, build, choose_target, model_bytes, needed_bytes

if TYPE_CHECKING:
    from ..tokenize import Tokenizer

__all__ = [
    "COMPUTE_CHOICES",
    "KQUANT_CHOICES",
    "LoadReport",
    "default_model_path",
    "describe_model",
    "load",
    "load_draft",
    "load_model",
    "resolve",
]

_WHY = {
    "float32": "dequantized/cast to float32 (fastest on the CPU backend)",
    "native": "kept in the file's representation",
    "quantized": "kept quantized with float32 scales (a float32 copy would not fit in memory)",
}


@dataclass(frozen=True)
class LoadReport:
    """What loading did, for ``--verbose`` and benchmarks: ``str(report)`` is one line."""

    path: Path
    format: str
    target: str  # 'float32' | 'native' | 'quantized'
    detail: str
    weight_bytes: int
    seconds: float
    requant_errors: dict[str, float] | None = None  # GGUF block type -> mean relative RMS error added

    def __str__(self) -> str:
        return (
            f"{self.path.name}: {self.detail}; {self.weight_bytes / 2**20:.0f} MiB of weights, "
            f"loaded in {self.seconds:.2f} s"
        )


Source = GGUFSource | HFSource


def open_source(spec: str | Path | Source | None) -> Source:
    """The reader for a model spec (a source passes through, so a caller that needs the file's header
    and the model parses the file once)."""
    if isinstance(spec, (GGUFSource, HFSource)):
        return spec
    path = resolve(spec)
    if path.is_dir():
        return HFSource(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(path)
    raise UserError(f"{path.name} is neither a GGUF file nor a Hugging Face model directory")


def _type_summary(specs) -> str:
    counts = Counter(s.file_type for s in specs)
    return ", ".join(f"{n} {t}" for t, n in counts.most_common())


def load_model(
    path: str | Path | Source | None = None, *, compute: str = "auto", kquant: str = "q8", lazy: bool = True,
    parallel: str = "tensor",
) -> Model:
    """Load only the model (None: the default SmolLM2 GGUF). See ``load`` for the options."""
    return _load_model(path, compute, kquant, lazy, parallel)[0]


def _load_model(path: str | Path | Source | None, compute: str, kquant: str, lazy: bool,
                parallel: str = "tensor") -> tuple[Model, Source]:
    """``load_model``, also returning the opened source (``load`` takes a GGUF file's parsed header from it)."""
    start = time.perf_counter()
    source = open_source(path)
    specs = source.specs
    target = choose_target(compute, specs, kquant)
    model = build(source.config, source.tensors(target, kquant))
    notes = [f"{source.format} ({_type_summary(specs)}) {_WHY[target]} on {backend.device_name()}"]
    if target != "float32" and kquant != "float" and any(s.form == "other" for s in specs):
        notes.append(f"block types MLX lacks re-quantized to MLX {kquant[1:]}-bit")
    if (source.config.rope_scaling or {}).get("rope_type") == "freq_factors":
        notes.append("RoPE frequency factors from rope_freqs")
    group = backend.rank_group()
    if parallel not in ("tensor", "pipeline"):
        raise UserError(f"parallel is {parallel!r}: 'tensor' or 'pipeline'")
    if group is not None and group.size() > 1:  # under mlx.launch: this rank's share (model/shard.py)
        (pipeline_model if parallel == "pipeline" else shard_model)(model, group)
        notes.append(f"{parallel} parallel: rank {group.rank()} of {group.size()}")
        for _, share in tree_flatten(model.parameters()):  # one lazy full tensor at a time, cut to its share
            mx.eval(share)
    if not lazy or target != "native":
        # A converted weight left lazy would be re-converted by every forward pass: materialize it once.
        mx.eval(model.parameters())
    model.load_report = report = LoadReport(
        source.path,
        source.format,
        target,
        "; ".join(n for n in notes if n),
        model_bytes(specs, target, kquant),
        time.perf_counter() - start,
        {k: sum(v) / len(v) for k, v in getattr(source, "requant_errors", {}).items()} or None,
    )
    model.compute_path = str(report)  # the line the CLI prints under --verbose
    return model, source


def load(
    path_or_repo: str | Path | None = None, *, compute: str = "auto", kquant: str = "q8", lazy: bool = True,
    adapter_path: str | Path | None = None, parallel: str = "tensor",
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer: ``(model, tokenizer)``, like ``mlx_lm.load``.

    path_or_repo: a .gguf file, a Hugging Face model directory, a Hub id (``org/name`` or
        ``org/name/file.gguf``), or None for the default model.
    compute: 'auto' | 'float32' | 'native' (see the module docstring); the path taken is in
        ``model.load_report``.
    kquant: for GGUF block types MLX cannot hold (K-quants, Q5_x, IQ*) when weights stay quantized:
        'q8' (MLX 8-bit, default), 'q4' (MLX 4-bit) or 'float' (16-bit).
    lazy: safetensors weights kept in their own representation ('native') are read on first use
        unless False; converted weights and GGUF tensors are materialized at load.
    adapter_path: a folder of LoRA/DoRA adapters (``mlxllm lora`` or ``mlx_lm.lora`` output) to apply.
    parallel: under ``mlx.launch``, how the ranks split the model: 'tensor' (heads and hidden columns) or
        'pipeline' (runs of layers).
    """
    from ..tokenize import Tokenizer

    model, source = _load_model(path_or_repo, compute, kquant, lazy, parallel)
    if adapter_path is not None:
        from ..model.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    if isinstance(source, GGUFSource):  # the header parsed for the weights holds the vocabulary too
        from ..tokenize.gguf_vocab import read_gguf_tokenizer_metadata

        tokenizer = Tokenizer.from_gguf_metadata(read_gguf_tokenizer_metadata(source.file))
    else:
        tokenizer = Tokenizer.from_hf_dir(model.load_report.path)
    return model, tokenizer


def _specifics(cfg: ModelConfig, specs: list, total: int) -> dict[str, Any]:
    """What a family adds to the common facts: experts, layers without RoPE, with a window or chunked,
    partial or scaled RoPE, the query scale, fused projections."""
    out: dict[str, Any] = {}
    if cfg.num_experts:  # stacked (switch_mlp / experts) or per-expert (experts.N) tensors
        routed = sum(s.elements for s in specs if ".switch_mlp." in s.name or ".experts." in s.name)
        out = {"experts": f"{cfg.num_experts} ({cfg.num_experts_per_tok} active per token)",
               "active_parameters": total - routed + routed * cfg.num_experts_per_tok // cfg.num_experts}
    layers = range(cfg.num_hidden_layers)
    if cfg.no_rope_layers is not None:
        out["layers_without_rope"] = [i for i in layers if not cfg.uses_rope(i)]
    sliding = [i for i in layers if cfg.is_sliding(i)]
    if sliding:
        out["sliding_window"] = f"{cfg.sliding_window} tokens, on {len(sliding)} of {len(layers)} layers"
    if not cfg.kv_lora_rank and cfg.rope_dims != cfg.head_dim:
        out["rope_features_per_head"] = f"{cfg.rope_dims} of {cfg.head_dim}"
    scaling = cfg.rope_scaling or {}
    if scaling:
        out["rope_scaling"] = scaling.get("rope_type", scaling.get("type"))
    chunked = [i for i in layers if cfg.is_chunked(i)]
    if chunked:
        out["chunked_attention"] = f"{cfg.attention_chunk_size} tokens, on {len(chunked)} of {len(layers)} layers"
    if cfg.query_scale_beta is not None:
        position = f"(position + {cfg.query_scale_shift})" if cfg.query_scale_shift else "position"
        where = " on layers without RoPE" if cfg.query_scale_nope_only else ""
        out["query_scale"] = (f"1 + {cfg.query_scale_beta:.6g} * log(1 + floor({position} / "
                              f"{cfg.query_scale_length})){where}")
    linear = [i for i in layers if cfg.is_linear(i)]
    if linear:  # Gated DeltaNet layers: a recurrent state each, the others gated full attention
        out["layer_pattern"] = "".join("L" if cfg.is_linear(i) else "F" for i in layers)
        out["linear_attention"] = (f"{len(linear)} layers, {cfg.linear_num_key_heads} key heads x "
                                   f"{cfg.linear_key_head_dim}, {cfg.linear_num_value_heads} value heads x "
                                   f"{cfg.linear_value_head_dim}, conv kernel {cfg.linear_conv_kernel_dim}")
        out["full_attention"] = (f"{len(layers) - len(linear)} layers, output-gated, RoPE on "
                                 f"{cfg.rope_dims} of {cfg.head_dim} features per head")
    fused = [name for name, on in (("qkv_proj", cfg.fused_qkv), ("gate_up_proj", cfg.fused_gate_up)) if on]
    if fused:
        out["fused_projections"] = fused
    _gemma4_specifics(cfg, out)
    return out


def _gemma4_specifics(cfg: ModelConfig, out: dict[str, Any]) -> None:
    """Gemma 4's, added to ``out``: head sizes per layer kind, keys as values, KV-sharing layers and their
    sources, the proportional RoPE's share, per-layer inputs, experts beside the MLP, logit soft-capping."""
    full = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    if cfg.global_head_dim and full and cfg.global_head_dim != cfg.head_dim:
        out["head_dim"] = f"{cfg.head_dim}, {cfg.global_head_dim} on full-attention layers"
    if cfg.attention_k_eq_v and full:
        out["keys_as_values"] = f"on full-attention layers ({cfg.layer_kv_heads(full[0])} key/value heads)"
    if cfg.num_kv_shared_layers:
        sources = {i: cfg.kv_source(i) for i in range(cfg.num_hidden_layers) if cfg.kv_source(i) is not None}
        out["kv_shared_layers"] = (f"{len(sources)} (layer <- the layer whose keys and values it attends over: "
                                   + ", ".join(f"{i} <- {j}" for i, j in sources.items()) + ")")
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "proportional" and full:
        dims = cfg.layer_head_dim(full[0])
        out["rope_features_per_head"] = (f"{int(dims * scaling.get('partial_rotary_factor', 1.0))} of {dims} on "
                                         "full-attention layers")
    if cfg.hidden_size_per_layer_input:
        out["per_layer_inputs"] = f"{cfg.hidden_size_per_layer_input} features per layer and token"
    if cfg.enable_moe_block:
        out["experts"] += " beside each layer's dense MLP"
    if cfg.final_logit_softcapping is not None:
        out["final_logit_softcapping"] = cfg.final_logit_softcapping


def describe_model(path: str | Path | None = None, *, kquant: str = "q8", ranks: int = 1) -> dict[str, Any]:
    """Facts about a model from its header/index alone (no tensor data read), for ``mlxllm info``;
    ``ranks``: also the memory each of that many tensor-parallel ranks needs."""
    source = open_source(path)
    specs, cfg = source.specs, source.config
    if ranks > 1:
        check_shardable(cfg, ranks)
    types: dict[str, dict[str, int]] = {}
    for s in specs:
        entry = types.setdefault(s.file_type, {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += s.elements
    try:
        auto = choose_target("auto", specs, kquant)
    except UserError:
        auto = None
    total = sum(s.elements for s in specs)
    specifics = _specifics(cfg, specs, total)
    return {
        "path": str(source.path),
        "format": source.format,
        "architecture": source.arch,
        "family": cfg.model_type,
        "parameters": total,
        **specifics,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tensor_types": types,
        "file_bytes": sum(s.file_bytes for s in specs),
        "memory_needed_bytes": {
            t: needed_bytes(model_bytes(specs, t, kquant)) for t in ("float32", "native", "quantized")
        },
        **({"memory_needed_per_rank_bytes": {
            t: needed_bytes(model_bytes([s for s in specs if replicated(s.name)], t, kquant)
                            + model_bytes([s for s in specs if not replicated(s.name)], t, kquant) // ranks)
            for t in ("float32", "native", "quantized")}, "ranks": ranks} if ranks > 1 else {}),
        "memory_available_bytes": backend.device_memory(),
        "compute_auto": auto,
    }


def load_draft(spec: str, compute: str, tokenizer: Any) -> Any:
    """Load a draft model, refusing one whose tokenizer is not ``tokenizer`` (ids would mean other text)."""
    draft, draft_tokenizer = load(spec, compute=compute)
    if draft_tokenizer.fingerprint != tokenizer.fingerprint:
        raise UserError(f"--draft-model {spec} has a different tokenizer than the model; speculative decoding needs "
                        "the same vocabulary")
    return draft
