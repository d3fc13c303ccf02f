"""The tokenizer metadata of a GGUF file, as plain Python values, checked before use.

A tokenizer needs the ``tokenizer.*`` keys (vocabulary, scores, token types, merges, special ids, chat
template) and ``general.architecture``. The header is parsed by ``mlxllm.gguf_file``, the same reader
the weight loader uses, so ``mlxllm.load`` can hand over the file it already parsed instead of
reading the header a second time; only the arrays picked here are decoded.
"""

from __future__ import annotations

import os
from typing import Any

from ..gguf_file import GGUFFile, read_gguf
from .checks import TokenizerFileError, check_one_id_per_text, check_special_lengths, check_token_id

# Special ids a tokenizer uses; each must name one of the file's tokens.
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id",
                   "unknown_token_id")  # fmt: skip
_MATCHED_WHOLE = (2, 3, 4)  # unknown, control, user-defined: cut out of the text whole


class TokenizerMetadata(dict):
    """The metadata dict, remembering the file it came from (`source`, for error messages)."""

    source: str = "the GGUF tokenizer metadata"


def _wanted(key: str) -> bool:
    return key.startswith("tokenizer.") or key == "general.architecture"


def read_gguf_tokenizer_metadata(path_or_parsed: str | os.PathLike[str] | GGUFFile) -> dict[str, Any]:
    """Return `tokenizer.*` keys (and `general.architecture`) of a GGUF file as plain Python values.

    `path_or_parsed` is a path or an already parsed `GGUFFile`. Strings stay `str`, integers `int`,
    floats `float`, booleans `bool`, and arrays become lists. A malformed file raises `UserError`.
    """
    parsed = path_or_parsed if isinstance(path_or_parsed, GGUFFile) else read_gguf(path_or_parsed)
    meta = parsed.metadata
    out = TokenizerMetadata({key: meta[key] for key in meta if _wanted(key)})
    out.source = parsed.path.name
    return out


def check_tokenizer_metadata(meta: dict[str, Any]) -> str:
    """Check what a tokenizer is built from: the vocabulary, its token types and scores, merges and
    special ids. Returns the name errors use; raises `TokenizerFileError` naming it."""
    source = getattr(meta, "source", TokenizerMetadata.source)

    def fail(message: str) -> TokenizerFileError:
        return TokenizerFileError(f"{source}: {message}")

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise fail("tokenizer.ggml.tokens must be a non-empty array of strings")
    n = len(tokens)
    for key, kinds in (("token_type", (int,)), ("scores", (int, float))):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, kinds) for v in values):
            raise fail(f"tokenizer.ggml.{key} must be an array of {n} numbers, one per token")
    if meta.get("tokenizer.ggml.model") in ("gpt2", "gemma4"):
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise fail("tokenizer.ggml.merges must be an array of strings")
    check_one_id_per_text(source, "token", tokens)
    for key in SPECIAL_ID_KEYS:
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None:
            check_token_id(source, f"tokenizer.ggml.{key}", tid, n)
    types = meta.get("tokenizer.ggml.token_type") or []
    check_special_lengths(source, [t for t, k in zip(tokens, types) if k in _MATCHED_WHOLE])
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise fail("tokenizer.chat_template must be a string")
    return source
