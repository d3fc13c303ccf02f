"""Byte-level BPE (GPT-2 style): pre-tokenizer regexes, an exact pair-rank BPE, and a tiktoken fast path.

Hugging Face `tokenizers` and llama.cpp repeatedly merge the adjacent pair with the lowest rank in
the merges list. tiktoken instead merges the adjacent pair whose concatenation has the lowest token
rank, and returns a whole pre-token directly when it is itself a token. The two agree only for
some vocabularies, so tiktoken is used only when `tiktoken_exactness_problem` proves they agree;
otherwise a pure-Python pair-rank BPE with a per-word cache does the work.
"""

from __future__ import annotations

import heapq
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple, TYPE_CHECKING

import regex

from .checks import building

if TYPE_CHECKING:
    import tiktoken

# --- the byte <-> printable-character alphabet of byte-level BPE -------------------------------


def _byte_alphabet() -> list[str]:
    """Character standing for each byte: printable Latin-1 bytes stand for themselves, the rest
    are moved past U+00FF in byte order, so no token string contains whitespace or controls."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shifted = 0x100
    for b in range(256):
        if b not in chars:
            chars[b] = chr(shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_alphabet()
# Latin-1 decoding turns bytes into chars 0..255, which this table moves onto the alphabet.
_TO_ALPHABET = {b: c for b, c in enumerate(BYTE_CHARS)}
# Alphabet chars back to Latin-1 chars; chars 0..255 outside the alphabet are pushed out of
# Latin-1 range so that encoding them fails instead of silently passing through.
_FROM_ALPHABET = {ord(c): b for b, c in enumerate(BYTE_CHARS)}
_FROM_ALPHABET.update({b: 0x110000 - 1 - b for b in range(256) if ord(BYTE_CHARS[b]) != b})


def to_byte_level(text: str) -> str:
    """UTF-8 bytes of `text` spelled in the byte alphabet."""
    return text.encode("utf-8").decode("latin-1").translate(_TO_ALPHABET)


def byte_level_to_bytes(token: str) -> bytes | None:
    """Bytes a byte-level token string stands for, or None if it uses characters outside the alphabet."""
    try:
        return token.translate(_FROM_ALPHABET).encode("latin-1")
    except UnicodeEncodeError:
        return None


# --- pre-tokenizer regexes ----------------------------------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp spells the case-insensitive contractions as explicit classes; `(?i:'s)` would also
# match "'ſ" under Unicode case folding.
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_PATTERN = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def hf_pre_tokenizer(spec: Mapping | None) -> list[str]:
    """Regex stages equivalent to a tokenizer.json byte-level `pre_tokenizer`."""
    if spec is None:
        return []
    kind = spec["type"]
    if kind == "Sequence":
        return [stage for sub in spec["pretokenizers"] for stage in hf_pre_tokenizer(sub)]
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"]
    if kind == "Split":
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"unsupported Split pre-tokenizer {spec!r}")
        pattern = spec["pattern"]
        return [pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])]
    raise ValueError(f"unsupported pre-tokenizer type {kind!r}")


def _isolating(pattern: str) -> str:
    """`pattern`, plus an alternative for the text between its matches, so that a findall returns
    every piece of the input (llama.cpp and `Split(behavior=Isolated)` keep those gaps)."""
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}


def hf_normalizer(spec: Mapping | None) -> Callable[[str], str] | None:
    """A function applying a tokenizer.json `normalizer` (Unicode normal forms only)."""
    if spec is None:
        return None
    forms = [s["type"] for s in spec["normalizers"]] if spec["type"] == "Sequence" else [spec["type"]]
    unknown = [f for f in forms if f not in _NORMALIZERS]
    if unknown:
        raise ValueError(f"unsupported normalizer(s) {unknown} for byte-level BPE")

    def normalize(text: str) -> str:
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text

    return normalize


# --- BPE -----------------------------------------------------------------------------------------


def merge_word(word: str, ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Pair-rank BPE of one pre-token: repeatedly merge the adjacent pair with the lowest rank,
    leftmost first on ties (the order of HF `tokenizers` and llama.cpp). O(n log n) with a heap."""
    syms: list[str] = list(word)
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        # Entries go stale when a neighbour merges; a pair's rank identifies the pair.
        if j < 0 or not syms[i] or ranks.get((syms[i], syms[j])) != rank:
            continue
        syms[i] += syms[j]
        syms[j] = ""
        k = nxt[i] = nxt[j]
        if k >= 0:
            prv[k] = i
            if (r := ranks.get((syms[i], syms[k]))) is not None:
                heapq.heappush(heap, (r, i))
        p = prv[i]
        if p >= 0 and (r := ranks.get((syms[p], syms[i]))) is not None:
            heapq.heappush(heap, (r, p))
    return [s for s in syms if s]


def tiktoken_exactness_problem(
    vocab: Mapping[str, int], ranks: Mapping[tuple[str, str], int], ignore_merges: bool
) -> str | None:
    """Why tiktoken could disagree with pair-rank BPE on this vocabulary, or None if it cannot.

    tiktoken is given the 256 byte tokens and the merge results, each ranked by its token id.
    It agrees with pair-rank BPE on every input when:

    1. every merge's parts and result are tokens, and no result comes from two merges -- so
       each merge result has one merge, hence one rank;
    2. token ids of merge results increase in merge order -- so tiktoken's order (result id) is
       the merge order;
    3. pair-rank BPE of every merge result's own bytes gives back that one token.

    Why 3 suffices: tiktoken could only differ by merging an adjacent pair (x, y) that is not a
    listed merge although x+y is a token t. If pair-rank BPE ever had x and y adjacent, the merges
    that built x and y stayed inside their bytes, so BPE of t's bytes alone would also reach
    [x, y] and stop there, since (x, y) is no merge; 3 says it reaches [t]. So such pairs never
    occur, both algorithms see the same candidate pairs in the same order, and by induction make
    the same merges. 3 also covers tiktoken's shortcut of returning a pre-token that is itself a
    token (with `ignore_merges` the reference does the same, which additionally needs every
    multi-byte token to be a merge result so tiktoken knows it).

    Bytes without a token (SmolLM2 has none for 0x04, for instance) are not covered: text that
    contains one must go to the exact path, which drops such a byte as the references do.
    """
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    results: dict[str, tuple[str, str]] = {}
    last_id = -1
    for (left, right), _ in by_rank:
        merged = left + right
        if left not in vocab or right not in vocab or merged not in vocab:
            return f"merge {left!r} {right!r} uses or makes a token outside the vocabulary"
        if merged in results:
            return f"token {merged!r} is made by more than one merge"
        results[merged] = (left, right)
        if vocab[merged] <= last_id:
            return f"token ids do not increase in merge order at {merged!r}"
        last_id = vocab[merged]
    if ignore_merges and any(len(t) > 1 and t not in results for t in vocab):
        return "a multi-character token is not a merge result"
    # Check 3 in merge order. When both parts are bytes or earlier merge results that passed, BPE
    # of t's bytes applies merges in rank order and runs each part to completion independently,
    # unless some merge ranked j < rank(t) joins the symbol ending the left part at time j with
    # the one starting the right part at time j. Those boundary symbols are the right spine of
    # the left part (the part, its right child, ... down to a byte) and the left spine of the
    # right part; each is there from its own merge's rank until its parent's. Only tokens where
    # such a merge exists, or whose parts come later in the merge order, are checked by running
    # the BPE, which is the ground truth.
    born = {c: -1 for c in BYTE_CHARS}
    right_spine: dict[str, tuple[str, ...]] = {c: (c,) for c in BYTE_CHARS}
    left_spine: dict[str, tuple[str, ...]] = {c: (c,) for c in BYTE_CHARS}
    for (left, right), rank in by_rank:
        merged = left + right
        rs_left, ls_right = right_spine.get(left), left_spine.get(right)
        if rs_left is None or ls_right is None:
            simulate = True
        else:
            simulate = _boundary_merge_possible(rs_left, ls_right, rank, ranks, born)
        if simulate and merge_word(merged, ranks) != [merged]:
            return f"BPE of token {merged!r} does not give back the token"
        if rs_left is not None and ls_right is not None:  # spines are kept for both sides or neither
            born[merged] = rank
            right_spine[merged] = (merged, *right_spine[right])
            left_spine[merged] = (merged, *left_spine[left])
    return None


def _boundary_merge_possible(
    ends: tuple[str, ...],
    starts: tuple[str, ...],
    rank: int,
    ranks: Mapping[tuple[str, str], int],
    born: Mapping[str, int],
) -> bool:
    """Whether a merge ranked before `rank` could join a symbol ending the left part (`ends`, its
    right spine, root first) with one starting the right part (`starts`) while both exist."""
    left_life = [(x, born[x], born[ends[k - 1]] if k else rank) for k, x in enumerate(ends)]
    right_life = [(y, born[y], born[starts[k - 1]] if k else rank) for k, y in enumerate(starts)]
    for x, x_from, x_to in left_life:
        for y, y_from, y_to in right_life:
            j = ranks.get((x, y))
            if j is not None and j < rank and x_from < j <= x_to and y_from < j <= y_to:
                return True
    return False


class BytePairEncoder:
    """Encodes raw text (no special tokens) to ids with byte-level BPE, or BPE over the characters
    themselves (`byte_level=False`, SentencePiece-style vocabularies with `<0xNN>` byte tokens)."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        patterns: Sequence[str],
        *,
        ignore_merges: bool = False,
        normalize: Callable[[str], str] | None = None,
        drop_untokenized_bytes: bool = False,
        allow_tiktoken: bool = True,
        byte_level: bool = True,
        whole_newline_runs: bool = False,
        source: str = "the vocabulary",
    ) -> None:
        """`drop_untokenized_bytes` picks what happens to a byte with no token (rare, but SmolLM2
        has none for 0x04): HF `tokenizers` drops it before merging, so its neighbours can merge
        with each other; llama.cpp keeps it as a symbol nothing merges with, then drops it.
        Without `byte_level`, a symbol that is no token becomes the `<0xNN>` tokens of its UTF-8
        bytes (those that exist), as in llama.cpp; `whole_newline_runs` takes a piece of newlines
        whole when it is a token (llama.cpp's Gemma 4 rule). `source` (a file name) is what errors
        name; the caller has checked the ids (`checks.py`)."""
        self._source = source
        self._vocab = dict(vocab)
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self._ranks.setdefault(pair, rank)
        self._ignore_merges = ignore_merges
        self._byte_level = byte_level
        self._whole_newline_runs = whole_newline_runs
        self._normalize = normalize
        self._stages = [regex.compile(_isolating(p)) for p in patterns]
        self._cache: dict[str, list[int]] = {}
        if not byte_level:
            self.tiktoken_problem: str | None = "not byte-level BPE"
        elif allow_tiktoken:
            self.tiktoken_problem = tiktoken_exactness_problem(self._vocab, self._ranks, ignore_merges)
        else:
            self.tiktoken_problem = "disabled by caller"
        self._tiktoken = self._make_tiktoken(patterns) if self.tiktoken_problem is None else None
        missing = bytes(b for b, c in enumerate(BYTE_CHARS) if byte_level and c not in self._vocab)
        self._untokenized_byte = regex.compile(b"[" + regex.escape(missing) + b"]") if missing else None
        self._drop_table = {ord(BYTE_CHARS[b]): None for b in missing} if drop_untokenized_bytes else None

    @property
    def uses_tiktoken(self) -> bool:
        return self._tiktoken is not None

    def _make_tiktoken(self, patterns: Sequence[str]) -> tiktoken.Encoding | None:
        import tiktoken  # only needed when the vocabulary passes the check

        ranks = {byte_level_to_bytes(c): self._vocab[c] for c in BYTE_CHARS if c in self._vocab}
        for left, right in self._ranks:
            merged = left + right
            ranks[byte_level_to_bytes(merged)] = self._vocab[merged]
        # tiktoken runs the last regex stage itself; earlier stages (and no stage) split in Python.
        last = _isolating(patterns[-1]) if patterns else r"[\s\S]+"
        if None in ranks or len(set(ranks.values())) != len(ranks):  # tiktoken would panic on these
            self.tiktoken_problem = "tokens outside the byte alphabet, or ids shared by two tokens"
            return None
        with building(self._source, "tiktoken"):  # anything else, a Rust panic included, is an error
            try:
                return tiktoken.Encoding(name="mlxllm-bpe", pat_str=last, mergeable_ranks=ranks, special_tokens={})
            except ValueError as err:  # e.g. a regex fancy-regex cannot compile: the exact path takes over
                self.tiktoken_problem = f"tiktoken rejected the vocabulary: {err}"
                return None

    def encode(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        fast = self._tiktoken is not None and not (
            self._untokenized_byte is not None and self._untokenized_byte.search(text.encode("utf-8"))
        )
        pieces = [text]
        for stage in self._stages[:-1] if fast else self._stages:
            pieces = [p for piece in pieces for p in stage.findall(piece)]
        if fast:
            enc = self._tiktoken.encode_ordinary
            return [t for piece in pieces for t in enc(piece)]
        ids: list[int] = []
        cache = self._cache
        for piece in pieces:
            word = to_byte_level(piece) if self._byte_level else piece
            hit = cache.get(word)
            if hit is None:
                hit = cache[word] = self._encode_word(word)
                if len(cache) > 100_000:
                    cache.clear()
            ids.extend(hit)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        vocab = self._vocab
        if self._drop_table:
            word = word.translate(self._drop_table)
        if (self._ignore_merges or self._whole_newline_runs and not word.strip("\n")) and word in vocab:
            return [vocab[word]]
        ids: list[int] = []
        for sym in merge_word(word, self._ranks):
            tid = vocab.get(sym)
            if tid is not None:
                ids.append(tid)
            elif self._byte_level:  # a merge whose result is not a token: fall back to its characters
                ids.extend(vocab[c] for c in sym if c in vocab)
            else:
                ids.extend(vocab[t] for b in sym.encode("utf-8") if (t := f"<0x{b:02X}>") in vocab)
        return ids
