"""Run by ``mlx.launch`` from tests/test_distributed.py: on every rank, each listed family's tiny random
model is built (the same on every rank: one seed), its logits and a greedy generation are taken alone,
then it is sharded over the group (tensor parallel, or ``family:pipe`` pipeline parallel; ``family:q4``
4-bit, tensor parallel) and both are taken again; rank 0 writes what it saw as JSON. With
``die``, rank 1 exits in the middle of a generation instead."""

from __future__ import annotations

import json
import os
import sys

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.errors import UserError
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model
from mlxllm.model.shard import pipeline_model, shard_model

TOKENS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]


def _model(config: dict, quantized: bool) -> Model:
    mx.random.seed(0)
    model = Model(ModelConfig.from_hf(config))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())]))
    if quantized:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 64 == 0 and "embed" not in p)
    mx.eval(model.parameters())
    return model


def _bytes(model: Model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _greedy(model: Model, n: int = 8) -> list[int]:
    cache, ids = model.make_cache(), list(TOKENS)
    logits = model(mx.array([ids]), cache)
    for _ in range(n):
        ids.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([ids[-1:]]), cache)
    return ids[len(TOKENS):]


def main() -> None:
    sys.path.insert(0, sys.argv[2])
    from test_parity_mlx_lm import FAMILIES

    group = mx.distributed.init()
    if sys.argv[3] == "die":  # rank 1 dies mid-generation; the launch must end anyway
        model = _model(FAMILIES["llama"], False)
        shard_model(model, group)
        cache, token = model.make_cache(), mx.array([TOKENS])
        for step in range(10_000):
            if group.rank() == 1 and step == 3:
                os._exit(3)
            token = mx.argmax(model(token, cache)[:, -1:], axis=-1)
            mx.eval(token)
        return
    out = {}
    for spec in sys.argv[3].split(","):
        family, _, mode = spec.partition(":")
        config = FAMILIES[family]
        model = _model(config, mode == "q4")
        alone, alone_ids, before = model(mx.array([TOKENS])), _greedy(model), _bytes(model)
        try:
            (pipeline_model if mode == "pipe" else shard_model)(model, group)
        except UserError as e:
            out[spec] = {"error": str(e)}
            continue
        sharded = model(mx.array([TOKENS]))
        out[spec] = {"diff": float(mx.abs(sharded - alone).max()), "scale": float(mx.abs(alone).max()),
                     "ids": _greedy(model), "alone_ids": alone_ids, "bytes": [before, _bytes(model)]}
    if group.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
