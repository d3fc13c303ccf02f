"""DeepSeek-V2/V3 latent attention: the two attention forms agree, checkpoints in every layout load
(HF per-expert tensors with multi-token-prediction layers, mlx-lm's split ``embed_q``/``unembed_out``,
quantized), and converted directories load in mlx-lm."""

from __future__ import annotations

import json

import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllm.tools import benchmark as bm
from mlxllm.errors import UserError
from mlxllm.formats.loader import load_model
from mlxllm.model.mla import LatentAttention

from test_benchmark import _write_tokenizer
from test_parity_mlx_lm import FAMILIES, _random_pair

TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("quantized", [False, True])
def test_absorbed_and_expanded_attention_agree(family, quantized, monkeypatch):
    ours, _ = _random_pair(FAMILIES[family])
    if quantized:  # kv_b_proj split by head rows out of its packed form
        nn.quantize(ours, group_size=32, bits=8, class_predicate=lambda p, m: p.endswith("kv_b_proj"))
        assert "scales" in ours.layers[0].self_attn.kv_b_proj
    outs = []
    for absorb in (True, False):
        monkeypatch.setattr(LatentAttention, "_absorb", lambda self, n, s, a=absorb: a)
        outs.append(ours(TOKENS))
    assert mx.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4).item(), float(mx.abs(outs[0] - outs[1]).max())


def _hf_layout(model: nn.Module) -> dict[str, mx.array]:
    """The model's weights as a Hugging Face DeepSeek checkpoint stores them: experts one by one."""
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in k:
            prefix, rest = k.split(".switch_mlp.")
            out.update({f"{prefix}.experts.{e}.{rest}": v[e] for e in range(v.shape[0])})
        else:
            out[k] = v
    return out


def test_hf_checkpoint_with_mtp_layer_loads(tmp_path):
    """Per-expert tensors are stacked and DeepSeek-V3's extra multi-token-prediction layer is skipped."""
    config = dict(FAMILIES["deepseek_v3"], num_nextn_predict_layers=1)
    ours, _ = _random_pair(config)
    weights = _hf_layout(ours)
    n = config["num_hidden_layers"]
    weights[f"model.layers.{n}.eh_proj.weight"] = mx.zeros((8, 8))
    (tmp_path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights, metadata={"format": "pt"})
    assert mx.allclose(load_model(tmp_path, compute="float32")(TOKENS), ours(TOKENS), atol=1e-5).item()


@pytest.mark.parametrize("q_bits", [None, 8])
def test_mlx_lm_converted_deepseek_v3_loads(q_bits, tmp_path):
    """mlx_lm.convert writes kv_b_proj split per head (embed_q transposed, unembed_out); folded back
    at load: exact in float, one extra 8-bit rounding of embed_q when quantized."""
    convert = pytest.importorskip("mlx_lm.convert")
    ours, ref = _random_pair(FAMILIES["deepseek_v3"])
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(FAMILIES["deepseek_v3"]))
    mx.save_safetensors(str(src / "model.safetensors"), _hf_layout(ours), metadata={"format": "pt"})
    _write_tokenizer(src)
    out = tmp_path / "mlx"
    convert.convert(str(src), str(out), quantize=q_bits is not None, q_bits=q_bits or 4, q_group_size=32, dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".embed_q." in k for k in index) and not any("kv_b_proj" in k for k in index)
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(out)
    loaded = load_model(out, compute="native")
    a, b = loaded(TOKENS), theirs(TOKENS)
    tol = 1e-4 if q_bits is None else 0.01 * float(mx.abs(b).max())  # measured 0.4 %
    assert mx.allclose(a, b, atol=tol).item(), float(mx.abs(a - b).max())


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_quantized_dir_with_kv_b_proj_loads_in_mlx_lm(family, tmp_path):
    """Our layout keeps kv_b_proj (Hugging Face's); mlx-lm's V2 reads it as is, its V3 splits it."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlxllm.formats.save import save_model

    ours, _ = _random_pair(FAMILIES[family])
    nn.quantize(ours, group_size=32, bits=8, class_predicate=lambda p, m: hasattr(m, "to_quantized") and "embed" not in p)
    path = save_model(ours, tmp_path / family)
    want = ours(TOKENS)
    assert mx.allclose(load_model(path, compute="native")(TOKENS), want, atol=1e-5).item()
    theirs, _ = mlx_lm_utils.load_model(path)
    got = theirs(TOKENS)
    # V3: mlx-lm re-quantizes the transposed key map (8-bit), measured 0.4 % of the largest logit
    tol = 1e-4 if family == "deepseek_v2" else 0.01 * float(mx.abs(want).max())
    assert mx.allclose(got, want, atol=tol).item(), float(mx.abs(got - want).max())


def test_latent_cache_is_small_and_kv_bits_refused():
    ours, _ = _random_pair(FAMILIES["deepseek_v3"])
    cache = ours.make_cache()
    ours(TOKENS, cache=cache)
    cfg = ours.config
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # float32 latent + shared RoPE key
    assert sum(c.nbytes for c in cache) == cfg.num_hidden_layers * TOKENS.shape[1] * per_token
    assert bm.kv_bytes(ours, TOKENS.shape[1], dtype=mx.float32) == sum(c.nbytes for c in cache)
    with pytest.raises(UserError, match="latent-attention"):
        from mlxllm.model.cache import KVSettings

        KVSettings(8, 32).checked(cfg)
