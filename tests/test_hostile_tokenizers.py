"""Hostile tokenizer files and chat templates: each must end as one `UserError` naming the file (one
``error:`` line from the CLI) in bounded time and memory -- never a traceback, a hang, a Rust panic or a
table sized by a bogus id.

The inputs are generated here by mutating a valid small tokenizer (byte-level BPE built with Hugging
Face `tokenizers`, and a SentencePiece model built by mlxllm): ids negative, huge, 10**15, beyond the
vocabulary or shared; files truncated, not JSON, not UTF-8; templates that loop, recurse, grow or do
not compile. The Tokenizer API sees every case; a sample goes through the real CLI in one child
process with an address-space cap and a timeout.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mlx.core as mx

from mlxllm.errors import UserError
from mlxllm.formats.save import save_model
from mlxllm.tokenize import Tokenizer, bpe, budget, spm
from mlxllm.tokenize.checks import TokenizerFileError, id_limit
from mlxllm.tokenize.gguf_vocab import TokenizerMetadata
from test_load_hf import CONFIG, random_model

tk = pytest.importorskip("tokenizers")

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_TOKENS = 256 + 4 + len(SPECIALS)  # bytes, merges, added tokens
TIME_CAP = 10.0  # seconds any single hostile case may take through the API (budgets are shortened)


def _bpe_files() -> dict[str, bytes]:
    """A valid byte-level BPE tokenizer directory's files."""
    vocab = {c: i for i, c in enumerate(bpe.BYTE_CHARS)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    ref = tk.Tokenizer(tk.models.BPE(vocab, merges))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([tk.AddedToken(t, special=True) for t in SPECIALS])
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    return {
        "tokenizer.json": ref.to_str().encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
        "special_tokens_map.json": json.dumps({"eos_token": {"content": "</s>"}}).encode(),
        "generation_config.json": json.dumps({"eos_token_id": [261]}).encode(),
    }


def _spm_files() -> dict[str, bytes]:
    """A valid SentencePiece tokenizer directory's files."""
    pieces = ["<unk>", "<s>", "</s>", "\u2581", "\u2581a", "b", "\u2581ab", "a"]
    sp = spm.from_gguf_vocab(pieces, [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -1.5, -4.0], [2, 3, 3, 1, 1, 1, 1, 1],
                             add_space_prefix=True, unknown_token_id=0)  # fmt: skip
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHATML}
    return {"tokenizer.model": sp.proto.SerializeToString(), "tokenizer_config.json": json.dumps(config).encode()}


def _write(path: Path, files: dict[str, bytes | None]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (path / name).write_bytes(data)
    return path


def _edit(files: dict[str, bytes], name: str, change) -> dict[str, bytes]:
    """`files` with the JSON file `name` parsed, changed in place by `change`, and written back."""
    data = json.loads(files[name])
    change(data)
    return {**files, name: json.dumps(data).encode()}


def _tok(change):
    return lambda files: _edit(files, "tokenizer.json", change)


def _config(change):
    return lambda files: _edit(files, "tokenizer_config.json", change)


def _set_added_id(i: int, tid):
    def change(data):
        data["added_tokens"][i]["id"] = tid

    return change


def _add_token(content: str, tid: int):
    def change(data):
        data["added_tokens"].append({"id": tid, "content": content, "special": True, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False})  # fmt: skip

    return change


def _vocab(key: str, tid):
    def change(data):
        data["model"]["vocab"][key] = tid

    return change


def _template(source: str):
    return _config(lambda c: c.__setitem__("chat_template", source))


def _raw(name: str, make):
    return lambda files: {**files, name: make(files[name])}


def _duplicate_vocab_key(data: bytes) -> bytes:
    text = data.decode()
    assert '"hello":259' in text
    return text.replace('"hello":259', '"hello":259,"hello":7').encode()


def _invalid_utf8(data: bytes) -> bytes:
    at = data.index(b'"', 10) + 1  # inside a string
    return data[:at] + b"\xff\xfe" + data[at:]


def _post_processor(ids):
    def change(data):
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": ids, "tokens": ["<s>"]}},
        }

    return change


HUGE, ENORMOUS = 999_999_999, 10**15
BEYOND = id_limit(N_TOKENS) + 5

# (case, mutation of the BPE files, what the one error line must say)
BPE_CASES = [
    ("added-id-huge", _tok(_set_added_id(0, HUGE)),
     f"tokenizer.json: added token '<s>' has id {HUGE}; the vocabulary has {N_TOKENS} tokens"),
    ("added-id-1e15", _tok(_set_added_id(1, ENORMOUS)), f"added token '</s>' has id {ENORMOUS};"),
    ("added-id-negative", _tok(_set_added_id(2, -1)), "added token '<|im_start|>' has id -1;"),
    ("added-id-beyond-vocab", _tok(_set_added_id(3, BEYOND)), f"added token '<|im_end|>' has id {BEYOND};"),
    ("added-id-float", _tok(_set_added_id(0, 3.5)), "added token 0 needs a string"),
    ("added-id-bool", _tok(_set_added_id(0, True)), "added token 0 needs a string"),
    ("vocab-id-negative", _tok(_vocab("he", -5)), "tokenizer.json: token 'he' has id -5"),
    ("vocab-id-1e15", _tok(_vocab("hello", ENORMOUS)), f"token 'hello' has id {ENORMOUS}"),
    ("vocab-id-string", _tok(_vocab("hello", "259")), "token 'hello' has id '259'"),
    ("vocab-lone-surrogate", _tok(_vocab("\ud800", 5)), "token '\\ud800' is not valid Unicode"),
    ("added-lone-surrogate", _tok(_add_token("<\udc00>", N_TOKENS)), "added token '<\\udc00>' is not valid Unicode"),
    ("template-lone-surrogate", _template("{{ '\udc00' }}"), "tokenizer_config.json: the chat template is not valid"),
    ("vocab-two-texts-one-id", _tok(_vocab("hello", 256)), "id 256 is both 'he' and 'hello'"),
    ("vocab-one-text-two-ids", _raw("tokenizer.json", _duplicate_vocab_key), "token 'hello' is in the vocabulary twice"),
    ("added-text-also-in-vocab", _tok(_add_token("hello", N_TOKENS)), f"'hello' has id {N_TOKENS}, but also id 259"),
    ("added-text-twice", lambda f: _tok(_add_token("<x>", N_TOKENS + 1))(_tok(_add_token("<x>", N_TOKENS))(f)),
     f"added token '<x>' has id {N_TOKENS + 1}, but also id {N_TOKENS}"),
    ("added-id-of-a-vocab-token", _tok(_add_token("<y>", 258)), "id 258 is both 'hell' and '<y>'"),
    ("added-not-an-object", _tok(lambda d: d.__setitem__("added_tokens", [5])), "added token 0 needs"),
    ("special-token-too-long", _tok(_add_token("<" + "x" * 1000 + ">", N_TOKENS)), "characters long"),
    ("merge-not-a-pair", _tok(lambda d: d["model"].__setitem__("merges", [["h", "e", "x"]])), "merge 0"),
    ("merge-not-a-string", _tok(lambda d: d["model"].__setitem__("merges", [5])), "merge 0 (5)"),
    ("model-not-an-object", _tok(lambda d: d.__setitem__("model", [])), '"model" must be an object'),
    ("vocab-not-an-object", _tok(lambda d: d["model"].__setitem__("vocab", [])), '"model.vocab" must be'),
    ("pre-tokenizer-unsupported", _tok(lambda d: d.__setitem__("pre_tokenizer", {"type": "Whitespace"})),
     "tokenizer.json: unsupported pre-tokenizer type 'Whitespace'"),
    ("pre-tokenizer-bad-regex",
     _tok(lambda d: d.__setitem__("pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(("},
                                                   "behavior": "Isolated", "invert": False})),
     "tokenizer.json: building the tokenizer failed"),
    ("post-processor-bos-1e15", _tok(_post_processor([ENORMOUS])), f"the post-processor's BOS id is {ENORMOUS}"),
    ("post-processor-malformed", _tok(lambda d: d.__setitem__("post_processor", {"type": "TemplateProcessing",
                                                                                   "single": 5})), '"post_processor"'),
    ("decoder-table-id-huge", _config(lambda c: c.__setitem__("added_tokens_decoder", {str(HUGE): {"content": "<z>"}})),
     f"tokenizer_config.json: added token '<z>' has id {HUGE}"),
    ("decoder-table-id-negative", _config(lambda c: c.__setitem__("added_tokens_decoder", {"-3": {"content": "<z>"}})),
     "tokenizer_config.json: added token '<z>' has id -3"),
    ("decoder-table-id-text", _config(lambda c: c.__setitem__("added_tokens_decoder", {"x": {"content": "<z>"}})),
     "tokenizer_config.json: added token id 'x' is not an integer"),
    ("decoder-table-id-digits", _config(lambda c: c.__setitem__("added_tokens_decoder", {"9" * 5000: {"content": "z"}})),
     "tokenizer_config.json: added token id"),
    ("chat-template-not-text", _config(lambda c: c.__setitem__("chat_template", 5)), '"chat_template" must be'),
    ("chat-template-list-malformed", _config(lambda c: c.__setitem__("chat_template", [5])), '"chat_template" must be'),
    ("generation-eos-1e15", lambda f: _edit(f, "generation_config.json", lambda g: g.__setitem__("eos_token_id", ENORMOUS)),
     f"generation_config.json: eos_token_id is {ENORMOUS}"),
    ("config-eos-negative", lambda f: {**f, "config.json": b'{"eos_token_id": [2, -1]}'}, "config.json: eos_token_id is -1"),
    ("tokenizer-json-truncated", _raw("tokenizer.json", lambda d: d[: len(d) // 2]), "tokenizer.json: not valid JSON"),
    ("tokenizer-json-not-json", _raw("tokenizer.json", lambda d: b"hello"), "tokenizer.json: not valid JSON"),
    ("tokenizer-json-an-array", _raw("tokenizer.json", lambda d: b"[1, 2]"), "tokenizer.json: expected a JSON object"),
    ("tokenizer-json-nested", _raw("tokenizer.json", lambda d: b"[" * 200_000), "tokenizer.json: not valid JSON"),
    ("tokenizer-json-huge-int", _raw("tokenizer.json", lambda d: b'{"a": ' + b"9" * 100_000 + b"}"),
     "tokenizer.json: not valid JSON"),
    ("tokenizer-json-not-utf8", _raw("tokenizer.json", _invalid_utf8), "tokenizer.json: not UTF-8 text"),
    ("config-truncated", _raw("tokenizer_config.json", lambda d: d[:20]), "tokenizer_config.json: not valid JSON"),
    ("config-not-utf8", _raw("tokenizer_config.json", _invalid_utf8), "tokenizer_config.json: not UTF-8 text"),
    ("special-map-truncated", _raw("special_tokens_map.json", lambda d: d[:-2]), "special_tokens_map.json: not valid JSON"),
    ("special-map-not-utf8", _raw("special_tokens_map.json", _invalid_utf8), "special_tokens_map.json: not UTF-8"),
    ("generation-config-truncated", _raw("generation_config.json", lambda d: d[:-1]), "generation_config.json: not valid"),
    ("template-file-not-utf8", lambda f: {**f, "chat_template.jinja": b"{{ 'a' }}\xff"}, "chat_template.jinja: not UTF-8"),
]  # fmt: skip


def _spm_dup_piece(data: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    proto = sp_pb.ModelProto.FromString(data)
    proto.pieces[5].piece = "\u2581a"
    return proto.SerializeToString()


def _spm_bad_byte_piece(data: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    proto = sp_pb.ModelProto.FromString(data)
    proto.pieces[5].type = spm.BYTE
    return proto.SerializeToString()


def _protobuf_fails(data: bytes) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    try:
        sp_pb.ModelProto.FromString(data)
    except Exception:
        return True
    return False


def _truncate_unparsable(data: bytes) -> bytes:
    return data[: next(c for c in range(len(data) // 2, len(data)) if _protobuf_fails(data[:c]))]


SPM_CASES = [
    ("model-truncated", _raw("tokenizer.model", _truncate_unparsable), "tokenizer.model: not a SentencePiece model"),
    ("model-garbage", _raw("tokenizer.model", lambda d: b"\xff" * 64), "tokenizer.model: not a SentencePiece model"),
    ("model-piece-twice", _raw("tokenizer.model", _spm_dup_piece), "tokenizer.model: piece '\u2581a' has two ids, 4 and 5"),
    ("model-bad-byte-piece", _raw("tokenizer.model", _spm_bad_byte_piece), "tokenizer.model: byte piece 5 is 'b'"),
    ("spm-added-id-1e15",
     _config(lambda c: c.__setitem__("added_tokens_decoder", {str(ENORMOUS): {"content": "<pad>"}})),
     f"tokenizer_config.json: added token '<pad>' has id {ENORMOUS}; the vocabulary has 9 tokens"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bpe_files():
    return _bpe_files()


@pytest.fixture(scope="module")
def spm_files():
    return _spm_files()


def _expect_error(path: Path, message: str) -> UserError:
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        Tokenizer.from_hf_dir(path)
    assert time.monotonic() - start < TIME_CAP
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_the_unmutated_tokenizers_work(bpe_files, spm_files, tmp_path):
    tok = Tokenizer.from_hf_dir(_write(tmp_path / "bpe", bpe_files))
    ref = tk.Tokenizer.from_str(bpe_files["tokenizer.json"].decode())
    for text in ["hello world", "<|im_start|>user\nhello<|im_end|>", "héllo"]:
        assert tok.encode(text) == ref.encode(text).ids
    assert tok.vocab_size == N_TOKENS and tok.eos_token_ids == {261, 263}
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    sp = Tokenizer.from_hf_dir(_write(tmp_path / "spm", spm_files))
    assert sp.decode(sp.encode("a ab b"), skip_special_tokens=True) == "a ab b"


@pytest.mark.parametrize("case, mutate, message", BPE_CASES, ids=[c[0] for c in BPE_CASES])
def test_hostile_bpe_files(case, mutate, message, bpe_files, tmp_path):
    err = _expect_error(_write(tmp_path, mutate(bpe_files)), message)
    assert isinstance(err, ValueError)  # what these errors were before, for callers that catch that


@pytest.mark.parametrize("case, mutate, message", SPM_CASES, ids=[c[0] for c in SPM_CASES])
def test_hostile_sentencepiece_files(case, mutate, message, spm_files, tmp_path):
    _expect_error(_write(tmp_path, mutate(spm_files)), message)


def test_every_prefix_of_the_files_loads_or_fails_cleanly(bpe_files, spm_files, tmp_path):
    """Truncated anywhere, a file is a UserError (or, at a field boundary of a protobuf, still a model)."""
    model = spm_files["tokenizer.model"]
    for cut in range(len(model)):
        try:
            Tokenizer.from_hf_dir(_write(tmp_path / "spm", {**spm_files, "tokenizer.model": model[:cut]}))
        except UserError:
            pass
    data = bpe_files["tokenizer.json"]
    for cut in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(UserError, match=r"tokenizer\.json: not (valid JSON|UTF-8 text)"):  # a cut character
            Tokenizer.from_hf_dir(_write(tmp_path / "bpe", {**bpe_files, "tokenizer.json": data[:cut]}))


def test_small_holes_in_the_ids_are_allowed(bpe_files, tmp_path):
    """Some real vocabularies leave a few ids unused; only tables mostly made of holes are refused."""
    tok = Tokenizer.from_hf_dir(_write(tmp_path, _tok(_add_token("<gap>", N_TOKENS + 40))(bpe_files)))
    assert tok.vocab_size == N_TOKENS + 41 and tok.encode("<gap>", add_special_tokens=False) == [N_TOKENS + 40]
    assert tok.decode([N_TOKENS + 3]) == ""


def test_special_tokens_nesting_as_deep_as_allowed(bpe_files, tmp_path):
    files = bpe_files
    for k in range(1, 257):  # "☃", "☃☃", ...: every one a prefix of the next
        files = _tok(_add_token("\u2603" * k, N_TOKENS + k - 1))(files)
    tok = Tokenizer.from_hf_dir(_write(tmp_path, files))
    assert tok.encode("\u2603" * 300, add_special_tokens=False) == [N_TOKENS + 255, N_TOKENS + 43]


# --- native code: what tiktoken and sentencepiece raise becomes one error naming the file -------------


def test_tiktoken_panics_on_duplicate_ids_so_they_are_refused_first():
    tiktoken = pytest.importorskip("tiktoken")
    with pytest.raises(BaseException) as info:  # noqa: B017 -- a pyo3 PanicException is no Exception
        tiktoken.Encoding(name="dup", pat_str=r"\S+", mergeable_ranks={b"a": 0, b"b": 0}, special_tokens={})
    assert not isinstance(info.value, Exception)


class _FakePanic(BaseException):
    pass


def test_anything_the_native_constructors_raise_names_the_file(bpe_files, spm_files, tmp_path, monkeypatch):
    import tiktoken

    def panic(*args, **kwargs):
        raise _FakePanic("called `Result::unwrap()` on an `Err` value")

    monkeypatch.setattr(tiktoken, "Encoding", panic)
    _expect_error(_write(tmp_path / "bpe", bpe_files), "tokenizer.json: tiktoken failed (_FakePanic: called")
    monkeypatch.setattr(spm.sentencepiece, "SentencePieceProcessor", panic)
    _expect_error(_write(tmp_path / "spm", spm_files), "tokenizer.model: sentencepiece failed (_FakePanic")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spm.sentencepiece, "SentencePieceProcessor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Tokenizer.from_hf_dir(tmp_path / "spm")


# --- GGUF metadata ------------------------------------------------------------------------------------


def _gguf_meta() -> TokenizerMetadata:
    merges = ["h e", "l l", "he ll", "hell o"]
    tokens = [*bpe.BYTE_CHARS, "he", "ll", "hell", "hello", "<s>", "</s>"]
    meta = TokenizerMetadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 260 + [3, 3], "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 260, "tokenizer.ggml.eos_token_id": 261, "tokenizer.chat_template": CHATML,
    })  # fmt: skip
    meta.source = "tiny.gguf"
    return meta


def _meta_with(**changes) -> TokenizerMetadata:
    meta = _gguf_meta()
    for key, value in changes.items():
        meta[key.replace("__", ".")] = value
    return meta


GGUF_CASES = [
    (_meta_with(tokenizer__ggml__bos_token_id=HUGE),
     f"tiny.gguf: tokenizer.ggml.bos_token_id is {HUGE}; the vocabulary has 262 tokens"),
    (_meta_with(tokenizer__ggml__eos_token_id=-1), "tiny.gguf: tokenizer.ggml.eos_token_id is -1"),
    (_meta_with(tokenizer__ggml__padding_token_id=ENORMOUS), f"tokenizer.ggml.padding_token_id is {ENORMOUS}"),
    (_meta_with(tokenizer__ggml__unknown_token_id=262), "tokenizer.ggml.unknown_token_id is 262; the vocabulary has 262"),
    (_meta_with(tokenizer__ggml__eot_token_id="1"), "tokenizer.ggml.eot_token_id is '1'"),
    (_meta_with(tokenizer__ggml__tokens=[*_gguf_meta()["tokenizer.ggml.tokens"][:-1], "he"]),
     "token 'he' has two ids, 256 and 261"),
    (_meta_with(tokenizer__ggml__tokens="abc"), "tokenizer.ggml.tokens must be a non-empty array of strings"),
    (_meta_with(tokenizer__ggml__token_type=[1] * 10), "tokenizer.ggml.token_type must be an array of 262 numbers"),
    (_meta_with(tokenizer__ggml__merges=[1, 2]), "tokenizer.ggml.merges must be an array of strings"),
    (_meta_with(tokenizer__chat_template=["x"]), "tokenizer.chat_template must be a string"),
    (_meta_with(tokenizer__ggml__model="bert"), "tiny.gguf: unsupported tokenizer model 'bert'"),
    (_meta_with(tokenizer__ggml__pre="no-such-pre"), "tiny.gguf: unsupported GGUF pre-tokenizer 'no-such-pre'"),
    (_meta_with(tokenizer__ggml__model="llama", tokenizer__ggml__token_type=[6] * 262), "tiny.gguf: byte piece 0 is"),
    (_meta_with(tokenizer__ggml__model="llama", tokenizer__ggml__token_type=[1] * 261 + [99]), "tiny.gguf:"),
]  # fmt: skip


@pytest.mark.parametrize("meta, message", GGUF_CASES, ids=[m for _, m in GGUF_CASES])
def test_hostile_gguf_metadata(meta, message):
    assert Tokenizer.from_gguf_metadata(_gguf_meta()).encode("hello") == [259]
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        Tokenizer.from_gguf_metadata(meta)
    assert time.monotonic() - start < TIME_CAP
    assert message in str(info.value), str(info.value)


# --- chat templates ---------------------------------------------------------------------------------

LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
TEMPLATE_CASES = [
    ("nested-range-loops", LOOPS, "ran past its budget (it ran longer than 0.5 s)"),
    ("loops-over-a-list", "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",
     "ran past its budget (it ran longer than 0.5 s)"),
    ("repetition", "{{ 'a' * 10**9 }}", "ran past its budget (a repetition of 1000000000 characters; at most"),
    ("big-power", "{{ 10 ** (10 ** 10) }}", "ran past its budget (an integer too large)"),
    ("recursive-macro", "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "ran past its budget (calls nested"),
    ("recursive-loop", "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "ran past its budget (calls nested"),
    ("string-doubling", "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "ran past its budget (a string of"),
    ("list-doubling", "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}"
     "{% endfor %}{{ ns.x }}", "ran past its budget (a value of more than"),
    ("output-flood", "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "ran past its budget (output of"),
    ("macro-buffer-flood", "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 10000 }}{% endfor %}{% endmacro %}"
     "{{ m() | length }}", "ran past its budget"),
    ("wide-format", "{{ '%999999999d' % 1 }}", "ran past its budget (a formatted string"),
    ("wide-method", "{{ 'x'.ljust(10**9) }}", "ran past its budget (str.ljust()"),
    ("wide-filter", "{{ ('\\n' * 1000)|indent(100000) }}", "ran past its budget (indent"),
    ("huge-range", "{{ range(10**12) | length }}", "ran past its budget (range() of more than 100000"),
    ("undefined-name", "{{ nothing.here }}", "the chat template in tokenizer_config.json failed: 'nothing' is undefined"),
    ("type-error", "{{ [] + {} }}", "the chat template in tokenizer_config.json failed: TypeError"),
    ("syntax-error", "hello\n{% for m in messages %}", "tokenizer_config.json does not compile (line 2: Unexpected end"),
    ("python-nesting", "{% for a in [1] %}" * 25 + "{% endfor %}" * 25, "tokenizer_config.json does not compile"),
]  # fmt: skip


@pytest.fixture
def short_budget(monkeypatch):
    monkeypatch.setattr(budget, "RENDER", budget.Budget(seconds=0.5))
    monkeypatch.setattr(budget, "PROBE", budget.Budget(seconds=0.2))


@pytest.mark.parametrize("case, template, message", TEMPLATE_CASES, ids=[c[0] for c in TEMPLATE_CASES])
def test_hostile_chat_templates(case, template, message, bpe_files, tmp_path, short_budget):
    start = time.monotonic()
    tok = Tokenizer.from_hf_dir(_write(tmp_path, _template(template)(bpe_files)))  # loading still works
    assert tok.encode("hello", add_special_tokens=False) == [259] and tok.has_chat_template
    with pytest.raises(UserError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < TIME_CAP
    assert str(info.value).startswith("the chat template") and message in str(info.value), str(info.value)


def test_a_broken_template_file_names_its_line(bpe_files, tmp_path):
    files = {**bpe_files, "chat_template.jinja": b"{{ bos_token }}\n{% if x %}\n{{ x ]] }}\n{% endif %}\n"}
    tok = Tokenizer.from_hf_dir(_write(tmp_path, files))
    assert tok.chat_template_error.startswith("the chat template in chat_template.jinja does not compile (line 3:")
    with pytest.raises(UserError, match=r"chat_template\.jinja does not compile \(line 3"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_lora_chat_data_with_a_broken_template_fails(bpe_files, tmp_path):
    from mlxllm.train.data import load_split

    tok = Tokenizer.from_hf_dir(_write(tmp_path / "m", _template("{% if %}")(bpe_files)))
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    with pytest.raises(UserError, match="tokenizer_config.json does not compile"):
        load_split(tmp_path, "train", tok, 64)


def test_a_legitimate_template_is_unchanged(bpe_files, tmp_path):
    """The budget costs nothing a real template notices: ChatML over a long conversation renders as
    Jinja's own sandbox renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok = Tokenizer.from_hf_dir(_write(tmp_path, bpe_files))
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 200} for i in range(300)]
    plain = ImmutableSandboxedEnvironment().from_string(CHATML)
    assert tok.apply_chat_template(messages) == plain.render(messages=messages, add_generation_prompt=True)


# --- the CLI, in one child process with a memory cap and a timeout ------------------------------------

CHILD = textwrap.dedent(
    """
    import io, json, os, sys, tempfile, traceback
    from mlxllm.cli import main

    cases = json.loads(sys.argv[1])
    results = []
    for args, stdin in cases:
        native = tempfile.TemporaryFile()
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)  # what native code (a Rust panic) prints goes to fd 2
        err, out = io.StringIO(), io.StringIO()
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
        code = None
        try:
            main(args)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = "escaped"
            traceback.print_exc(file=err)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        results.append({"code": code, "stderr": err.getvalue(), "native": native.read().decode(errors="replace")})
    json.dump(results, open(os.environ["HOSTILE_RESULTS"], "w"))
    """
)


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    model = random_model({**CONFIG, "vocab_size": N_TOKENS, "num_hidden_layers": 1}, mx.float32)
    return save_model(model, tmp_path_factory.mktemp("hostile") / "weights")


def test_hostile_files_through_the_cli(weights_dir, bpe_files, spm_files, tmp_path):
    """A sample of the cases above through `mlxllm` itself: nonzero exit, exactly one `error:` line on
    stderr, no traceback, nothing printed by native code; and the broken template still allows
    `--no-chat`. The budgets are the real ones here."""
    by_name = {name: mutate for name, mutate, _ in BPE_CASES}
    spm_by_name = {name: mutate for name, mutate, _ in SPM_CASES}
    dirs = {
        "valid": bpe_files,
        "added-id-huge": by_name["added-id-huge"](bpe_files),
        "added-id-1e15": by_name["added-id-1e15"](bpe_files),
        "vocab-two-texts-one-id": by_name["vocab-two-texts-one-id"](bpe_files),
        "tokenizer-json-truncated": by_name["tokenizer-json-truncated"](bpe_files),
        "config-not-utf8": by_name["config-not-utf8"](bpe_files),
        "generation-eos-1e15": by_name["generation-eos-1e15"](bpe_files),
        "model-truncated": spm_by_name["model-truncated"](spm_files),
        "loops": _template(LOOPS)(bpe_files),
        "repetition": _template("{{ 'a' * 10**9 }}")(bpe_files),
        "recursion": _template("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}")(bpe_files),
        "syntax-error": _template("ok\n{% for m in messages %}")(bpe_files),
    }
    for name, files in dirs.items():
        shutil.copytree(weights_dir, tmp_path / name)
        _write(tmp_path / name, files)

    def gen(name, *extra):
        return ["generate", "-m", str(tmp_path / name), "-p", "hello", "-n", "2", *extra]

    expected = [
        (gen("valid"), "", None),
        (gen("added-id-huge"), "", f"error: tokenizer.json: added token '<s>' has id {HUGE}; the vocabulary has"),
        (gen("added-id-1e15", "--no-chat"), "", f"error: tokenizer.json: added token '</s>' has id {ENORMOUS}"),
        (gen("vocab-two-texts-one-id"), "", "error: tokenizer.json: id 256 is both 'he' and 'hello'"),
        (gen("tokenizer-json-truncated"), "", "error: tokenizer.json: not valid JSON"),
        (gen("config-not-utf8"), "", "error: tokenizer_config.json: not UTF-8 text"),
        (gen("generation-eos-1e15"), "", f"error: generation_config.json: eos_token_id is {ENORMOUS}"),
        (gen("model-truncated"), "", "error: tokenizer.model: not a SentencePiece model"),
        (gen("loops"), "", "error: the chat template ran past its budget (it ran longer than 2 s)"),
        (gen("repetition"), "", "error: the chat template ran past its budget (a repetition"),
        (gen("recursion"), "", "error: the chat template ran past its budget (calls nested more than 64 deep)"),
        (gen("syntax-error"), "", "error: the chat template in tokenizer_config.json does not compile (line 2:"),
        (gen("syntax-error", "--chat"), "", "error: the chat template in tokenizer_config.json does not compile"),
        (gen("syntax-error", "--no-chat"), "", None),
        (["chat", "-m", str(tmp_path / "syntax-error"), "-n", "2"], "hi\n/exit\n",
         "error: the chat template in tokenizer_config.json does not compile (line 2:"),
    ]
    results_file = tmp_path / "results.json"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([[args, stdin] for args, stdin, _ in expected])],
        preexec_fn=_cap_memory, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOSTILE_RESULTS": str(results_file)}, cwd=Path(__file__).parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    results = json.loads(results_file.read_text())
    for (args, _, message), got in zip(expected, results):
        assert not got["native"].strip(), (args, got["native"][-2000:])
        if message is None:
            assert got["code"] in (0, None), (args, got)
            continue
        lines = got["stderr"].strip().splitlines()
        assert got["code"] not in (0, None, "escaped"), (args, got)
        assert "Traceback" not in got["stderr"], (args, got["stderr"])
        assert len(lines) == 1 and lines[0].startswith(message), (args, got["stderr"])


def test_errors_are_tokenizer_file_errors(bpe_files, tmp_path):
    err = _expect_error(_write(tmp_path, _tok(_set_added_id(0, -1))(bpe_files)), "has id -1")
    assert isinstance(err, TokenizerFileError)
