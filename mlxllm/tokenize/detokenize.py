"""Streaming detokenization: text out as tokens arrive, never a broken character.

Every token decodes to a fixed byte string (byte-level BPE tokens, SentencePiece pieces with '▁' as
a space, `<0xNN>` byte-fallback pieces), so the text of a token stream is the UTF-8 decoding of
their concatenation. An incremental UTF-8 decoder holds back the bytes of a character that is not
complete yet, which a multi-byte character split over byte-fallback tokens needs. The one
context-dependent rule, SentencePiece dropping the dummy-prefix space of the first piece, is
applied the same way as in `Tokenizer.decode`.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StreamingDetokenizer:
    """Turns token ids into text incrementally; `add_token` returns only newly completed text."""

    def __init__(self, piece_bytes: Sequence[bytes], strip_first_space: bool) -> None:
        self._pieces = piece_bytes
        self._strip_first_space = strip_first_space
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._segments: list[str] = []
        self.last_segment = ""

    def add_token(self, token: int) -> str:
        """Feed one id; return the text it completes (possibly empty). An id past the vocabulary (a
        model's embedding table padded beyond its tokenizer, as Qwen's is) has no text."""
        data = self._pieces[token] if 0 <= token < len(self._pieces) else b""
        if self._first:
            self._first = False
            if self._strip_first_space and data.startswith(b" "):
                data = data[1:]
        self.last_segment = self._decoder.decode(data)
        self._segments.append(self.last_segment)
        return self.last_segment

    def finalize(self) -> str:
        """End the stream; bytes of an unfinished character come out as U+FFFD."""
        self.last_segment = self._decoder.decode(b"", final=True)
        self._segments.append(self.last_segment)
        return self.last_segment

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._segments)
