"""Tokenizers for mlxllm: GGUF and Hugging Face vocabularies, exact against their references."""

from .detokenize import StreamingDetokenizer
from .gguf_vocab import read_gguf_tokenizer_metadata
from .tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer", "Tokenizer", "read_gguf_tokenizer_metadata"]
