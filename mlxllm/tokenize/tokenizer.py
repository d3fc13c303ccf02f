"""The `Tokenizer`: one interface over byte-level BPE and SentencePiece vocabularies."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from . import bpe, spm
from .gguf_pre import GGUFPreTokenizer, gguf_pre_tokenizer
from .chat import ChatTemplate, ChatTemplateError
from .checks import TokenizerFileError, building
from .detokenize import StreamingDetokenizer
from .gguf_vocab import check_tokenizer_metadata, read_gguf_tokenizer_metadata
from .hf_dir import HFTokenizerFiles
from .specials import SpecialSplitter

# Token types (GGUF and SentencePiece number them alike) matched whole in the text before encoding.
_MATCHED_WHOLE = (spm.CONTROL, spm.USER_DEFINED, spm.UNKNOWN)


class _TextEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Build it with `from_gguf`, `from_gguf_metadata` or `from_hf_dir`. The surface follows
    mlx-lm's TokenizerWrapper (itself modelled on Hugging Face tokenizers).
    """

    def __init__(
        self,
        *,
        encoder: _TextEncoder,
        piece_bytes: list[bytes],
        specials: dict[str, int],
        skip_ids: Iterable[int],
        longest_first_specials: bool,
        bos_token_id: int | None,
        add_bos: bool,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        chat_template: str | None,
        strip_first_space: bool = False,
        unk_token_id: int | None = None,
        source: str = "the tokenizer files",
        chat_template_file: str | None = None,
    ) -> None:
        self._encoder = encoder
        self._pieces = piece_bytes
        try:
            self._splitter = SpecialSplitter(specials, longest_first=longest_first_specials)
        except RecursionError:
            raise TokenizerFileError(f"{source}: the special tokens nest too deeply to match") from None
        self._skip = frozenset(skip_ids)
        self._strip_first_space = strip_first_space
        self._bos = bos_token_id
        self._add_bos = add_bos and bos_token_id is not None
        self._pad = pad_token_id
        self._texts = {tid: text for text, tid in specials.items()}
        self._template_vars = {
            name: self._token_text(tid)
            for name, tid in [
                ("bos_token", bos_token_id),
                ("eos_token", eos_token_ids[0] if eos_token_ids else None),
                ("pad_token", pad_token_id),
                ("unk_token", unk_token_id),
            ]
            if tid is not None
        }
        self._specials, self._own_eos = specials, list(dict.fromkeys(eos_token_ids))
        self._use_template(chat_template or None, chat_template_file or source)

    def _use_template(self, source: str | None, where: str) -> None:
        """Compile the chat template (an error is kept and reported when it is used) and add the
        token that ends its turns to the EOS ids."""
        self._template: ChatTemplate | None = None
        self._template_source = source
        self._template_error: ChatTemplateError | None = None
        if source:
            try:
                self._template = ChatTemplate(source, where)
            except ChatTemplateError as err:
                self._template_error = err
        eos = list(self._own_eos)
        if self._template is not None:
            end = self._template.end_of_turn(self._specials, **self._template_vars)
            if end is not None and self._specials[end] not in eos:
                eos.append(self._specials[end])
        self._eos = eos

    def set_chat_template(self, source: str, where: str) -> None:
        """Use ``source`` (read from ``where``, which errors name) instead of the model's own chat
        template, as ``--chat-template FILE`` asks; one that does not compile is refused now."""
        self._use_template(source, where)
        if self._template_error is not None:
            raise self._template_error

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer stored in a GGUF file."""
        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Tokenizer from GGUF metadata (key -> decoded value), behaving like llama.cpp's. Malformed
        metadata raises `TokenizerFileError` (a `UserError`) naming the file."""
        source = check_tokenizer_metadata(meta)
        with building(source):
            return cls._from_checked_gguf_metadata(meta, source)

    @classmethod
    def _from_checked_gguf_metadata(cls, meta: dict[str, Any], source: str) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [spm.NORMAL] * len(tokens)
        # Control, user-defined and unknown tokens are cut out of the text first; only control
        # and unknown ones are "special" (left out when decoding with skip_special_tokens).
        specials = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t in _MATCHED_WHOLE}
        skip = [i for i, t in enumerate(types) if t in (spm.CONTROL, spm.UNKNOWN)]
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if kind in ("gpt2", "gemma4"):
            # llama.cpp reads a `gemma4` vocabulary as BPE with the gemma4 pre-tokenizer, whatever the file says.
            pre = gguf_pre_tokenizer("gemma4" if kind == "gemma4" else meta.get("tokenizer.ggml.pre"))
            merges = [_split_merge(m) for m in meta["tokenizer.ggml.merges"]]
            encoder: _TextEncoder = bpe.BytePairEncoder(
                {tok: i for i, tok in enumerate(tokens)}, merges, pre.stages, ignore_merges=pre.ignore_merges,
                normalize=_escape_spaces if pre.escape_spaces else None, byte_level=pre.byte_level,
                whole_newline_runs=pre.whole_newline_runs, source=source,
            )
            pieces = [_bpe_piece_bytes(tok, t, pre) for tok, t in zip(tokens, types)]
            add_bos = (pre.add_bos if add_bos is None else add_bos) or pre.always_bos
            strip_first_space = False
        elif kind == "llama":
            sp = spm.from_gguf_vocab(
                tokens,
                meta.get("tokenizer.ggml.scores"),
                types,
                add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                unknown_token_id=unk,
                source=source,
            )
            encoder, pieces = sp, sp.piece_bytes()
            add_bos = True if add_bos is None else add_bos
            strip_first_space = sp.add_dummy_prefix
        else:
            raise TokenizerFileError(
                f"{source}: unsupported tokenizer model {kind!r} (supported: 'gpt2', 'gemma4', 'llama')"
            )
        eos = [
            meta[key]
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if meta.get(key) is not None
        ]
        return cls(
            encoder=encoder,
            piece_bytes=pieces,
            specials=specials,
            skip_ids=skip,
            longest_first_specials=True,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            add_bos=add_bos,
            eos_token_ids=eos,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            strip_first_space=strip_first_space,
            unk_token_id=unk,
            source=source,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer from a Hugging Face model directory: `tokenizer.json` (byte-level BPE) or
        `tokenizer.model` (SentencePiece), with `tokenizer_config.json`, `special_tokens_map.json`,
        `generation_config.json` and `config.json` for special tokens and the chat template."""
        files = HFTokenizerFiles(path)
        if files.byte_level_bpe is not None:
            source, model = "tokenizer.json", files.byte_level_bpe
            added = files.resolve_added(model.vocab)
            with building(source):
                encoder: _TextEncoder = bpe.BytePairEncoder(
                    model.vocab,
                    model.merges,
                    bpe.hf_pre_tokenizer(model.pre_tokenizer),
                    ignore_merges=model.ignore_merges,
                    normalize=bpe.hf_normalizer(model.normalizer),
                    drop_untokenized_bytes=True,
                    source=source,
                )
            texts = {**{i: t for t, i in model.vocab.items()}, **{i: t for t, i in added.items()}}
            # Decoded as the ByteLevel decoder does: via the byte alphabet if possible, else literally.
            by_id = {i: bpe.byte_level_to_bytes(t) or t.encode("utf-8") for i, t in texts.items()}
            pieces = [by_id.get(i, b"") for i in range(max(by_id) + 1)]  # ids are checked: checks.id_limit
            vocab_ids, specials, strip_first_space = model.vocab, dict(added), False
            skip = set(files.special_ids)
        elif files.sentencepiece is not None:
            source = "tokenizer.model"
            with building(source, "sentencepiece"):
                sp = spm.from_model_file(files.sentencepiece, source=source)
                pieces = sp.piece_bytes()
            encoder, strip_first_space = sp, sp.add_dummy_prefix
            vocab_ids = {p.piece: i for i, p in enumerate(sp.proto.pieces)}
            added = files.resolve_added(vocab_ids)
            specials = {p.piece: i for i, p in enumerate(sp.proto.pieces) if p.type in _MATCHED_WHOLE}
            skip = set(files.special_ids)
            skip.update(i for i, p in enumerate(sp.proto.pieces) if p.type in (spm.CONTROL, spm.UNKNOWN))
            for text, tid in added.items():  # added tokens may extend past the model's pieces
                specials[text] = tid
                if tid >= len(pieces):
                    pieces.extend([b""] * (tid + 1 - len(pieces)))
                    pieces[tid] = text.encode("utf-8")
        else:
            raise TokenizerFileError(
                f"{os.fspath(path)!r} has neither a byte-level BPE tokenizer.json nor a tokenizer.model"
            )
        ids_by_text = {**vocab_ids, **specials}

        def lookup(text: str | None) -> int | None:
            return ids_by_text.get(text) if text is not None else None

        return cls(
            encoder=encoder,
            piece_bytes=pieces,
            specials=specials,
            skip_ids=skip,
            longest_first_specials=False,
            bos_token_id=files.bos_token_id(lookup, len(pieces)),
            add_bos=files.add_bos(default=files.sentencepiece is not None),
            eos_token_ids=files.eos_token_ids(lookup, len(pieces)),
            pad_token_id=lookup(files.special_token("pad_token")),
            chat_template=files.chat_template,
            strip_first_space=strip_first_space,
            unk_token_id=lookup(files.special_token("unk_token")),
            source=source,
            chat_template_file=files.chat_template_file,
        )

    # --- encoding and decoding --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text become their single ids (unless
        `split_special_tokens`, as in Hugging Face: then they are read as plain text); BOS is
        prepended when the model's metadata asks for it and `add_special_tokens` is true."""
        ids = [self._bos] if add_special_tokens and self._add_bos else []
        encode = self._encoder.encode
        if split_special_tokens:
            return ids + encode(text)
        for part in self._splitter.split(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with `skip_special_tokens`, control tokens (BOS, EOS, turn markers) are left out."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip]
        try:
            chunks = [self._pieces[i] for i in ids]
        except (IndexError, TypeError):
            raise ValueError(f"token ids must be ints in [0, {self.vocab_size})") from None
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be ints in [0, {self.vocab_size})")
        if self._strip_first_space and chunks and chunks[0].startswith(b" "):
            chunks[0] = chunks[0][1:]
        return b"".join(chunks).decode("utf-8", errors="replace")

    def detokenizer(self) -> StreamingDetokenizer:
        """A new streaming detokenizer; its text is exactly `decode` of the ids fed so far (ids past
        the vocabulary, which `decode` refuses, add no text)."""
        return StreamingDetokenizer(self._pieces, self._strip_first_space)

    # --- chat ---------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """Whether the model comes with a chat template (one that does not compile included: using it
        raises `ChatTemplateError`, see `chat_template_error`)."""
        return self._template_source is not None

    @property
    def chat_template(self) -> str | None:
        return self._template_source

    @property
    def chat_template_error(self) -> str | None:
        """Why the model's chat template cannot be used (it does not compile), or None."""
        return str(self._template_error) if self._template_error is not None else None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template; extra keyword arguments (e.g. `tools`)
        become template variables. Tokenized, a BOS the template wrote itself is not added again."""
        if self._template_error is not None:
            raise ChatTemplateError(str(self._template_error))
        if self._template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template (base models usually have none); encode the prompt text directly"
            )
        text = self._template.render(messages, add_generation_prompt, **{**self._template_vars, **kwargs})
        if not tokenize:
            return text
        bos_text = self._template_vars.get("bos_token")
        return self.encode(text, add_special_tokens=not (bos_text and text.startswith(bos_text)))

    # --- special tokens -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each id decodes to (a fresh list; what a grammar engine matches text against)."""
        return list(self._pieces)

    @property
    def control_token_ids(self) -> set[int]:
        """Ids that are markers, not text (BOS, EOS, turn markers): `decode` drops them when asked to
        skip special tokens, and constrained text never contains them."""
        return set(self._skip) | set(self._eos)

    @property
    def fingerprint(self) -> str:
        """A hash of what each id decodes to: two tokenizers with equal fingerprints agree on the meaning
        of every id (what a draft model and its target, or a student and its teacher, must share)."""
        import hashlib

        h = hashlib.sha256()
        for piece in self._pieces:
            h.update(len(piece).to_bytes(4, "little") + piece)
        return h.hexdigest()[:16]

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos[0] if self._eos else None

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation (a fresh set): the metadata's EOS/EOT/EOM ids, the
        generation config's EOS list, and the token the chat template closes turns with."""
        return set(self._eos)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def bos_token(self) -> str | None:
        return self._template_vars.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._template_vars.get("eos_token")

    def _token_text(self, tid: int) -> str:
        return self._texts.get(tid) or self._pieces[tid].decode("utf-8", errors="replace")


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp does: the separator is the first space after the first character.
    at = merge.find(" ", 1)
    return (merge[:at], merge[at + 1 :]) if at >= 0 else (merge, "")


def _escape_spaces(text: str) -> str:
    return text.replace(" ", "\u2581")


def _bpe_piece_bytes(token: str, kind: int, pre: GGUFPreTokenizer) -> bytes:
    """What a BPE token decodes to, as llama.cpp decodes it."""
    if kind in _MATCHED_WHOLE:
        return token.encode("utf-8")
    if not pre.byte_level and kind == spm.BYTE and spm.BYTE_PIECE.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    if pre.escape_spaces:
        return token.replace("\u2581", " ").encode("utf-8")
    return bpe.byte_level_to_bytes(token) or token.encode("utf-8")
