"""The GGUF container: header (metadata and tensor index) of a llama.cpp file, over a memory map.

One reader serves both users of a GGUF file, the weight loader (``mlxllm.formats.gguf``) and the
tokenizer (``mlxllm.tokenize.gguf_vocab``), so ``mlxllm.load`` parses a file's header once and every
malformed file fails with the same ``UserError`` naming it. It is a bottom-layer utility: it knows
the file format, not models or tokenizers.

Why not ``gguf.GGUFReader``: it builds a numpy view per array item, which is slow for vocabularies
of hundreds of thousands of strings that the weight loader never looks at. Here arrays stay lazy:

  * numeric arrays are one numpy view over the map each (no copy);
  * string arrays are only stepped over (each string has its own length, so their end has to be
    walked to), and decoded on first access.

``GGUFFile.metadata`` is a read-only mapping that hands out plain Python values (arrays as lists,
decoded on first access and cached); ``metadata.raw(key)`` gives a ``GGUFArray`` itself (e.g. for
``.numpy()``). Scalars and strings are decoded while the header is read. The map stays open for as
long as the ``GGUFFile`` (or a view taken from it) is alive; tensor data is never read here:
``tensor_bytes`` returns a view.

Layout (GGUF v2/v3, little- or big-endian): ``b"GGUF"``, u32 version, u64 tensor count, u64 key/value
count, the key/values (string key, u32 value type, value), the tensor infos (string name, u32 number
of dims, u64 dims innermost first, u32 ggml type, u64 offset into the data section), padding to
``general.alignment`` (default 32), then the data section.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import UserError

__all__ = ["GGUFArray", "GGUFFile", "GGUFMetadata", "GGUFTensor", "read_gguf"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_NESTING = 16  # arrays of arrays of ...: a bound so a corrupt file cannot exhaust the stack
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_STRING, _ARRAY, _BOOL = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.BOOL
# Fixed-size value types -> struct format (scalars) and numpy dtype (arrays); bools read as bytes.
_STRUCT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "u1", 10: "u8", 11: "i8", 12: "f8"}
_MIN_ITEM = {_STRING: 8, _ARRAY: 12}  # smallest encoding of an array item, to bound counts early


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), i.e. ggml's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class _Truncated(Exception):
    pass


class GGUFArray:
    """A metadata array as stored: ``item_type`` (a ``GGUFValueType``), ``len()``, ``tolist()``
    (plain Python values, decoded on the first call and cached) and, for numeric items, ``numpy()``."""

    __slots__ = ("item_type", "_count", "_src", "_key", "_start", "_view", "_items", "_list")

    def __init__(self, item_type: GGUFValueType, count: int, src: _Source, key: str, *, start: int = 0,
                 view: np.ndarray | None = None, items: list[GGUFArray] | None = None):
        self.item_type, self._count, self._src, self._key = item_type, count, src, key
        self._start, self._view, self._items, self._list = start, view, items, None

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"GGUFArray({self.item_type.name}, {self._count})"

    def numpy(self) -> np.ndarray:
        """Numeric items as a read-only numpy array over the map (bools as ``np.bool_``, a copy)."""
        if self._view is None:
            raise TypeError(f"'{self._key}' is an array of {self.item_type.name}, not of numbers")
        return self._view != 0 if self.item_type == _BOOL else self._view

    def tolist(self) -> list[Any]:
        if self._list is None:
            if self._view is not None:
                self._list = self.numpy().tolist()
            elif self._items is not None:
                self._list = [item.tolist() for item in self._items]
            else:
                self._list = self._src.strings(self._start, self._count, self._key)
        return self._list


class GGUFMetadata(Mapping[str, Any]):
    """Key -> value, arrays as lists (decoded on first access); ``raw(key)`` keeps a ``GGUFArray`` as is."""

    def __init__(self, fields: dict[str, Any]):
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        value = self._fields[key]
        return value.tolist() if isinstance(value, GGUFArray) else value

    def __contains__(self, key: object) -> bool:  # without decoding the value
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def raw(self, key: str) -> Any:
        return self._fields[key]


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF header; tensor data stays in the memory map."""

    path: Path
    version: int
    byteorder: str  # '<' little-endian (what llama.cpp writes) or '>' big-endian
    metadata: GGUFMetadata
    tensors: list[GGUFTensor]
    alignment: int
    data_offset: int  # absolute offset of the data section (tensor offsets are relative to it)
    buffer: mmap.mmap

    def tensor_bytes(self, t: GGUFTensor) -> np.ndarray:
        """A tensor's stored bytes: a read-only uint8 view over the map (nothing is read until used)."""
        return np.frombuffer(self.buffer, np.uint8, t.nbytes, t.offset)


class _Source:
    """The mapped bytes, their byte order and the file's name, for reading and for error messages."""

    def __init__(self, buf: mmap.mmap, name: str, endian: str):
        self.buf, self.name, self.endian = buf, name, endian
        self.scalars = {code: struct.Struct(endian + fmt) for code, fmt in _STRUCT.items()}
        self.u64 = self.scalars[GGUFValueType.UINT64]

    def corrupt(self, what: str) -> UserError:
        return UserError(f"{self.name} is not a readable GGUF file: {what}")

    def text(self, start: int, n: int, what: str) -> str:
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} is not valid UTF-8") from None

    def strings(self, start: int, count: int, key: str) -> list[str]:
        """Decode ``count`` length-prefixed strings from ``start`` (already checked to lie in the file)."""
        buf, unpack, out = self.buf, self.u64.unpack_from, []
        try:
            for _ in range(count):
                (n,) = unpack(buf, start)
                start += 8
                out.append(buf[start : start + n].decode("utf-8"))
                start += n
        except UnicodeDecodeError:
            raise self.corrupt(f"a string in metadata '{key}' is not valid UTF-8") from None
        return out


class _Reader:
    """Sequential reader of the header; ``_Truncated`` when anything runs past the end of the file."""

    def __init__(self, src: _Source, pos: int):
        self.src, self.buf, self.size, self.pos = src, src.buf, len(src.buf), pos

    def take(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        if self.pos > self.size:
            raise _Truncated
        return start

    def scalar(self, code: int) -> Any:
        s = self.src.scalars[code]
        return s.unpack_from(self.buf, self.take(s.size))[0]

    def string(self, what: str) -> str:
        n = self.scalar(GGUFValueType.UINT64)
        return self.src.text(self.take(n), n, what)

    def value(self, code: int, key: str, depth: int = 0) -> Any:
        if code == _STRING:
            return self.string(f"metadata '{key}'")
        if code == _ARRAY:
            return self.array(key, depth)
        if code not in _STRUCT:
            raise self.src.corrupt(f"metadata '{key}' has unknown value type {code}")
        return self.scalar(code)

    def array(self, key: str, depth: int) -> GGUFArray:
        code, count = self.scalar(GGUFValueType.UINT32), self.scalar(GGUFValueType.UINT64)
        if code in _NUMPY:
            dtype = np.dtype(self.src.endian + _NUMPY[code])
            view = np.frombuffer(self.buf, dtype, count, self.take(count * dtype.itemsize))
            return GGUFArray(GGUFValueType(code), count, self.src, key, view=view)
        if code not in _MIN_ITEM:
            raise self.src.corrupt(f"metadata '{key}' has unknown array item type {code}")
        if count * _MIN_ITEM[code] > self.size - self.pos:
            raise _Truncated
        if code == _STRING:
            start = self.pos
            self.pos = self._skip_strings(count)
            return GGUFArray(_STRING, count, self.src, key, start=start)
        if depth >= _MAX_NESTING:
            raise self.src.corrupt(f"metadata '{key}' nests arrays more than {_MAX_NESTING} deep")
        items = [self.array(key, depth + 1) for _ in range(count)]
        return GGUFArray(_ARRAY, count, self.src, key, items=items)

    def _skip_strings(self, count: int) -> int:
        buf, pos, size, unpack = self.buf, self.pos, self.size, self.src.u64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise _Truncated
        return pos


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header, checking that every tensor lies inside the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != _MAGIC:  # also an empty file, which cannot be mapped
                raise UserError(f"{path.name} is not a GGUF file (bad magic bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return _parse(path, buf)
    except _Truncated:
        raise UserError(f"{path.name} is truncated or corrupt: its GGUF header ends early") from None


def _parse(path: Path, buf: mmap.mmap) -> GGUFFile:
    if len(buf) < 8:
        raise _Truncated
    (version,) = struct.unpack_from("<I", buf, 4)
    # A big-endian file shows its small version number byte-swapped when read little-endian.
    endian = ">" if version & 0xFFFF == 0 and version else "<"
    (version,) = struct.unpack_from(endian + "I", buf, 4)
    if version not in _VERSIONS:
        raise UserError(f"{path.name}: unsupported GGUF version {version} (2 and 3 are supported)")
    src = _Source(buf, path.name, endian)
    r = _Reader(src, 8)
    u32, u64 = GGUFValueType.UINT32, GGUFValueType.UINT64
    n_tensors, n_kv = r.scalar(u64), r.scalar(u64)
    if n_kv * 12 + n_tensors * 24 > r.size - r.pos:  # each pair / tensor info takes at least this much
        raise _Truncated
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string("a metadata key")
        fields[key] = r.value(r.scalar(u32), key)
    infos = []
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        n_dims = r.scalar(u32)
        dims = struct.unpack_from(f"{endian}{n_dims}Q", buf, r.take(8 * n_dims))
        type_id, offset = r.scalar(u32), r.scalar(u64)
        if n_dims > _MAX_DIMS:
            raise src.corrupt(f"tensor '{name}' has {n_dims} dimensions (ggml allows at most {_MAX_DIMS})")
        if 0 in dims:
            raise src.corrupt(f"tensor '{name}' has an empty dimension: {list(dims)}")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UserError(f"{path.name}: tensor '{name}' has unknown ggml type {type_id}") from None
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise src.corrupt(f"general.alignment is {alignment!r}, not a power of two")
    data_offset = -(-r.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise UserError(f"{path.name}: tensor '{name}' row length {shape[-1]} is not a multiple of {block}")
        if offset % alignment:
            raise src.corrupt(f"tensor '{name}' has offset {offset}, not a multiple of the alignment {alignment}")
        nbytes = math.prod(shape) // block * size
        start = data_offset + offset
        if start + nbytes > len(buf):
            raise UserError(
                f"{path.name} is truncated: tensor '{name}' ends at byte {start + nbytes:,} "
                f"but the file has {len(buf):,} bytes"
            )
        tensors.append(GGUFTensor(name, shape, qtype, start, nbytes))
    return GGUFFile(path, version, endian, GGUFMetadata(fields), tensors, alignment, data_offset, buf)
