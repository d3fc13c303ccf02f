"""Reading the tokenizer files of a Hugging Face model directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ByteLevelBPEModel:
    """The parts of a byte-level BPE tokenizer.json the encoder needs."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    ignore_merges: bool
    pre_tokenizer: dict | None
    normalizer: dict | None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_byte_level(tok: dict[str, Any]) -> bool:
    def mentions(spec: dict | None) -> bool:
        if not spec:
            return False
        parts = spec.get("pretokenizers") or spec.get("decoders") or []
        return spec.get("type") == "ByteLevel" or any(mentions(p) for p in parts)

    return tok.get("model", {}).get("type") == "BPE" and (
        mentions(tok.get("decoder")) or mentions(tok.get("pre_tokenizer"))
    )


def _token_content(value: Any) -> str | None:
    """Special tokens are written either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class HFTokenizerFiles:
    """Everything tokenizer-related in one model directory, parsed once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"no model directory at {os.fspath(path)!r}")
        tok = _read_json(root / "tokenizer.json")
        self.config = _read_json(root / "tokenizer_config.json")
        self.special_map = _read_json(root / "special_tokens_map.json")
        self.generation_config = _read_json(root / "generation_config.json")
        self.model_config = _read_json(root / "config.json")
        self._post_processor = tok.get("post_processor")

        self.byte_level_bpe: ByteLevelBPEModel | None = None
        self.sentencepiece: bytes | None = None
        if _is_byte_level(tok):
            model = tok["model"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            self.byte_level_bpe = ByteLevelBPEModel(
                vocab=model["vocab"],
                merges=merges,
                ignore_merges=model.get("ignore_merges", False),
                pre_tokenizer=tok.get("pre_tokenizer"),
                normalizer=tok.get("normalizer"),
            )
        elif (root / "tokenizer.model").is_file():
            self.sentencepiece = (root / "tokenizer.model").read_bytes()

        # Added tokens are matched whole in text; those marked special are skipped when decoding
        # with skip_special_tokens.
        self.added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        entries = [(t["id"], t) for t in tok.get("added_tokens", [])]
        entries += [(int(i), t) for i, t in self.config.get("added_tokens_decoder", {}).items()]
        for tid, entry in entries:
            self.added[entry["content"]] = tid
            if entry.get("special"):
                self.special_ids.add(tid)

        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = root / "chat_template.jinja"
        self.chat_template: str | None = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else template

    def special_token(self, name: str) -> str | None:
        """Text of a named special token (`bos_token`, `eos_token`, ...)."""
        return _token_content(self.config.get(name)) or _token_content(self.special_map.get(name))

    def _post_processor_bos(self) -> int | None:
        """Id of the special token a TemplateProcessing post-processor puts before the text."""
        stack = [self._post_processor] if self._post_processor else []
        while stack:
            proc = stack.pop()
            if proc.get("type") == "Sequence":
                stack.extend(proc.get("processors", []))
            elif proc.get("type") == "TemplateProcessing":
                first = proc.get("single", [{}])[0]
                if "SpecialToken" in first:
                    ids = proc["special_tokens"][first["SpecialToken"]["id"]]["ids"]
                    return ids[0] if ids else None
        return None

    def add_bos(self, default: bool) -> bool:
        """Whether encoding prepends BOS: the post-processor decides for tokenizer.json, else the
        `add_bos_token` flag of tokenizer_config.json."""
        if self._post_processor_bos() is not None:
            return True
        return bool(self.config.get("add_bos_token", default))

    def bos_token_id(self, lookup: Callable[[str | None], int | None]) -> int | None:
        bos = self._post_processor_bos()
        return bos if bos is not None else lookup(self.special_token("bos_token"))

    def eos_token_ids(self, lookup: Callable[[str | None], int | None]) -> list[int]:
        """EOS of the tokenizer config first, then the ids generation_config/config.json list."""
        ids = [lookup(self.special_token("eos_token"))]
        ids += _id_list(self.generation_config.get("eos_token_id"))
        ids += _id_list(self.model_config.get("eos_token_id"))
        return [i for i in dict.fromkeys(ids) if i is not None]
