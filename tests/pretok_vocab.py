"""Vocabularies for checking every GGUF pre-tokenizer against llama.cpp: shared by
tests/test_tokenize_pretokenizers.py and bench/make_pretokenizer_fixtures.py (which writes them as
GGUF files for llama.cpp), so both tokenize with exactly the same tokens and merges.

- byte-level BPE: SmolLM2's vocabulary plus a few tokens no merge makes, so that llama.cpp's
  ``ignore_merges`` (a pre-token that is a token is taken whole) changes ids;
- ``gemma4`` (BPE over raw characters, spaces as U+2581, ``<0xNN>`` byte tokens): Gemma 3's
  SentencePiece vocabulary with merges derived from it the way Hugging Face converts one to BPE
  (every split of a piece into two pieces, in the order of the merged piece's score).
"""

from __future__ import annotations

from typing import Any

# Tokens appended to SmolLM2's vocabulary: byte-level spellings of pre-tokens in the corpus.
UNMERGED_TOKENS = ["ĠHelloWorld", "ĠcamelCase", "ĠDON", "Ġ123", "ĠĠĠĠĠĠĠĠĠĠĠĠ"]
NORMAL = 1


def byte_level_metadata(smollm2: dict[str, Any], pre: str) -> dict[str, Any]:
    """SmolLM2's tokenizer metadata with `UNMERGED_TOKENS` added and `tokenizer.ggml.pre` = `pre`
    (and no add_bos key, so the pre-tokenizer's default shows)."""
    tokens = list(smollm2["tokenizer.ggml.tokens"])
    types = list(smollm2["tokenizer.ggml.token_type"])
    added = [t for t in UNMERGED_TOKENS if t not in set(tokens)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens + added,
        "tokenizer.ggml.token_type": types + [NORMAL] * len(added),
        "tokenizer.ggml.merges": list(smollm2["tokenizer.ggml.merges"]),
        "tokenizer.ggml.bos_token_id": smollm2["tokenizer.ggml.bos_token_id"],
        "tokenizer.ggml.eos_token_id": smollm2["tokenizer.ggml.eos_token_id"],
    }


def gemma4_metadata(gemma3: dict[str, Any]) -> dict[str, Any]:
    """A `gemma4`-model vocabulary built from Gemma 3's SentencePiece one."""
    tokens: list[str] = gemma3["tokenizer.ggml.tokens"]
    types: list[int] = gemma3["tokenizer.ggml.token_type"]
    scores: list[float] = gemma3["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = []
    for token, tid in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((-scores[tid], tid, ids[left], ids[right], f"{left} {right}"))
    merges.sort()
    return {
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.scores": list(scores),
        "tokenizer.ggml.merges": [m[-1] for m in merges],
        "tokenizer.ggml.bos_token_id": gemma3["tokenizer.ggml.bos_token_id"],
        "tokenizer.ggml.eos_token_id": gemma3["tokenizer.ggml.eos_token_id"],
        "tokenizer.ggml.add_bos_token": False,  # llama.cpp adds BOS for gemma4 all the same
    }


# Text beyond tests/fixtures/tokenizer_golden.json's corpus, aimed at what the pre-tokenizers differ in.
EXTRA_TEXTS = [
    "HelloWorld camelCase XMLHttpRequest iPhone McDonald's ÉCOLE élève ΑΘΗΝΑ αθηνα",
    "I'M DON'T we'Ll YOU'rE it'S 'S 'd rock'n'roll İstanbul'da o'clock",
    "1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890 12345678901",
    "x1y22z333w4444 ١٢٣٤٥ ١23456 12٣45 ²³⁴ ½¾ 3.14e-10 1,234,567.89 $100 +5",
    "<=> ^~|` !!!???... —–… ‘quoted’ “double” «guillemets» (paren) [brackets] {braces}",
    "ภาษาไทยง่ายนิดเดียว ພາສາລາວ ភាសាខ្មែរ မြန်မာဘာသာ",
    "한국어 텍스트 ㄱㄴㄷ ㅏㅑ 안녕하세요! 中文（你好！）：测试；“引号”",
    "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ ㈱ 〇 𠀀𠀁 ⼀⼁",
    "abc中文def Hello世界'S 漢字kanji123",
    "नमस्ते दुनिया বাংলা e\u0301 a\u0308bc Z\u0334\u0321a\u0336 \u0301start",
    "a\r\nb\r\n\r\nc\n\n\nd \n \n e\t\n\tf",
    " " * 600 + "x" + " " * 17 + "y" + "\t" * 9 + "z   \n",
    "  leading and trailing  ",
    "<sentinel:12>IMGIMGABCZ hello  world\t\ttabs    four",
    "def f(x):\r\n\treturn x**2  # comment\n\n\nclass A: pass\n",
    "👩\u200d💻 🧑🏾\u200d🚀 ✋🏻 🇺🇳 #️⃣ 😀😃",
    "mixed\u00a0nbsp\u2009thin\u202fnarrow\u3000ideo end\u2028ls\u2029ps",
    "\u200bzero\u200cwidth\u200djoiner\ufeffbom\u00adshy",
    "what's.up?yes!no,maybe;so:ok/done\\back",
    "ǅungla ǈ ǋ ᾈ ﬁ ﬂ Ⅻ ⅻ ℌ ℍ",
]
