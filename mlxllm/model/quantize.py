"""Quantizing a model's modules in place: the modes MLX offers, bit recipes, float casts.

Written once for every family: any linear map, embedding or expert stack with ``to_quantized`` takes
part, so convert, distillation students and QLoRA bases quantize the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from .config import QUANT_MODES, layer_index
from .decoder import Model

# What convert quantizes to, per mode: (group sizes, bits): what MLX loads, less affine's 1 bit (too
# lossy to offer). mxfp4/mxfp8/nvfp4 store small floats with one shared 8-bit scale per group.
MODES = {mode: (groups, tuple(b for b in bits if b > 1)) for mode, (groups, bits) in QUANT_MODES.items()}


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


