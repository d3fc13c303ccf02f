"""Write a GGUF file's tokenizer as Hugging Face tokenizer files, so a converted GGUF model carries a
tokenizer that mlxllm, transformers and mlx-lm all read the way llama.cpp reads the original.

Byte-level BPE (``tokenizer.ggml.model = gpt2``) becomes a ``tokenizer.json`` whose pre-tokenizer
is llama.cpp's regex stages for the file's ``tokenizer.ggml.pre`` as isolated splits followed by
the byte-level mapping; SentencePiece (``llama``) becomes the ``tokenizer.model`` protobuf mlxllm
already builds from the GGUF vocabulary. Special tokens, BOS/EOS and the chat template go to
``tokenizer_config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import spm
from .gguf_pre import GGUFPreTokenizer, gguf_pre_tokenizer
from .gguf_vocab import check_tokenizer_metadata


def _isolated(pattern: str) -> dict[str, Any]:
    # Oniguruma, which `tokenizers` uses, has no \U escape: characters past U+FFFF go in as themselves.
    pattern = re.sub(r"\\U([0-9a-fA-F]{8})", lambda m: chr(int(m[1], 16)), pattern)
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _bpe_json(meta: dict[str, Any], pre: GGUFPreTokenizer, add_bos: bool, bos: str | None) -> dict[str, Any]:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t == spm.CONTROL}
        for i, t in enumerate(types) if t in (spm.CONTROL, spm.USER_DEFINED)
    ]  # fmt: skip
    post = None
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *(_isolated(stage) for stage in pre.stages),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},  # fmt: skip
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre.ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},  # fmt: skip
    }


def write_hf_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """Write the tokenizer described by GGUF metadata ``meta`` into the directory ``out``; malformed
    metadata raises `TokenizerFileError` (a `UserError`) naming the file, before anything is written."""
    check_tokenizer_metadata(meta)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    kind = meta.get("tokenizer.ggml.model")

    def text(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}")
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

    bos = text("bos_token_id")
    config: dict[str, Any] = {"bos_token": bos, "eos_token": text("eos_token_id"), "pad_token": text("padding_token_id"),
                              "unk_token": text("unknown_token_id")}  # fmt: skip
    if kind == "gpt2":
        pre = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        if not pre.byte_level:
            raise ValueError(f"exporting the GGUF pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} (BPE over raw "
                             "UTF-8 characters, not byte-level) is not supported")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre.add_bos)
        (out / "tokenizer.json").write_text(json.dumps(_bpe_json(meta, pre, add_bos, bos), ensure_ascii=False))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif kind == "llama":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        sp = spm.from_gguf_vocab(tokens, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.token_type"),
                                 add_space_prefix=space_prefix,
                                 unknown_token_id=meta.get("tokenizer.ggml.unknown_token_id"))  # fmt: skip
        (out / "tokenizer.model").write_bytes(sp.proto.SerializeToString())
        # transformers' LlamaTokenizer always prefixes a space; its GemmaTokenizer never does.
        config["tokenizer_class"] = "LlamaTokenizer" if space_prefix else "GemmaTokenizer"
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
    config["add_bos_token"] = bool(add_bos)
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None},
                                                          indent=2, ensure_ascii=False))
    eos = [meta[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if meta.get(f"tokenizer.ggml.{k}") is not None]  # fmt: skip
    generation = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos or None}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None}))
