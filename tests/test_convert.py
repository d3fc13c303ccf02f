"""`mlxllm convert`: quantized and mixed-precision outputs that load in mlxllm and in mlx-lm with the same
logits, sharding, the model card, and bad input that leaves nothing behind."""

from __future__ import annotations

import json

import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllm.tools import conversion as cv
from mlxllm.formats.loader import load, load_model
from test_benchmark import _write_tokenizer
from test_cli import assert_one_line_error, run
from test_load_hf import CONFIG, random_model

TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A bf16 Llama-family checkpoint with a tied, quantizable embedding and a tokenizer."""
    model = random_model({**CONFIG, "tie_word_embeddings": True, "vocab_size": 256}, mx.bfloat16)
    path = cv.save_model(model, tmp_path_factory.mktemp("src") / "src")
    _write_tokenizer(path)
    return path


def _mlx_lm_logits(path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model, _ = mlx_lm_utils.load_model(path)
    return model(TOKENS)


def test_quantized_output_loads_in_mlxllm_and_mlx_lm(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q4"
    code, stdout, _ = run(["convert", "-m", str(source), "-o", str(out), "-q", "--q-bits", "4", "--q-group-size", "32",
                           "--json"], capsys, monkeypatch)
    assert code in (0, None)
    report = json.loads(stdout)
    assert report["weights"] == "affine 4-bit, group 32" and 4 < report["bits_per_weight"] < 5.5
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert (out / "tokenizer.json").exists() and "mlxllm convert" in (out / "README.md").read_text()
    ours, tok = load(out, compute="native")
    assert isinstance(ours.model.embed_tokens, nn.QuantizedEmbedding)  # quantized embedding, tied head
    assert tok.encode("hi", add_special_tokens=False) == [104, 105]
    want = _mlx_lm_logits(out)
    assert mx.allclose(ours(TOKENS), want, atol=1e-2).item()
    # against the source weights, quantized by MLX itself the same way
    ref = load_model(source, compute="native")
    nn.quantize(ref, group_size=32, bits=4)
    assert mx.allclose(ref(TOKENS), want, atol=1e-2).item()


def test_mixed_recipe_writes_per_layer_bits(source, tmp_path):
    out = tmp_path / "mixed"
    cv.convert(str(source), out, quantize=True, bits=3, group_size=32, recipe="mixed_3_6")
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 3
    high = {k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 6}
    assert "model.embed_tokens" in high  # the tied head too
    assert {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"} <= high
    assert "model.layers.0.self_attn.q_proj" not in high
    ours = load_model(out, compute="native")
    assert ours.model.layers[0].self_attn.v_proj.bits == 6 and ours.model.layers[0].self_attn.q_proj.bits == 3
    assert mx.allclose(ours(TOKENS), _mlx_lm_logits(out), atol=1e-2).item()


@pytest.mark.parametrize("mode, bits, group", [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
def test_float_modes_load_in_mlxllm_and_mlx_lm(source, tmp_path, mode, bits, group):
    """MLX's MX/NV float modes: no biases, 8-bit shared scales; native and float32 paths agree with mlx-lm."""
    out = tmp_path / mode
    report = cv.convert(str(source), out, quantize=True, bits=bits, group_size=group, mode=mode)
    assert report["weights"].startswith(f"{mode} {bits}-bit")
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == (mode, bits, group)
    native = load_model(out, compute="native")
    layer = native.model.layers[0].self_attn.q_proj
    assert layer.mode == mode and "biases" not in layer
    want = _mlx_lm_logits(out)
    assert mx.allclose(native(TOKENS), want, atol=1e-2).item()
    assert mx.allclose(load_model(out, compute="float32")(TOKENS), want, atol=2e-2).item()


def test_dtype_and_shards(source, tmp_path):
    model = load_model(source, compute="native")
    cv.cast_floats(model, mx.float16)
    out = cv.save_model(model, tmp_path / "sharded", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    again = load_model(out, compute="native")
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(again.parameters()))
    assert mx.array_equal(again(TOKENS), model(TOKENS)).item()


@pytest.mark.parametrize("args, message", [
    (["-q", "--q-bits", "7"], "affine quantization takes 2, 3, 4, 5, 6, 8 bits, not 7"),
    (["-q", "--q-group-size", "48"], "group sizes 32, 64, 128, not 48"),
    (["-q", "--q-mode", "nf4"], "quantization mode 'nf4' is not supported"),
    (["-q", "--q-mode", "mxfp4", "--q-bits", "8", "--q-group-size", "32"], "mxfp4 quantization takes 4 bits, not 8"),
    (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"], "nvfp4 quantization takes group sizes 16, not 32"),
    (["-q", "--q-group-size", "128"], "has 64 input columns, not a multiple of the group size 128"),
    (["-q", "--recipe", "fancy"], "unknown recipe 'fancy'"),
    (["--recipe", "mixed_3_6"], "--recipe needs --quantize"),
])  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(source, tmp_path, args, message, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run(["convert", "-m", str(source), "-o", str(out), *args], capsys, monkeypatch)
    assert_one_line_error(code, err, message)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["convert", "-m", str(source), "-o", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, "exists: choose another --out or pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run(["convert", "-m", str(source), "-o", str(out), "--force"], capsys, monkeypatch)
    assert code in (0, None) and (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_already_quantized_source_is_refused(source, tmp_path):
    cv.convert(str(source), tmp_path / "q", quantize=True, group_size=32)
    with pytest.raises(cv.UserError, match="already quantized"):
        cv.convert(str(tmp_path / "q"), tmp_path / "qq", quantize=True, group_size=32)


def test_a_failed_write_leaves_no_directory(source, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cv.mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        cv.convert(str(source), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_gguf_convert_keeps_native_blocks_and_reports(smollm2_path, tmp_path):
    """SmolLM2's Q4_1/Q8_0 tensors go over bit for bit; the tokenizer comes along as HF files."""
    report = cv.convert(str(smollm2_path), tmp_path / "smol")
    actions = {row["type"]: row["action"] for row in report["gguf_tensors"]}
    assert actions["Q4_1"] == "kept exactly (MLX 4-bit, group 32)" and actions["Q8_0"].startswith("kept exactly")
    q = json.loads((tmp_path / "smol" / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32) and q["model.embed_tokens"]["bits"] == 8
    from_gguf = load_model(smollm2_path, compute="native")
    converted, tok = load(tmp_path / "smol", compute="native")
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in
               zip(tree_flatten(from_gguf.parameters()), tree_flatten(converted.parameters())))  # fmt: skip
    model, tok = load(tmp_path / "smol")
    import mlxllm

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in mlxllm.generate(model, tok, prompt, max_tokens=8)


def test_gguf_convert_requantizes_k_quants_with_measured_error(gemma3_path, tmp_path):
    report = cv.convert(str(gemma3_path), tmp_path / "gemma", requantize="q8")
    rows = {row["type"]: row for row in report["gguf_tensors"]}
    for kind in ("Q4_K", "Q6_K", "Q5_0"):
        assert rows[kind]["action"].startswith("re-quantized to MLX 8-bit")
        assert 0 < rows[kind]["added_rms_error"] < 0.01
    assert json.loads((tmp_path / "gemma" / "tokenizer_config.json").read_text())["tokenizer_class"] == "GemmaTokenizer"
    # --requantize float keeps the K-quants' exact values (16-bit): the converted model answers as the GGUF does
    report = cv.convert(str(gemma3_path), tmp_path / "exact", requantize="float")
    assert {row["type"]: row["action"] for row in report["gguf_tensors"]}["Q4_K"].startswith("dequantized to 16-bit")
    import mlxllm

    prompt = "The Eiffel Tower is located in the city of"
    original = mlxllm.generate(*load(gemma3_path), prompt, max_tokens=6)
    assert "Paris" in original and mlxllm.generate(*load(tmp_path / "exact"), prompt, max_tokens=6) == original
