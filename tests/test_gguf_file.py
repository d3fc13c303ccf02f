"""The GGUF container reader (``mlxllm.gguf_file``) on small files written by ``gguf.GGUFWriter``.

Checks: every metadata value type round-trips (scalars, strings, numeric / string / bool arrays,
nested arrays) in both byte orders; tensor infos, the data offset and the tensor bytes match what the
writer wrote (and ``gguf.GGUFReader`` sees); big arrays stay undecoded until asked for; ``mlxllm.load``
parses a GGUF header once; and every malformed file fails with one ``UserError`` naming the file.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFEndian, GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.quants import quantize

from mlxllm import gguf_file
from mlxllm.errors import UserError
from mlxllm.gguf_file import GGUFArray, GGUFFile, read_gguf
from mlxllm.tokenize import read_gguf_tokenizer_metadata

SCALARS = {
    "t.u8": (200, V.UINT8),
    "t.i8": (-100, V.INT8),
    "t.u16": (60000, V.UINT16),
    "t.i16": (-30000, V.INT16),
    "t.u32": (4_000_000_000, V.UINT32),
    "t.i32": (-2_000_000_000, V.INT32),
    "t.f32": (1.5, V.FLOAT32),
    "t.true": (True, V.BOOL),
    "t.false": (False, V.BOOL),
    "t.u64": (2**63 + 5, V.UINT64),
    "t.i64": (-(2**62), V.INT64),
    "t.f64": (math.pi, V.FLOAT64),
    "t.str": ("héllo ✓ {{ template }}", V.STRING),
    "t.empty_str": ("", V.STRING),
}
ARRAYS = {
    "t.a_u8": ([0, 7, 255], V.UINT8),
    "t.a_i8": ([-128, 0, 127], V.INT8),
    "t.a_u16": ([1, 65535], V.UINT16),
    "t.a_i16": ([-32768, 5], V.INT16),
    "t.a_u32": ([3, 4_000_000_000], V.UINT32),
    "t.a_i32": ([-1, 2, -3], V.INT32),
    "t.a_f32": ([0.5, -2.25, 3.0], V.FLOAT32),
    "t.a_bool": ([True, False, True], V.BOOL),
    "t.a_u64": ([2**64 - 1, 0], V.UINT64),
    "t.a_i64": ([-(2**63), 9], V.INT64),
    "t.a_f64": ([math.e, -0.1], V.FLOAT64),
    "t.a_str": (["a", "", "ĠHello", "<0x0A>", "日本"], V.STRING),
}
NESTED = {
    "t.nested_int": [[1, 2, 3], [4]],
    "t.nested_str": [["a", "bc"], ["d"]],
    "t.nested_deep": [[[1.5], [2.5, 3.5]], [[4.5]]],
}
VOCAB = [f"tok{i}" for i in range(3000)]


def _tensors() -> dict[str, tuple[np.ndarray, T | None]]:
    rng = np.random.default_rng(0)
    q8 = quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0)
    return {
        "a.f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "b.f16": (rng.standard_normal((2, 3, 8)).astype(np.float16), None),
        "c.i32": (np.arange(7, dtype=np.int32), None),
        "d.q8_0": (q8, T.Q8_0),
    }


def write(path, *, endian=GGUFEndian.LITTLE, alignment: int | None = None, tensors=True) -> dict:
    """A GGUF file with every value type and a few tensors; returns the tensors as written."""
    w = GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for key, (value, vtype) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    for key, value in NESTED.items():
        w.add_array(key, value)
    w.add_token_list(VOCAB)
    w.add_token_scores([float(i) for i in range(len(VOCAB))])
    written = _tensors() if tensors else {}
    for name, (array, raw_dtype) in written.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _expected_metadata() -> dict:
    out = {"general.architecture": "llama"}
    out.update({k: v for k, (v, _) in SCALARS.items()})
    out.update({k: v for k, (v, _) in ARRAYS.items()})
    out.update(NESTED)
    out["tokenizer.ggml.tokens"] = VOCAB
    out["tokenizer.ggml.scores"] = [float(i) for i in range(len(VOCAB))]
    return out


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_every_value_type_round_trips(tmp_path, endian):
    path = tmp_path / "values.gguf"
    write(path, endian=endian)
    f = read_gguf(path)
    assert f.version == 3 and f.byteorder == ("<" if endian == GGUFEndian.LITTLE else ">")
    meta = f.metadata
    expected = _expected_metadata()
    assert set(meta) == set(expected)
    for key, value in expected.items():
        got = meta[key]
        assert got == value and type(got) is type(value), key
        if isinstance(value, list) and value and not isinstance(value[0], list):
            assert all(type(g) is type(v) for g, v in zip(got, value)), key
    assert meta["t.f64"] == math.pi and meta["t.a_u64"][0] == 2**64 - 1  # no precision lost
    assert dict(read_gguf_tokenizer_metadata(f)) == {
        k: v for k, v in expected.items() if k.startswith("tokenizer.") or k == "general.architecture"
    }


def test_arrays_are_lazy(tmp_path, monkeypatch):
    path = tmp_path / "lazy.gguf"
    write(path)
    decoded = []
    real = gguf_file._Source.strings
    monkeypatch.setattr(gguf_file._Source, "strings", lambda self, *a: decoded.append(a[-1]) or real(self, *a))
    f = read_gguf(path)
    assert "tokenizer.ggml.tokens" in f.metadata and decoded == []
    tokens = f.metadata.raw("tokenizer.ggml.tokens")
    assert isinstance(tokens, GGUFArray) and len(tokens) == len(VOCAB) and tokens.item_type == V.STRING
    with pytest.raises(TypeError):
        tokens.numpy()
    assert f.metadata["tokenizer.ggml.tokens"] == VOCAB and decoded == ["tokenizer.ggml.tokens"]
    assert f.metadata["tokenizer.ggml.tokens"] is f.metadata["tokenizer.ggml.tokens"]  # decoded once
    scores = f.metadata.raw("tokenizer.ggml.scores").numpy()
    assert scores.dtype == np.float32 and not scores.flags.writeable and not scores.flags.owndata
    np.testing.assert_array_equal(scores, np.arange(len(VOCAB), dtype=np.float32))
    np.testing.assert_array_equal(f.metadata.raw("t.a_bool").numpy(), [True, False, True])


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_tensor_infos_and_bytes(tmp_path, alignment, endian):
    path = tmp_path / "tensors.gguf"
    written = write(path, alignment=alignment, endian=endian)
    f = read_gguf(path)
    assert f.alignment == (alignment or 32)
    assert f.data_offset % f.alignment == 0
    assert [t.name for t in f.tensors] == list(written)
    for t, (array, raw_dtype) in zip(f.tensors, written.values()):
        if raw_dtype is None:
            assert t.shape == array.shape and t.qtype == {np.float32: T.F32, np.float16: T.F16, np.int32: T.I32}[array.dtype.type]
            stored = array.byteswap() if endian == GGUFEndian.BIG else array
        else:
            assert t.qtype == raw_dtype and t.shape == (array.shape[0], array.shape[1] // 34 * 32)
            stored = array
        assert (t.offset - f.data_offset) % f.alignment == 0
        assert t.nbytes == array.nbytes
        assert f.tensor_bytes(t).tobytes() == stored.tobytes()
    if endian == GGUFEndian.LITTLE:  # the gguf package's reader agrees on every offset
        reader = GGUFReader(path)
        assert reader.data_offset == f.data_offset
        assert [(r.name, int(r.data_offset), r.tensor_type) for r in reader.tensors] == [
            (t.name, t.offset, t.qtype) for t in f.tensors
        ]


# --- one parse per load ------------------------------------------------------------------------------


@pytest.fixture
def parses(monkeypatch):
    """(the default SmolLM2 GGUF, the list of files ``gguf_file`` parses from now on)."""
    from mlxllm.formats.hub import default_model_path

    path = default_model_path()
    if not path.exists():
        pytest.skip("the default SmolLM2 model is not installed")
    parsed = []
    real = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda p, buf: parsed.append(p) or real(p, buf))
    return path, parsed


def test_load_parses_the_header_once(parses):
    from mlxllm.formats.loader import load

    path, parsed = parses
    model, tokenizer = load(path)
    assert parsed == [path]
    assert tokenizer.decode(tokenizer.encode("Hello world")).endswith("Hello world")
    assert model.load_report.format == "gguf"


def test_weights_do_not_decode_the_vocabulary(monkeypatch):
    from mlxllm.formats.gguf import GGUFSource
    from mlxllm.formats.hub import default_model_path

    path = default_model_path()
    if not path.exists():
        pytest.skip("the default SmolLM2 model is not installed")
    decoded = []
    real = gguf_file._Source.strings
    monkeypatch.setattr(gguf_file._Source, "strings", lambda self, *a: decoded.append(a[-1]) or real(self, *a))
    source = GGUFSource(path)
    assert source.specs and isinstance(source.file, GGUFFile) and decoded == []


# --- malformed files ---------------------------------------------------------------------------------


def _raises_naming(path, pattern: str, what: str = "") -> None:
    with pytest.raises(UserError) as info:
        read_gguf(path)
    message = str(info.value)
    assert path.name in message and re.search(pattern, message), (what, message)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.gguf"
    write(path, alignment=32)  # the default, but stated: general.alignment is then in the file
    data = path.read_bytes()
    f = read_gguf(path)
    return path, data, f.data_offset, max(t.offset + t.nbytes for t in f.tensors)


def test_truncated_everywhere(tmp_path, good):
    _, data, data_offset, end = good
    cut = tmp_path / "cut.gguf"
    # Every byte of the small values and of the tensor infos; a stride through the vocabulary and the data.
    vocab, infos = _after_key(data, "tokenizer.ggml.tokens"), _after_key(data, "a.f32") - 13
    dense = set(range(vocab + 64)) | set(range(infos - 64, data_offset + 64))
    cuts = sorted(dense | set(range(vocab, infos, 101)) | set(range(data_offset, end, 7)))
    for n in cuts:
        cut.write_bytes(data[:n])
        if n < 4:
            _raises_naming(cut, "not a GGUF file", n)
        elif n < data_offset - 31:  # inside the header (the last bytes before the data may be padding)
            _raises_naming(cut, "truncated or corrupt: its GGUF header ends early", n)
        elif n >= data_offset:
            _raises_naming(cut, r"is truncated: tensor '.*' ends at byte", n)
        else:
            _raises_naming(cut, "truncated", n)


def _patch(path, data: bytes, offset: int, fmt: str, value) -> None:
    data = bytearray(data)
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _after_key(data: bytes, key: str) -> int:
    """Offset just past metadata key ``key`` (its u64 length and bytes), i.e. of its u32 value type."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def test_bad_magic_and_version(tmp_path, good):
    _, data, _, _ = good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUG" + data[4:])
    _raises_naming(bad, r"not a GGUF file \(bad magic bytes\)")
    bad.write_bytes(b"")
    _raises_naming(bad, "not a GGUF file")
    for version in (1, 4, 0xFFFFFFFF):
        _patch(bad, data, 4, "<I", version)
        _raises_naming(bad, f"unsupported GGUF version {version}")


@pytest.mark.parametrize("value", [None, 2**40, 2**63, 2**64 - 1])
def test_lengths_and_counts_past_the_end(tmp_path, good, value):
    _, data, _, _ = good
    bad = tmp_path / "bad.gguf"
    past = value or len(data)  # None: just past the end of the file
    ends_early = "truncated or corrupt: its GGUF header ends early"
    spots = {
        "tensor count": (8, "<Q"),
        "key/value count": (16, "<Q"),
        "first key's length": (24, "<Q"),
        "a string value's length": (_after_key(data, "t.str") + 4, "<Q"),
        "a numeric array's count": (_after_key(data, "t.a_f32") + 8, "<Q"),
        "a string array's count": (_after_key(data, "tokenizer.ggml.tokens") + 8, "<Q"),
        "a string's length inside an array": (_after_key(data, "tokenizer.ggml.tokens") + 16, "<Q"),
        "a nested array's count": (_after_key(data, "t.nested_int") + 8, "<Q"),
        "an inner array's count": (_after_key(data, "t.nested_int") + 20, "<Q"),
    }
    for what, (offset, fmt) in spots.items():
        _patch(bad, data, offset, fmt, past)
        _raises_naming(bad, re.escape(ends_early), what)


def test_corrupt_values(tmp_path, good):
    _, data, _, _ = good
    bad = tmp_path / "bad.gguf"
    _patch(bad, data, _after_key(data, "t.u8"), "<I", 13)
    _raises_naming(bad, "metadata 't.u8' has unknown value type 13")
    _patch(bad, data, _after_key(data, "t.a_i32") + 4, "<I", 99)
    _raises_naming(bad, "metadata 't.a_i32' has unknown array item type 99")
    at = _after_key(data, "t.str") + 12
    bad.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    _raises_naming(bad, "metadata 't.str' is not valid UTF-8")
    at = _after_key(data, "tokenizer.ggml.tokens") + 24  # the first token's first byte
    bad.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    f = read_gguf(bad)  # string arrays are decoded on first access: the error comes then
    with pytest.raises(UserError, match=r"bad\.gguf .*a string in metadata 'tokenizer\.ggml\.tokens' is not valid"):
        read_gguf_tokenizer_metadata(f)
    _patch(bad, data, _after_key(data, "general.alignment") + 4, "<I", 0)
    _raises_naming(bad, "general.alignment is 0")


def test_corrupt_tensor_infos(tmp_path, good):
    _, data, _, _ = good
    bad = tmp_path / "bad.gguf"
    info = _after_key(data, "a.f32")  # tensor name, then u32 n_dims, u64 dims..., u32 type, u64 offset
    _patch(bad, data, info + 4 + 2 * 8, "<I", 250)
    _raises_naming(bad, "tensor 'a.f32' has unknown ggml type 250")
    _patch(bad, data, info + 4 + 2 * 8 + 4, "<Q", 2**40)
    _raises_naming(bad, r"is truncated: tensor 'a\.f32' ends at byte")
    _patch(bad, data, info, "<I", 2**31)
    _raises_naming(bad, "header ends early")
    _patch(bad, data, info + 4, "<Q", 2**62)  # element count overflows int64
    _raises_naming(bad, "truncated")
    q8 = _after_key(data, "d.q8_0")
    _patch(bad, data, q8 + 4, "<Q", 33)  # a Q8_0 row of 33 elements: not whole blocks
    _raises_naming(bad, "row length 33 is not a multiple of 32")


def test_big_nesting_is_refused(tmp_path):
    path = tmp_path / "deep.gguf"
    w = GGUFWriter(str(path), "llama")
    value: list = [1]
    for _ in range(40):
        value = [value]
    w.add_array("t.deep", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    _raises_naming(path, "nests arrays more than")


def test_convert_parses_the_header_once(parses, tmp_path):
    """convert needs the sizes, the weights and the tokenizer of a GGUF file: one parse for all three."""
    from mlxllm.tools.conversion import convert

    path, parsed = parses
    report = convert(str(path), tmp_path / "out")
    assert parsed == [path]
    assert (tmp_path / "out" / "tokenizer.json").exists() and report["gguf_tensors"]
