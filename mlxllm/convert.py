"""``mlxllm convert``: write a model as an mlx-community directory, optionally quantized.

The directory holds ``config.json`` (with mlx-community's ``quantization`` block, per-layer entries
included), safetensors shards with an index, the tokenizer files and a model card, under Hugging Face
parameter names, so mlxllm and mlx-lm read it alike. ``bench --compare`` uses ``save_model`` to give
mlx-lm the very weights mlxllm loaded from a GGUF file. Everything is written into a temporary
directory that is renamed at the end, so an interrupted or failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .model.config import ModelConfig, layer_index
from .model.decoder import Model

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                  "dots1": "Dots1ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                  "deepseek_v3": "DeepseekV3ForCausalLM"}
_MOE = ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers")
_LATENT = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_COMMON = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
           "max_position_embeddings", "tie_word_embeddings", "attention_bias")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` a Hugging Face checkpoint of this family would carry."""
    if (cfg.rope_scaling or {}).get("rope_type") == "freq_factors":
        raise UserError("RoPE frequency factors from a GGUF rope_freqs tensor have no config.json form")
    out: dict[str, Any] = {"architectures": [_ARCHITECTURES[cfg.model_type]]}
    out.update({k: getattr(cfg, k) for k in _COMMON})
    if cfg.model_type == "gemma3_text":
        first_global = next((i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)), cfg.num_hidden_layers)
        out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                   rope_local_base_freq=cfg.rope_local_base_freq, layer_types=cfg.layer_types,
                   sliding_window_pattern=first_global + 1, hidden_activation="gelu_pytorch_tanh")
    elif cfg.sliding_window is not None:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    if cfg.kv_lora_rank:
        out.update({k: getattr(cfg, k) for k in _LATENT})
    if cfg.num_experts and (cfg.router == "sigmoid_group" or cfg.model_type.startswith("deepseek")):
        sigmoid = cfg.router == "sigmoid_group"  # DeepSeek-style names
        out.update(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   n_shared_experts=(cfg.shared_expert_intermediate_size or 0) // cfg.moe_intermediate_size,
                   first_k_dense_replace=len(cfg.mlp_only_layers), routed_scaling_factor=cfg.routed_scaling_factor,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, moe_layer_freq=1,
                   scoring_func="sigmoid" if sigmoid else "softmax",
                   topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if cfg.n_group > 1 else "greedy")
    elif cfg.num_experts:
        out.update({k: getattr(cfg, k) for k in _MOE})
        out["num_local_experts" if cfg.model_type == "mixtral" else "num_experts"] = cfg.num_experts
    return {k: v for k, v in out.items() if v is not None or k == "q_lora_rank"}


# What convert quantizes to, per mode: (group sizes, bits). MLX's affine mode also takes 1 bit, too
# lossy to offer. mxfp4/mxfp8/nvfp4 store small floats with one shared 8-bit scale per group.
MODES = {"affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)), "mxfp4": ((32,), (4,)), "mxfp8": ((32,), (8,)),
         "nvfp4": ((16,), (4,))}
SHARD_BYTES = 5 * 2**30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_quantization(bits: int, group_size: int, mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"quantization mode '{mode}' is not supported (supported: {', '.join(MODES)})")
    groups, allowed_bits = MODES[mode]
    if bits not in allowed_bits:
        raise UserError(f"{mode} quantization takes {', '.join(map(str, allowed_bits))} bits, not {bits}")
    if group_size not in groups:
        raise UserError(f"{mode} quantization takes group sizes {', '.join(map(str, groups))}, not {group_size}")


def recipe_bits(recipe: str | None, bits: int) -> Callable[[str, int | None, int], int]:
    """Bits per module for a recipe. ``mixed_L_H``: L bits, except H bits for the embeddings, the
    head, and the v and down projections of the first and last eighth of the layers (at least one
    each) and of every third layer between: where quantization error hurts most, the idea behind
    llama.cpp's _M types."""
    if recipe is None:
        return lambda path, layer, n_layers: bits
    parts = recipe.split("_")
    if len(parts) != 3 or parts[0] != "mixed" or not all(p.isdigit() for p in parts[1:]):
        raise UserError(f"unknown recipe '{recipe}' (recipes: mixed_LOW_HIGH, e.g. mixed_3_6, mixed_4_8)")
    low, high = int(parts[1]), int(parts[2])

    def choose(path: str, layer: int | None, n_layers: int) -> int:
        if layer is None:  # embeddings, head
            return high
        eighth = max(1, n_layers // 8)
        edge = layer < eighth or layer >= n_layers - eighth or (layer - eighth) % 3 == 2
        return high if edge and path.endswith(("v_proj", "down_proj")) else low

    return choose


def quantize_model(model: Model, bits: int, group_size: int, mode: str = "affine", recipe: str | None = None) -> None:
    """Quantize every linear map, embedding and expert stack of ``model`` in place, per ``recipe``."""
    check_quantization(bits, group_size, mode)
    choose = recipe_bits(recipe, bits)
    n_layers = model.config.num_hidden_layers
    plan: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        if "scales" in m:
            raise UserError(f"the model is already quantized ('{path}'): convert from unquantized weights")
        if not hasattr(m, "to_quantized") or "weight" not in m:
            continue
        cols = m.weight.shape[-1]
        if cols % group_size:
            raise UserError(f"'{path}' has {cols} input columns, not a multiple of the group size {group_size}")
        b = choose(path, layer_index(path), n_layers)
        check_quantization(b, group_size, mode)
        plan[path] = {"group_size": group_size, "bits": b, "mode": mode}
    nn.quantize(model, class_predicate=lambda path, m: plan.get(path, False))


def cast_floats(model: Model, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (quantized weights are integers and stay as they are)."""
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
                                 if mx.issubdtype(v.dtype, mx.floating)]))


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx-community's ``quantization`` entry: the most common (group_size, bits, mode) as the default
    and an override for every quantized module that differs."""
    found = {name: (m.group_size, m.bits, getattr(m, "mode", "affine")) for name, m in model.named_modules()
             if "scales" in m and hasattr(m, "bits")}  # fmt: skip
    if not found:
        return None
    group, bits, mode = Counter(found.values()).most_common(1)[0][0]
    block: dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for name, (g, b, m) in sorted(found.items()):
        if (g, b, m) != (group, bits, mode):
            block[name] = {"group_size": g, "bits": b, "mode": m}
    return block


def _write_shards(weights: dict[str, mx.array], out: Path, shard_bytes: int) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if shards[-1] and size + w.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model: Model, out: str | Path, tokenizer_files: Path | None = None, *,
               shard_bytes: int = SHARD_BYTES, card: str | None = None, keep: tuple[str, ...] = ()) -> Path:
    """Write ``model`` to the directory ``out`` (replaced if it exists): config, safetensors shards
    of at most ``shard_bytes``, the tokenizer files found in ``tokenizer_files``, and ``card`` as
    README.md. Written to ``out.tmp`` first and renamed, so a failure leaves no partial directory;
    the entries named in ``keep`` (a training checkpoint) move from the old ``out`` to the new one."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = hf_config(model.config)
        quant = quantization_block(model)
        if quant:
            config["quantization"] = quant
        _write_shards(dict(tree_flatten(model.parameters())), tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES if tokenizer_files is not None else ():
            if (tokenizer_files / name).exists():
                shutil.copy(tokenizer_files / name, tmp / name)
        if card:
            (tmp / "README.md").write_text(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in keep:
        if (out / name).exists():
            os.replace(out / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def model_card(source: str, model: Model, weights: str) -> str:
    """A short README.md saying where the weights came from and how to run them."""
    from importlib.metadata import version

    cfg = model.config
    return (f"# {Path(source).name}\n\nConverted from `{source}` by mlxllm {version('mlxllm')} "
            f"(`mlxllm convert`).\n\n- architecture: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
            f"hidden size {cfg.hidden_size}\n- weights: {weights}\n\n"
            "```bash\nmlxllm generate --model <this directory> --prompt \"Hello\"\n"
            "mlx_lm.generate --model <this directory> --prompt \"Hello\"\n```\n")


def gguf_import_report(path: Path, kquant: str, quantize: bool, errors: dict[str, float] | None) -> list[dict[str, Any]]:
    """Per GGUF tensor type: how many tensors, what conversion did with them, and for block types
    MLX cannot hold the relative RMS error re-quantizing them added (``errors``, measured at load)."""
    from .load.gguf import GGUFSource
    from .load.weights import REQUANT_GROUP

    rows: dict[str, dict[str, Any]] = {}
    for spec in GGUFSource(path).specs:
        row = rows.setdefault(spec.file_type, {"type": spec.file_type, "tensors": 0, "parameters": 0})
        row["tensors"] += 1
        row["parameters"] += spec.elements
        if quantize:
            row["action"] = "dequantized, then quantized as requested"
        elif spec.form == "affine":
            row["action"] = f"kept exactly (MLX {spec.bits}-bit, group {spec.group_size})"
        elif spec.form == "float":
            row["action"] = "kept (16-bit)" if spec.bits == 16 else "cast to 16-bit"
        elif kquant == "float":
            row["action"] = "dequantized to 16-bit float (exact)"
        else:
            row["action"] = f"re-quantized to MLX {kquant[1:]}-bit, group {REQUANT_GROUP}"
            row["added_rms_error"] = (errors or {}).get(spec.file_type, 0.0)
    return list(rows.values())


@contextlib.contextmanager
def tokenizer_files_of(path: Path) -> Iterator[Path]:
    """A folder with ``path``'s tokenizer as Hugging Face files: the model folder itself, or for a GGUF
    file a temporary one written from its metadata (``mlxllm.tokenize.export``)."""
    if not path.is_file():
        yield path
        return
    from .tokenize import read_gguf_tokenizer_metadata
    from .tokenize.export import write_hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="mlxllm-tokenizer-") as tok_dir:
        write_hf_tokenizer(read_gguf_tokenizer_metadata(path), Path(tok_dir))
        yield Path(tok_dir)


def convert(source: str, out: str | Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
            mode: str = "affine", dtype: str | None = None, recipe: str | None = None, requantize: str = "q8",
            force: bool = False, adapter_path: str | Path | None = None, dequantize: bool = False) -> dict[str, Any]:
    """Load ``source`` (HF / mlx-community directory, Hub id or GGUF file), optionally cast and
    quantize it, and write it to ``out`` in the mlx-community layout; returns what was done.

    GGUF: Q4_0/Q4_1/Q8_0 are kept bit for bit; block types MLX lacks are re-quantized per
    ``requantize`` ('q8', 'q4' or 'float'); with ``quantize`` everything is dequantized first. The
    tokenizer is written as Hugging Face files (``mlxllm.tokenize.export``). With ``adapter_path`` the
    adapters are fused into the weights first (``mlxllm fuse``): a quantized layer stays quantized with
    its own bits and groups unless ``dequantize``."""
    from .load import describe_model, load_model, resolve
    from .load.weights import KQUANT_CHOICES

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists: choose another --out or pass --force to replace it")
    if quantize:
        check_quantization(bits, group_size, mode)
        recipe_bits(recipe, bits)  # reject an unknown recipe before any loading
    elif recipe:
        raise UserError("--recipe needs --quantize")
    if requantize not in KQUANT_CHOICES:
        raise UserError(f"--requantize takes {', '.join(KQUANT_CHOICES)}, not '{requantize}'")
    path = resolve(source)
    gguf = path.is_file()
    elements = describe_model(path)["parameters"]
    report: dict[str, Any] = {"source": str(path), "out": str(out)}
    with tokenizer_files_of(path) as tokenizer_files:
        if gguf:
            dtype = dtype or ("bfloat16" if quantize else None)  # float32 decode -> a 16-bit store
        model = load_model(path, compute="float32" if gguf and quantize else "native", kquant=requantize, lazy=True)
        if gguf:
            report["gguf_tensors"] = gguf_import_report(path, requantize, quantize, model.load_report.requant_errors)
        if adapter_path is not None:
            from .train.adapters import fuse, load_adapters

            fuse(load_adapters(model, adapter_path), dequantize=dequantize or quantize)
            report["adapters"] = str(adapter_path)
        if dtype:
            cast_floats(model, getattr(mx, dtype))
        if quantize:
            quantize_model(model, bits, group_size, mode, recipe)
        quant = quantization_block(model)
        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        described = "unquantized" if not quant else (
            f"{quant.get('mode', 'affine')} {quant['bits']}-bit, group {quant['group_size']}"
            + (" (+ per-layer entries)" if any(isinstance(v, dict) for v in quant.values()) else "")
            + (f", recipe {recipe}" if recipe else ""))
        save_model(model, out, tokenizer_files=tokenizer_files, card=model_card(source, model, described))
    return {**report, "weights": described, "bytes": nbytes, "bits_per_weight": 8 * nbytes / elements}
