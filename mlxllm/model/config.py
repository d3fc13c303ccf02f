"""One config for every supported decoder family.

Each family is a set of switches on the same decoder (see ``decoder.py``); ``from_hf`` reads a
Hugging Face ``config.json`` and ``mlxllm.formats.gguf`` builds the same object from GGUF metadata.

Both go through one validation layer before anything is sized from a config: ``check_config`` refuses
values no model has (sizes that are not whole numbers within generous bounds, non-positive or
non-finite norms and RoPE bases, malformed rope_scaling and quantization blocks, a non-finite float
anywhere) and sizes that disagree with what the weights hold; ``check_weights`` then compares the
built config with the rows of the tensors that carry each size. Every refusal is one line naming the
file and the field. Longer than ~400 lines for that reason: the checks of every field sit here, next to
the fields they check, as the one layer both readers go through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from ..errors import UserError

# model_type -> family switches that differ from the Llama defaults.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
    "smollm3": {},  # Llama with some layers that take no RoPE (``no_rope_layers``)
    "gemma3_text": {
        "qk_norm": True,
        "norm_plus_one": True,
        "sandwich_norm": True,
        "activation": "gelu_tanh",
        "scale_embeddings": True,
        "tie_word_embeddings": True,
    },
    # Mixture-of-experts families (see moe.py).
    "mixtral": {"router": "topk_softmax", "ffn_name": "block_sparse_moe"},
    "qwen2_moe": {"attention_bias": True},
    "qwen3_moe": {"qk_norm": True},
    "olmoe": {"qk_norm": True, "qk_norm_per_head": False},
    # dots.llm1: DeepSeek-V3's MoE (sigmoid scores + selection bias, group-limited top-k, scaled
    # weights, ungated shared experts, first layers dense) under Qwen3-style attention.
    "dots1": {"qk_norm": True, "router": "sigmoid_group", "expert_stack_name": "experts",
              "shared_expert_gate": False},
    # DeepSeek-V2/V3 (and Kimi K2): multi-head latent attention (mla.py), ungated shared experts;
    # V2 routes by softmax (optionally group-limited), V3 by sigmoid + selection bias.
    "deepseek_v2": {"shared_expert_gate": False, "float_router": True},
    "deepseek_v3": {"router": "sigmoid_group", "shared_expert_gate": False},
    # GLM-4.5/4.6: DeepSeek-V3's routing and ungated shared experts under Qwen-style attention with
    # biases, optional per-head q/k norms and RoPE over half of each head.
    "glm4_moe": {"router": "sigmoid_group", "shared_expert_gate": False, "partial_rotary_factor": 0.5},
    # Phi-3 / Phi-4: Llama with fused q|k|v and gate|up projections, LongRoPE ("su") scaling.
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
    # Ministral 3 (Mistral 3's text model): Llama with YaRN and Llama 4's position-dependent query scale.
    "ministral3": {"tie_word_embeddings": True},
    # gpt-oss: biased projections, attention sinks, alternating window/full layers, a biased top-k-softmax
    # router over biased experts with a clipped gated unit.
    "gpt_oss": {"attention_bias": True, "attention_out_bias": True, "attention_sinks": True, "router": "topk_softmax",
                "router_name": "router", "expert_stack_name": "experts", "expert_bias": True, "activation": "swiglu_oai"},
    # Llama 4 (Scout, Maverick): interleaved RoPE layers with chunked attention and unit q/k norms, every
    # 4th layer without RoPE, attending globally, its queries temperature-scaled; MoE layers route each
    # token to one expert whose sigmoid weight scales its input, beside an always-on shared expert.
    "llama4_text": {"ffn_name": "feed_forward", "router": "sigmoid_input", "router_name": "router",
                    "expert_stack_name": "experts", "shared_expert_gate": False, "shared_expert_name": "shared_expert",
                    "rope_traditional": True, "query_scale_nope_only": True, "query_scale_shift": 1},
    # Mistral 4: DeepSeek-V3's latent attention with Llama 4's query scale (in rope_parameters), softmax
    # routing limited to the groups whose two best experts score highest, ungated shared experts.
    "mistral4": {"shared_expert_gate": False, "group_by_top2": True},
    # Qwen3-Next / Qwen3.5: Gated DeltaNet linear-attention layers between gated full-attention ones
    # (gated_delta.py); Qwen3-Next fuses the linear layers' projections (in_proj_qkvz, in_proj_ba).
    "qwen3_next": {"qk_norm": True, "attn_output_gate": True, "partial_rotary_factor": 0.25, "norm_topk_prob": True},
    "qwen3_5": {"qk_norm": True, "attn_output_gate": True, "partial_rotary_factor": 0.25},
    "qwen3_5_moe": {"qk_norm": True, "attn_output_gate": True, "partial_rotary_factor": 0.25, "norm_topk_prob": True},
    # Gemma 4: Gemma 3's sandwich norms stored as w (not 1 + w), attention scale 1 over RMS-normed queries,
    # keys and (weightless) values; see ``_gemma4`` for its layer kinds, KV sharing and per-layer inputs.
    "gemma4_text": {"qk_norm": True, "v_norm": True, "sandwich_norm": True, "activation": "gelu_tanh",
                    "scale_embeddings": True, "tie_word_embeddings": True, "query_pre_attn_scalar": 1.0,
                    "layer_scalar": True, "router": "topk_softmax"},
}
# Names under which the same families appear elsewhere (HF multimodal wrappers, GGUF).
ALIASES = {"gemma3": "gemma3_text", "smollm2": "llama", "smollm": "llama", "qwen2moe": "qwen2_moe",
           "glm4moe": "glm4_moe", "mistral3": "ministral3", "gpt-oss": "gpt_oss", "llama4": "llama4_text",
           "deepseek2": "deepseek_v2",
           "qwen3moe": "qwen3_moe", "qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe",
           "qwen3next": "qwen3_next", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe", "gemma4": "gemma4_text"}


class UnsupportedArchitecture(UserError):
    def __init__(self, name: str):
        supported = ", ".join(sorted(FAMILIES))
        super().__init__(f"unsupported architecture '{name}' (supported: {supported})")


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name (``model.layers.N. ...``) belongs to, or None."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isascii() and parts[2].isdigit():
        return int(parts[2]) if len(parts[2]) <= 9 else None  # no real layer number has 10 digits
    return None


def family_of(name: str) -> str:
    """Map a model_type / GGUF architecture name to a supported family, or raise a clear error."""
    if not isinstance(name, str):
        raise UnsupportedArchitecture(repr(name))
    family = ALIASES.get(name, name)
    if family not in FAMILIES:
        raise UnsupportedArchitecture(name)
    return family


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # Family switches.
    attention_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    # Sliding-window attention: per-layer kinds ("sliding_attention" / "full_attention").
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_base_freq: float | None = None
    no_rope_layers: list[int] | None = None  # per layer, 1: RoPE, 0: none (SmolLM3's NoPE layers); None: all RoPE
    qk_norm_per_head: bool = True  # False: one norm over all heads' projections (OLMoE)
    partial_rotary_factor: float = 1.0  # RoPE turns the first rope_dims = head_dim x this features of each head
    fused_qkv: bool = False  # one qkv_proj (rows: q, k, v) instead of q_proj/k_proj/v_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj (rows: gate, up) instead of gate_proj/up_proj (Phi-3)
    attention_out_bias: bool = False  # o_proj has a bias (gpt-oss)
    attention_sinks: bool = False  # a learned per-head logit joins each softmax (gpt-oss)
    # Llama 4 / Ministral 3: queries at position p scaled by 1 + beta * log(1 + floor((p + shift) / length)),
    # on every layer or (Llama 4) only on those without RoPE.
    query_scale_beta: float | None = None
    query_scale_length: int = 8192
    query_scale_shift: int = 0
    query_scale_nope_only: bool = False
    rope_traditional: bool = False  # RoPE turns adjacent feature pairs (Llama 4's checkpoints)
    qk_rms_after_rope: bool = False  # Llama 4: q and k RMS-normed without weights after RoPE, on RoPE layers
    attention_chunk_size: int | None = None  # "chunked_attention" layers see only their own chunk (Llama 4)
    # Mixture of experts: a layer is MoE when num_experts > 0, it is not in mlp_only_layers, and
    # (layer + 1) is a multiple of decoder_sparse_step.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # expert width (default: intermediate_size)
    shared_expert_intermediate_size: int | None = None  # an always-on, sigmoid-gated shared expert
    norm_topk_prob: bool = False
    router: str = "softmax_topk"  # or "topk_softmax" (Mixtral), "sigmoid_group" (DeepSeek-V3), "sigmoid_input" (Llama 4)
    n_group: int = 1  # experts fall in n_group groups; only the topk_group best groups are eligible
    topk_group: int = 1
    group_by_top2: bool = False  # a group scores its two best experts' sum (DeepSeek-V3, Mistral 4), not its best
    routed_scaling_factor: float = 1.0
    expert_stack_name: str = "switch_mlp"  # parameter name of the stacked experts
    router_name: str = "gate"  # parameter name of the router
    expert_bias: bool = False  # the router and each expert's maps have biases (gpt-oss)
    shared_expert_gate: bool = True  # the shared expert's output is sigmoid-gated (Qwen2-MoE) or not
    shared_expert_name: str | None = None  # its parameter name (default: shared_expert when gated, else shared_experts)
    float_router: bool = False  # router stored as a plain weight, never quantized (DeepSeek; always for sigmoid_group)
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    ffn_name: str = "mlp"  # the feed-forward's parameter name ("block_sparse_moe" in Mixtral)
    # Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: keys and values are
    # expanded from a cached kv_lora_rank-wide latent plus one shared qk_rope_head_dim-wide RoPE key.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None  # queries through a low-rank bottleneck (None: one projection)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Gated DeltaNet ("linear_attention" layers, gated_delta.py) and the gated full attention beside it.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = False  # q_proj also yields a sigmoid gate per output feature (Qwen3-Next)
    # Gemma 4: full-attention layers with their own head size (and, when keys double as values, their own
    # key/value head count); the last num_kv_shared_layers layers attend over the keys and values of the
    # last earlier layer of their kind (and have a double-wide MLP when use_double_wide_mlp); per-layer
    # input embeddings hidden_size_per_layer_input wide; routed experts beside the dense MLP.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False  # full-attention layers have no v_proj: values are the raw keys
    v_norm: bool = False  # values RMS-normed without a weight
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int | None = None
    enable_moe_block: bool = False
    layer_scalar: bool = False  # each layer's output times a learned scalar
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    # mlx-community quantization block ({"group_size", "bits", per-layer overrides}).
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.model_type = family_of(self.model_type)
        check_config({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if not self.head_dim:
                raise UserError(f"num_attention_heads is {self.num_attention_heads}, more than hidden_size "
                                f"({self.hidden_size}) has features")
        if self.rope_dims % 2 and not self.kv_lora_rank or self.qk_rope_head_dim % 2 or not self.rope_dims:
            dims = "qk_rope_head_dim" if self.kv_lora_rank else "head_dim x partial_rotary_factor"
            value = self.qk_rope_head_dim if self.kv_lora_rank else self.rope_dims
            raise UserError(f"{dims} is {value}, not a positive even number (RoPE turns pairs of features)")
        if self.partial_rotary_factor > 1:
            raise UserError(f"partial_rotary_factor is {self.partial_rotary_factor}, more than 1")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"config lists {len(self.layer_types)} layer types for {self.num_hidden_layers} layers"
            )
        if self.no_rope_layers is not None and (len(self.no_rope_layers) != self.num_hidden_layers
                                                or any(v not in (0, 1) for v in self.no_rope_layers)):
            raise UserError(f"no_rope_layers must list 0 or 1 for each of the {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.activation not in ("silu", "gelu_tanh", "swiglu_oai"):
            raise UserError(f"unsupported activation '{self.activation}'")
        if self.router not in ("softmax_topk", "topk_softmax", "sigmoid_group", "sigmoid_input"):
            raise UserError(f"unsupported MoE router '{self.router}'")
        if self.num_experts and self.router == "sigmoid_input" and self.num_experts_per_tok != 1:
            raise UserError(f"num_experts_per_tok is {self.num_experts_per_tok}; Llama 4's routing takes 1 expert per token")
        if "chunked_attention" in self.layer_types and not self.attention_chunk_size:
            raise UserError("attention_chunk_size is missing but the config has chunked-attention layers")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")
        if self.num_experts and (self.num_experts % max(self.n_group, 1) or not 0 < self.topk_group <= self.n_group):
            raise UserError(f"{self.num_experts} experts cannot form {self.n_group} groups with {self.topk_group} chosen")
        if self.sliding_window is None or self.sliding_window < 1:
            if any(t == "sliding_attention" for t in self.layer_types):
                raise UserError(f"sliding_window is {self.sliding_window} but the config has sliding-window layers")
        if any(self.is_linear(i) for i in range(self.num_hidden_layers)) and not (
                self.linear_num_key_heads and self.linear_key_head_dim and self.linear_value_head_dim
                and self.linear_num_value_heads % self.linear_num_key_heads == 0 and self.linear_conv_kernel_dim > 1):
            raise UserError("linear_attention layers need linear_num_key_heads, linear_key_head_dim, "
                            "linear_value_head_dim, linear_num_value_heads (a multiple of the key heads) and "
                            "linear_conv_kernel_dim > 1")
        self._check_kv_sharing()
        if self.kv_lora_rank and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise UserError("latent attention needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim")

    def _check_kv_sharing(self) -> None:
        shared = self.num_kv_shared_layers
        if not 0 <= shared < self.num_hidden_layers:
            raise UserError(f"num_kv_shared_layers is {shared}; it must leave at least one of the "
                            f"{self.num_hidden_layers} layers with keys and values of its own")
        owners = set(self.layer_types[: self.num_hidden_layers - shared])
        missing = sorted(set(self.layer_types[self.num_hidden_layers - shared :]) - owners)
        if missing:
            raise UserError(f"num_kv_shared_layers is {shared} but no earlier layer of kind {missing[0]} "
                            "has keys and values to share")
        if self.enable_moe_block and not (self.num_experts and self.num_experts_per_tok and self.moe_intermediate_size):
            raise UserError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")

    def layer_head_dim(self, layer: int) -> int:
        """Features per head of ``layer`` (Gemma 4's full-attention layers have their own)."""
        return self.global_head_dim if self.global_head_dim and not self.is_sliding(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        """Key/value heads of ``layer`` (Gemma 4's full-attention layers where keys double as values)."""
        if self.shares_k_as_v(layer) and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def shares_k_as_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def kv_source(self, layer: int) -> int | None:
        """The layer whose keys and values ``layer`` attends over (None: its own)."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return None
        return max(i for i in range(first_shared) if self.layer_types[i] == self.layer_types[layer])

    @property
    def kv_layers(self) -> list[int]:
        """The layers that hold a cache, in order (all but the KV-shared ones)."""
        return list(range(self.num_hidden_layers - self.num_kv_shared_layers))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rope_dims(self) -> int:
        """Features of each head that RoPE turns (all but the tail when partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def kv_cache_width(self, layer: int) -> int:
        """Numbers cached per token by ``layer`` for its keys plus values."""
        if self.kv_lora_rank:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.layer_kv_heads(layer) * 2 * self.layer_head_dim(layer)

    def uses_rope(self, layer: int) -> bool:
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        return self.layer_types[layer] == "chunked_attention"

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    @property
    def trims(self) -> bool:
        """Whether every layer's cache can forget its last positions (no sliding ring, no recurrent state)."""
        return not any(self.is_sliding(i) or self.is_linear(i) for i in range(self.num_hidden_layers))

    def is_moe(self, layer: int) -> bool:
        """Whether ``layer``'s feed-forward is routed experts (not Gemma 4's, whose experts sit beside its MLP)."""
        return (self.num_experts > 0 and not self.enable_moe_block and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, where: str = "config.json", names: Mapping[str, str] | None = None,
                weights: Callable[[], Mapping[str, tuple[int, ...]]] | None = None) -> "ModelConfig":
        """Build from a Hugging Face / mlx-community ``config.json`` dictionary, validated (``check_config``)
        before anything is sized from it. ``weights``: the file's tensor index (our names -> shapes),
        asked for once the family is known, to check the config against; ``where`` and ``names`` (our field
        -> the file's own name, e.g. GGUF keys) are how errors name the file and the field."""
        if not isinstance(config, Mapping):
            raise UserError(f"{where} is not a JSON object")
        config = dict(config)
        if "text_config" in config:  # multimodal wrappers (e.g. Gemma3ForConditionalGeneration)
            if not isinstance(config["text_config"], Mapping):
                raise UserError(f"{where}: text_config is not an object")
            text = dict(config["text_config"])
            text.setdefault("model_type", config.get("model_type"))
            for key in ("quantization", "tie_word_embeddings"):
                if key in config:
                    text.setdefault(key, config[key])
            if config.get("model_type") == "mistral3":  # Mistral 3's wrapper unties the head unless told
                text.setdefault("tie_word_embeddings", False)
            config = text
        model_type = config.get("model_type")
        if model_type is None:
            raise UserError(f"{where} has no model_type")
        family = family_of(model_type)
        shapes = weights() if weights is not None else None
        check_config(config, where, names, None if shapes is None else _held(shapes, config))
        values: dict[str, Any] = dict(FAMILIES[family])
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in config.items() if k in known and v is not None})
        values["model_type"] = family
        values["extra"] = {k: v for k, v in config.items() if k not in known}
        names = dict(names or {})
        for name in ("num_local_experts", "n_routed_experts"):  # Mixtral's and DeepSeek's names
            if name in config:
                values["num_experts"] = config[name]
                names.setdefault("num_experts", name)
        if "experts_per_token" in config and "num_experts_per_tok" not in config:  # OpenAI's name (gpt-oss)
            values["num_experts_per_tok"] = config["experts_per_token"]
            names.setdefault("num_experts_per_tok", "experts_per_token")
        if config.get("n_shared_experts"):  # DeepSeek style: n experts' width, always on
            width = values.get("moe_intermediate_size") or values.get("intermediate_size", 0)
            values["shared_expert_intermediate_size"] = config["n_shared_experts"] * width
            names.setdefault("shared_expert_intermediate_size", "n_shared_experts x moe_intermediate_size")
        if config.get("first_k_dense_replace"):
            values["mlp_only_layers"] = list(range(config["first_k_dense_replace"]))
        if family.startswith("deepseek"):
            _deepseek_routing(values, config)
        if "rope_parameters" in config and "rope_theta" not in config:  # transformers >= 5 layout
            try:
                params = config["rope_parameters"]
                if "full_attention" in params:
                    values["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
                    params = params["full_attention"]
                values["rope_theta"] = params.get("rope_theta", values.get("rope_theta", 10000.0))
            except (KeyError, TypeError, AttributeError):
                raise UserError(f"{where}: rope_parameters is not a valid RoPE description") from None
            if params.get("rope_type", "default") != "default":
                values["rope_scaling"] = params
        if family == "phi3":
            _phi3_rope(values, config)
        elif family == "glm4_moe":
            values["qk_norm"] = bool(config.get("use_qk_norm", False))
        elif family in ("ministral3", "mistral4"):
            _query_scale(values, config.get("rope_parameters") or config.get("rope_scaling") or {})
        if family == "gpt_oss" and "layer_types" not in config:  # window first, then every other layer full
            values["layer_types"] = [("sliding_attention", "full_attention")[i % 2]
                                     for i in range(values.get("num_hidden_layers", 0))]
        if family == "gemma3_text":
            _gemma3_layers(values, config)
        elif family == "gemma4_text":
            _gemma4(values, config)
        elif family.startswith(("qwen3_next", "qwen3_5")):
            _linear_layers(values, config, where)
        elif config.get("sliding_window") and family in ("mistral", "mixtral", "phi3"):
            values["layer_types"] = ["sliding_attention"] * values.get("num_hidden_layers", 0)
        elif family in ("qwen2", "qwen2_moe") and not config.get("use_sliding_window"):
            values["sliding_window"] = None
        elif family in ("llama", "qwen3", "qwen3_moe", "olmoe", "dots1", "deepseek_v2", "deepseek_v3", "smollm3",
                        "glm4_moe", "llama4_text", "qwen3_next", "qwen3_5", "qwen3_5_moe", "mistral4"):
            values.pop("sliding_window", None)
        if family == "llama4_text":
            _llama4(values, config)
        if family in ("smollm3", "llama4_text") and not config.get("no_rope_layers"):  # every interval-th has none
            interval = config.get("no_rope_layer_interval", 4)
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise UserError(f"{where}: no_rope_layer_interval must be a positive integer, got {interval!r}")
            values["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(values.get("num_hidden_layers", 0))]
        if family == "llama4_text" and "layer_types" not in config and values.get("attention_chunk_size"):
            values["layer_types"] = ["chunked_attention" if r else "full_attention" for r in values["no_rope_layers"]]
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise UserError(f"{where} is missing a field: {e}") from None
        except UserError as e:  # a check of the built config: named as the file names the field
            first, _, rest = str(e).partition(" ")
            raise UserError(f"{where}: {names.get(first, first)} {rest}") from None
        if shapes is not None:
            check_weights(cfg, shapes, where, names)
        return cfg


def _deepseek_routing(values: dict[str, Any], config: dict[str, Any]) -> None:
    """DeepSeek configs name their routing: V2 'greedy' or 'group_limited_greedy' over softmax
    scores, V3 'noaux_tc' (sigmoid + selection bias, group-limited)."""
    method = config.get("topk_method", "greedy" if values["model_type"] == "deepseek_v2" else "noaux_tc")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UserError(f"unsupported DeepSeek topk_method '{method}'")
    if method == "noaux_tc" and config.get("scoring_func", "sigmoid") != "sigmoid":
        raise UserError(f"unsupported DeepSeek scoring_func '{config['scoring_func']}' with noaux_tc routing")
    values["router"] = "sigmoid_group" if method == "noaux_tc" else "softmax_topk"
    if method == "greedy" or not values.get("n_group"):
        values["n_group"] = values["topk_group"] = 1
    if config.get("moe_layer_freq", 1) != 1:
        raise UserError(f"moe_layer_freq {config['moe_layer_freq']} is not supported (only 1)")


def _phi3_rope(values: dict[str, Any], config: dict[str, Any]) -> None:
    """Phi-3 keeps LongRoPE's context lengths beside rope_scaling; the RoPE needs both to size its
    attention factor."""
    scaling = values.get("rope_scaling")
    if isinstance(scaling, Mapping) and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        scaling = dict(scaling)
        scaling.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings", 4096))
        scaling.setdefault("max_position_embeddings", values.get("max_position_embeddings", 4096))
        values["rope_scaling"] = scaling


def _llama4(values: dict[str, Any], config: dict[str, Any]) -> None:
    """Llama 4's names: experts and the shared expert are ``intermediate_size`` wide, dense layers
    ``intermediate_size_mlp``; MoE every ``interleave_moe_layer_step``-th layer; biases on all four
    attention maps; temperature tuning of the RoPE-less layers' queries."""
    if config.get("num_local_experts"):
        values["moe_intermediate_size"] = values["shared_expert_intermediate_size"] = config.get("intermediate_size")
        values["intermediate_size"] = config.get("intermediate_size_mlp", config.get("intermediate_size"))
        values["decoder_sparse_step"] = config.get("interleave_moe_layer_step", 1)
    values["attention_out_bias"] = bool(config.get("attention_bias", False))
    values["qk_rms_after_rope"] = bool(config.get("use_qk_norm", True))
    if config.get("attn_temperature_tuning", True):
        values["query_scale_beta"] = config.get("attn_scale", 0.1)
        values["query_scale_length"] = config.get("floor_scale", 8192)


def _query_scale(values: dict[str, Any], rope: Mapping[str, Any]) -> None:
    """Ministral 3 states Llama 4's query scaling in its RoPE parameters."""
    if isinstance(rope, Mapping) and rope.get("llama_4_scaling_beta") is not None:
        values["query_scale_beta"] = rope["llama_4_scaling_beta"]
        values["query_scale_length"] = rope.get("original_max_position_embeddings", 8192)


def _linear_layers(values: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Qwen3-Next / Qwen3.5: every ``full_attention_interval``-th layer is full attention, the rest
    linear (unless ``layer_types`` lists them); Qwen3.5 keeps its partial rotary in ``rope_parameters``."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and "partial_rotary_factor" in params and "partial_rotary_factor" not in config:
        values["partial_rotary_factor"] = params["partial_rotary_factor"]
    if "layer_types" not in config:
        interval = config.get("full_attention_interval", 4)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise UserError(f"{where}: full_attention_interval must be a positive integer, got {interval!r}")
        values["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                 for i in range(values.get("num_hidden_layers", 0))]


def _gemma3_layers(values: dict[str, Any], config: dict[str, Any]) -> None:
    """Gemma 3: every Nth layer is global, the rest use a sliding window with their own RoPE base."""
    values.setdefault("query_pre_attn_scalar", config.get("query_pre_attn_scalar", 256))
    values.setdefault("rope_local_base_freq", 10000.0)
    values.setdefault("sliding_window", 512)
    if "layer_types" not in config:
        pattern = config.get("sliding_window_pattern", 6)
        values["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(values.get("num_hidden_layers", 0))
        ]


def _gemma4(values: dict[str, Any], config: dict[str, Any]) -> None:
    """Gemma 4 as transformers reads it: five sliding layers to one full unless ``layer_types`` says
    (the last layer always full), the sliding layers' RoPE from ``rope_parameters`` and the full ones'
    "proportional" RoPE over their global head, routed experts named ``top_k_experts``; the attention
    scale is 1 and RoPE covers whole heads whatever else the config states."""
    values.setdefault("sliding_window", 512)
    if "layer_types" not in config:
        pattern = 6
        values["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                 for i in range(values.get("num_hidden_layers", 0))]
    if values.get("layer_types"):
        values["layer_types"] = values["layer_types"][:-1] + ["full_attention"]
    if "rope_parameters" not in config:
        values.update(rope_local_base_freq=10000.0, rope_theta=1e6, rope_scaling={
            "rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6})
    values["rope_local_base_freq"] = values.get("rope_local_base_freq") or 10000.0
    values.update(query_pre_attn_scalar=1.0, partial_rotary_factor=1.0)
    for key, default in (("global_head_dim", 512), ("hidden_size_per_layer_input", 256)):
        if key not in config:  # transformers' defaults (a null turns them off)
            values[key] = default
    if values["hidden_size_per_layer_input"]:
        values.setdefault("vocab_size_per_layer_input", 262144)
    if not values.get("attention_k_eq_v"):
        values["num_global_key_value_heads"] = None
    if config.get("top_k_experts") is not None:
        values["num_experts_per_tok"] = config["top_k_experts"]
    values["num_experts"] = (config.get("num_experts") or 0) if config.get("enable_moe_block") else 0


# --- validation ----------------------------------------------------------------------------------
# Every integer size a config may state, under our names and the aliases ``from_hf`` reads: (least,
# most). The caps are generous (DeepSeek-V3: 61 layers, 7168 wide, 256 experts, 129280 tokens; Llama 3.1
# 405B: 126 layers, 16384 wide, 53248 FFN; Gemma 3: 262208 tokens; Llama 4 Scout: a 10M-token context)
# and stop a hostile value from sizing anything before the weights are compared with it.
_SIZES = {
    "hidden_size": (1, 2**24), "intermediate_size": (1, 2**24), "num_hidden_layers": (1, 2**20),
    "num_attention_heads": (1, 2**16), "num_key_value_heads": (1, 2**16), "head_dim": (1, 2**16),
    "vocab_size": (1, 2**27), "max_position_embeddings": (1, 2**26), "sliding_window": (0, 2**26),
    "sliding_window_pattern": (1, 2**20), "num_experts": (0, 2**16), "num_local_experts": (0, 2**16),
    "n_routed_experts": (0, 2**16), "num_experts_per_tok": (0, 2**16), "experts_per_token": (0, 2**16), "n_shared_experts": (0, 2**16),
    "moe_intermediate_size": (0, 2**24), "shared_expert_intermediate_size": (0, 2**24), "n_group": (0, 2**16),
    "topk_group": (0, 2**16), "first_k_dense_replace": (0, 2**20), "decoder_sparse_step": (1, 2**20),
    "moe_layer_freq": (1, 2**20), "num_nextn_predict_layers": (0, 2**20), "kv_lora_rank": (0, 2**24),
    "q_lora_rank": (0, 2**24), "qk_nope_head_dim": (0, 2**16), "qk_rope_head_dim": (0, 2**16),
    "v_head_dim": (0, 2**16), "query_scale_length": (1, 2**26), "attention_chunk_size": (1, 2**26),
    "interleave_moe_layer_step": (1, 2**20), "intermediate_size_mlp": (1, 2**24), "query_scale_shift": (0, 1),
    "linear_num_key_heads": (0, 2**16), "linear_num_value_heads": (0, 2**16), "linear_key_head_dim": (0, 2**16),
    "linear_value_head_dim": (0, 2**16), "linear_conv_kernel_dim": (1, 2**10), "global_head_dim": (1, 2**16),
    "num_global_key_value_heads": (1, 2**16), "num_kv_shared_layers": (0, 2**20),
    "hidden_size_per_layer_input": (0, 2**16), "vocab_size_per_layer_input": (1, 2**27), "top_k_experts": (0, 2**16),
}  # fmt: skip
# Floats that must be finite and above a bound (a RoPE base of 1 or less has no wavelengths).
_ABOVE = {"rms_norm_eps": 0, "rope_theta": 1, "rope_local_base_freq": 1, "query_pre_attn_scalar": 0,
          "routed_scaling_factor": 0, "partial_rotary_factor": 0, "query_scale_beta": 0, "final_logit_softcapping": 0}  # fmt: skip
_BOOLS = {f.name for f in fields(ModelConfig) if f.type == "bool"}
# What MLX loads, per quantization mode: (group sizes, bits); ``quantize.MODES`` is what convert offers of it.
QUANT_MODES = {"affine": ((32, 64, 128), (1, 2, 3, 4, 5, 6, 8)), "mxfp4": ((32,), (4,)), "mxfp8": ((32,), (8,)),
          "nvfp4": ((16,), (4,))}  # fmt: skip
_HELD = {"num_hidden_layers": "layers", "vocab_size": "token embeddings", "hidden_size": "features per token"}
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor")  # fmt: skip

Fail = Callable[[str, str], NoReturn]


def _failure(where: str | None, names: Mapping[str, str] | None) -> Fail:
    def fail(key: str, problem: str) -> NoReturn:
        label = (names or {}).get(key, key)
        raise UserError(f"{where}: {label} {problem}" if where else f"{label} {problem}")

    return fail


def _whole(key: str, value: Any, least: int, most: int, fail: Fail, held: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(key, f"is {value!r}, not a whole number")
    if value < least:
        fail(key, f"is {value}, less than {least}")
    if held is not None and value != held:
        fail(key, f"is {value} but the weights hold {held} {_HELD[key]}")
    if value > most:
        fail(key, f"is {value}, more than {most:,} (no model is that large)")


def _number(key: str, value: Any, above: float, fail: Fail) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(key, f"is {value!r}, not a number")
    if not math.isfinite(value) or value <= above:
        fail(key, f"is {value}; it must be a finite number above {above}")


def check_config(values: Mapping[str, Any], where: str | None = None, names: Mapping[str, str] | None = None,
                 held: Mapping[str, int] | None = None) -> None:
    """Refuse, in one line naming ``where`` and the field (``names`` maps our names to the file's), any
    config value no model has, and sizes that disagree with ``held`` (what the weights hold)."""
    fail = _failure(where, names)
    stack = list(values.items())
    while stack:  # a non-finite float anywhere (iteratively: JSON may nest deeply)
        key, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, f"is {value}, not a finite number")
        if isinstance(value, Mapping):
            stack.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
    for key, value in values.items():
        if value is None:
            continue
        if key in _SIZES:
            _whole(key, value, *_SIZES[key], fail, (held or {}).get(key))
        elif key in _ABOVE:
            _number(key, value, _ABOVE[key], fail)
        elif key in _BOOLS and not isinstance(value, bool):
            fail(key, f"is {value!r}, not true or false")
        elif key in ("model_type", "activation", "router", "expert_stack_name", "router_name", "ffn_name",
                     "shared_expert_name") and (
                not isinstance(value, str)):
            fail(key, f"is {value!r}, not a name")
    layer_types, dense = values.get("layer_types"), values.get("mlp_only_layers")
    kinds = ("sliding_attention", "full_attention", "chunked_attention", "linear_attention")
    if layer_types is not None and not (isinstance(layer_types, list) and all(t in kinds for t in layer_types)):
        fail("layer_types", f"is not a list of {' / '.join(repr(k) for k in kinds)}")
    if dense is not None:
        if not isinstance(dense, list):
            fail("mlp_only_layers", f"is {dense!r}, not a list of layer numbers")
        for i, layer in enumerate(dense):
            _whole(f"mlp_only_layers[{i}]", layer, 0, 2**20, fail)
    if values.get("rope_scaling") is not None:
        _check_rope_scaling(values["rope_scaling"], fail)
    if values.get("quantization") is not None:
        check_quantization_block(values["quantization"], where, "quantization")


def _check_rope_scaling(scaling: Any, fail: Fail) -> None:
    if not isinstance(scaling, Mapping):
        fail("rope_scaling", f"is {scaling!r}, not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    for key in _ROPE_NUMBERS:
        if scaling.get(key) is not None:
            _number(f"rope_scaling.{key}", scaling[key], 0 if "factor" in key else -math.inf, fail)
    if scaling.get("factor") is None and (kind in ("linear", "llama3", "yarn") or scaling.get("mscale_all_dim")):
        fail("rope_scaling.factor", f"is missing (rope type {kind!r} needs it)")
    if kind in ("longrope", "su"):
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, list) or not factors:
                fail(f"rope_scaling.{key}", f"is {factors!r}, not a list of numbers ({kind} scaling needs it)")
            for i, value in enumerate(factors):
                _number(f"rope_scaling.{key}[{i}]", value, 0, fail)
    if kind == "llama3" and scaling.get("low_freq_factor", 1.0) == scaling.get("high_freq_factor", 4.0):
        fail("rope_scaling.high_freq_factor", "equals low_freq_factor (llama3 scaling ramps between them)")
    if scaling.get("original_max_position_embeddings") is not None:
        _whole("rope_scaling.original_max_position_embeddings", scaling["original_max_position_embeddings"],
               1, 2**26, fail)


def check_quantization_block(block: Any, where: str | None, key: str = "quantization") -> None:
    """An mlx-community quantization block: group size and bits MLX can load for its mode, at the top and
    in every per-module override."""
    fail = _failure(where, None)
    if not isinstance(block, Mapping):
        fail(key, f"is {block!r}, not an object")
    for label, params in [(key, block)] + [(f"{key}.{m}", p) for m, p in block.items() if isinstance(p, Mapping)]:
        mode = params.get("mode", block.get("mode", "affine"))
        if not isinstance(mode, str) or mode not in QUANT_MODES:
            fail(f"{label}.mode", f"is {mode!r} (supported: {', '.join(QUANT_MODES)})")
        for name, allowed in zip(("group_size", "bits"), QUANT_MODES[mode]):
            value = params.get(name, block.get(name))
            if isinstance(value, bool) or value not in allowed:
                fail(f"{label}.{name}", f"is {value!r}, not one of {', '.join(map(str, allowed))} ({mode} mode)")


def _held(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> dict[str, int]:
    """Layers, vocabulary and width the weights hold (a DeepSeek checkpoint's multi-token-prediction
    layers, numbered after the decoder's, not counted)."""
    ids = {layer_index(name) for name in shapes} - {None}
    layers = config.get("num_hidden_layers")
    if config.get("num_nextn_predict_layers") and isinstance(layers, int):
        ids = {i for i in ids if i < layers}
    held = {"num_hidden_layers": len(ids)}
    embed, norm = shapes.get("model.embed_tokens.weight"), shapes.get("model.norm.weight")
    if embed is not None and len(embed) == 2:
        held["vocab_size"] = embed[0]
    if norm is not None and len(norm) == 1:
        held["hidden_size"] = norm[0]
    return held


def check_weights(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str,
                  names: Mapping[str, str] | None = None) -> None:
    """Compare each size of ``cfg`` with the rows of a tensor that carries it (rows only: the packed
    columns of a quantized tensor say nothing), naming the field; run before anything is built."""
    def n(*keys: str) -> str:
        return " x ".join((names or {}).get(k, k) for k in keys)

    a, layers = "model.layers.0.self_attn.", range(cfg.num_hidden_layers)
    checks = [] if cfg.tie_word_embeddings else [(n("vocab_size"), cfg.vocab_size, "lm_head.weight", 0)]
    if cfg.kv_lora_rank:
        q_rows = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        checks += [(n("kv_lora_rank"), cfg.kv_lora_rank, a + "kv_a_layernorm.weight", 0),
                   (f"{n('kv_lora_rank')} + {n('qk_rope_head_dim')}", cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                    a + "kv_a_proj_with_mqa.weight", 0),
                   (n("q_lora_rank"), cfg.q_lora_rank, a + "q_a_proj.weight", 0),
                   (f"{n('num_attention_heads')} x ({n('qk_nope_head_dim')} + {n('qk_rope_head_dim')})", q_rows,
                    a + ("q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight"), 0)]
    else:
        head = cfg.layer_head_dim(0)
        if cfg.qk_norm and cfg.qk_norm_per_head:
            checks.append((n("head_dim"), head, a + "q_norm.weight", 0))
        kv = cfg.layer_kv_heads(0) * head
        q_rows = cfg.num_attention_heads * head
        checks += [(n("num_attention_heads", "head_dim"), q_rows, a + "q_proj.weight", 0),
                   (n("num_key_value_heads", "head_dim"), kv, a + "k_proj.weight", 0),
                   (n("num_key_value_heads", "head_dim"), kv, a + "v_proj.weight", 0)]
    dense = next((i for i in layers if not cfg.is_moe(i)), None)
    if dense is not None:
        checks.append((n("intermediate_size"), cfg.intermediate_size,
                       f"model.layers.{dense}.{cfg.ffn_name}.up_proj.weight", 0))
    moe = next((i for i in layers if cfg.is_moe(i)), None)
    if moe is not None:
        p = f"model.layers.{moe}.{cfg.ffn_name}."
        width = "moe_intermediate_size" if cfg.moe_intermediate_size else "intermediate_size"
        expert = cfg.moe_intermediate_size or cfg.intermediate_size
        checks += [(n("num_experts"), cfg.num_experts, p + "gate.weight", 0),
                   (n("num_experts"), cfg.num_experts, f"{p}{cfg.expert_stack_name}.up_proj.weight", 0),
                   (n(width), expert, f"{p}{cfg.expert_stack_name}.up_proj.weight", 1),
                   (n(width), expert, p + "experts.0.up_proj.weight", 0),
                   (n(width), expert, p + "experts.0.w3.weight", 0)]
        for shared in ("shared_expert", "shared_experts"):
            checks.append((n("shared_expert_intermediate_size"), cfg.shared_expert_intermediate_size,
                           f"{p}{shared}.up_proj.weight", 0))
    for label, expected, name, dim in checks:
        shape = shapes.get(name)
        if shape is not None and len(shape) > dim and shape[dim] != expected:
            raise UserError(f"{where}: {label} is {expected} but the weights hold {shape[dim]} "
                                f"(tensor '{name}' has shape {tuple(shape)})")
