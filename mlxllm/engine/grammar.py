"""Constrained decoding: JSON schemas, JSON objects, regular expressions and context-free grammars
(Lark or llama.cpp's GBNF), compiled by llguidance against the model's own tokenizer, and the token
masks that keep each sequence's sampling inside its grammar.

The grammar engine sees every id as the bytes it decodes to (``Tokenizer.piece_bytes``), so byte-level
BPE and SentencePiece vocabularies are alike to it; control tokens (BOS, EOS, turn markers) are
marked special, which keeps them out of constrained text (an end-of-sequence id is allowed only where
the grammar may end). JSON is compact by default (``", "`` and ``": "`` separators, no free
whitespace): a small model given free whitespace can emit newlines until its token limit. A schema's
own ``"x-guidance"`` options override that.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import UserError

KINDS = ("json_schema", "json_object", "regex", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(UserError):
    """A grammar, schema or pattern that is malformed or that no text can satisfy."""


@dataclass(frozen=True)
class Grammar:
    """What generated text must match: ``kind`` (one of ``KINDS``) and its source text (a JSON schema
    as JSON text, a regular expression, or a Lark / GBNF grammar; empty for ``json_object``)."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """Text that is JSON valid under ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("a JSON schema must be a JSON object")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def cfg(cls, text: str) -> Grammar:
        """A context-free grammar in Lark syntax or llama.cpp's GBNF (told apart by their syntax)."""
        return cls("grammar", text)

    def definition(self) -> str:
        """The llguidance grammar this compiles to (not yet checked against a tokenizer)."""
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        try:
            if self.kind in ("json_schema", "json_object"):
                schema = self.source if self.kind == "json_schema" else '{"type": "object"}'
                definition = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            else:
                definition = llguidance.grammar_from("regex" if self.kind == "regex" else "grammar", self.source)
        except ValueError as e:
            raise GrammarError(f"the {self.what} cannot be compiled: {one_line(str(e))}") from None
        error = llguidance.LLMatcher.validate_grammar(definition)
        if error:
            raise GrammarError(f"the {self.what} is not usable: {one_line(error)}")
        return definition

    @property
    def what(self) -> str:
        return self.kind.replace("_", " ").replace("json", "JSON").replace("regex", "regular expression")


def one_line(message: str) -> str:
    """llguidance's multi-line error as one line (the source excerpt and its caret markers dropped)."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("^") and "|" not in line[:6])


class _TokenizerView:
    """What llguidance reads from a tokenizer: each id's bytes, the special ids, and an encoder."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokens = tokenizer.piece_bytes
        self.special_token_ids = sorted(tokenizer.control_token_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = tokenizer.encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace"), add_special_tokens=False, split_special_tokens=True)


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compiled_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer``, built once per tokenizer (any thread)."""
    with _compiled_lock:
        found = _compiled.get(tokenizer)
        if found is None:
            eos = sorted(tokenizer.eos_token_ids)
            if not eos:
                raise GrammarError("constrained decoding needs a tokenizer with an end-of-sequence token")
            try:
                found = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)), eos_token=eos)
            except (ValueError, RuntimeError) as e:  # a vocabulary the grammar engine cannot index
                raise GrammarError(f"constrained decoding cannot use this tokenizer: {one_line(str(e))}") from None
            _compiled[tokenizer] = found
        return found


class Constraint:
    """One sequence's place in its grammar: which ids may come next, and the ids it has taken."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int | None = None) -> None:
        tok = grammar_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(tok, grammar.definition(), log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the {grammar.what} is not usable: {one_line(self._matcher.get_error())}")
        self.vocab_size = vocab_size or tok.vocab_size  # the model's logits may be wider than the vocabulary
        self._bits = np.full((tok.vocab_size + 31) // 32, -1, dtype=np.int32)
        self.allowed()  # a grammar no text satisfies allows nothing: refuse it now, not mid-generation

    @property
    def complete(self) -> bool:
        """The grammar is matched and can take nothing more."""
        return self._matcher.is_stopped()

    def consume(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} was sampled outside the grammar: {self._matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """A boolean ``[vocab_size]`` array of the ids that may come next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise GrammarError(f"the grammar cannot continue: {one_line(self._matcher.get_error())}")
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").astype(bool)
        out = np.zeros(self.vocab_size, dtype=bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = bits[:n]
        if not out.any():
            raise GrammarError("no text satisfies the grammar (it allows no token here)")
        return out

    def apply(self, logits: mx.array) -> mx.array:
        """``logits [1, V]`` with every id the grammar does not allow next set to -inf."""
        return masked(logits, self.allowed())


def masked(logits: mx.array, allowed: np.ndarray) -> mx.array:
    """``logits`` with the ids ``allowed`` (boolean, broadcasting against them) leaves at -inf elsewhere."""
    return mx.where(mx.array(allowed), logits, -mx.inf)
