"""How much prompt a batch step reads: the per-step token budget, a share of one decode step's
measured time for each request waiting for its first token, and chunks cut to whole row blocks."""

from __future__ import annotations


class StepPacing:
    """Moving averages of a decode step's time and of one prompt token's, and the prompt budget they
    give. ``prefill_share`` of 0 leaves only ``max_step_tokens`` (the way llama-server and vLLM
    schedule)."""

    MIN_CHUNK = 16  # prompt tokens a step reads at least, so a prompt always moves
    ROW_BLOCK = 16  # float32 GEMM (OpenBLAS here) runs a multiple of 16 rows up to 2x faster than others

    def __init__(self, max_step_tokens: int, prefill_share: float) -> None:
        self.max_step_tokens, self.prefill_share = max_step_tokens, prefill_share
        self.decode_s: float | None = None  # seconds a decode step takes (moving average)
        self.token_s: float | None = None  # seconds one prompt token takes

    def prompt_tokens(self, rows: int, waiting: int) -> int:
        """Prompt tokens a step with ``rows`` decoding rows may read: what ``max_step_tokens`` leaves
        after them, and while they run no more than ``prefill_share`` of a decode step's time for each
        of the ``waiting`` requests. Streams and waiting prompts are thus slowed alike: at the default
        0.8 one long prompt arriving aims to keep the streams under twice their usual inter-token
        latency (late in a long prompt even ``MIN_CHUNK`` tokens can cost more, their attention reading
        the whole prompt), and a queue of prompts gets a share that grows with it. The chunk is cut so
        rows + chunk fill whole ``ROW_BLOCK``s when that leaves ``MIN_CHUNK``."""
        budget = self.max_step_tokens - rows
        if rows and self.prefill_share and self.decode_s and self.token_s:
            budget = min(budget, int(self.prefill_share * max(1, waiting) * self.decode_s / self.token_s))
        aligned = (rows + budget) // self.ROW_BLOCK * self.ROW_BLOCK - rows
        return aligned if aligned >= self.MIN_CHUNK else max(budget, self.MIN_CHUNK)

    def record(self, seconds: float, decoding: bool, fed: int) -> None:
        """Fold one step's time into the averages (``fed``: prompt tokens it read)."""
        def mix(old: float | None, new: float) -> float:
            return new if old is None else 0.7 * old + 0.3 * new

        if decoding and not fed:
            self.decode_s = mix(self.decode_s, seconds)
        elif fed:
            spent = seconds - ((self.decode_s or 0.0) if decoding else 0.0)
            if spent > 0:
                self.token_s = mix(self.token_s, spent / fed)
