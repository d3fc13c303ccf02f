"""llama.cpp's BPE pre-tokenizers, by their GGUF ``tokenizer.ggml.pre`` names.

llama.cpp (``src/llama-vocab.cpp``) maps each name to a list of regexes applied one after the other,
each splitting the pieces of the previous one, plus a few flags. Its regexes do not all run as
written, so the patterns here are spelled for the `regex` module to split text the way llama.cpp
does, not the way the model's original ``tokenizer.json`` does:

- Regexes with ``\\p{..}`` run on a "collapsed" copy of the text where each non-ASCII character
  stands for its category, and ``\\p{Lu}``, ``\\p{Ll}``, ``\\p{Lt}``, ``\\p{Lm}`` and ``\\p{Lo}`` all
  become "any letter": upper/lower case patterns (tiny_aya, youtu) therefore match any letter run.
- Some regexes are hand-written splitters in ``src/unicode.cpp``: the Kimi-K2 one treats only
  letters (no marks) as word characters and its own ranges as Han; the AFMoE and tiny_aya digit
  splitters cut runs of ``\\p{N}`` into groups of three from the right, the text before a run
  going with its first group.
- ``$`` is the end of a piece (``\\Z`` here) and ``\\d`` is ``[0-9]``; zero-width splits (superbpe)
  are rewritten as patterns that match the pieces between the split points.

Categories come from the `regex` module's Unicode tables, which may be newer than llama.cpp's:
characters assigned since then are split as letters, numbers, ... where llama.cpp sees "other".
"""

from __future__ import annotations

from typing import NamedTuple

from .bpe import CONTRACTIONS as _C
from .bpe import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN

_SPACES = r"\s*[\r\n]+|\s+(?!\S)|\s+"
_PUNCT = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]"""
# Separate numbers, CJK runs, then words (DeepSeek-V3 and the models that copied its tokenizer).
_DEEPSEEK3_WORDS = _PUNCT + r"[A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
_CJK_KANA = r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# DeepSeek LLM / Coder: Hangul and CJK runs (U+0800..U+4E00 is llama.cpp's range, as written).
_CJK_HANGUL = r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# The Latin, Greek, Cyrillic, ... letters of DeepSeek LLM's word regex.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
# AFMoE's CJK, kana, Thai, Lao, Khmer, Myanmar and Hangul runs (the third range starts at U+8C48, as
# llama.cpp writes it, not at U+F900).
_AFMOE_ASIAN = (
    "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
    "\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+"
)
# unicode.cpp's digit splitter: a run of numbers as 1-3 digits, then groups of three; the text
# before a run goes with its first group.
_DIGITS_BY_THREE = r"\P{N}*\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
# Kimi-K2: unicode.cpp's Han ranges, and letters that are not Han.
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f"
_NON_HAN_LETTER = rf"[^\P{{L}}{_HAN}]"
# A letter run that is upper case then lower case, or the reverse (GPT-4o's lookahead spelling).
_CASED_WORD = (
    r"[^\r\n\p{{L}}\p{{N}}]?(?:(?={m})[^a-z])*(?:(?={m})[^A-Z])+{c}"
    r"|[^\r\n\p{{L}}\p{{N}}]?(?:(?={m})[^a-z])+(?:(?={m})[^A-Z])*{c}"
)
_GPT4O = _CASED_WORD.format(m=r"\p{L}", c=_C + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES
_BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_NEWLINE_RUNS = r"[^\n]+|\n+"


class GGUFPreTokenizer(NamedTuple):
    stages: list[str]  # regexes applied one after the other, each splitting the previous pieces
    ignore_merges: bool = False  # a pre-token that is itself a token is not merged from bytes
    add_bos: bool = False  # BOS is added when the file has no tokenizer.ggml.add_bos_token
    byte_level: bool = True  # False: BPE over raw UTF-8 characters, <0xNN> tokens for other bytes
    escape_spaces: bool = False  # spaces become U+2581 before splitting (SentencePiece-style BPE)
    always_bos: bool = False  # BOS is added even where the file says not to (llama.cpp's Gemma 4 rule)
    whole_newline_runs: bool = False  # a run of newlines that is a token is taken whole


_LLAMA3 = GGUFPreTokenizer([LLAMA3_PATTERN])
_QWEN2 = GGUFPreTokenizer([QWEN2_PATTERN])
_GPT2 = GGUFPreTokenizer([GPT2_PATTERN])
_DEEPSEEK3 = GGUFPreTokenizer([r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_WORDS + r"[\r\n]*|" + _SPACES])
_GEMMA4 = GGUFPreTokenizer([_NEWLINE_RUNS], byte_level=False, escape_spaces=True, always_bos=True,
                           whole_newline_runs=True)  # fmt: skip

_TABLE: list[tuple[str, GGUFPreTokenizer]] = [
    ("default", GGUFPreTokenizer([r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"])),
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en"
     " jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4", _GPT2),
    ("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2",
     GGUFPreTokenizer([r"\p{N}", GPT2_PATTERN])),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     _LLAMA3._replace(ignore_merges=True, add_bos=True)),
    ("dbrx smaug-bpe chatglm-bpe", _LLAMA3),
    ("glm4 glm5", _LLAMA3._replace(ignore_merges=True)),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2", _QWEN2),
    ("qwen35", GGUFPreTokenizer([
        _C + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|" + _SPACES])),
    ("ufakzeka", GGUFPreTokenizer([r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _SPACES])),
    ("laguna", GGUFPreTokenizer([_NEWLINE_RUNS, QWEN2_PATTERN])),
    ("minicpm5", GGUFPreTokenizer(
        [r"\p{N}{1,3}", _C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _SPACES],
        ignore_merges=True)),
    ("jais-2", GGUFPreTokenizer([
        _C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        + "".join(rf"\s{{{n}}}(?!\S)|" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"\s{1,2}(?!\S)|\s"])),
    ("deepseek-llm", GGUFPreTokenizer([
        r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+\Z", _CJK_HANGUL, r"\p{N}+"])),
    ("deepseek-coder", GGUFPreTokenizer([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"])),
    ("deepseek-v3 hunyuan-dense joyai-llm hy_v4", _DEEPSEEK3),
    ("spark2_5", GGUFPreTokenizer(
        [r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_WORDS + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"])),
    ("afmoe", GGUFPreTokenizer([_DIGITS_BY_THREE, _AFMOE_ASIAN, _DEEPSEEK3_WORDS + r"[\r\n]*|" + _SPACES])),
    ("youtu", GGUFPreTokenizer([
        "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
        "\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA,
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+" + _C + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES],
        ignore_merges=True)),
    ("tiny_aya cohere2moe", GGUFPreTokenizer([
        _DIGITS_BY_THREE,
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+" + _C + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES])),
    ("falcon", GGUFPreTokenizer([r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, r"[0-9][0-9][0-9]"])),
    ("poro-chat bloom gpt3-finnish", GGUFPreTokenizer([_BLOOM])),
    ("viking", GGUFPreTokenizer([_BLOOM, r"\p{N}"])),
    ("tekken", GGUFPreTokenizer(
        [_CASED_WORD.format(m=r"\p{L}", c="") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES],
        ignore_merges=True, add_bos=True)),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", GGUFPreTokenizer([_GPT4O])),
    ("granite-embed-multi-97m", GGUFPreTokenizer(
        [_CASED_WORD.format(m=r"[\p{L}\p{M}]", c=_C + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES],
        ignore_merges=True)),
    ("chameleon", GGUFPreTokenizer([
        r"<sentinel:[0-9]+>", r"IMGIMG[A-I]{1,4}Z", r"[\t\n]|    |  ", r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]",
        GPT2_PATTERN], add_bos=True)),
    ("kimi-k2", GGUFPreTokenizer([
        rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?{_NON_HAN_LETTER}+{_C}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|"
        + _SPACES])),
    ("superbpe", GGUFPreTokenizer([r"\p{N}+", r"[\s\S](?:(?!(?:[0-9]{3})+(?![0-9]))[\s\S])*"])),
    ("bailingmoe bailingmoe2 llada-moe", GGUFPreTokenizer([
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+"])),
    ("seed-coder", GGUFPreTokenizer(
        [_C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|" + _SPACES])),
    ("exaone-moe", GGUFPreTokenizer([
        _C + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]"
        r"|\s+(?!\S)|\s+"])),
    ("gemma4 granite-embed-multi-311m", _GEMMA4),
    ("sarvam-moe", _GEMMA4._replace(always_bos=False, whole_newline_runs=False)),
]  # fmt: skip
_GGUF_PRE = {name: pre for names, pre in _TABLE for name in names.split()}
# Names llama.cpp knows that are not pre-tokenizers of a byte-level or SentencePiece-style BPE.
_REFUSED = {
    "whitespace": "it belongs to llama.cpp's 'whitespace' tokenizer model (jina-embeddings-v2-base-zh), which "
    "drops whitespace and BPE-encodes raw UTF-8; with a gpt2 vocabulary llama.cpp itself aborts on runs of spaces",
}


def gguf_pre_tokenizer(name: str | None) -> GGUFPreTokenizer:
    """Pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, as llama.cpp maps the names (no name is
    llama.cpp's "default")."""
    key = name or "default"
    if key in _REFUSED:
        raise ValueError(f"unsupported GGUF pre-tokenizer {key!r}: {_REFUSED[key]}")
    if key not in _GGUF_PRE:
        raise ValueError(f"unsupported GGUF pre-tokenizer {key!r}; supported: {sorted(_GGUF_PRE)}")
    return _GGUF_PRE[key]
