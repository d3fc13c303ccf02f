"""Logits of the one decoder equal mlx-lm's per-family implementations on the same random weights."""

import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

BASE = dict(
    hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=512, tie_word_embeddings=False,
)
FAMILIES = {
    "llama": dict(BASE, model_type="llama"),
    "llama3.1": dict(
        BASE, model_type="llama", tie_word_embeddings=True, head_dim=32,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    "mistral": dict(BASE, model_type="mistral", num_key_value_heads=1),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=24, num_key_value_heads=1),
    "qwen3-yarn": dict(BASE, model_type="qwen3", head_dim=16, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                   original_max_position_embeddings=16)),
    "smollm3": dict(BASE, model_type="smollm3", no_rope_layer_interval=2, tie_word_embeddings=True),
    "smollm3-listed": dict(BASE, model_type="smollm3", no_rope_layers=[1, 0, 0, 1]),
    "gemma3_text": dict(
        BASE, model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=48,
        sliding_window=5, sliding_window_pattern=2, rope_local_base_freq=10.0, rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        BASE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    "qwen3_moe": dict(
        BASE, model_type="qwen3_moe", head_dim=24, num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True, tie_word_embeddings=True,
    ),
    "olmoe": dict(BASE, model_type="olmoe", num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "dots1": dict(
        BASE, model_type="dots1", head_dim=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4,
        topk_group=2,
    ),
    # Latent attention; V2 without a query bottleneck, group-limited softmax routing, YaRN with mscale.
    "deepseek_v2": dict(
        BASE, model_type="deepseek_v2", num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
    ),
    "deepseek_v3": dict(
        BASE, model_type="deepseek_v3", num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, n_group=4,
        topk_group=2, norm_topk_prob=True, kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, topk_method="noaux_tc", scoring_func="sigmoid",
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
    ),
    # Phi-4-mini's shape: fused projections, LongRoPE over 3/4 of each head.
    "phi3": dict(
        BASE, model_type="phi3", partial_rotary_factor=0.75, original_max_position_embeddings=64,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 2.0, 3.0, 5.0],
                          long_factor=[1.0, 1.5, 2.5, 4.0, 8.0, 16.0]),
    ),
    "phi3-plain": dict(BASE, model_type="phi3", tie_word_embeddings=True),
    # Ministral 3: YaRN plus Llama 4's query scale, whose steps (every 8 positions here) the tokens cross.
    "ministral3": dict(
        {k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="ministral3", head_dim=32,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=5,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=8,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
    ),
    "glm4_moe": dict(
        BASE, model_type="glm4_moe", head_dim=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4,
        topk_group=2, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, rope_scaling=None,
    ),
    "gpt_oss": dict(
        BASE, model_type="gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=16),
    ),
    # Llama 4 as shipped (a text_config inside the multimodal wrapper): chunks of 5 and a temperature
    # floor of 4 positions, both crossed by the test's tokens; MoE on every other layer.
    "llama4": dict(model_type="llama4", text_config=dict(
        BASE, model_type="llama4_text", head_dim=16, rms_norm_eps=1e-6, attention_bias=False, attention_chunk_size=5,
        interleave_moe_layer_step=2, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
        use_qk_norm=True, floor_scale=4, attn_scale=0.1,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
}
# Gated DeltaNet layers (value heads grouped two per key head) alternating with gated full attention.
LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_conv_kernel_dim=4, full_attention_interval=2, head_dim=16)
QWEN35_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0]}
FAMILIES.update({
    "qwen3_next": dict(BASE, model_type="qwen3_next", **LINEAR, num_experts=4, num_experts_per_tok=2,
                       decoder_sparse_step=1, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                       moe_intermediate_size=32, partial_rotary_factor=0.5, norm_topk_prob=True),
    "qwen3_5": dict(BASE, model_type="qwen3_5", **LINEAR, rope_parameters=QWEN35_ROPE),
    "qwen3_5_moe": dict(BASE, model_type="qwen3_5_moe", **LINEAR, num_experts=4, num_experts_per_tok=2,
                        shared_expert_intermediate_size=48, moe_intermediate_size=32, rope_parameters=QWEN35_ROPE),
    # Mistral 4 (inside Mistral 3's wrapper): latent attention, YaRN and the Llama 4 query scale on the whole
    # query, softmax routing over groups scored by their two best experts.
    "mistral4": dict(model_type="mistral3", text_config=dict(
        {k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="mistral4", num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=1.5, n_group=4, topk_group=2, norm_topk_prob=True,
        kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=8,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
})
# Gemma 4: sliding/full layers with their own head sizes and RoPE (proportional over a quarter of the full
# layers' heads); E2B's shape: the last two layers share the K/V of layers 3 and 2 with double-wide MLPs, per-layer
# input embeddings; 26B's: keys double as values on full layers (one global K/V head), experts beside the MLP.
GEMMA4 = dict({k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="gemma4_text", head_dim=16,
              global_head_dim=32, num_hidden_layers=6, sliding_window=5, rms_norm_eps=1e-6, tie_word_embeddings=True,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
              final_logit_softcapping=30.0, rope_parameters={
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}})
FAMILIES.update({
    "gemma4": dict(GEMMA4, num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                   vocab_size_per_layer_input=97),
    "gemma4-moe": dict(model_type="gemma4", vocab_size=97, text_config=dict(
        GEMMA4, attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, use_double_wide_mlp=False, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32)),
})
MOE_FAMILIES = ["gemma4-moe", "mistral4", "llama4", "gpt_oss", "glm4_moe", "mixtral", "qwen2_moe", "qwen3_moe",
                "olmoe", "dots1", "deepseek_v2", "deepseek_v3", "qwen3_next", "qwen3_5_moe"]
HYBRID_FAMILIES = ["qwen3_next", "qwen3_5", "qwen3_5_moe"]


def _reference(config: dict) -> nn.Module:
    model_class, args_class = mlx_lm_utils._get_classes(config)
    return model_class(args_class.from_dict(config))


def _random_pair(config: dict):
    mx.random.seed(0)
    ours = Model(ModelConfig.from_hf(config))
    weights = {k: mx.random.normal(v.shape) * 0.2 for k, v in tree_flatten(ours.parameters())}
    ours.update(tree_unflatten(list(weights.items())))
    ref = _reference(config)
    if "text_config" in config:  # the wrapper holds the text model under language_model
        weights = {f"language_model.{k}": v for k, v in weights.items()}
    ref_weights = ref.sanitize(dict(weights)) if hasattr(ref, "sanitize") else weights
    ref.load_weights(list(ref_weights.items()), strict=True)
    mx.eval(ours.parameters(), ref.parameters())
    return ours, ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_mlx_lm(family):
    ours, ref = _random_pair(FAMILIES[family])
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])
    a, b = ours(tokens), ref(tokens)
    assert a.shape == (1, tokens.shape[1], 97)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), float(mx.abs(a - b).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_matches_mlx_lm(family):
    """Chunked prefill then token-by-token decode through our caches equals mlx-lm's, past the window."""
    ours, ref = _random_pair(FAMILIES[family])
    tokens = mx.array([[5, 17, 2, 44, 8, 71, 23, 9, 60, 31, 12, 77, 4, 19, 50, 66, 3]])
    full = ours(tokens)
    c_ours, c_ref = ours.make_cache(), make_prompt_cache(ref)
    steps = [(0, 4), (4, 7), (7, 8)] + [(i, i + 1) for i in range(8, tokens.shape[1])]
    for lo, hi in steps:
        a = ours(tokens[:, lo:hi], cache=c_ours)
        b = ref(tokens[:, lo:hi], cache=c_ref)
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), (lo, hi, float(mx.abs(a - b).max()))
        assert mx.allclose(a, full[:, lo:hi], atol=1e-4, rtol=1e-4).item(), (lo, hi)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_prefill_sorted_by_expert_matches_mlx_lm(family):
    """40 tokens x k experts is past the point where experts are run sorted by expert id."""
    ours, ref = _random_pair(FAMILIES[family])
    tokens = (mx.arange(40)[None] * 7) % 97
    a, b = ours(tokens), ref(tokens)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), float(mx.abs(a - b).max())


@pytest.mark.parametrize("family", ["phi3", "phi3-plain", "ministral3", "glm4_moe", "smollm3", "gpt_oss", "llama4",
                                    "mistral4", "gemma4", "gemma4-moe"])
def test_saved_checkpoint_reads_back_in_mlxllm_and_mlx_lm(family, tmp_path):
    """``convert``'s writer spells each family's settings as its config.json does (Phi-3's LongRoPE,
    Ministral 3's rope_parameters and query scale, GLM's use_qk_norm, partial rotary factors, Gemma 4's
    per-kind RoPE and the fields whose defaults differ between transformers and mlx-lm)."""
    from mlxllm.formats.loader import load_model
    from mlxllm.formats.save import save_model

    ours, _ = _random_pair(FAMILIES[family])
    path = save_model(ours, tmp_path / family)
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])
    want = ours(tokens)
    assert mx.allclose(load_model(path, compute="float32")(tokens), want, atol=1e-5).item()
    theirs, _ = mlx_lm_utils.load_model(path)
    assert mx.allclose(theirs(tokens), want, atol=1e-4).item()


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_periods_follow_the_definition(truncate):
    """YaRN as Hugging Face defines it, written out in numpy: the ramp between the dimensions where
    ``beta_fast`` and ``beta_slow`` turns fit the original context, rounded outward unless ``truncate``
    is false (gpt-oss; mlx-lm always rounds)."""
    import math

    import numpy as np

    from mlxllm.model.rope import yarn_freqs

    dims, base, factor, original = 64, 150000.0, 32.0, 4096
    corr = [dims * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base)) for turns in (32, 1)]
    if truncate:
        corr = [math.floor(corr[0]), math.ceil(corr[1])]
    low, high = max(corr[0], 0), min(corr[1], dims - 1)
    extrapolate = 1 - np.clip((np.arange(dims // 2) - low) / (high - low), 0, 1)
    periods = base ** (np.arange(0, dims, 2) / dims)
    inv = (1 / (factor * periods)) * (1 - extrapolate) + (1 / periods) * extrapolate
    scaling = dict(factor=factor, original_max_position_embeddings=original, beta_fast=32, beta_slow=1,
                   truncate=truncate)
    np.testing.assert_allclose(np.array(yarn_freqs(dims, base, scaling)), 1 / inv, rtol=1e-5)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_chunked_prefill_matches_mlx_lm(family):
    """150 tokens: the chunked delta rule over three chunks (the last padded), alone and after a cached
    part that ends mid-chunk, equals mlx-lm's token-by-token recurrence."""
    ours, ref = _random_pair(FAMILIES[family])
    tokens = (mx.arange(150)[None] * 7) % 97
    a, b = ours(tokens), ref(tokens)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), float(mx.abs(a - b).max())
    c_ours, c_ref = ours.make_cache(), make_prompt_cache(ref)
    for lo, hi in [(0, 70), (70, 73), (73, 74), (74, 150)]:
        a, b = ours(tokens[:, lo:hi], cache=c_ours), ref(tokens[:, lo:hi], cache=c_ref)
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), (lo, hi, float(mx.abs(a - b).max()))
