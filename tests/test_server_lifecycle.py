"""`mlxllm serve` as a process: /health while loading, SIGTERM with requests in flight, cached
prefixes that survive a restart, admission under a memory limit, and start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(url: str, **extra) -> httpx.Response:
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_health_says_loading_until_the_model_is_in(smollm2_path):
    server = ServerProcess("-m", str(smollm2_path), ready=False)
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            try:
                r = httpx.get(server.url + "/health", timeout=2)
                seen.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["status"] == "loading" and r.headers["retry-after"]
                    early = _chat(server.url)
                    assert early.status_code in (200, 503)  # the model may have come in meanwhile
            except httpx.ConnectError:
                pass
            time.sleep(0.05)
        assert 503 in seen and seen[-1] == 200
        assert _chat(server.url).status_code == 200
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_finishes_in_flight_streams_and_prefixes_survive_a_restart(smollm2_path, tmp_path):
    cache_dir = tmp_path / "prefixes"
    server = ServerProcess("-m", str(smollm2_path), "--prompt-cache-dir", str(cache_dir), "--shutdown-timeout", "60")
    system = "You are a careful assistant who answers in full sentences. " * 8
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    chunks: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"messages": messages, "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()

    try:
        thread = threading.Thread(target=stream)
        thread.start()
        assert first.wait(60)
        server.proc.send_signal(15)  # SIGTERM with the stream in flight
        thread.join(120)
        assert chunks[-1] == "[DONE]"
        usage_less = [json.loads(c) for c in chunks[:-1]]
        assert sum(1 for c in usage_less if c["choices"][0]["delta"].get("content")) > 30
        assert server.stop() == 0, server.output()
        assert "stopped" in server.output()
    finally:
        server.kill()
    saved = list(cache_dir.glob("prefix-*.safetensors"))
    assert saved
    (cache_dir / "prefix-0000.safetensors").write_bytes(b"\x00garbage")
    again = ServerProcess("-m", str(smollm2_path), "--prompt-cache-dir", str(cache_dir))
    try:
        r = httpx.post(again.url + "/v1/chat/completions", json={
            "messages": messages + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
            "max_tokens": 4, "temperature": 0}, timeout=120)
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 100  # the system prompt, from disk
    finally:
        again.stop()
    assert "ignoring prefix-0000.safetensors" in again.output()


def test_more_work_than_memory_waits_or_gets_503_and_the_server_lives(smollm2_path, smollm2):
    from mlx.utils import tree_flatten

    from mlxllm.model.cache import kv_bytes

    weights = sum(v.nbytes for _, v in tree_flatten(smollm2.parameters()))
    one = kv_bytes(smollm2, 30 + 40)  # a ~40-token prompt and 30 new tokens
    server = ServerProcess("-m", str(smollm2_path), "--max-memory", str(weights + int(2.5 * one)),
                           "--prompt-cache-bytes", "0", "--max-queue", "3")
    try:
        too_big = _chat(server.url, max_tokens=4000)
        assert too_big.status_code == 400 and "GB of KV cache" in too_big.json()["error"]["message"]
        results: list[httpx.Response] = []

        def one_request(i: int) -> None:
            results.append(_chat(server.url, max_tokens=30, ignore_eos=True,
                                 messages=[{"role": "user", "content": f"Tell me about the number {i}."}]))

        threads = [threading.Thread(target=one_request, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        codes = sorted(r.status_code for r in results)
        assert set(codes) <= {200, 503} and codes.count(200) >= 3 and 503 in codes  # 2 fit, 3 may wait
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "server_error"
        assert all(r.json()["usage"]["completion_tokens"] == 30 for r in results if r.status_code == 200)
        assert _chat(server.url).status_code == 200
    finally:
        assert server.stop() == 0, server.output()
    running = [line for line in server.output().splitlines() if "finish=length" in line]
    assert len(running) == codes.count(200)


def test_custom_chat_template_and_startup_errors(smollm2_path, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    server = ServerProcess("-m", str(smollm2_path), "--chat-template", str(template))
    try:
        r = _chat(server.url)
        ids = httpx.post(server.url + "/tokenize", json={"content": "user: What is the capital of France?\nassistant:"})
        assert r.json()["usage"]["prompt_tokens"] == len(ids.json()["tokens"])
    finally:
        server.stop()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for args, says in ((["-m", str(tmp_path / "missing.gguf")], "missing.gguf"),
                       (["-m", str(smollm2_path), "--chat-template", str(bad)], "bad.jinja"),
                       (["-m", str(smollm2_path), "--max-memory", "lots"], "lots"),
                       (["-m", str(smollm2_path), "--kv-bits", "7"], "--kv-bits"),
                       (["-m", str(smollm2_path), "--prefill-share", "-1"], "--prefill-share")):
        done = subprocess.run([sys.executable, "-m", "mlxllm", "serve", "--port", "0", *args], capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and lines[-1].startswith("error:") and says in lines[-1], done.stderr
        assert "Traceback" not in done.stderr
