"""SentencePiece models, from a `tokenizer.model` file or rebuilt from a GGUF `llama` vocabulary.

The real `sentencepiece` library does the encoding. For GGUF the vocabulary (pieces, scores,
piece types) is written into a ModelProto with the normalizer llama.cpp applies: spaces become
'▁', nothing else is normalized, and a dummy-prefix space only when `add_space_prefix` says so.
Special tokens are cut out of the text before the processor sees it (see `specials.py`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from .checks import TokenizerFileError, building, check_one_id_per_text

# Piece types; GGUF `tokenizer.ggml.token_type` uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceEncoder:
    """Encodes raw text (no special tokens) with a SentencePiece processor."""

    def __init__(self, proto: sp_pb.ModelProto, source: str = "the vocabulary") -> None:
        """`source` (a file name) is what errors name."""
        _check_pieces(proto, source)
        self.proto = proto
        with building(source, "sentencepiece"):
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @property
    def add_dummy_prefix(self) -> bool:
        return self.proto.normalizer_spec.add_dummy_prefix

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def piece_bytes(self) -> list[bytes]:
        """What each piece decodes to: '▁' as a space, `<0xNN>` as that byte, control and
        user-defined pieces as their literal text."""
        out = []
        for piece in self.proto.pieces:
            if piece.type == BYTE:
                out.append(bytes([int(piece.piece[3:5], 16)]))
            elif piece.type in (NORMAL, UNUSED):
                out.append(piece.piece.replace("\u2581", " ").encode("utf-8"))
            else:
                out.append(piece.piece.encode("utf-8"))
        return out


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _check_pieces(proto: sp_pb.ModelProto, source: str) -> None:
    """What sentencepiece would refuse (or this module misread), as one error naming the file."""
    if not proto.pieces:
        raise TokenizerFileError(f"{source}: the model has no pieces")
    check_one_id_per_text(source, "piece", (p.piece for p in proto.pieces))
    for i, p in enumerate(proto.pieces):
        if p.type == BYTE and not BYTE_PIECE.fullmatch(p.piece):
            raise TokenizerFileError(f"{source}: byte piece {i} is {p.piece!r:.60}, not <0xNN>")


def from_model_file(data: bytes, source: str = "tokenizer.model") -> SentencePieceEncoder:
    """Processor for the bytes of a `tokenizer.model` file, with its own normalizer settings."""
    try:
        proto = sp_pb.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise TokenizerFileError(f"{source}: not a SentencePiece model (truncated or corrupt: {err})") from None
    return SentencePieceEncoder(proto, source)


def from_gguf_vocab(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    token_types: Sequence[int] | None,
    *,
    add_space_prefix: bool,
    unknown_token_id: int | None,
    source: str = "the vocabulary",
) -> SentencePieceEncoder:
    """Processor equivalent to llama.cpp's SPM tokenizer over a GGUF `llama` vocabulary."""
    proto = sp_pb.ModelProto()
    proto.trainer_spec.model_type = sp_pb.TrainerSpec.BPE
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
    # sentencepiece needs exactly one UNKNOWN piece: without one it has nothing to emit for text no piece
    # covers, and it refuses a second ("unk is already defined"). llama.cpp's Phi-3 converter types its
    # padding ids ([PAD32000] ...) UNKNOWN; llama.cpp never matches such pieces, nor does an UNUSED one.
    unknown = [i for i, t in enumerate(types) if t == UNKNOWN]
    if unknown_token_id is not None and 0 <= unknown_token_id < len(types):
        keep = unknown_token_id
    else:
        keep = unknown[0] if unknown else None
    for i in unknown:
        if i != keep:
            types[i] = UNUSED
    if keep is not None:
        types[keep] = UNKNOWN
    proto.trainer_spec.byte_fallback = BYTE in types
    piece_scores = scores if scores is not None else [0.0] * len(tokens)
    add = proto.pieces.add
    for piece, score, kind in zip(tokens, piece_scores, types):
        add(piece=piece, score=score, type=kind)
    return SentencePieceEncoder(proto, source)
