"""Checks on tokenizer files before anything is built from them.

Tokenizer files come with downloaded models, so they are untrusted input: a malformed file must end as
one `UserError` naming the file, never as a traceback, a hang, or a table sized by a bogus id. Every
reader here checks the data once, before tiktoken, sentencepiece or any list sized by a token id sees it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError

# Larger than any real tokenizer file (Gemma 3's tokenizer.json, among the largest, is 33 MB), small
# enough that parsing one cannot exhaust memory.
MAX_FILE_BYTES = 256 * 2**20
# Special tokens are matched whole by one trie regex whose nesting grows with their length; real ones
# are a few dozen characters at most.
MAX_SPECIAL_CHARS = 256


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file that cannot be used (also a ValueError, as these errors were before)."""


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TokenizerFileError(f"{path.name}: {size} bytes is too large for a tokenizer file")
        return path.read_bytes()
    except OSError as err:
        raise TokenizerFileError(f"{path.name}: cannot read it ({err.strerror or err})") from None


def read_text(path: Path) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerFileError(f"{path.name}: not UTF-8 text (invalid byte at offset {err.start})") from None


class JSONFile:
    """A parsed JSON object file; remembers which objects had a key twice (JSON keeps the last one)."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self._twice: dict[int, tuple[dict, str]] = {}
        if not path.is_file():
            self.data: dict[str, Any] = {}
            return
        text = read_text(path)
        try:
            data = json.loads(text, object_pairs_hook=self._object)
        except RecursionError:
            raise TokenizerFileError(f"{self.name}: not valid JSON (nested too deeply)") from None
        except json.JSONDecodeError as err:
            raise TokenizerFileError(
                f"{self.name}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
            ) from None
        except ValueError as err:  # e.g. an integer with more digits than Python converts
            raise TokenizerFileError(f"{self.name}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise TokenizerFileError(f"{self.name}: expected a JSON object, found {type(data).__name__}")
        self.data = data

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self._twice[id(obj)] = (obj, key)
                    break
                seen.add(key)
        return obj

    def repeated_key(self, obj: dict) -> str | None:
        """A key written twice in `obj` (an object of this file), if any."""
        entry = self._twice.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def fail(self, message: str) -> TokenizerFileError:
        return TokenizerFileError(f"{self.name}: {message}")


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def id_limit(n_tokens: int) -> int:
    """Largest id + 1 a vocabulary of `n_tokens` tokens may use. Some real vocabularies leave a few ids
    unused, so holes are allowed, but not a table (sized by the largest id) mostly made of them."""
    return 2 * n_tokens + 1024


def check_ids(source: str, what: str, ids: Mapping[str, Any], n_tokens: int) -> None:
    """Every value of `ids` (token text -> id) is an int in [0, id_limit(n_tokens))."""
    limit = id_limit(n_tokens)
    for text, tid in ids.items():
        if not isinstance(text, str):
            raise TokenizerFileError(f"{source}: {what} {text!r} is not a string")
        check_unicode(source, f"{what} {_shown(text)}", text)
        if not is_id(tid) or not 0 <= tid < limit:
            raise TokenizerFileError(
                f"{source}: {what} {_shown(text)} has id {tid!r}; the vocabulary has {n_tokens} tokens"
            )


def check_unicode(source: str, what: str, text: str) -> None:
    """JSON can spell lone surrogates (``"\\ud800"``), which no UTF-8 encoder accepts."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerFileError(f"{source}: {what} is not valid Unicode (a lone surrogate)") from None


def check_one_text_per_id(source: str, what: str, ids: Mapping[str, int], others: Mapping[int, str]) -> None:
    """No id of `ids` (text -> id) belongs to two texts, here or in `others` (id -> text)."""
    seen = dict(others)
    for text, tid in ids.items():
        first = seen.setdefault(tid, text)
        if first != text:
            raise TokenizerFileError(f"{source}: id {tid} is both {_shown(first)} and {_shown(text)} ({what})")


def check_one_id_per_text(source: str, what: str, texts: Iterable[str]) -> None:
    """No text of `texts` (in id order) stands at two ids."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if j != i:
            raise TokenizerFileError(f"{source}: {what} {text!r:.60} has two ids, {j} and {i}")


def check_special_lengths(source: str, texts: Iterable[str]) -> None:
    for text in texts:
        if len(text) > MAX_SPECIAL_CHARS:
            raise TokenizerFileError(
                f"{source}: special token {_shown(text)} is {len(text)} characters long"
                f" (at most {MAX_SPECIAL_CHARS})"
            )


def check_token_id(source: str, what: str, tid: Any, n_tokens: int) -> int:
    """A single id that names an existing token: an int in [0, n_tokens)."""
    if not is_id(tid) or not 0 <= tid < n_tokens:
        raise TokenizerFileError(f"{source}: {what} is {tid!r}; the vocabulary has {n_tokens} tokens")
    return tid


_NOT_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def building(source: str, what: str = "building the tokenizer") -> Iterator[None]:
    """Turn whatever building a tokenizer from `source`'s data raises into one error naming the file,
    including the BaseException a Rust panic in tiktoken is (pyo3_runtime.PanicException)."""
    try:
        yield
    except UserError:
        raise
    except BaseException as err:
        if isinstance(err, _NOT_CAUGHT):
            raise
        if type(err) is ValueError:  # the readers' own messages ("unsupported pre-tokenizer ...")
            raise TokenizerFileError(f"{source}: {err}") from None
        lines = str(err).strip().splitlines()
        detail = f": {lines[0][:200]}" if lines else ""
        raise TokenizerFileError(f"{source}: {what} failed ({type(err).__name__}{detail})") from err
