"""Find special tokens written literally in text, before the model's own tokenizer sees it.

Two matching rules exist in the references and differ only when two special tokens overlap in
the text (say "ab" and "bc" in "abc"):

- Hugging Face `tokenizers` takes the leftmost, then longest, match (Aho-Corasick).
- llama.cpp takes the tokens one at a time, longest first, and cuts every occurrence of each out
  of the still-unmatched text (`tokenizer_st_partition`); its order among tokens of equal length
  is unspecified, here it is by id.

Both are done with one compiled trie regex, so that vocabularies with thousands of special tokens
(Gemma has 6414) cost a single C-speed scan of the text rather than one scan per token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


def _trie_regex(words: list[str]) -> str:
    """A regex matching exactly `words`, longest first at any start position."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a word ends here: the longer continuation is optional (and tried first)
            return body + "?" if len(branches) == 1 and len(branches[0]) == 1 else f"(?:{body})?"
        return body

    return emit(trie)


class SpecialSplitter:
    """Splits text into raw fragments (str) and special token ids (int)."""

    def __init__(self, tokens: Mapping[str, int], longest_first: bool) -> None:
        self._ids = {text: tid for text, tid in tokens.items() if text}
        self._longest_first = longest_first
        if self._ids:
            trie = _trie_regex(list(self._ids))
            # Leftmost-longest: split with a capture group. Longest-first needs every token that
            # occurs anywhere, overlaps included, so it scans with a lookahead at each position.
            self._pattern = re.compile(f"(?=({trie}))" if longest_first else f"({trie})")

    def split(self, text: str) -> list[str | int]:
        if not self._ids or not text:
            return [text] if text else []
        if self._longest_first:
            return self._split_longest_first(text)
        parts = self._pattern.split(text)
        out: list[str | int] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._ids[part])
            elif part:
                out.append(part)
        return out

    def _split_longest_first(self, text: str) -> list[str | int]:
        ids = self._ids
        found: set[str] = set()
        for m in self._pattern.finditer(text):
            longest = m.group(1)
            if longest not in found:
                # Shorter special tokens starting at the same place are prefixes of the longest.
                found.update(longest[:k] for k in range(1, len(longest) + 1) if longest[:k] in ids)
        if not found:
            return [text]
        pieces: list[str | int] = [text]
        for token in sorted(found, key=lambda t: (-len(t), ids[t])):
            tid = ids[token]
            nxt: list[str | int] = []
            for piece in pieces:
                if isinstance(piece, int) or token not in piece:
                    nxt.append(piece)
                    continue
                for j, part in enumerate(piece.split(token)):
                    if j:
                        nxt.append(tid)
                    if part:
                        nxt.append(part)
            pieces = nxt
        return pieces
