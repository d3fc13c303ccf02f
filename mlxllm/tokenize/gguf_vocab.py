"""Read only the tokenizer metadata of a GGUF file.

`gguf.GGUFReader` parses every key and tensor record eagerly into per-item numpy views, which takes
about 9 s for a 262k-token vocabulary. A tokenizer needs a few keys from the head of the file, so
this walks the key/value section directly over an mmap: numeric arrays become one `np.frombuffer`
each, string arrays one pass of slicing, and the tensor records are never touched (~0.1 s).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

_NUMPY_TYPES = {
    GGUFValueType.UINT8: "u1",
    GGUFValueType.INT8: "i1",
    GGUFValueType.UINT16: "u2",
    GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4",
    GGUFValueType.INT32: "i4",
    GGUFValueType.FLOAT32: "f4",
    GGUFValueType.BOOL: "u1",
    GGUFValueType.UINT64: "u8",
    GGUFValueType.INT64: "i8",
    GGUFValueType.FLOAT64: "f8",
}


def _wanted(key: str) -> bool:
    return key.startswith("tokenizer.") or key == "general.architecture"


class _Cursor:
    """Sequential reader over the mapped file in the file's byte order."""

    def __init__(self, buf: mmap.mmap, endian: str) -> None:
        self.buf = buf
        self.pos = 0
        self.endian = endian
        self._u32 = struct.Struct(endian + "I")
        self._u64 = struct.Struct(endian + "Q")

    def u32(self) -> int:
        (value,) = self._u32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        (value,) = self._u64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self) -> str:
        n = self.u64()
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos].decode("utf-8")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string() if keep else self._skip_string()
        if vtype == GGUFValueType.ARRAY:
            return self._array(keep)
        dtype = np.dtype(self.endian + _NUMPY_TYPES[GGUFValueType(vtype)])
        start = self.pos
        self.pos += dtype.itemsize
        if not keep:
            return None
        scalar = np.frombuffer(self.buf, dtype, 1, start)[0].item()
        return bool(scalar) if vtype == GGUFValueType.BOOL else scalar

    def _skip_string(self) -> None:
        n = self.u64()
        self.pos += n

    def _array(self, keep: bool) -> list[Any] | None:
        etype = self.u32()
        count = self.u64()
        if etype == GGUFValueType.STRING:
            return self._string_array(count, keep)
        if etype == GGUFValueType.ARRAY:
            items = [self._array(keep) for _ in range(count)]
            return items if keep else None
        dtype = np.dtype(self.endian + _NUMPY_TYPES[GGUFValueType(etype)])
        start = self.pos
        self.pos += dtype.itemsize * count
        if not keep:
            return None
        values = np.frombuffer(self.buf, dtype, count, start)
        return values.astype(bool).tolist() if etype == GGUFValueType.BOOL else values.tolist()

    def _string_array(self, count: int, keep: bool) -> list[str] | None:
        buf, pos, unpack = self.buf, self.pos, self._u64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if keep:
                append(buf[pos : pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out if keep else None


def read_gguf_tokenizer_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return `tokenizer.*` keys (and `general.architecture`) of a GGUF file as plain Python values.

    Strings stay `str`, integers `int`, floats `float`, booleans `bool`, and arrays become lists.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        (magic,) = struct.unpack_from("<I", buf, 0)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{os.fspath(path)!r} is not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        # A big-endian file shows its small version number byte-swapped when read little-endian.
        endian = ">" if version & 0xFFFF == 0 else "<"
        cur = _Cursor(buf, endian)
        cur.pos = 4
        version = cur.u32()
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (need 2 or later)")
        cur.u64()  # tensor count: tensor records follow the key/value section and are not read
        n_kv = cur.u64()
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            keep = _wanted(key)
            value = cur.value(cur.u32(), keep)
            if keep:
                meta[key] = value
        return meta
