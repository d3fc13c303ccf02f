"""Per-sequence caches to and from safetensors files (the server's ``--prompt-cache-dir``).

A file holds each layer's arrays under ``layer.N.name`` and, in its metadata, each layer's kind and
scalars; loading rebuilds the same cache objects and checks that the arrays agree with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .chunked import ChunkedKVCache
from .kv import KVCache
from .quantized import QuantizedKVCache
from .recurrent import RecurrentCache
from .rotating import RotatingKVCache


def caches_nbytes(caches: list) -> int:
    return sum(a.nbytes for c in caches for a in c.state)


def _layer(cache) -> tuple[dict[str, mx.array], dict]:
    if isinstance(cache, QuantizedKVCache):
        info = {"kind": "quantized", "offset": cache.offset, "bits": cache.bits, "group_size": cache.group_size,
                "start": cache.start, "float_prefix": cache.float_prefix, "quantized": cache.quantized}
        arrays = {}
        if not cache.quantized:
            if cache.keys is not None:
                arrays = {"keys": cache.keys, "values": cache.values}
            return arrays, info
        for name, group in (("prefix", cache.prefix), ("keys", cache.keys), ("values", cache.values)):
            for i, a in enumerate(group or ()):
                arrays[f"{name}.{i}"] = a
        if cache.center is not None:
            arrays["center"], arrays["rotation"] = cache.center, cache.rotation
        return arrays, info
    if isinstance(cache, RotatingKVCache):
        held = cache.copy()
        info = {"kind": "rotating", "offset": cache.offset, "window": cache.window}
        return ({} if held.keys is None else {"keys": held.keys, "values": held.values}), info
    if isinstance(cache, RecurrentCache):
        return dict(zip(("conv", "delta"), cache.state)), {"kind": "recurrent", "offset": cache.offset}
    if isinstance(cache, ChunkedKVCache):
        held = {} if cache.keys is None else {"keys": cache.keys, "values": cache.values}
        return held, {"kind": "chunked", "offset": cache.offset, "chunk": cache.chunk}
    if type(cache) is KVCache:
        return ({} if cache.keys is None else {"keys": cache.keys, "values": cache.values}), {"kind": "kv", "offset": cache.offset}
    raise TypeError(f"cannot save a {type(cache).__name__}")


def save_caches(path: str | Path, caches: list, metadata: dict[str, str]) -> None:
    """Write the compact per-sequence ``caches`` (as ``copy()`` makes them) and ``metadata`` to ``path``."""
    arrays, layers = {}, []
    for n, cache in enumerate(caches):
        held, info = _layer(cache)
        arrays.update({f"layer.{n}.{k}": v for k, v in held.items()})
        layers.append(info)
    mx.save_safetensors(str(path), arrays, {**metadata, "layers": json.dumps(layers)})


def _int(info: dict, key: str, low: int = 0) -> int:
    value = info[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"layer field {key} is {value!r}")
    return value


def _checked(cache, arrays: dict[str, mx.array]):
    """``cache`` once its arrays hold exactly ``offset`` positions in one consistent shape."""
    if isinstance(cache, QuantizedKVCache) and cache.quantized:
        held = (0 if cache.prefix is None else cache.prefix[0].shape[2]) + (0 if cache.keys is None else cache.keys[0].shape[2])
    else:
        held = 0 if cache.keys is None else cache.keys.shape[2]
    want = min(cache.offset, cache.window) if isinstance(cache, RotatingKVCache) else cache.offset
    shapes = {a.shape[:2] for a in arrays.values() if a.ndim == 4}
    if held != want or len(shapes) > 1 or any(a.ndim != 4 for a in arrays.values()):
        raise ValueError(f"a layer holds {held} positions of shapes {sorted(shapes)}, its offset says {want}")
    return cache


def _recurrent(info: dict, arrays: dict[str, mx.array]) -> RecurrentCache:
    """A recurrent state: a convolution window ``[1, kernel - 1, C]`` and a delta state ``[1, H, Dk, Dv]``
    (both, once a position is in)."""
    cache = RecurrentCache()
    cache.offset = _int(info, "offset")
    conv, delta = arrays.get("conv"), arrays.get("delta")
    if set(arrays) - {"conv", "delta"} or (conv is None) != (delta is None) or (conv is None) != (cache.offset == 0) or (
            conv is not None and (conv.ndim != 3 or delta.ndim != 4 or conv.shape[0] != delta.shape[0])):
        raise ValueError(f"a recurrent layer holds {sorted(arrays)} for offset {cache.offset}")
    cache.conv_state, cache.delta_state = conv, delta
    return cache


def _rebuild(info: dict, arrays: dict[str, mx.array]):
    kind = info.get("kind")
    if kind == "recurrent":
        return _recurrent(info, arrays)
    if kind == "kv":
        cache = KVCache()
    elif kind == "rotating":
        cache = RotatingKVCache(_int(info, "window", 1))
    elif kind == "chunked":
        cache = ChunkedKVCache(_int(info, "chunk", 1))
    elif kind == "quantized":
        cache = QuantizedKVCache(_int(info, "bits", 1), _int(info, "group_size", 1), _int(info, "start"),
                                 _int(info, "float_prefix"))
        cache.quantized = bool(info["quantized"])
        if cache.quantized:
            def group(name: str) -> tuple | None:
                parts = [arrays[f"{name}.{i}"] for i in range(3) if f"{name}.{i}" in arrays]
                return tuple(parts) or None

            cache.prefix, cache.keys, cache.values = group("prefix"), group("keys"), group("values")
            cache.center, cache.rotation = arrays.get("center"), arrays.get("rotation")
            cache.offset = _int(info, "offset")
            return _checked(cache, {k: v for k, v in arrays.items() if k != "rotation"})
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if arrays:
        cache.keys, cache.values = arrays["keys"], arrays["values"]
    cache.offset = _int(info, "offset")
    return _checked(cache, arrays)


def load_caches(path: str | Path) -> tuple[list, dict[str, str]]:
    """The caches and metadata ``save_caches`` wrote; ValueError (or the reader's error) when the file
    is damaged or does not describe consistent caches."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    layers = json.loads(metadata.get("layers", "null"))
    if not isinstance(layers, list) or not layers:
        raise ValueError("no layer list in its metadata")
    caches = []
    for n, info in enumerate(layers):
        if not isinstance(info, dict):
            raise ValueError(f"layer {n} is not described")
        prefix = f"layer.{n}."
        caches.append(_rebuild(info, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}))
    if len({c.offset for c in caches}) != 1:
        raise ValueError("its layers hold different numbers of positions")
    return caches, metadata

