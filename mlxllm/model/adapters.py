"""LoRA / DoRA adapters on the decoder's linear layers, in mlx-lm's adapter format.

A ``LoRALinear`` keeps the base layer (float or MLX-quantized, frozen and left as it is: QLoRA when it
is quantized) and adds ``scale * (x A) B`` with ``A [in, r]``, ``B [r, out]``; with DoRA each output
row of the adapted weight is renormalised to a learned magnitude ``m``. Parameter names and the
``adapter_config.json`` fields follow mlx-lm (``lora_a``, ``lora_b``, ``m``; ``fine_tune_type``,
``num_layers``, ``lora_parameters: {rank, scale, dropout, keys}``), so adapters move between the two
runtimes unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from ..files import write_atomic

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# --lora-targets names -> the linear layers (leaf names inside a block) they select, across the
# attention forms (plain, fused as Phi-3's, and DeepSeek's latent attention) and dense MLPs (incl. MoE
# shared experts). A fused projection is selected by any of the maps it holds.
TARGETS = {
    "q": ("q_proj", "q_a_proj", "q_b_proj", "qkv_proj"),
    "k": ("k_proj", "kv_a_proj_with_mqa", "qkv_proj"),
    "v": ("v_proj", "kv_b_proj", "qkv_proj"),
    "o": ("o_proj",),
    "gate": ("gate_proj", "gate_up_proj"),
    "up": ("up_proj", "gate_up_proj"),
    "down": ("down_proj",),
}


def _dims(base: nn.Module) -> tuple[int, int]:
    """(input, output) features of a linear or MLX-quantized linear layer."""
    out_dims, cols = base.weight.shape
    return (cols * 32 // base.bits if isinstance(base, nn.QuantizedLinear) else cols), out_dims


def _weight(base: nn.Module) -> mx.array:
    """The base layer's weight as a float matrix ``[out, in]``."""
    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(base.weight, base.scales, base.get("biases"), group_size=base.group_size, bits=base.bits,
                             mode=base.mode)
    return base.weight


class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ lora_a) @ lora_b``; ``dora``: the result's rows rescaled to the
    magnitude ``m`` over the norm of the adapted weight (the norm treated as a constant in the gradient,
    as DoRA's paper and mlx-lm do). ``lora_b`` starts at zero, so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        in_dims, out_dims = _dims(base)
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else None
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        if dora:
            self.m = mx.linalg.norm(_weight(base).astype(mx.float32), axis=1)

    def delta(self) -> mx.array:
        """The low-rank update to the weight, ``[out, in]``."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        h = self.dropout(x) if self.dropout is not None else x
        if "m" not in self:
            return self.linear(x) + (self.scale * ((h @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        w = _weight(self.linear)
        y = x @ w.T + (self.scale * ((h @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        norm = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        y = (self.m / norm).astype(x.dtype) * y
        return y + self.linear.bias if "bias" in self.linear else y

    def fused(self, dequantize: bool = False) -> nn.Module:
        """One plain (or, for a quantized base unless ``dequantize``, re-quantized) linear layer
        computing the same function."""
        base = self.linear
        w = _weight(base)
        w = w + self.delta().astype(w.dtype)
        if "m" in self:
            w = (self.m / mx.linalg.norm(w.astype(mx.float32), axis=1))[:, None].astype(w.dtype) * w
        out_dims, in_dims = w.shape
        layer = nn.Linear(in_dims, out_dims, bias="bias" in base)
        layer.weight = w
        if "bias" in base:
            layer.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            layer = nn.QuantizedLinear.from_linear(layer, base.group_size, base.bits, mode=base.mode)
        return layer


def target_keys(model: nn.Module, targets: list[str], num_layers: int) -> list[str]:
    """Paths (relative to a block, as mlx-lm's ``keys``) of the linear layers ``targets`` select in the
    last ``num_layers`` blocks; an unknown target or one that selects nothing is a ``UserError``."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserError(f"--lora-targets: unknown {', '.join(unknown)} (choose from {','.join(TARGETS)})")
    leaves = {leaf for t in targets for leaf in TARGETS[t]}
    keys: dict[str, None] = {}
    for block in model.layers[-num_layers:]:
        for path, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and path.rsplit(".", 1)[-1] in leaves:
                keys[path] = None
    if not keys:
        raise UserError(f"--lora-targets {','.join(targets)} selects no linear layer of this model")
    return sorted(keys)


def apply_adapters(model: nn.Module, num_layers: int, keys: list[str], rank: int, scale: float, dropout: float = 0.0,
                   dora: bool = False) -> int:
    """Wrap the layers named by ``keys`` in the last ``num_layers`` blocks with fresh adapters, freeze
    everything else, and return how many layers were wrapped."""
    if rank <= 0:
        raise UserError(f"--lora-rank must be positive, got {rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout}")
    if not 0 < num_layers <= len(model.layers):
        raise UserError(f"--lora-layers must be in 1..{len(model.layers)} (or all), got {num_layers}")
    model.freeze()
    wrapped = 0
    wanted = set(keys)
    for block in model.layers[-num_layers:]:
        found = [(p, LoRALinear(m, rank, scale, dropout, dora)) for p, m in block.named_modules()
                 if p in wanted and isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        if found:
            block.update_modules(tree_unflatten(found))
            wrapped += len(found)
    if not wrapped:
        raise UserError("no layer of this model matches the adapter's keys")
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False, recurse=False)
    return wrapped


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The trainable adapter tensors by their full names (what ``adapters.safetensors`` holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(num_layers: int, keys: list[str], rank: int, scale: float, dropout: float, dora: bool,
                   **extra: Any) -> dict[str, Any]:
    """``adapter_config.json`` as mlx-lm writes and reads it (plus ``extra`` fields it ignores)."""
    return {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}, **extra}


def save_adapters(model: nn.Module, folder: Path, config: dict[str, Any],
                  metadata: dict[str, str] | None = None) -> None:
    """``adapters.safetensors`` (with ``metadata``) + ``adapter_config.json`` in ``folder``, each written
    atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_parameters(model)
    write_atomic(folder / ADAPTER_FILE, lambda p: mx.save_safetensors(str(p), weights,
                                                                      metadata=metadata or {"format": "mlx"}))
    write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter folder's config, checked to be one this module can apply."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"adapter folder {folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
        kind = config.get("fine_tune_type", "lora")
        params = config["lora_parameters"]
        int(config["num_layers"]), int(params["rank"]), float(params["scale"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an adapter config: {e}") from None
    if kind not in ("lora", "dora"):
        raise UserError(f"{path}: fine_tune_type {kind!r} is not supported (lora or dora)")
    return config


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the adapters saved in ``folder`` (by mlxllm or mlx-lm) to ``model``; tensors the model has
    no place for, or of the wrong shape, are a ``UserError`` naming them."""
    folder = Path(folder)
    config = read_config(folder)
    params = config["lora_parameters"]
    n = int(config["num_layers"])
    num_layers = n if 0 < n <= len(model.layers) else len(model.layers)  # mlx-lm: <= 0 or too many = all
    keys = params.get("keys")
    if keys is None:  # mlx-lm's default: every linear layer of the adapted blocks
        keys = target_keys(model, list(TARGETS), num_layers)
    apply_adapters(model, num_layers, list(keys), int(params["rank"]), float(params["scale"]),
                   float(params.get("dropout", 0.0)), config.get("fine_tune_type") == "dora")
    weights_path = folder / ADAPTER_FILE
    if not weights_path.is_file():
        raise UserError(f"adapter folder {folder} has no {ADAPTER_FILE}")
    weights = mx.load(str(weights_path))
    expected = adapter_parameters(model)
    wrong = [f"{k} {tuple(v.shape)}" + (f" (model: {tuple(expected[k].shape)})" if k in expected else " (no such layer)")
             for k, v in weights.items() if k not in expected or expected[k].shape != v.shape]
    if wrong:
        raise UserError(f"adapter {folder} does not fit this model: {'; '.join(wrong[:3])}"
                        + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"adapter {folder} lacks {len(missing)} tensors the config implies, e.g. {missing[0]}")
    model.load_weights(list(weights.items()), strict=False)
    return model


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every adapted layer by its fused equivalent (in place) and return the model."""
    fused = [(path, m.fused(dequantize)) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not fused:
        raise UserError("the model has no adapters to fuse")
    model.update_modules(tree_unflatten(fused))
    return model


class AdapterSet:
    """Several adapters served at once from one base model: their names, and which one each token of
    the next forward pass uses (``ids``, broadcastable to the input's ``[B, L]``; 0: no adapter)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ids: mx.array | None = None

    @contextlib.contextmanager
    def selecting(self, adapters: list[int], shape: tuple[int, int]) -> Iterator[None]:
        """``adapters`` (one per token, or per row, ``shape`` broadcasting to ``[B, L]``) for the forward
        pass built inside; cleared after it, so to anyone else the model is the base model."""
        self.ids = mx.array(adapters, dtype=mx.int32).reshape(shape) if any(adapters) else None
        try:
            yield
        finally:
            self.ids = None

    def index(self, name: str | None) -> int:
        """1 + the adapter's position (0 for None); an unknown name is a ``UserError``."""
        if name is None:
            return 0
        if name not in self.names:
            raise UserError(f"no adapter named {name!r}; loaded: {', '.join(self.names) or 'none'}")
        return self.names.index(name) + 1


class MultiLoRALinear(nn.Module):
    """``base(x)`` plus, for each token, the low-rank update of the adapter its row selects: every
    adapter's ``x @ A`` in one product (``a [in, n * rank]``), the other adapters' columns zeroed, then
    one product with the stacked, pre-scaled ``b [n * rank, out]`` (ranks padded with zeros)."""

    def __init__(self, base: nn.Module, selection: AdapterSet, a: mx.array, b: mx.array, rank: int) -> None:
        super().__init__()
        self.linear, self.a, self.b = base, a, b
        self._selection, self._rank = selection, rank
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        ids = self._selection.ids
        if ids is None:
            return y
        count = self.a.shape[1] // self._rank
        chosen = mx.repeat((ids[..., None] == mx.arange(1, count + 1)).astype(x.dtype), self._rank, axis=-1)
        return y + (((x @ self.a) * chosen) @ self.b).astype(x.dtype)


def load_adapter_set(model: nn.Module, adapters: list[tuple[str, str | Path]]) -> AdapterSet:
    """Load ``(name, folder)`` LoRA adapters side by side onto ``model`` (the base left unchanged), so
    each row of a batch can use its own; DoRA adapters, which rescale the whole weight, are refused."""
    selection = AdapterSet([name for name, _ in adapters])
    if len(set(selection.names)) != len(adapters):
        raise UserError("--adapter names must be distinct")
    per_layer: dict[str, dict[int, tuple[mx.array, mx.array]]] = {}
    for k, (name, folder) in enumerate(adapters, start=1):
        config = read_config(Path(folder))
        if config.get("fine_tune_type") == "dora":
            raise UserError(f"adapter {name}: DoRA adapters cannot be served per request; fuse it (mlxllm fuse)")
        scale = float(config["lora_parameters"]["scale"])
        path = Path(folder) / ADAPTER_FILE
        if not path.is_file():
            raise UserError(f"adapter folder {folder} has no {ADAPTER_FILE}")
        weights = mx.load(str(path))
        for key, a in weights.items():
            if key.endswith(".lora_a"):
                layer = key[: -len(".lora_a")]
                b = weights.get(layer + ".lora_b")
                if b is None or a.ndim != 2 or b.shape[0] != a.shape[1]:
                    raise UserError(f"adapter {name}: {layer} has no matching lora_b")
                per_layer.setdefault(layer, {})[k] = (a, b * scale)
    modules = dict(model.named_modules())
    rank = max((a.shape[1] for layers in per_layer.values() for a, _ in layers.values()), default=1)
    wrapped = []
    for layer, found in per_layer.items():
        base = modules.get(layer)
        if base is None:
            raise UserError(f"the adapters name {layer}, which this model does not have")
        in_dims, out_dims = next(iter(found.values()))[0].shape[0], next(iter(found.values()))[1].shape[1]
        if isinstance(base, (nn.Linear, nn.QuantizedLinear)) and _dims(base) != (in_dims, out_dims):
            raise UserError(f"the adapters' {layer} is {in_dims}x{out_dims}; the model's is {'x'.join(map(str, _dims(base)))}")
        a = mx.zeros((in_dims, len(adapters) * rank))
        b = mx.zeros((len(adapters) * rank, out_dims))
        for k, (ak, bk) in found.items():
            a[:, (k - 1) * rank : (k - 1) * rank + ak.shape[1]] = ak
            b[(k - 1) * rank : (k - 1) * rank + bk.shape[0]] = bk
        wrapped.append((layer, MultiLoRALinear(base, selection, a, b, rank)))
    model.update_modules(tree_unflatten(wrapped))
    mx.eval(model.parameters())
    return selection
