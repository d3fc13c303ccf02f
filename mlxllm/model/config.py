"""One config for every supported decoder family.

Each family is a set of switches on the same decoder (see ``decoder.py``); ``from_hf`` reads a
Hugging Face ``config.json`` and ``mlxllm.formats.gguf`` builds the same object from GGUF metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UserError

# model_type -> family switches that differ from the Llama defaults.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
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
}
# Names under which the same families appear elsewhere (HF multimodal wrappers, GGUF).
ALIASES = {"gemma3": "gemma3_text", "smollm2": "llama", "smollm": "llama", "qwen2moe": "qwen2_moe",
           "qwen3moe": "qwen3_moe"}


class UnsupportedArchitecture(UserError):
    def __init__(self, name: str):
        supported = ", ".join(sorted(FAMILIES))
        super().__init__(f"unsupported architecture '{name}' (supported: {supported})")


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name (``model.layers.N. ...``) belongs to, or None."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() else None


def family_of(name: str) -> str:
    """Map a model_type / GGUF architecture name to a supported family, or raise a clear error."""
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
    qk_norm_per_head: bool = True  # False: one norm over all heads' projections (OLMoE)
    # Mixture of experts: a layer is MoE when num_experts > 0, it is not in mlp_only_layers, and
    # (layer + 1) is a multiple of decoder_sparse_step.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # expert width (default: intermediate_size)
    shared_expert_intermediate_size: int | None = None  # an always-on, sigmoid-gated shared expert
    norm_topk_prob: bool = False
    router: str = "softmax_topk"  # or "topk_softmax" (Mixtral), "sigmoid_group" (DeepSeek-V3 style)
    n_group: int = 1  # experts fall in n_group groups; only the topk_group best groups are eligible
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    expert_stack_name: str = "switch_mlp"  # parameter name of the stacked experts
    shared_expert_gate: bool = True  # the shared expert's output is sigmoid-gated (Qwen2-MoE) or not
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
    # mlx-community quantization block ({"group_size", "bits", per-layer overrides}).
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.model_type = family_of(self.model_type)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"config lists {len(self.layer_types)} layer types for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.activation not in ("silu", "gelu_tanh"):
            raise UserError(f"unsupported activation '{self.activation}'")
        if self.router not in ("softmax_topk", "topk_softmax", "sigmoid_group"):
            raise UserError(f"unsupported MoE router '{self.router}'")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")
        if self.num_experts and self.n_group > 1 and (self.num_experts % self.n_group
                                                      or not 0 < self.topk_group <= self.n_group):
            raise UserError(f"{self.num_experts} experts cannot form {self.n_group} groups with {self.topk_group} chosen")
        if self.kv_lora_rank and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise UserError("latent attention needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_cache_width(self) -> tuple[int, int]:
        """(heads, features) cached per token and layer for keys plus values."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_key_value_heads, 2 * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def is_moe(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face / mlx-community ``config.json`` dictionary."""
        config = dict(config)
        if "text_config" in config:  # multimodal wrappers (e.g. Gemma3ForConditionalGeneration)
            text = dict(config["text_config"])
            text.setdefault("model_type", config.get("model_type"))
            for key in ("quantization", "tie_word_embeddings"):
                if key in config:
                    text.setdefault(key, config[key])
            config = text
        model_type = config.get("model_type")
        if model_type is None:
            raise UserError("config.json has no model_type")
        family = family_of(model_type)
        values: dict[str, Any] = dict(FAMILIES[family])
        names = {f.name for f in fields(cls)}
        values.update({k: v for k, v in config.items() if k in names and v is not None})
        values["model_type"] = family
        values["extra"] = {k: v for k, v in config.items() if k not in names}
        for name in ("num_local_experts", "n_routed_experts"):  # Mixtral's and DeepSeek's names
            if name in config:
                values["num_experts"] = config[name]
        if config.get("n_shared_experts"):  # DeepSeek style: n experts' width, always on
            values["shared_expert_intermediate_size"] = config["n_shared_experts"] * config["moe_intermediate_size"]
        if config.get("first_k_dense_replace"):
            values["mlp_only_layers"] = list(range(config["first_k_dense_replace"]))
        if family.startswith("deepseek"):
            _deepseek_routing(values, config)
        if "rope_parameters" in config and "rope_theta" not in config:  # transformers >= 5 layout
            params = config["rope_parameters"]
            if "full_attention" in params:
                values["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
                params = params["full_attention"]
            values["rope_theta"] = params.get("rope_theta", values.get("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                values["rope_scaling"] = params
        if family == "gemma3_text":
            _gemma3_layers(values, config)
        elif config.get("sliding_window") and family in ("mistral", "mixtral"):
            values["layer_types"] = ["sliding_attention"] * values["num_hidden_layers"]
        elif family in ("qwen2", "qwen2_moe") and not config.get("use_sliding_window"):
            values["sliding_window"] = None
        elif family in ("llama", "qwen3", "qwen3_moe", "olmoe", "dots1", "deepseek_v2", "deepseek_v3"):
            values.pop("sliding_window", None)
        try:
            return cls(**values)
        except TypeError as e:
            raise UserError(f"config.json is missing a field: {e}") from None


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


def _gemma3_layers(values: dict[str, Any], config: dict[str, Any]) -> None:
    """Gemma 3: every Nth layer is global, the rest use a sliding window with their own RoPE base."""
    values.setdefault("query_pre_attn_scalar", config.get("query_pre_attn_scalar", 256))
    values.setdefault("rope_local_base_freq", 10000.0)
    values.setdefault("sliding_window", 512)
    if "layer_types" not in config:
        pattern = config.get("sliding_window_pattern", 6)
        values["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(values["num_hidden_layers"])
        ]
