"""``mlxllm perplexity``: how well a model predicts a text, to measure what quantization costs.

Windows of ``seq_len`` tokens advance by ``stride`` (default: ``seq_len``, non-overlapping); each
window scores only the tokens the previous one did not, each predicted from the context inside its
window (the usual strided evaluation; with overlap every token after the first is scored). The standard error is that of
the mean negative log-likelihood over scored tokens, carried to perplexity by the delta method.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.cache import KVSettings


def default_text() -> str:
    """Python's own documentation topics (``pydoc_data.topics``, ~465 KB of English prose and code),
    present in every Python install, so the default needs no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def check_window(seq_len: int, stride: int | None) -> int:
    """The stride to use; bad window settings are one clear error."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise UserError(f"--stride must be in 1..{seq_len} (the window), got {stride}")
    return stride


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window. No position is scored twice; with overlap
    (stride < seq_len) every position 1..n-1 is scored, without it each window's first token is not
    (it has no context inside its window)."""
    out, scored_to = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + seq_len, n_tokens)
        if end - begin < 2 or end <= scored_to:
            break
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
    return out


def token_nll(model: Any, tokens: list[int], seq_len: int = 512, stride: int | None = None, batch: int = 4,
              on_window: Callable[[], None] | None = None, kv: KVSettings | None = None,
              chunk: int = 512) -> np.ndarray:
    """Negative log-likelihood (nats) of each scored token. With a quantized ``kv`` each window goes
    through a quantized KV cache in
    chunks of ``chunk`` tokens, as generation would, so the score includes the cache's rounding."""
    stride = check_window(seq_len, stride)
    spans = windows(len(tokens), seq_len, stride)
    if not spans:
        raise UserError(f"the text has {len(tokens)} tokens; at least 2 are needed")
    ids = np.asarray(tokens, dtype=np.int32)
    parts = []
    for i in range(0, len(spans), batch):
        group = spans[i : i + batch]
        width = max(end - begin for begin, end, _ in group)
        x = np.zeros((len(group), width), np.int32)
        for row, (begin, end, _) in enumerate(group):
            x[row, : end - begin] = ids[begin:end]
        if kv is not None and kv.quantized:
            cache = model.make_cache(kv)
            logits = mx.concatenate([model(mx.array(x[:, s : s + chunk]), cache=cache).astype(mx.float32)
                                     for s in range(0, width, chunk)], axis=1)
        else:
            logits = model(mx.array(x)).astype(mx.float32)
        nll = mx.logsumexp(logits[:, :-1], axis=-1) - mx.take_along_axis(
            logits[:, :-1], mx.array(x[:, 1:])[..., None], axis=-1)[..., 0]
        nll = np.array(nll)
        for row, (begin, end, first) in enumerate(group):
            parts.append(nll[row, first - begin - 1 : end - begin - 1])
            if on_window:
                on_window()
    return np.concatenate(parts)


def summarize(nll: np.ndarray) -> dict[str, Any]:
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_stderr": ppl * se, "nll": mean, "nll_stderr": se, "tokens": len(nll)}
