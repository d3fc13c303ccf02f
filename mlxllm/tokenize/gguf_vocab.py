"""The tokenizer metadata of a GGUF file, as plain Python values.

A tokenizer needs the ``tokenizer.*`` keys (vocabulary, scores, token types, merges, special ids, chat
template) and ``general.architecture``. The header is parsed by ``mlxllm.gguf_file``, the same reader
the weight loader uses, so ``mlxllm.load`` can hand over the file it already parsed instead of
reading the header a second time; only the arrays picked here are decoded.
"""

from __future__ import annotations

import os
from typing import Any

from ..gguf_file import GGUFFile, read_gguf


def _wanted(key: str) -> bool:
    return key.startswith("tokenizer.") or key == "general.architecture"


def read_gguf_tokenizer_metadata(path_or_parsed: str | os.PathLike[str] | GGUFFile) -> dict[str, Any]:
    """Return `tokenizer.*` keys (and `general.architecture`) of a GGUF file as plain Python values.

    `path_or_parsed` is a path or an already parsed `GGUFFile`. Strings stay `str`, integers `int`,
    floats `float`, booleans `bool`, and arrays become lists. A malformed file raises `UserError`.
    """
    parsed = path_or_parsed if isinstance(path_or_parsed, GGUFFile) else read_gguf(path_or_parsed)
    meta = parsed.metadata
    return {key: meta[key] for key in meta if _wanted(key)}
