"""Bad flags and arguments through the real command line: one ``error:`` line, nonzero exit, no
traceback, nothing loaded or written first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_cli import assert_one_line_error, run


@pytest.mark.parametrize("args, message", [
    (["generate", "--seed", "-1"], "--seed must be an integer from 0 to 2^64 - 1, got -1"),
    (["generate", "--seed", str(2**64)], "--seed must be an integer"),
    (["generate", "--stop", "ok", "--stop", ""], "--stop strings must not be empty"),
    (["generate", "--kv-bits", "0"], "--kv-bits takes 2, 3, 4, 5, 6 or 8, not 0"),
    (["info", "~nobody-such-user/x"], "model not found"),
    (["generate", "-m", "~nobody-such-user/x"], "model not found"),
])
def test_bad_flags_one_line(args, message, capsys, monkeypatch):
    code, _, err = run(args, capsys, monkeypatch)
    assert_one_line_error(code, err, message)


def test_prompt_that_is_not_utf8():
    """Bytes from the terminal that are not UTF-8 arrive as lone surrogates in argv."""
    proc = subprocess.run([sys.executable, "-m", "mlxllm", "generate", "--no-chat", "-n", "2", "-p", b"\xff\xfeab"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: the prompt is not valid UTF-8 text (position 0)"


def test_offline_hub_is_one_quiet_line(capsys, monkeypatch):
    """A Hub id when the Hub's name does not resolve: the cache is asked, no retries, one line."""
    import socket

    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def download(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "no")))
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-mlxllm-cache")
    code, _, err = run(["info", "some-org/some-model/model.gguf"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is not in the local Hugging Face cache and the Hub cannot be reached")
    assert calls and calls[0]["local_files_only"] is True
    assert "Retrying" not in err


def test_native_panic_is_one_line(capsys, monkeypatch):
    """A Rust extension's panic is a BaseException, not an Exception: still one line."""
    from mlxllm.cli import generation

    class PanicException(BaseException):
        pass

    def boom(*a, **k):
        raise PanicException("called `Option::unwrap()` on a `None` value\nstack backtrace: ...")

    monkeypatch.setattr(generation, "load_for_command", boom)
    code, _, err = run(["generate", "-p", "x"], capsys, monkeypatch)
    assert_one_line_error(code, err, "PanicException: called `Option::unwrap()` on a `None` value")


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent-mlxllm-data"], "is not a folder"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--seed", "-3"], "--seed must be an integer"),
    (["--lora-rank", "0"], "--lora-rank must be positive"),
])
def test_lora_argument_errors_come_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    """No model load, no progress display, no file before an argument error."""
    from mlxllm.cli import training

    monkeypatch.setattr(training, "load_for_command", lambda *a, **k: pytest.fail("loaded a model first"))
    (tmp_path / "data").mkdir()
    args = ["lora", "--train", "--data", str(tmp_path / "data"), "--adapter-path", str(tmp_path / "out"), *extra]
    code, out, err = run(args, capsys, monkeypatch)
    assert_one_line_error(code, err, message)
    assert out == "" and not (tmp_path / "out").exists()
