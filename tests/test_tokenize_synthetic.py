"""Tokenizers built from small synthetic files, against Hugging Face `tokenizers` and `sentencepiece`.

They cover what the real models cannot show: vocabularies where tiktoken's merge order would be
wrong (and the exact fallback must take over), Hugging Face directory layouts, and SentencePiece
models with a dummy prefix.
"""

from __future__ import annotations

import io
import json
import random

import pytest

from mlxllm.tokenize import Tokenizer, bpe
from mlxllm.tokenize.specials import SpecialSplitter

tk = pytest.importorskip("tokenizers")


def _byte_vocab() -> dict[str, int]:
    return {c: i for i, c in enumerate(bpe.BYTE_CHARS)}


def _write_bpe_dir(tmp_path, vocab, merges, **extra):
    """A tokenizer.json made by `tokenizers` itself (ByteLevel pre-tokenizer and decoder)."""
    ref = tk.Tokenizer(tk.models.BPE(vocab, merges))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tk.decoders.ByteLevel()
    for key, value in extra.items():
        setattr(ref, key, value)
    ref.save(str(tmp_path / "tokenizer.json"))
    return ref


def _naive_tiktoken(vocab, merges):
    """tiktoken ranked by token id, the shortcut the exactness check guards against."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bpe.byte_level_to_bytes(c): vocab[c] for c in bpe.BYTE_CHARS}
    ranks.update({bpe.byte_level_to_bytes(a + b): vocab[a + b] for a, b in merges})
    return tiktoken.Encoding(name="naive", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


# --- the tiktoken exactness check ------------------------------------------------------------------


def test_byte_alphabet():
    assert len(set(bpe.BYTE_CHARS)) == 256
    assert bpe.BYTE_CHARS[ord(" ")] == "\u0120" and bpe.BYTE_CHARS[ord("\n")] == "\u010a"  # 'Ġ', 'Ċ'
    assert all(not c.isspace() and c.isprintable() for c in bpe.BYTE_CHARS)
    assert all(bpe.byte_level_to_bytes(c) == bytes([b]) for b, c in enumerate(bpe.BYTE_CHARS))
    assert bpe.to_byte_level("é x") == "\u00c3\u00a9\u0120x"
    assert bpe.byte_level_to_bytes("a b") is None  # a real space is not in the alphabet


def test_fallback_when_merge_order_disagrees_with_ids(tmp_path):
    vocab = _byte_vocab()
    vocab["bc"], vocab["ab"] = 256, 257  # "ab" merges first but has the larger id
    merges = [("a", "b"), ("b", "c")]
    ref = _write_bpe_dir(tmp_path, vocab, merges)
    assert ref.encode("abc").ids == [257, vocab["c"]]  # pair rank: "a b" wins
    assert _naive_tiktoken(vocab, merges).encode("abc") == [vocab["a"], 256]  # id rank: "bc" wins

    enc = bpe.BytePairEncoder(vocab, merges, [bpe.GPT2_PATTERN])
    assert not enc.uses_tiktoken and "ids do not increase" in enc.tiktoken_problem
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in ["abc", "abcabc bca cab", "aabbcc", "b c a"]:
        assert tok.encode(text) == ref.encode(text).ids, text


def test_fallback_when_a_token_does_not_merge_back(tmp_path):
    vocab = _byte_vocab()
    vocab.update({"ab": 256, "bc": 257, "abc": 258})
    merges = [("a", "b"), ("b", "c"), ("a", "bc")]  # "abc" is only reachable through "bc"
    ref = _write_bpe_dir(tmp_path, vocab, merges)
    assert ref.encode("abc").ids == [256, vocab["c"]]
    assert _naive_tiktoken(vocab, merges).encode("abc") == [258]  # whole pre-token is a token
    assert _naive_tiktoken(vocab, merges).encode("abcd")[:1] == [258]  # and "ab"+"c" is no merge

    enc = bpe.BytePairEncoder(vocab, merges, [bpe.GPT2_PATTERN])
    assert not enc.uses_tiktoken and "does not give back" in enc.tiktoken_problem
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in ["abc", "abcd", "xabcx", "bcabc"]:
        assert tok.encode(text) == ref.encode(text).ids, text


def _random_bpe(rng: random.Random, letters: str, n_merges: int):
    vocab = _byte_vocab()
    merges: list[tuple[str, str]] = []
    symbols = list(letters)
    for _ in range(n_merges):
        pair = (rng.choice(symbols), rng.choice(symbols))
        if pair in merges or pair[0] + pair[1] in vocab:
            continue
        merges.append(pair)
        vocab[pair[0] + pair[1]] = len(vocab)
        symbols.append(pair[0] + pair[1])
    if rng.random() < 0.3:  # sometimes scramble the ids of merged tokens
        multi = [t for t in vocab if len(t) > 1]
        ids = [vocab[t] for t in multi]
        rng.shuffle(ids)
        vocab.update(zip(multi, ids))
    return vocab, merges


def test_exactness_check_is_sound_on_random_vocabularies():
    """Whenever the check lets tiktoken in, it must agree with pair-rank BPE; the exact path
    itself must agree with `tokenizers`."""
    rng = random.Random(3)
    admitted = rejected = 0
    for trial in range(300):
        vocab, merges = _random_bpe(rng, "ab" if trial % 2 else "abc", rng.randint(1, 20))
        words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 16))) for _ in range(20)]
        exact = bpe.BytePairEncoder(vocab, merges, [], allow_tiktoken=False)
        fast = bpe.BytePairEncoder(vocab, merges, [])
        if fast.uses_tiktoken:
            admitted += 1
            assert [fast.encode(w) for w in words] == [exact.encode(w) for w in words], merges
        else:
            rejected += 1
        if trial % 5 == 0:
            ref = tk.Tokenizer(tk.models.BPE(vocab, merges))
            assert [exact.encode(w) for w in words] == [ref.encode(w).ids for w in words], merges
    assert admitted > 50 and rejected > 50


# --- Hugging Face directories ----------------------------------------------------------------------


def test_hf_dir_special_files(tmp_path):
    vocab = _byte_vocab()
    vocab.update({"he": 256, "ll": 257, "hell": 258, "hello": 259})
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    added = [
        tk.AddedToken("<s>", special=True),
        tk.AddedToken("</s>", special=True),
        tk.AddedToken("<turn>", special=True),
    ]
    ref = tk.Tokenizer(tk.models.BPE(vocab, merges))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tk.decoders.ByteLevel()
    ref.normalizer = tk.normalizers.NFC()
    ref.add_special_tokens(added)
    ref.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 260)])
    ref.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}<turn>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "</s>"}
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [261, 5]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))

    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in ["hello", "he\u0301llo", "hello<turn>hello</s>", "héllo wörld", ""]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == ref.decode(
            ref.encode(text, add_special_tokens=False).ids, skip_special_tokens=False
        )
    assert tok.bos_token_id == 260 and tok.encode("hello")[0] == 260
    assert tok.eos_token_id == 261 and tok.pad_token_id == 261
    assert tok.eos_token_ids == {261, 5, 7, 262}  # config EOS, generation config, config.json, "<turn>"
    assert tok.decode(tok.encode("hello<turn>"), skip_special_tokens=True) == "hello"
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True) == [260, 259, 262]


def test_hf_split_pre_tokenizer_and_ignore_merges(tmp_path):
    vocab = _byte_vocab()
    vocab.update({"12": 256, "123": 257, "\u0120a": 258, "ab": 259, "\u0120ab": 260})
    merges = [("1", "2"), ("12", "3"), ("\u0120", "a"), ("a", "b"), ("\u0120a", "b")]
    spec = {"type": "BPE", "vocab": vocab, "merges": [" ".join(m) for m in merges], "ignore_merges": True}
    spec.update({"dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None})
    spec.update({"fuse_unk": False, "byte_fallback": False})
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": bpe.LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": spec,
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    ref = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(tmp_path)
    rng = random.Random(5)
    texts = [
        "".join(rng.choice(["1", "2", "3", " ", "a", "b", "\n", "'s", "A"]) for _ in range(20)) for _ in range(200)
    ]
    for text in texts:
        assert tok.encode(text) == ref.encode(text).ids, text


def test_hf_dir_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        Tokenizer.from_hf_dir(tmp_path)


# --- SentencePiece tokenizer.model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = [f"The quick brown fox jumps over the lazy dog. {i} apples, {i * 7} pears." for i in range(300)]
    lines += ["Ünïcödé façade naïve café — 東京 ok"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<tool>"],
        control_symbols=["<ctrl>"],
        minloglevel=3,
    )
    path = tmp_path_factory.mktemp("spm")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


SPM_TEXTS = [
    "The quick brown fox",
    " leading space",
    "two  spaces and trailing ",
    "東京 😀 unknown ✓ chars",
    "numbers 12345 and café",
    "",
]


def test_spm_model_matches_sentencepiece(spm_dir):
    path, sp = spm_dir
    tok = Tokenizer.from_hf_dir(path)
    assert tok.bos_token_id == sp.bos_id() and tok.eos_token_id == sp.eos_id()
    for text in SPM_TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [sp.bos_id(), *ids], text  # add_bos_token defaults to true
        assert tok.decode(ids) == sp.decode(ids), text  # dummy-prefix space removed
        detok = tok.detokenizer()
        assert "".join(detok.add_token(i) for i in ids) + detok.finalize() == sp.decode(ids), text


def test_spm_special_tokens_in_text(spm_dir):
    path, sp = spm_dir
    tok = Tokenizer.from_hf_dir(path)
    ctrl, tool = sp.piece_to_id("<ctrl>"), sp.piece_to_id("<tool>")
    # Each text fragment between special tokens is encoded on its own (its own dummy prefix).
    assert tok.encode("fox<ctrl>dog<tool>", add_special_tokens=False) == [
        *sp.encode("fox"),
        ctrl,
        *sp.encode("dog"),
        tool,
    ]
    assert tok.decode([ctrl, *sp.encode("fox")]) == "<ctrl> fox"
    assert tok.decode([ctrl, *sp.encode("fox")], skip_special_tokens=True) == "fox"
    assert tok.apply_chat_template([{"role": "user", "content": "fox"}], tokenize=True) == [
        sp.bos_id(),
        *sp.encode("fox"),
    ]


# --- special-token matching rules ----------------------------------------------------------------------


def test_special_matching_rules():
    tokens = {"ab": 1, "bcd": 2, "b": 3, "<x>": 4, "<x>>": 5}
    # llama.cpp: longest token first, everywhere; Hugging Face: leftmost, then longest.
    assert SpecialSplitter(tokens, longest_first=True).split("abcd") == ["a", 2]
    assert SpecialSplitter(tokens, longest_first=False).split("abcd") == [1, "cd"]
    for rule in (True, False):
        splitter = SpecialSplitter(tokens, longest_first=rule)
        assert splitter.split("a<x>>b <x>") == ["a", 5, 3, " ", 4]
        assert splitter.split("") == [] and splitter.split("zz") == ["zz"]
    assert SpecialSplitter({}, longest_first=True).split("ab") == ["ab"]


def _cut_longest_first(text: str, tokens: dict[str, int]) -> list[str | int]:
    """llama.cpp's rule written plainly: longest token first, cut out everywhere (ties by id)."""
    pieces: list[str | int] = [text] if text else []
    for token in sorted(tokens, key=lambda t: (-len(t), tokens[t])):
        out: list[str | int] = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
                continue
            for j, part in enumerate(piece.split(token)):
                out += ([tokens[token]] if j else []) + ([part] if part else [])
        pieces = out
    return pieces


def _cut_leftmost_longest(text: str, tokens: dict[str, int]) -> list[str | int]:
    out: list[str | int] = []
    i = start = 0
    while i < len(text):
        match = max((t for t in tokens if text.startswith(t, i)), key=len, default=None)
        if match is None:
            i += 1
            continue
        out += ([text[start:i]] if i > start else []) + [tokens[match]]
        i = start = i + len(match)
    return out + ([text[start:]] if start < len(text) else [])


def test_special_splitter_against_plain_implementations():
    rng = random.Random(9)
    for _ in range(1500):
        words = {"".join(rng.choice("ab<>.") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6))}
        tokens = {w: i for i, w in enumerate(sorted(words))}
        text = "".join(rng.choice("ab<>.") for _ in range(rng.randint(0, 30)))
        assert SpecialSplitter(tokens, longest_first=True).split(text) == _cut_longest_first(text, tokens)
        assert SpecialSplitter(tokens, longest_first=False).split(text) == _cut_leftmost_longest(text, tokens)


def test_leftmost_longest_matches_tokenizers():
    vocab = _byte_vocab()
    ref = tk.Tokenizer(tk.models.BPE(vocab, []))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in ["ab", "bcd", "b"]])
    ids = {t: ref.token_to_id(t) for t in ["ab", "bcd", "b"]}
    splitter = SpecialSplitter(ids, longest_first=False)
    for text in ["abcd", "xbcdab", "bbcd", "abab"]:
        ours: list[int] = []
        for part in splitter.split(text):
            ours.extend([part] if isinstance(part, int) else [vocab[c] for c in bpe.to_byte_level(part)])
        assert ours == ref.encode(text).ids, text
