"""Every GGUF pre-tokenizer name llama.cpp knows, against llama.cpp's ids.

tests/fixtures/pretokenizer_golden.json holds llama.cpp's ids (bench/make_pretokenizer_fixtures.py,
which needs llama-cpp-python; CI has none) for SmolLM2's byte-level vocabulary written with each
``tokenizer.ggml.pre`` name, and for a ``gemma4``-model vocabulary built from Gemma 3's
(tests/pretok_vocab.py builds both vocabularies for the generator and for these tests alike).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxllm.tokenize import Tokenizer, read_gguf_tokenizer_metadata
from mlxllm.tokenize import bpe
from mlxllm.tokenize.export import write_hf_tokenizer
from mlxllm.tokenize.gguf_pre import _GGUF_PRE, gguf_pre_tokenizer
from pretok_vocab import EXTRA_TEXTS, byte_level_metadata, gemma4_metadata
from test_tokenize_models import CORPUS

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "pretokenizer_golden.json").read_text(encoding="utf-8"))
TEXTS = [CORPUS[i] for i in FIXTURE["corpus_indices"]] + EXTRA_TEXTS
NAMES: list[str] = FIXTURE["names"]
# Names with the same pre-tokenizer build one tokenizer; each name is still checked on its own ids.
GROUPS: dict[tuple, list[str]] = {}
for _name in NAMES:
    _pre = gguf_pre_tokenizer(_name)
    GROUPS.setdefault((tuple(_pre.stages), *_pre[1:]), []).append(_name)


def _expected(name: str) -> list[list[int]]:
    """llama.cpp's ids for every text with pre-tokenizer `name`."""
    index = NAMES.index(name)
    return [next(ids for ids, members in entry if index in members) for entry in FIXTURE["byte_level"]]


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path) -> dict:
    return read_gguf_tokenizer_metadata(smollm2_path)


def test_fixture_covers_every_name_and_the_corpus():
    assert FIXTURE["n_extra_texts"] == len(EXTRA_TEXTS) and len(FIXTURE["byte_level"]) == len(TEXTS)
    # every name llama.cpp compares against (the generator reads them from its source) is mapped here,
    # except the one refused below
    assert set(NAMES) | {"whitespace"} == set(_GGUF_PRE) | {"whitespace"} and "whitespace" not in NAMES
    # the names do tokenize differently: a table mapping them all alike would fail
    distinct = {tuple(map(tuple, _expected(n))) for n in NAMES}
    assert len(distinct) >= 25


@pytest.mark.parametrize("names", list(GROUPS.values()), ids=[g[0] for g in GROUPS.values()])
def test_ids_equal_llama_cpp(smollm2_meta, names):
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata(smollm2_meta, names[0]))
    got = [tok.encode(text, add_special_tokens=False) for text in TEXTS]
    for name in names:
        want = _expected(name)
        bad = [(text, g, w) for text, g, w in zip(TEXTS, got, want) if g != w]
        assert not bad, (name, bad[:3])
        with_bos = tok.encode("x", add_special_tokens=True)
        assert (with_bos[0] == tok.bos_token_id) == FIXTURE["add_bos"][name], name


def test_ignore_merges_and_lookaheads_change_ids():
    """What the fixture shows llama.cpp does, which a simpler table would miss: a pre-token that is
    a token no merge makes is taken whole only under ignore_merges, and tiny_aya's upper/lower case
    pattern keeps a camel-case word together while gpt-4o's splits it."""
    text = TEXTS.index(EXTRA_TEXTS[0])
    assert _expected("llama3")[text] != _expected("dbrx")[text]  # same regex, ignore_merges differs
    assert _expected("gpt-4o")[text] != _expected("tiny_aya")[text]


def test_whitespace_pre_tokenizer_is_refused(smollm2_meta):
    with pytest.raises(ValueError, match="'whitespace' tokenizer model"):
        Tokenizer.from_gguf_metadata(byte_level_metadata(smollm2_meta, "whitespace"))
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'no-such-name'"):
        gguf_pre_tokenizer("no-such-name")


def test_gemma4_model_equals_llama_cpp(gemma3_path):
    """The `gemma4` tokenizer model: BPE over raw characters with spaces as U+2581, newline runs
    split off, `<0xNN>` byte fallback; BOS always added (the file says not to)."""
    meta = gemma4_metadata(read_gguf_tokenizer_metadata(gemma3_path))
    tok = Tokenizer.from_gguf_metadata(meta)
    got = [tok.encode(text, add_special_tokens=False) for text in TEXTS]
    bad = [(text, g, w) for text, g, w in zip(TEXTS, got, FIXTURE["gemma4"]["ids"]) if g != w]
    assert not bad, bad[:3]
    assert FIXTURE["gemma4"]["add_bos"] and tok.encode("x")[0] == tok.bos_token_id
    byte_ids = {i for i, t in enumerate(meta["tokenizer.ggml.tokens"]) if t.startswith("<0x")}
    assert byte_ids & {i for ids in got for i in ids}  # the corpus does reach the byte fallback
    for text, ids in zip(TEXTS, got):
        if "\ufffd" not in text:
            assert tok.decode(ids) == text


BYTE_LEVEL_GROUPS = [g for g in GROUPS.values() if gguf_pre_tokenizer(g[0]).byte_level]


@pytest.mark.parametrize("names", BYTE_LEVEL_GROUPS, ids=[g[0] for g in BYTE_LEVEL_GROUPS])
def test_exported_tokenizer_json_gives_llama_cpp_ids(smollm2_meta, names, tmp_path):
    """`convert`'s tokenizer.json, read by the `tokenizers` library, gives llama.cpp's ids; text with
    bytes SmolLM2 has no token for is left out (HF drops them before merging, llama.cpp after)."""
    import tokenizers

    write_hf_tokenizer(byte_level_metadata(smollm2_meta, names[0]), tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    vocab = set(smollm2_meta["tokenizer.ggml.tokens"])
    missing = {b for b, c in enumerate(bpe.BYTE_CHARS) if c not in vocab}
    kept = [i for i, text in enumerate(TEXTS) if not missing & set(text.encode("utf-8"))]
    assert len(kept) > 0.75 * len(TEXTS)
    want = _expected(names[0])
    got = {i: ref.encode(TEXTS[i], add_special_tokens=False).ids for i in kept}
    bad = [(TEXTS[i], got[i], want[i]) for i in kept if got[i] != want[i]]
    assert not bad, (names[0], bad[:3])


def test_raw_character_bpe_export_is_refused(smollm2_meta, tmp_path):
    for name in ("gemma4", "sarvam-moe"):
        with pytest.raises(ValueError, match="not byte-level"):
            write_hf_tokenizer(byte_level_metadata(smollm2_meta, name), tmp_path)
