"""How the KV cache is stored, as one value that travels from the CLI or the API to ``make_cache``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import UserError

if TYPE_CHECKING:
    from ..config import ModelConfig

FLOAT_PREFIX = 64  # positions a quantized cache keeps in float (attention sinks; see bench/kv_quality.py)


@dataclass(frozen=True)
class KVSettings:
    """The global attention layers' KV storage: float (``bits`` None), or MLX-quantized to ``bits`` per
    element in groups of ``group_size`` along the head dimension from position ``start`` on, the first
    ``float_prefix`` positions kept in float. Sliding-window layers keep their small float ring."""

    bits: int | None = None
    group_size: int = 64
    start: int = 0
    float_prefix: int = FLOAT_PREFIX

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def checked(self, cfg: "ModelConfig") -> "KVSettings":
        """``self`` once it is known to apply to this model's heads; otherwise one-line ``UserError``."""
        if self.start < 0:
            raise UserError(f"--quantized-kv-start must be >= 0, got {self.start}")
        if self.bits is None:
            if self.start:
                raise UserError("--quantized-kv-start needs --kv-bits")
            return self
        if cfg.kv_lora_rank:
            raise UserError("--kv-bits is not supported for latent-attention (DeepSeek) models: their cache is "
                            "already compressed")
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise UserError(f"--kv-bits takes 2, 3, 4, 5, 6 or 8, not {self.bits}")
        if self.group_size not in (32, 64, 128) or self.group_size > cfg.head_dim:
            raise UserError(f"--kv-group-size must be 32, 64 or 128 and at most the head size {cfg.head_dim}, "
                            f"got {self.group_size}")
        if self.float_prefix < 0:
            raise UserError(f"the float prefix must be >= 0, got {self.float_prefix}")
        return self
