"""Students for distillation: a layer-pruned copy of the teacher, a smaller model from a config file,
or the teacher quantized with its scales and biases left trainable (as DWQ does).

A pruned student starts from the teacher's kept blocks, embeddings, final norm and head, so before any
training it already predicts much like the teacher (the skipped blocks are residual updates); a
config student starts from random weights and shares only the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError


def pruned_layers(spec: str, n_layers: int) -> list[int]:
    """``every-2nd-layer`` (blocks 0, 2, 4, ..., with the last kept block moved to the teacher's last,
    which writes what the head reads: 15 of 30) or ``layers=0,2,5`` -> the kept block indices, checked
    against the teacher's ``n_layers``."""
    if spec.startswith("every-") and spec.endswith("-layer"):
        word = spec[len("every-"):-len("-layer")]
        digits = word.rstrip("ndrths")
        if not digits.isdigit() or int(digits) < 2:
            raise UserError(f"prune:{spec}: expected every-Nth-layer with N >= 2, e.g. every-2nd-layer")
        keep = list(range(0, n_layers, int(digits)))
        if len(keep) < 2 or keep[-1] != n_layers - 1:
            keep = keep[:-1] + [n_layers - 1] if len(keep) > 1 else [0, n_layers - 1][: n_layers]
        return keep
    if spec.startswith("layers="):
        try:
            keep = [int(x) for x in spec[len("layers="):].split(",") if x.strip()]
        except ValueError:
            raise UserError(f"prune:{spec}: layer indices must be integers, e.g. layers=0,2,4") from None
        if not keep or any(not 0 <= i < n_layers for i in keep) or len(set(keep)) != len(keep):
            raise UserError(f"prune:{spec}: give distinct layer indices in 0..{n_layers - 1}")
        return sorted(keep)
    raise UserError(f"unknown pruning 'prune:{spec}' (every-2nd-layer or layers=0,2,...)")


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the blocks ``keep`` of ``model`` (in place), with a config that describes the result;
    each kept block keeps its kind (sliding or global attention, MoE or dense)."""
    cfg = model.config
    kinds = [cfg.layer_types[i] for i in keep]
    extra: dict[str, Any] = {}
    if cfg.num_experts:
        extra = dict(decoder_sparse_step=1, mlp_only_layers=[j for j, i in enumerate(keep) if not cfg.is_moe(i)])
    model.model.layers = [model.model.layers[i] for i in keep]
    model.config = dataclasses.replace(cfg, num_hidden_layers=len(keep), layer_types=kinds, **extra)
    return model


def from_config(path: Path, teacher_config: Any) -> nn.Module:
    """A randomly initialised student from a Hugging Face ``config.json`` (its vocabulary must be the
    teacher's, as the tokenizer is shared)."""
    from ..model.config import ModelConfig
    from ..model.decoder import Model

    try:
        cfg = ModelConfig.from_hf(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"--student-init config:{path}: cannot read it ({e})") from None
    if cfg.vocab_size != teacher_config.vocab_size:
        raise UserError(f"config:{path} has a vocabulary of {cfg.vocab_size}; the teacher's is {teacher_config.vocab_size}")
    model = Model(cfg)
    mx.eval(model.parameters())
    return model


def quantized_student(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """The teacher's own weights quantized (in place); only the quantization scales and biases are
    trained, so the student stays a drop-in quantized copy of the teacher."""
    from ..model.quantize import quantize_model

    quantize_model(model, bits, group_size)
    model.freeze()
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.unfreeze(keys=["scales", "biases"], recurse=False, strict=False)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
