"""Hostile model files: every one must end as one ``error:`` line, within a memory and a time cap.

The inputs are generated here, not copied by hand: a tiny valid Hugging Face directory (plain and
MLX-quantized, written by ``save_model``) and a tiny GGUF file (written by ``gguf.GGUFWriter``), then
mutated one field at a time: every size field of config.json set to 0, -1, 1.5, "7", true, 10**9, 10**10
and NaN; every count, length, offset, dtype and shape of the safetensors and GGUF headers set to 0, huge
and past the end of the file. Each case runs through the real CLI (``mlxllm info`` and ``mlxllm
generate``) in a child process capped at ~4 GB of address space and 60 s (each command also has its own
alarm): nonzero exit, exactly one line on stderr starting with ``error:`` (no traceback, no raw exception
name, no warning), and no file changed anywhere under the test's folder (HOME included). The untouched
models are run too, as controls that must succeed.

For speed one child runs a whole batch of cases (``RUNNER`` calls ``mlxllm.cli.main`` per case with its
own stdout/stderr captured at the file-descriptor level), instead of one process per case.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import GGUFWriter
from gguf.quants import quantize
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.formats.save import save_model
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model
from mlxllm.tokenize import bpe

MEMORY_CAP = 4 * 2**30
BATCH_TIMEOUT = 60  # seconds for one child and its whole batch
CASE_ALARM = 20  # seconds for one command of one case, inside the child
BATCH = 50

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
SIZE_FIELDS = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings"]  # fmt: skip
SIZE_VALUES = [0, -1, 1.5, "7", True, 10**9, 10**10, math.nan]
FLOAT_FIELDS = ["rms_norm_eps", "rope_theta"]
FLOAT_VALUES = [0, -1, "7", True, math.nan, math.inf, -math.inf]
HUGE = [2**32, 2**63, 2**64 - 1]

# Runs in the child: for each case, each command through mlxllm.cli.main, stdout/stderr captured by fd.
RUNNER = r'''
import json, os, signal, sys, tempfile, traceback, warnings
warnings.simplefilter("always")  # every warning shows, not only its first occurrence in this process
from mlxllm.cli import main

class Alarm(BaseException):
    pass

def on_alarm(*_):
    raise Alarm()

signal.signal(signal.SIGALRM, on_alarm)
cases, out_path, alarm = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
saved = os.dup(1), os.dup(2)
with open(out_path, "w") as out:
    for case in cases:
        result = {"id": case["id"]}
        for name, args in case["commands"].items():
            with tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e:
                sys.stdout.flush(); sys.stderr.flush()
                os.dup2(o.fileno(), 1); os.dup2(e.fileno(), 2)
                code = None
                signal.alarm(alarm)
                try:
                    main(args)
                except SystemExit as x:
                    code = x.code
                except Alarm:
                    code = "timeout"
                except BaseException:  # e.g. MemoryError escaping main: recorded, the batch goes on
                    code = "escaped"
                    traceback.print_exc()
                finally:
                    signal.alarm(0)
                    sys.stdout.flush(); sys.stderr.flush()
                    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
                o.seek(0); e.seek(0)
                result[name] = {"code": code, "stdout": o.read().decode(errors="replace")[-2000:],
                                "stderr": e.read().decode(errors="replace")[-4000:]}
        out.write(json.dumps(result) + "\n")
        out.flush()
'''


@dataclass
class Case:
    id: str
    path: Path
    expect: str | None = None  # a substring the error line must hold (the field or the file it names)
    commands: tuple[str, ...] = ("info", "generate")
    ok: bool = False  # a control: must succeed


# --- the valid models the cases start from ---------------------------------------------------------


def _tokenizer_json(path: Path) -> None:
    tk = pytest.importorskip("tokenizers")
    ref = tk.Tokenizer(tk.models.BPE({c: i for i, c in enumerate(bpe.BYTE_CHARS)}, []))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tk.decoders.ByteLevel()
    ref.save(str(path / "tokenizer.json"))


def _random_model() -> Model:
    mx.random.seed(0)
    model = Model(ModelConfig.from_hf(CONFIG))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())]))
    mx.eval(model.parameters())
    return model


_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}  # fmt: skip
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip


def _gguf_name(name: str) -> str:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    layer, module, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight)", name).groups()
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{leaf}"


def gguf_metadata() -> dict[str, tuple[object, V | None]]:
    """The valid file's metadata: key -> (value, GGUF value type; None: an array, typed by its items)."""
    c = CONFIG
    return {
        "general.architecture": ("llama", V.STRING),
        "general.alignment": (32, V.UINT32),  # the default, stated so that it is in the file
        "llama.block_count": (c["num_hidden_layers"], V.UINT32),
        "llama.context_length": (c["max_position_embeddings"], V.UINT32),
        "llama.embedding_length": (c["hidden_size"], V.UINT32),
        "llama.feed_forward_length": (c["intermediate_size"], V.UINT32),
        "llama.attention.head_count": (c["num_attention_heads"], V.UINT32),
        "llama.attention.head_count_kv": (c["num_key_value_heads"], V.UINT32),
        "llama.attention.key_length": (c["head_dim"], V.UINT32),
        "llama.attention.value_length": (c["head_dim"], V.UINT32),
        "llama.rope.dimension_count": (c["head_dim"], V.UINT32),
        "llama.rope.freq_base": (c["rope_theta"], V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (c["rms_norm_eps"], V.FLOAT32),
        "llama.vocab_size": (c["vocab_size"], V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("default", V.STRING),
        "tokenizer.ggml.tokens": (list(bpe.BYTE_CHARS), None),
        "tokenizer.ggml.token_type": ([1] * len(bpe.BYTE_CHARS), None),
        "tokenizer.ggml.merges": (["Ġ Ġ"], None),
    }


def write_gguf(path: Path, model: Model, changes: dict | None = None) -> None:
    """A llama GGUF with a byte-level gpt2 vocabulary, the MLP maps as Q8_0 and the rest float32;
    ``changes`` replaces metadata entries (a value of None removes one)."""
    w = GGUFWriter(str(path), None)  # general.architecture comes from the metadata table
    meta = {**gguf_metadata(), **(changes or {})}
    for key, entry in meta.items():
        if entry is None:
            continue
        value, vtype = entry
        if vtype is None:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for name, value in tree_flatten(model.parameters()):
        data = np.array(value, dtype=np.float32)
        if ".mlp." in name:
            w.add_tensor(_gguf_name(name), quantize(data, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def bases(root):
    return make_bases(root)


def make_bases(root: Path) -> dict[str, Path]:
    model = _random_model()
    hf = save_model(model, root / "bases" / "hf")
    _tokenizer_json(hf)
    quantized = _random_model()
    nn.quantize(quantized, group_size=32, bits=4)
    hfq = save_model(quantized, root / "bases" / "hfq")
    _tokenizer_json(hfq)
    gguf = root / "bases" / "tiny.gguf"
    write_gguf(gguf, model)
    return {"hf": hf, "hfq": hfq, "gguf": gguf, "model": model}


# --- mutations --------------------------------------------------------------------------------------


def _copy_hf(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def _edit_config(base: Path, to: Path, edit: Callable[[dict], object]) -> Path:
    path = _copy_hf(base, to)
    config = json.loads((path / "config.json").read_text())
    out = edit(config)
    text = out if isinstance(out, str) else json.dumps(config if out is None else out)  # NaN as Python writes it
    (path / "config.json").write_text(text)
    return path


def _set(key, value):
    def edit(config):
        config[key] = value

    return edit


def config_cases(bases, at: Path) -> list[Case]:
    hf, hfq, cases = bases["hf"], bases["hfq"], []

    def add(name, edit, expect, base=hf, **kw):
        cases.append(Case(name, _edit_config(base, at / name, edit), expect, **kw))

    for key in SIZE_FIELDS:
        for i, value in enumerate(SIZE_VALUES):
            add(f"config-{key}-{i}", _set(key, value), key)
    for key in FLOAT_FIELDS:
        for i, value in enumerate(FLOAT_VALUES):
            add(f"config-{key}-{i}", _set(key, value), key)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    for i, scaling in enumerate([{**rope, "factor": 0}, {**rope, "factor": math.nan}, {**rope, "factor": "8"},
                                 {**rope, "high_freq_factor": 1.0}, {**rope, "original_max_position_embeddings": 0},
                                 {"rope_type": "linear"}, "yarn", [1, 2]]):
        add(f"config-rope_scaling-{i}", _set("rope_scaling", scaling), "rope_scaling")
    add("config-layer_types-short", _set("layer_types", ["full_attention"]), "layer types")
    add("config-layer_types-ints", _set("layer_types", [1, 2]), "layer_types")
    add("config-mlp_only_layers", _set("mlp_only_layers", [-1]), "mlp_only_layers")
    add("config-tie-string", _set("tie_word_embeddings", "yes"), "tie_word_embeddings")
    add("config-experts-no-k", _set("num_experts", 4), "num_experts_per_tok")
    add("config-experts-1e10", _set("num_experts", 10**10), "num_experts")
    add("config-model_type-int", _set("model_type", 5), "unsupported architecture")
    add("config-model_type-foo", _set("model_type", "foo"), "unsupported architecture 'foo'")
    add("config-model_type-none", lambda c: c.pop("model_type") and None, "no model_type")
    add("config-hidden-missing", lambda c: c.pop("hidden_size") and None, "missing a field")
    add("config-text_config-int", _set("text_config", 5), "text_config")
    add("config-rope_parameters", lambda c: c.pop("rope_theta") and c.update(rope_parameters={"full_attention": {}}),
        "rope_parameters")
    add("config-list", lambda c: [c], "not an object")
    add("config-not-json", lambda c: "{model_type: llama", "not valid JSON")
    add("config-deep", lambda c: "[" * 200_000 + "]" * 200_000, "not valid JSON")
    add("config-deep-nan", lambda c: {**c, "extra": [[[[[math.nan]]]]]}, "extra[0][0][0][0][0] is nan")
    # the config disagrees with the weights in a way only building the model tells (generate only)
    add("config-attention_bias", _set("attention_bias", True), "q_proj.bias", commands=("generate",))
    # quantization blocks (the MLX-quantized base: group 32, 4 bits)
    for key, values in {"group_size": [0, -1, 7, 10**9, "32", True, 1.5, math.nan],
                        "bits": [0, 7, 9, 99, "4", True, -4]}.items():  # fmt: skip
        for i, value in enumerate(values):
            add(f"quant-{key}-{i}", lambda c, k=key, v=value: c["quantization"].update({k: v}), key, base=hfq)
    add("quant-mode", lambda c: c["quantization"].update(mode="nf4"), "mode", base=hfq)
    add("quant-mode-int", lambda c: c["quantization"].update(mode=5), "mode", base=hfq)
    add("quant-block-int", _set("quantization", 5), "quantization", base=hfq)
    add("quant-block-missing", lambda c: c.pop("quantization") and None, "no 'quantization' block", base=hfq)
    add("quant-override", lambda c: c["quantization"].update({"model.layers.0.mlp.up_proj": {"group_size": 0}}),
        "model.layers.0.mlp.up_proj.group_size", base=hfq)
    add("quant-other-group", lambda c: c["quantization"].update(group_size=64), "does not fit", base=hfq)
    add("quant-other-bits", lambda c: c["quantization"].update(bits=8), "does not fit", base=hfq)
    return cases


def _safetensors(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def safetensors_cases(bases, at: Path) -> list[Case]:
    hf, cases = bases["hf"], []
    n, header, body = _safetensors(hf / "model.safetensors")
    size = 8 + n + len(body)

    def add(name, data: bytes, expect="model.safetensors", **kw):
        path = _copy_hf(hf, at / name)
        (path / "model.safetensors").write_bytes(data)
        cases.append(Case(name, path, expect, **kw))

    raw_header = json.dumps(header).encode()
    for i, length in enumerate([0, 1, 7, n - 1, size, size - 7, *HUGE]):
        add(f"st-length-{i}", struct.pack("<Q", length) + raw_header + body)
    for i, text in enumerate([b"not json", b"[]", b'"text"', b"5", b"null", b"[" * 100_000, b"\xff\xfe{}",
                              json.dumps({"__metadata__": {"format": "pt"}}).encode()]):
        add(f"st-header-{i}", _pack(text, body), "model.safetensors" if i != 7 else "hold 0 layers")
    for i, cut in enumerate([0, 4, 8, 8 + n // 2, 8 + n + len(body) // 2, size - 1]):
        add(f"st-cut-{i}", (_pack(raw_header, body))[:cut])
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]
    entries = {
        "dtype": ["X99", 5, None, "f32"],
        "shape": [[0], [], [-1], [10**10, 10**10], [2**64], ["7"], [1.5], [True], "abc", None, [2**64, 0]],
        "data_offsets": [[0, 0], [-1, 10], [10, 5], [0, 2**64], "x", [0], [0, 1, 2], [True, 4], None],
    }
    for t, name in enumerate(names):
        begin, end = header[name]["data_offsets"]
        for key, values in entries.items():
            for i, value in enumerate(values + ([[begin, end + 4], [begin + size, end + size]] if key == "data_offsets"
                                                else [])):
                edited = json.loads(raw_header)
                edited[name][key] = value
                add(f"st-{t}-{key}-{i}", _pack(edited, body))
        for i, value in enumerate([5, [], "s", None, {}]):
            edited = json.loads(raw_header)
            edited[name] = value
            add(f"st-{t}-entry-{i}", _pack(edited, body))
    swapped = json.loads(raw_header)
    swapped["model.embed_tokens.weight"]["shape"] = swapped["model.embed_tokens.weight"]["shape"][::-1]
    add("st-embed-transposed", _pack(swapped, body), "vocab_size is 256 but the weights hold 64")
    renamed = json.loads(raw_header)
    renamed["model.layers.99999999999.mlp.up_proj.weight"] = renamed.pop("model.layers.1.mlp.up_proj.weight")
    add("st-layer-number", _pack(renamed, body), "weights do not match", commands=("generate",))
    indexes = ["{", [], {"weight_map": []}, {"weight_map": {"a": 5}}, {"weight_map": {"a": "../x.safetensors"}},
               {"weight_map": {"a": "missing.safetensors"}}]
    for i, index in enumerate(index if isinstance(index, str) else json.dumps(index) for index in indexes):
        path = _copy_hf(hf, at / f"st-index-{i}")
        (path / "model.safetensors.index.json").write_text(index)
        cases.append(Case(f"st-index-{i}", path, "index"))
    return cases


def _after_key(data: bytes, key: str) -> int:
    """Offset just past metadata key ``key`` (its u64 length and bytes), i.e. of its u32 value type."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def gguf_cases(bases, at: Path) -> list[Case]:
    base, cases = bases["gguf"], []
    data = base.read_bytes()
    size = len(data)
    (n_tensors,), (n_kv,) = struct.unpack_from("<Q", data, 8), struct.unpack_from("<Q", data, 16)

    def add(name, new: bytes, expect="tiny.gguf", **kw):
        path = at / name / "tiny.gguf"
        path.parent.mkdir(parents=True)
        path.write_bytes(new)
        cases.append(Case(name, path, expect, **kw))

    def patched(offset: int, fmt: str, value) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)

    for i, value in enumerate([0, 1, n_tensors + 1, *HUGE]):
        add(f"gguf-tensor-count-{i}", patched(8, "<Q", value))
    for i, value in enumerate([0, n_kv + 1, *HUGE]):
        add(f"gguf-kv-count-{i}", patched(16, "<Q", value))
    for i, value in enumerate([0, size, *HUGE]):
        add(f"gguf-first-key-length-{i}", patched(24, "<Q", value))
    for i, version in enumerate([0, 1, 4, 2**32 - 1]):
        add(f"gguf-version-{i}", patched(4, "<I", version))
    for i, cut in enumerate([0, 3, 8, 20, size // 4, size // 2, size - 1]):
        add(f"gguf-cut-{i}", data[:cut], "tiny.gguf" if cut >= 4 else "tiny.gguf")
    arch = _after_key(data, "general.architecture")
    for i, value in enumerate([0, size, *HUGE]):
        add(f"gguf-arch-length-{i}", patched(arch + 4, "<Q", value))
    # the model's sizes (u32 values), then retyped as int32 -1, float32 1.5 and string
    sizes = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "vocab_size"]  # fmt: skip
    for key in sizes:
        at_value = _after_key(data, f"llama.{key}") + 4
        for i, value in enumerate([0, 2**31, 2**32 - 1]):
            add(f"gguf-{key}-{i}", patched(at_value, "<I", value), f"llama.{key}")
        minus = patched(at_value - 4, "<I", V.INT32)
        add(f"gguf-{key}-minus", minus[:at_value] + struct.pack("<i", -1) + minus[at_value + 4 :], f"llama.{key}")
        half = patched(at_value - 4, "<I", V.FLOAT32)
        add(f"gguf-{key}-float", half[:at_value] + struct.pack("<f", 1.5) + half[at_value + 4 :], f"llama.{key}")
        add(f"gguf-{key}-string", patched(at_value - 4, "<I", V.STRING))
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
        at_value = _after_key(data, f"llama.{key}") + 4
        for i, value in enumerate([math.nan, 0.0, -1.0, math.inf]):
            add(f"gguf-{key}-{i}", patched(at_value, "<f", value), f"llama.{key}")
    alignment = _after_key(data, "general.alignment") + 4
    for i, value in enumerate([0, 3, 48, 2**31, 2**32 - 1]):
        add(f"gguf-alignment-{i}", patched(alignment, "<I", value))
    tokens = _after_key(data, "tokenizer.ggml.tokens") + 8
    for i, value in enumerate([size, *HUGE]):
        add(f"gguf-token-count-{i}", patched(tokens, "<Q", value))
        add(f"gguf-token-length-{i}", patched(tokens + 8, "<Q", value))
    # tensor infos: name, u32 n_dims, u64 dims (innermost first), u32 type, u64 offset
    for t, name in enumerate(["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"]):
        info = _after_key(data, name)
        (n_dims,) = struct.unpack_from("<I", data, info)
        dims = info + 4
        kind, offset = dims + 8 * n_dims, dims + 8 * n_dims + 4
        for i, value in enumerate([0, 5, 2**31, 2**32 - 1]):
            add(f"gguf-{t}-n_dims-{i}", patched(info, "<I", value))
        for d in range(n_dims):
            for i, value in enumerate([0, size, *HUGE]):
                add(f"gguf-{t}-dim{d}-{i}", patched(dims + 8 * d, "<Q", value))
        add(f"gguf-{t}-dim1-one", patched(dims + 8, "<Q", 1), "llama." if t < 2 else "weights do not match",
            commands=("info", "generate") if t < 2 else ("generate",))
        for i, value in enumerate([999, 2**32 - 1, T.Q4_K]):
            add(f"gguf-{t}-type-{i}", patched(kind, "<I", value))
        for i, value in enumerate([1, size, *HUGE]):
            add(f"gguf-{t}-offset-{i}", patched(offset, "<Q", struct.unpack_from("<Q", data, offset)[0] + value
                                                if value == 1 else value))
        for i, value in enumerate([0, size, *HUGE]):
            add(f"gguf-{t}-name-length-{i}", patched(info - 8 - len(name), "<Q", value))
    return cases


def gguf_metadata_cases(bases, at: Path) -> list[Case]:
    """Metadata a converter could have written wrong: missing, retyped, per-layer arrays, NaN."""
    cases = []

    def add(name, changes, expect, **kw):
        path = at / name / "tiny.gguf"
        path.parent.mkdir(parents=True)
        write_gguf(path, bases["model"], changes)
        cases.append(Case(name, path, expect, **kw))

    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.layer_norm_rms_epsilon"):  # fmt: skip
        add(f"meta-{key}-missing", {f"llama.{key}": None}, f"lacks 'llama.{key}'")
    for i, entry in enumerate([("2", V.STRING), (2.0, V.FLOAT64), (True, V.BOOL), (-1, V.INT64), (2**64 - 1, V.UINT64),
                               ([2, 4], None), ([], None), ([[2]], None), (["a", "b"], None)]):
        add(f"meta-block_count-{i}", {"llama.block_count": entry}, "llama.block_count")
    for i, entry in enumerate([([2, 4], None), ([], None), ([[2, 2]], None), (0, V.UINT32), (3, V.UINT32),
                               (-2, V.INT32)]):
        add(f"meta-head_count_kv-{i}", {"llama.attention.head_count_kv": entry},
            "key/value heads" if i == 4 else "head_count_kv")
    for i, entry in enumerate([("1e4", V.STRING), (math.nan, V.FLOAT64), (1.0, V.FLOAT32), (True, V.BOOL)]):
        add(f"meta-freq_base-{i}", {"llama.rope.freq_base": entry}, "llama.rope.freq_base")
    for i, factor in enumerate([None, (0.0, V.FLOAT32), (math.nan, V.FLOAT32), ("8", V.STRING)]):
        add(f"meta-rope-scaling-{i}", {"llama.rope.scaling.type": ("linear", V.STRING),
                                       "llama.rope.scaling.factor": factor}, "llama.rope.scaling.factor")
    add("meta-key_length-odd", {"llama.attention.key_length": (15, V.UINT32),
                                "llama.attention.value_length": (15, V.UINT32),
                                "llama.rope.dimension_count": (15, V.UINT32)}, "llama.attention.key_length")
    add("meta-value_length", {"llama.attention.value_length": (32, V.UINT32)}, "key and value head sizes")
    add("meta-rope-dims-odd", {"llama.rope.dimension_count": (7, V.UINT32)}, "llama.rope.dimension_count")
    add("meta-rope-dims-wide", {"llama.rope.dimension_count": (4096, V.UINT32)}, "llama.rope.dimension_count")
    add("meta-context-huge", {"llama.context_length": (2**40, V.UINT64)}, "llama.context_length")
    add("meta-arch-missing", {"general.architecture": None}, "general.architecture")
    add("meta-arch-int", {"general.architecture": (5, V.UINT32)}, "unsupported architecture")
    add("meta-arch-foo", {"general.architecture": ("foo", V.STRING)}, "unsupported architecture 'foo'")
    add("meta-split", {"split.count": (2, V.UINT16)}, "split GGUF")
    add("meta-split-string", {"split.count": ("2", V.STRING)}, "split GGUF")
    add("meta-experts-no-k", {"llama.expert_count": (4, V.UINT32)}, "llama.expert_used_count")
    add("meta-experts-k0", {"llama.expert_count": (4, V.UINT32), "llama.expert_used_count": (0, V.UINT32)},
        "llama.expert_used_count")
    add("meta-experts-huge", {"llama.expert_count": (2**32 - 1, V.UINT32), "llama.expert_used_count": (2, V.UINT32)},
        "llama.expert_count")
    add("meta-experts-dense-weights", {"llama.expert_count": (4, V.UINT32), "llama.expert_used_count": (2, V.UINT32)},
        "weights do not match", commands=("generate",))
    add("meta-softcap", {"llama.final_logit_softcapping": (30.0, V.FLOAT32)}, "soft-capping")
    return cases


# --- running ----------------------------------------------------------------------------------------


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def run_batch(cases: list[Case], root: Path, tag: str) -> dict[str, dict]:
    io = root / f"io-{tag}"
    sandbox = io / "home"
    sandbox.mkdir(parents=True)
    listing = [{"id": c.id, "commands": {cmd: (["info", str(c.path)] if cmd == "info" else
                                                ["generate", "-m", str(c.path), "-p", "hi", "-n", "2"])
                                         for cmd in c.commands}} for c in cases]  # fmt: skip
    (io / "cases.json").write_text(json.dumps(listing))
    (io / "runner.py").write_text(RUNNER)
    env = {**os.environ, "HOME": str(sandbox), "XDG_CACHE_HOME": str(sandbox / ".cache"),
           "HF_HOME": str(sandbox / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "always"}  # fmt: skip
    before = _snapshot(root, io)
    proc = subprocess.run([sys.executable, str(io / "runner.py"), str(io / "cases.json"), str(io / "results.jsonl"),
                           str(CASE_ALARM)], cwd=sandbox, env=env, preexec_fn=_limits, capture_output=True,
                          text=True, timeout=BATCH_TIMEOUT)  # fmt: skip
    after = _snapshot(root, io)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed outside the io folder: {changed[:10]}"
    assert list(sandbox.iterdir()) == [], f"the CLI wrote into HOME: {list(sandbox.iterdir())}"
    results = {}
    for line in (io / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        results[r.pop("id")] = r
    assert proc.returncode == 0 and len(results) == len(cases), (
        f"runner exited {proc.returncode} after {len(results)} of {len(cases)} cases "
        f"(next: {cases[len(results)].id if len(results) < len(cases) else '-'}):\n{proc.stderr[-3000:]}"
    )
    return results


def problems(case: Case, result: dict) -> list[str]:
    out = []
    for cmd in case.commands:
        r = result[cmd]
        code, err = r["code"], r["stderr"]
        where = f"{case.id} [{cmd}]"
        if case.ok:
            if code not in (0, None):
                out.append(f"{where}: control failed with {code}: {err.strip()}")
            continue
        lines = err.strip().splitlines()
        if code in (0, None) or code in ("timeout", "escaped"):
            out.append(f"{where}: exit {code!r}, stderr {err.strip()[-300:]!r}")
        elif len(lines) != 1 or not lines[0].startswith("error: "):
            out.append(f"{where}: stderr is not one error line: {err.strip()[-600:]!r}")
        elif "Traceback" in err or "Warning" in err or "--verbose for the traceback" in err:
            out.append(f"{where}: {lines[0]}")
        elif case.expect is not None and case.expect not in lines[0]:
            out.append(f"{where}: error does not name {case.expect!r}: {lines[0]}")
    return out


KINDS = {"config": config_cases, "safetensors": safetensors_cases, "gguf": gguf_cases,
         "gguf-metadata": gguf_metadata_cases}


@pytest.fixture(scope="module")
def all_cases(bases, root) -> dict[str, list[Case]]:
    return make_cases(bases, root)


def make_cases(bases: dict[str, Path], root: Path) -> dict[str, list[Case]]:
    cases = {kind: make(bases, root / kind) for kind, make in KINDS.items()}
    controls = [Case("control-hf", bases["hf"], ok=True), Case("control-hfq", bases["hfq"], ok=True),
                Case("control-gguf", bases["gguf"], ok=True)]  # fmt: skip
    cases["config"] = controls + cases["config"]
    return cases


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_inputs_fail_as_one_line(all_cases, root, kind):
    cases, found = all_cases[kind], []
    for at in range(0, len(cases), BATCH):  # one child process per batch
        chunk = cases[at : at + BATCH]
        results = run_batch(chunk, root, f"{kind}-{at}")
        found += [p for case in chunk for p in problems(case, results[case.id])]
    assert not found, f"{len(found)} problems in {len(cases)} {kind} cases:\n" + "\n".join(found)
