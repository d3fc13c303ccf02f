"""Reading the tokenizer files of a Hugging Face model directory, checked before anything is built.

Every file is parsed once; anything malformed (not UTF-8, not JSON, the wrong shape, an id that is
negative, beyond the vocabulary or given to two tokens) raises `TokenizerFileError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (JSONFile, TokenizerFileError, check_ids, check_one_text_per_id, check_special_lengths,
                     check_token_id, check_unicode, id_limit, is_id, read_bytes, read_text)


@dataclass
class ByteLevelBPEModel:
    """The parts of a byte-level BPE tokenizer.json the encoder needs."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    ignore_merges: bool
    pre_tokenizer: dict | None
    normalizer: dict | None


def _is_byte_level(tok: dict[str, Any]) -> bool:
    def mentions(spec: Any) -> bool:
        if not isinstance(spec, dict):
            return False
        parts = spec.get("pretokenizers") or spec.get("decoders") or []
        return spec.get("type") == "ByteLevel" or (isinstance(parts, list) and any(mentions(p) for p in parts))

    model = tok.get("model")
    return isinstance(model, dict) and model.get("type") == "BPE" and (
        mentions(tok.get("decoder")) or mentions(tok.get("pre_tokenizer"))
    )


def _token_content(value: Any) -> str | None:
    """Special tokens are written either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _merges(file: JSONFile, merges: Any) -> list[tuple[str, str]]:
    if not isinstance(merges, list):
        raise file.fail('"model.merges" must be a list')
    out = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise file.fail(f"merge {i} ({m!r:.60}) is not a pair of tokens")
        out.append(pair)
    return out


def _bpe_model(file: JSONFile) -> ByteLevelBPEModel:
    tok, model = file.data, file.data["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise file.fail('"model.vocab" must be a non-empty object of token -> id')
    check_ids(file.name, "token", vocab, len(vocab))
    repeated = file.repeated_key(vocab)
    if repeated is not None:
        raise file.fail(f"token {repeated!r:.60} is in the vocabulary twice")
    check_one_text_per_id(file.name, "in the vocabulary", vocab, {})
    for key in ("pre_tokenizer", "normalizer"):
        if tok.get(key) is not None and not isinstance(tok.get(key), dict):
            raise file.fail(f'"{key}" must be an object')
    return ByteLevelBPEModel(
        vocab=vocab,
        merges=_merges(file, model.get("merges", [])),
        ignore_merges=bool(model.get("ignore_merges", False)),
        pre_tokenizer=tok.get("pre_tokenizer"),
        normalizer=tok.get("normalizer"),
    )


class HFTokenizerFiles:
    """Everything tokenizer-related in one model directory, parsed and checked once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"no model directory at {os.fspath(path)!r}")
        tok_file = JSONFile(root / "tokenizer.json")
        tok = tok_file.data
        self._tok_file = tok_file
        self._config_file = JSONFile(root / "tokenizer_config.json")
        self.config = self._config_file.data
        self.special_map = JSONFile(root / "special_tokens_map.json").data
        self._generation_file = JSONFile(root / "generation_config.json")
        self.generation_config = self._generation_file.data
        self._model_file = JSONFile(root / "config.json")
        self.model_config = self._model_file.data
        self._post_processor = tok.get("post_processor")

        self.byte_level_bpe: ByteLevelBPEModel | None = None
        self.sentencepiece: bytes | None = None
        if "model" in tok and not isinstance(tok["model"], dict):
            raise tok_file.fail('"model" must be an object')
        if _is_byte_level(tok):
            self.byte_level_bpe = _bpe_model(tok_file)
        elif (root / "tokenizer.model").is_file():
            self.sentencepiece = read_bytes(root / "tokenizer.model")

        self._added = self._added_entries()
        self.added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        self.chat_template, self.chat_template_file = self._chat_template(root)

    def _added_entries(self) -> list[tuple[str, str, int, bool]]:
        """(file, content, id, special) of every added token, in tokenizer.json and tokenizer_config.json."""
        out = []
        listed = self._tok_file.data.get("added_tokens", [])
        if not isinstance(listed, list):
            raise self._tok_file.fail('"added_tokens" must be a list')
        for i, t in enumerate(listed):
            if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not is_id(t.get("id")):
                raise self._tok_file.fail(f'added token {i} needs a string "content" and an integer "id"')
            out.append((self._tok_file.name, t["content"], t["id"], bool(t.get("special"))))
        decoder = self.config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise self._config_file.fail('"added_tokens_decoder" must be an object of id -> token')
        for key, t in decoder.items():
            try:
                tid = int(key)
            except ValueError:
                raise self._config_file.fail(f"added token id {key!r:.40} is not an integer") from None
            if not isinstance(t, dict) or not isinstance(t.get("content"), str):
                raise self._config_file.fail(f'added token {key} needs a string "content"')
            out.append((self._config_file.name, t["content"], tid, bool(t.get("special"))))
        return out

    def resolve_added(self, vocab: Mapping[str, int]) -> dict[str, int]:
        """Check the added tokens against the model's `vocab` (text -> id) and return them (text -> id).

        Ids must be in range (see `checks.id_limit`); a text may not have two ids, and an id may not
        be two texts (tiktoken panics on such vocabularies, sentencepiece refuses them)."""
        n_tokens = len(set(vocab) | {content for _, content, _, _ in self._added})
        by_id = {tid: text for text, tid in vocab.items()}
        for source, content, tid, special in self._added:
            check_ids(source, "added token", {content: tid}, n_tokens)
            known = vocab.get(content, self.added.get(content))
            if known is not None and known != tid:
                raise TokenizerFileError(f"{source}: added token {content!r:.60} has id {tid}, but also id {known}")
            check_one_text_per_id(source, "an added token", {content: tid}, by_id)
            by_id[tid] = content
            self.added[content] = tid
            if special:
                self.special_ids.add(tid)
        check_special_lengths(self._tok_file.name, self.added)
        return self.added

    def _chat_template(self, root: Path) -> tuple[str | None, str]:
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            return read_text(jinja_file), jinja_file.name
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise self._config_file.fail('"chat_template" must be a string or a list of {"name", "template"}')
            named = {t.get("name"): t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is not None and not isinstance(template, str):
            raise self._config_file.fail('"chat_template" must be a string or a list of {"name", "template"}')
        if template is not None:
            check_unicode(self._config_file.name, "the chat template", template)
        return template, self._config_file.name

    def special_token(self, name: str) -> str | None:
        """Text of a named special token (`bos_token`, `eos_token`, ...)."""
        return _token_content(self.config.get(name)) or _token_content(self.special_map.get(name))

    def _post_processor_bos(self) -> int | None:
        """Id of the special token a TemplateProcessing post-processor puts before the text."""
        stack = [self._post_processor] if self._post_processor else []
        try:
            while stack:
                proc = stack.pop()
                if proc.get("type") == "Sequence":
                    stack.extend(proc.get("processors", []))
                elif proc.get("type") == "TemplateProcessing":
                    first = proc.get("single", [{}])[0]
                    if "SpecialToken" in first:
                        ids = proc["special_tokens"][first["SpecialToken"]["id"]]["ids"]
                        return ids[0] if ids else None
        except (AttributeError, KeyError, IndexError, TypeError) as err:
            raise self._tok_file.fail(f'"post_processor" is malformed ({type(err).__name__}: {err})') from None
        return None

    def add_bos(self, default: bool) -> bool:
        """Whether encoding prepends BOS: the post-processor decides for tokenizer.json, else the
        `add_bos_token` flag of tokenizer_config.json."""
        if self._post_processor_bos() is not None:
            return True
        return bool(self.config.get("add_bos_token", default))

    def bos_token_id(self, lookup: Callable[[str | None], int | None], n_tokens: int) -> int | None:
        bos = self._post_processor_bos()
        if bos is not None:
            return check_token_id(self._tok_file.name, "the post-processor's BOS id", bos, n_tokens)
        return lookup(self.special_token("bos_token"))

    def eos_token_ids(self, lookup: Callable[[str | None], int | None], n_tokens: int) -> list[int]:
        """EOS of the tokenizer config first, then the ids generation_config/config.json list. Those
        may name ids past the tokenizer's own (a model's embedding is often padded), not past
        config.json's `vocab_size`."""
        ids = [lookup(self.special_token("eos_token"))]
        rows = self.model_config.get("vocab_size")
        limit = max(n_tokens, rows if is_id(rows) and rows < id_limit(n_tokens) else 0)
        for file, config in ((self._generation_file, self.generation_config), (self._model_file, self.model_config)):
            value = config.get("eos_token_id")
            for tid in value if isinstance(value, list) else [] if value is None else [value]:
                ids.append(check_token_id(file.name, "eos_token_id", tid, limit))
        return [i for i in dict.fromkeys(ids) if i is not None]
