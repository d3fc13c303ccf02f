"""`mlxllm serve` against a corpus of malformed and hostile requests: truncated JSON, wrong types,
NaN / Infinity, huge numbers, invalid UTF-8, 10 MB bodies, deep nesting, prompts past the context,
huge max_tokens, unknown roles, fields, methods and paths, bad Content-Length headers, raw garbage
over a socket and slowloris-style idle connections.

Every case must be answered by a 4xx in its API's error shape (OpenAI paths: ``{"error": {"message",
"type", ...}}``; ``/v1/messages`` paths: ``{"type": "error", "error": {"type", "message"}}``), or, at
the byte level, by a closed connection; never a 5xx, a hang or a dead server. Requests that are
valid by design (unknown fields, optional fields set to null) must simply not fail. Midway and at
the end a good request still answers "Paris".

Each test runs its whole group and then lists every case that misbehaved, by name."""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest

from conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONTEXT = 8192
MAX_BODY = 1 << 20
TIMEOUT = 30.0  # no single case may take longer: past that it counts as a hang

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
POST_PATHS = OPENAI_PATHS + ANTHROPIC_PATHS
GET_PATHS = ("/health", "/metrics", "/v1/models", "/v1/models/smollm2")

# A valid body for every POST endpoint. The OpenAI ones ask for no tokens (max_tokens 0 is valid and
# goes through every check but costs the engine nothing: the corpus is about what the server
# refuses); /v1/messages needs at least one. ``edge_value_cases`` does generate with odd values.
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "smollm2", "messages": QUESTION, "max_tokens": 0, "temperature": 0, "top_p": 1, "top_k": 0,
        "min_p": 0, "seed": 1, "stop": ["\n\n"], "n": 1, "user": "u", "logprobs": False, "top_logprobs": 0,
        "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1.0, "ignore_eos": False,
        "stream": False, "stream_options": {"include_usage": False}},
    "/v1/completions": {
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 0, "temperature": 0, "seed": 1,
        "stop": ["\n"], "echo": False, "logprobs": None, "suffix": None, "stream": False},
    "/v1/messages": {
        "model": "smollm2", "max_tokens": 1, "messages": QUESTION, "system": "You are a helpful assistant.",
        "temperature": 0, "top_p": 1, "top_k": 0, "stop_sequences": ["\n\n"], "metadata": {"user_id": "u"},
        "stream": False},
    "/v1/messages/count_tokens": {"model": "smollm2", "messages": QUESTION, "system": "You are brief.", "tools": None},
    "/tokenize": {"content": "hello world", "add_special": False},
    "/detokenize": {"tokens": [1, 2, 3]},
}

# Hostile values, as raw JSON text (so NaN and Infinity go over the wire as the bare literals).
VALUES: dict[str, str] = {
    "null": "null", "true": "true", "false": "false", "zero": "0", "negative": "-1", "float": "1.5",
    "huge_int": str(10**30), "neg_huge_int": str(-10**30), "big_float": "1e308", "overflow_float": "1e999",
    "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "string": '"x"', "empty_string": '""',
    "empty_list": "[]", "int_list": "[1, 2]", "nested_list": "[[[[]]]]", "empty_dict": "{}", "dict": '{"a": 1}',
}

# For each field: the hostile values that are valid by design (these need only not fail). Every
# other value must be refused with a 4xx.
STR_OPT = {"null", "string", "empty_string"}
BOOL = {"true", "false"}
ACCEPTED: dict[str, dict[tuple, set[str]]] = {
    "/v1/chat/completions": {
        ("model",): STR_OPT, ("user",): STR_OPT,
        ("messages",): set(), ("messages", 0, "role"): set(),
        ("messages", 0, "content"): {"null", "string", "empty_string", "empty_list"},
        ("max_tokens",): {"null", "zero", "huge_int"}, ("top_k",): {"null", "zero", "huge_int"},
        ("temperature",): {"null", "zero", "float"}, ("top_p",): {"null"}, ("min_p",): {"null", "zero"},
        ("presence_penalty",): {"null", "zero", "negative", "float"},
        ("frequency_penalty",): {"null", "zero", "negative", "float"},
        ("repetition_penalty",): {"null", "float", "huge_int", "big_float"},
        ("seed",): {"null", "zero"}, ("stop",): {"null", "string", "empty_list"}, ("n",): {"null"},
        ("logprobs",): BOOL, ("top_logprobs",): {"null", "zero"}, ("ignore_eos",): BOOL, ("stream",): BOOL,
        ("stream_options",): {"null", "empty_dict", "dict"},
    },
    "/v1/completions": {
        ("model",): STR_OPT, ("prompt",): {"string", "int_list"},
        ("max_tokens",): {"null", "zero", "huge_int"}, ("temperature",): {"null", "zero", "float"},
        ("seed",): {"null", "zero"}, ("stop",): {"null", "string", "empty_list"}, ("echo",): BOOL,
        ("logprobs",): {"null", "zero"}, ("suffix",): {"null", "empty_string"}, ("stream",): BOOL,
    },
    "/v1/messages": {
        ("model",): STR_OPT, ("max_tokens",): {"huge_int"},
        ("messages",): set(), ("messages", 0, "role"): set(),
        ("messages", 0, "content"): {"string", "empty_string", "empty_list"},
        ("system",): {"null", "string", "empty_string", "empty_list"},
        ("temperature",): {"null", "zero"}, ("top_p",): {"null"}, ("top_k",): {"null", "zero", "huge_int"},
        ("stop_sequences",): {"null", "empty_list"}, ("metadata",): {"null", "empty_dict", "dict"},
        ("stream",): BOOL,
    },
    "/v1/messages/count_tokens": {
        ("model",): STR_OPT, ("messages",): set(), ("messages", 0, "role"): set(),
        ("messages", 0, "content"): {"string", "empty_string", "empty_list"},
        ("system",): {"null", "string", "empty_string", "empty_list"}, ("tools",): {"null", "empty_list"},
    },
    "/tokenize": {("content",): {"string", "empty_string"}, ("add_special",): BOOL},
    "/detokenize": {("tokens",): {"empty_list", "int_list"}},
}

INVALID_UTF8 = {
    "ff": b"\xff", "fe_ff": b"\xfe\xff", "lone_continuation": b"\x80", "bad_2nd_byte": b"\xc3\x28",
    "two_continuations": b"\xa0\xa1", "bad_3byte": b"\xe2\x28\xa1", "cut_3byte": b"\xe2\x82",
    "bad_4byte": b"\xf0\x28\x8c\x28", "five_byte": b"\xf8\xa1\xa1\xa1\xa1", "overlong_slash": b"\xc0\xaf",
    "utf8_surrogate": b"\xed\xa0\x80", "above_max": b"\xf4\x90\x80\x80",
}

# Where a string goes in each endpoint's body, for the byte-level UTF-8 cases.
STRING_SLOT: dict[str, tuple] = {
    "/v1/chat/completions": ("messages", 0, "content"), "/v1/completions": ("prompt",),
    "/v1/messages": ("messages", 0, "content"), "/v1/messages/count_tokens": ("system",),
    "/tokenize": ("content",),
}


# ---------------------------------------------------------------------------------------------
# The server and the case machinery


@pytest.fixture(scope="module")
def server(smollm2_path):
    server = ServerProcess("-m", str(smollm2_path), "--max-batch", "8", "--max-body-bytes", "1MiB",
                           "--model-name", "smollm2")
    yield server
    server.stop()


@dataclass
class Case:
    """One HTTP request and what may come back: ``expect`` is "4xx" (a 4xx in the API's shape),
    "ok" (anything but a 5xx; a 4xx still in shape), or the exact status; ``says`` must then be in
    the error message; ``may_close``: a closed connection is an answer too."""

    name: str
    path: str
    body: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    expect: str | int | tuple = "4xx"
    says: str | None = None
    may_close: bool = False
    check: Callable[[httpx.Response, Any], str | None] | None = None  # more to check on the answer


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _body(path: str, **changes: Any) -> bytes:
    return _dumps({**VALID[path], **changes}).encode()


_SENTINEL = "\x00HOSTILE\x00"


def _splice(obj: dict[str, Any], where: tuple, raw: str) -> bytes:
    """``obj`` as JSON with the value at ``where`` replaced by the raw JSON text ``raw``."""
    obj = copy.deepcopy(obj)
    target = obj
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = _SENTINEL
    text = _dumps(obj)
    assert text.count(json.dumps(_SENTINEL)) == 1
    return text.replace(json.dumps(_SENTINEL), raw).encode("utf-8", "surrogatepass")


def _splice_bytes(obj: dict[str, Any], where: tuple, raw: bytes) -> bytes:
    obj = copy.deepcopy(obj)
    target = obj
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = _SENTINEL
    text = _dumps(obj).encode()
    marker = json.dumps(_SENTINEL).encode()
    return text.replace(marker, raw)


def shape_problem(path: str, payload: Any) -> str | None:
    """Why ``payload`` is not an error in the shape of the API that ``path`` belongs to (None: it is)."""
    if path.split("?")[0].startswith("/v1/messages"):
        if not (isinstance(payload, dict) and payload.get("type") == "error" and isinstance(payload.get("error"), dict)
                and isinstance(payload["error"].get("type"), str) and isinstance(payload["error"].get("message"), str)):
            return f"not an Anthropic error: {str(payload)[:200]}"
    elif not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)
              and isinstance(payload["error"].get("message"), str) and isinstance(payload["error"].get("type"), str)):
        return f"not an OpenAI error: {str(payload)[:200]}"
    return None


def error_message(payload: Any) -> str:
    try:
        return payload["error"]["message"]
    except (KeyError, TypeError):
        return ""


def run_case(client: httpx.Client, case: Case) -> str | None:
    """Send ``case``; None when the answer is one it allows, else what was wrong. A 200 stream is
    closed after its first chunk."""
    started = time.monotonic()
    try:
        with client.stream(case.method, case.path, content=case.body, headers=case.headers) as r:
            status = r.status_code
            streamed = status == 200 and r.headers.get("content-type", "").startswith("text/event-stream")
            if streamed:
                first = next(r.iter_bytes(), b"")
                if not first.startswith((b"data: ", b"event: ")):
                    return f"a 200 stream that does not start with an SSE event: {first[:200]!r}"
                payload = first
            else:
                r.read()
                payload = None
                if r.content:
                    try:
                        payload = r.json()
                    except (ValueError, UnicodeDecodeError):
                        payload = r.content[:200]
    except httpx.TimeoutException:
        return f"no answer in {TIMEOUT:.0f} s (a hang)"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError) as e:
        if case.may_close:
            return None
        return f"the connection closed without an answer ({type(e).__name__}: {e})"
    elapsed = time.monotonic() - started
    if elapsed > TIMEOUT:
        return f"took {elapsed:.1f} s"
    if status >= 500:
        return f"{status} {str(payload)[:300]}"
    if isinstance(case.expect, int) and status != case.expect:
        return f"expected {case.expect}, got {status} {str(payload)[:300]}"
    if isinstance(case.expect, tuple) and status not in case.expect:
        return f"expected one of {case.expect}, got {status} {str(payload)[:300]}"
    if case.expect == "4xx" and not 400 <= status < 500:
        return f"expected a 4xx, got {status} {str(payload)[:300]}"
    if 400 <= status < 500 and case.method != "HEAD":
        problem = shape_problem(case.path, payload)
        if problem:
            return f"{status}: {problem}"
        if case.says is not None and case.says not in error_message(payload):
            return f"{status}: the message does not say {case.says!r}: {error_message(payload)!r}"
    if case.check is not None and not streamed:
        return case.check(r, payload)
    return None


def run_all(server: ServerProcess, cases: list[Case], workers: int = 8) -> None:
    """Run ``cases`` on ``workers`` threads (each with its own keep-alive client, so accepted
    generations batch together), then list every case that misbehaved, in corpus order."""
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    todo = list(enumerate(cases))[::-1]
    problems: dict[int, str] = {}
    lock = threading.Lock()

    def worker() -> None:
        client = httpx.Client(base_url=server.url, timeout=TIMEOUT)
        try:
            while True:
                with lock:
                    if not todo or server.proc.poll() is not None:
                        return
                    i, case = todo.pop()
                try:
                    problem = run_case(client, case)
                except Exception as e:  # noqa: BLE001  (reported with the case, not lost with the thread)
                    problem = f"the client raised {type(e).__name__}: {e}"
                if problem is not None:
                    problems[i] = problem
                    # a failed case may leave its kept-alive connection closed under the next one: afresh
                    client.close()
                    client = httpx.Client(base_url=server.url, timeout=TIMEOUT)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.proc.poll() is None, "the server died:\n" + server.output()[-3000:]
    failures = [f"{cases[i].name}: {problems[i]}" for i in sorted(problems)]
    assert not failures, f"{len(failures)} of {len(cases)} cases misbehaved:\n" + "\n".join(failures)


def ask_paris(server: ServerProcess, timeout: float = 60) -> float:
    """The good request: greedy, 8 tokens, \"Paris\" in the answer; returns how long it took."""
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=timeout,
                   json={"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"], r.text
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# The corpus, built at import (cheap): JSON-level cases sent with httpx


def truncation_cases() -> list[Case]:
    cases = []
    for path in POST_PATHS:
        whole = _body(path)
        n = len(whole)
        offsets = sorted({0, 1, 2, n - 2, n - 1, *range(0, n, max(1, n // 24))} - {n})
        for at in offsets:
            cases.append(Case(f"truncated {path} at {at}/{n}", path, whole[:at],
                              says=None if at == 0 else "not valid JSON"))
    # a body cut inside a multi-byte character: invalid UTF-8 and cut JSON at once
    text = _dumps({"content": "héllo wörld ✓ 日本語 🙂"}).encode()
    for at in range(len(text) - 16, len(text) - 1):
        cases.append(Case(f"truncated multibyte /tokenize at {at}", "/tokenize", text[:at]))
    return cases


def wrong_type_cases() -> list[Case]:
    cases = []
    for path, fields in ACCEPTED.items():
        for where, accepted in fields.items():
            for name, raw in VALUES.items():
                label = ".".join(str(k) for k in where)
                # a limit of null or 10**30 may run to the context: stream it, and close after the first chunk
                base = {**VALID[path], "stream": True} if where == ("max_tokens",) else VALID[path]
                cases.append(Case(f"{path} {label}={name}", path, _splice(base, where, raw),
                                  expect="ok" if name in accepted else "4xx"))
    return cases


def _generated(limit: int) -> Callable:
    def check(r: httpx.Response, payload: Any) -> str | None:
        try:
            if "choices" in payload:
                choice = payload["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                used = payload["usage"]["completion_tokens"]
            else:
                text, used = payload["content"][0]["text"], payload["usage"]["output_tokens"]
        except (KeyError, IndexError, TypeError):
            return f"not a completion: {str(payload)[:300]}"
        return None if isinstance(text, str) and 0 <= used <= limit else f"a bad completion: {str(payload)[:300]}"
    return check


def edge_value_cases() -> list[Case]:
    """Values at the edge of what is valid, which reach the sampler: one token each, a whole 200."""
    chat = {"max_tokens": 1, "stream": False}
    edges = {"top_k=10**30": {"temperature": 1, "top_k": 10**30},
             "repetition_penalty=1e308": {"repetition_penalty": 1e308},
             "repetition_penalty=1e-300": {"repetition_penalty": 1e-300},
             "temperature=2 top_p=1e-9": {"temperature": 2, "top_p": 1e-9},
             "temperature=1e-300": {"temperature": 1e-300},
             "min_p=0.999999": {"temperature": 1, "min_p": 0.999999},
             "presence=-2 frequency=2": {"presence_penalty": -2, "frequency_penalty": 2},
             "seed=2**63-1": {"temperature": 1, "seed": 2**63 - 1},
             "top_logprobs=20": {"logprobs": True, "top_logprobs": 20},
             "stop of 16 long strings": {"stop": ["x" * 1000] * 16}, "ignore_eos": {"ignore_eos": True},
             "content=null": {"messages": [{"role": "user", "content": None}]},
             "assistant last": {"messages": QUESTION + [{"role": "assistant", "content": "The"}]},
             "only a system message": {"messages": [{"role": "system", "content": "hi"}]},
             "tool and developer roles": {"messages": [{"role": "developer", "content": "d"},
                                                       {"role": "tool", "content": "t"}]}}
    cases = [Case(f"chat {label}", "/v1/chat/completions", _body("/v1/chat/completions", **chat, **extra), expect=200,
                  check=_generated(1)) for label, extra in edges.items()]
    cases += [Case("completion logprobs=20 echo", "/v1/completions",
                   _body("/v1/completions", max_tokens=1, logprobs=20, echo=True), expect=200, check=_generated(1)),
              Case("completion of one token id", "/v1/completions", _body("/v1/completions", max_tokens=1, prompt=[0]),
                   expect=200, check=_generated(1)),
              Case("messages top_k=10**30 temperature=1", "/v1/messages",
                   _body("/v1/messages", max_tokens=1, top_k=10**30, temperature=1), expect=200, check=_generated(1)),
              Case("messages 64 stop sequences", "/v1/messages",
                   _body("/v1/messages", max_tokens=1, stop_sequences=["zz"] * 64),
                   expect="ok"),
              Case("messages empty system list", "/v1/messages", _body("/v1/messages", max_tokens=1, system=[]),
                   expect=200, check=_generated(1))]
    return cases


def not_an_object_cases() -> list[Case]:
    cases = []
    for path in POST_PATHS:
        for label, raw in {"empty": b"", "space": b" ", "empty_object": b"{}", "list": b"[]", "null": b"null",
                           "number": b"1", "string": b'"x"', "true": b"true", "list_of_body": b"[" + _body(path) + b"]",
                           "two_bodies": _body(path) + _body(path), "trailing_garbage": _body(path) + b"xyz",
                           "single_quotes": _body(path).replace(b'"', b"'"), "comment": b"/*x*/" + _body(path),
                           "form": b"content=hi&tokens=1"}.items():
            cases.append(Case(f"{path} body={label}", path, raw))
    return cases


def utf8_cases() -> list[Case]:
    cases = []
    for path, where in STRING_SLOT.items():
        for label, seq in INVALID_UTF8.items():
            cases.append(Case(f"{path} invalid UTF-8 {label} in {'.'.join(map(str, where))}", path,
                              _splice_bytes(VALID[path], where, b'"a' + seq + b'b"')))
    for path in POST_PATHS:
        cases.append(Case(f"{path} invalid UTF-8 in a key", path, _body(path)[:-1] + b',"k\xff":1}'))
        cases.append(Case(f"{path} invalid UTF-8 before the body", path, b"\xff\xfe\xfd" + _body(path)))
        cases.append(Case(f"{path} latin-1 body", path, _body(path)[:-1] + ',"k":"caf\xe9"}'.encode("latin-1")))
        cases.append(Case(f"{path} NUL bytes", path, b"\x00" * 64 + _body(path)))
    # lone surrogates as JSON escapes: valid JSON, not valid Unicode text
    for path, where in STRING_SLOT.items():
        for label, esc in {"high": "\\ud800", "low": "\\udfff", "reversed_pair": "\\udc00\\ud800"}.items():
            cases.append(Case(f"{path} lone surrogate {label} in {'.'.join(map(str, where))}", path,
                              _splice(VALID[path], where, f'"a{esc}b"')))
    # surrogates where the text is never tokenized: accepted or refused, never a failure
    for path, where, raw in [("/v1/chat/completions", ("stop",), '["\\ud800"]'),
                             ("/v1/messages", ("stop_sequences",), '["\\ud800"]'),
                             ("/v1/chat/completions", ("user",), '"\\ud800"'),
                             ("/v1/messages", ("model",), '"\\ud800"')]:
        cases.append(Case(f"{path} lone surrogate in {where[0]}", path, _splice(VALID[path], where, raw), expect="ok"))
    # other encodings and a BOM: may be understood (json detects them) or refused, never a failure
    for path in ("/tokenize", "/v1/messages/count_tokens"):
        text = _dumps(VALID[path])
        for enc in ("utf-16", "utf-16-be", "utf-32", "utf-8-sig"):
            cases.append(Case(f"{path} body in {enc}", path, text.encode(enc), expect="ok"))
    return cases


def nesting_cases() -> list[Case]:
    deep = 100_000
    lists = b"[" * deep + b"]" * deep
    dicts = b'{"a":' * deep + b"1" + b"}" * deep
    cases = []
    for path in POST_PATHS:
        cases.append(Case(f"{path} {deep} nested lists as the body", path, lists))
        cases.append(Case(f"{path} {deep} nested lists in a field", path, _body(path)[:-1] + b',"x":' + lists + b"}"))
    cases.append(Case(f"/tokenize {deep} nested objects", "/tokenize", dicts))
    cases.append(Case(f"/v1/messages {deep} nested objects in metadata", "/v1/messages",
                      _splice(VALID["/v1/messages"], ("metadata",), dicts.decode())))
    cases.append(Case(f"/v1/chat/completions {deep} unclosed lists", "/v1/chat/completions", b"[" * deep))
    # moderate nesting (parses fine) inside fields that do not take it
    cases.append(Case("/v1/chat/completions 500 nested lists as content", "/v1/chat/completions",
                      _splice(VALID["/v1/chat/completions"], ("messages", 0, "content"), "[" * 500 + "]" * 500)))
    cases.append(Case("/detokenize 500 nested lists as tokens", "/detokenize",
                      _splice(VALID["/detokenize"], ("tokens",), "[" * 500 + "]" * 500)))
    return cases


def _prompt_is(n_min: int) -> Callable:
    def check(r: httpx.Response, payload: Any) -> str | None:
        m = re.search(r"the prompt is (\d+) tokens", error_message(payload))
        if not m or int(m.group(1)) < n_min or str(CONTEXT) not in error_message(payload):
            return f"the message does not say how many tokens: {error_message(payload)!r}"
        return None
    return check


def context_cases() -> list[Case]:
    long = "word " * 9000
    half = "word " * 4500
    cases = [
        Case("chat prompt past the context", "/v1/chat/completions",
             _body("/v1/chat/completions", messages=[{"role": "user", "content": long}]), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("chat prompt past the context in two messages", "/v1/chat/completions",
             _body("/v1/chat/completions", messages=[{"role": "user", "content": half},
                                                     {"role": "assistant", "content": half},
                                                     {"role": "user", "content": "hi"}]), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("chat prompt past the context, not streamed", "/v1/chat/completions",
             _body("/v1/chat/completions", messages=[{"role": "user", "content": long}], stream=False), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("completion text prompt past the context", "/v1/completions", _body("/v1/completions", prompt=long),
             expect=400, check=_prompt_is(CONTEXT)),
        Case("completion ids prompt past the context", "/v1/completions",
             _body("/v1/completions", prompt=[1000] * 9000), expect=400, check=_prompt_is(9000)),
        Case("completion ids prompt exactly the context", "/v1/completions",
             _body("/v1/completions", prompt=[1000] * CONTEXT), expect=400, check=_prompt_is(CONTEXT)),
        Case("completion of 200k tokens", "/v1/completions", _body("/v1/completions", prompt="\u00e9 " * 80_000),
             expect=400, check=_prompt_is(CONTEXT)),
        Case("messages prompt past the context", "/v1/messages",
             _body("/v1/messages", messages=[{"role": "user", "content": long}]), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("messages system past the context", "/v1/messages", _body("/v1/messages", system=long), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("messages prompt past the context, not streamed", "/v1/messages",
             _body("/v1/messages", messages=[{"role": "user", "content": long}], stream=False), expect=400,
             check=_prompt_is(CONTEXT)),
        Case("count_tokens past the context just counts", "/v1/messages/count_tokens",
             _body("/v1/messages/count_tokens", messages=[{"role": "user", "content": long}]), expect=200,
             check=lambda r, p: None if p.get("input_tokens", 0) > CONTEXT else f"counted {p}"),
        Case("tokenize past the context just tokenizes", "/tokenize", _body("/tokenize", content=long), expect=200,
             check=lambda r, p: None if len(p.get("tokens", ())) > CONTEXT else "too few tokens"),
        Case("detokenize 100k ids", "/detokenize", _body("/detokenize", tokens=[1000] * 100_000), expect=200),
        Case("detokenize out-of-range ids", "/detokenize", _body("/detokenize", tokens=[0, 49152]), expect=400,
             says="token ids"),
        Case("detokenize negative ids", "/detokenize", _body("/detokenize", tokens=[-1]), expect=400),
        Case("detokenize huge ids", "/detokenize", _body("/detokenize", tokens=[2**64, 10**30]), expect=400),
        Case("completion with out-of-range ids", "/v1/completions", _body("/v1/completions", prompt=[10**30]),
             expect=400, says="token ids"),
        Case("completion with negative ids", "/v1/completions", _body("/v1/completions", prompt=[-5, 1]),
             expect=400, says="token ids"),
        Case("completion with mixed ids and strings", "/v1/completions", _body("/v1/completions", prompt=[1, "a"])),
        Case("completion with two string prompts", "/v1/completions", _body("/v1/completions", prompt=["a", "b"]),
             expect=400),
        Case("completion with an empty string in a list", "/v1/completions", _body("/v1/completions", prompt=[""]),
             expect=400),
    ]
    return cases


def huge_max_tokens_cases() -> list[Case]:
    """Huge limits must be refused or cut to the context; streamed ones are closed after the first
    chunk, the non-streamed ones ask a question the model ends by itself."""
    count = [{"role": "user", "content": "Count from one to one million."}]
    cases = []
    for value in (10**9, 2**63, 10**30):
        cases.append(Case(f"chat stream max_tokens={value}", "/v1/chat/completions",
                          _body("/v1/chat/completions", messages=count, max_tokens=value, ignore_eos=True, stream=True),
                          expect="ok"))
        cases.append(Case(f"chat stream max_completion_tokens={value}", "/v1/chat/completions",
                          _body("/v1/chat/completions", messages=count, max_completion_tokens=value, ignore_eos=True,
                                stream=True),
                          expect="ok"))
        cases.append(Case(f"completion stream max_tokens={value}", "/v1/completions",
                          _body("/v1/completions", max_tokens=value, stop=None, stream=True), expect="ok"))
        cases.append(Case(f"messages stream max_tokens={value}", "/v1/messages",
                          _body("/v1/messages", messages=count, max_tokens=value, stream=True), expect="ok"))
    cases.append(Case("chat stream with no max_tokens", "/v1/chat/completions",
                      _body("/v1/chat/completions", messages=count, max_tokens=None, ignore_eos=True, stream=True),
                      expect="ok"))
    cases.append(Case("chat max_tokens=10**9 not streamed", "/v1/chat/completions",
                      _body("/v1/chat/completions", max_tokens=10**9, stream=False), expect=(200, 400)))
    return cases


def role_cases() -> list[Case]:
    cases = []
    for role in ("wizard", "", "SYSTEM", "User", " user", "user ", "function", "model", "\u0000", "a" * 10000,
                 "assistant\n", "\\ud800"):
        msgs = [{"role": role, "content": "hi"}]
        cases.append(Case(f"chat role {role[:12]!r}", "/v1/chat/completions",
                          _body("/v1/chat/completions", messages=msgs), expect=400, says="role"))
    for role in ("system", "tool", "developer", "wizard", "", "User", "model"):
        msgs = [{"role": role, "content": "hi"}]
        cases.append(Case(f"messages role {role!r}", "/v1/messages", _body("/v1/messages", messages=msgs), expect=400))
        cases.append(Case(f"count_tokens role {role!r}", "/v1/messages/count_tokens",
                          _body("/v1/messages/count_tokens", messages=msgs), expect=400))
    for label, msg in {"no role": {"content": "hi"}, "no content in messages": {"role": "user"},
                       "role as list": {"role": ["user"], "content": "hi"}}.items():
        cases.append(Case(f"chat {label}", "/v1/chat/completions", _body("/v1/chat/completions", messages=[msg]),
                          expect="ok" if label == "no content in messages" else 400))
        cases.append(Case(f"messages {label}", "/v1/messages", _body("/v1/messages", messages=[msg]), expect=400))
    parts = {"image part": [{"type": "image_url", "image_url": {"url": "http://x"}}],
             "text part with no text": [{"type": "text"}],
             "part with no type": [{"text": "hi"}], "text part with a number": [{"type": "text", "text": 5}],
             "part as a string": ["hi"], "tool_result part": [{"type": "tool_result", "content": "x"}]}
    for label, content in parts.items():
        cases.append(Case(f"chat {label}", "/v1/chat/completions",
                          _body("/v1/chat/completions", messages=[{"role": "user", "content": content}]), expect=400))
        cases.append(Case(f"messages {label}", "/v1/messages",
                          _body("/v1/messages", messages=[{"role": "user", "content": content}]), expect=400))
    for label, extra, says in [
            ("a tool without a name", {"tools": [{"type": "function", "function": {"description": "f"}}]}, "name"),
            ("a tool whose parameters are a list", {"tools": [{"type": "function", "function": {
                "name": "f", "parameters": [1]}}]}, "parameters"),
            ("two tools of one name", {"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "distinct"),
            ("tool_choice required without tools", {"tool_choice": "required"}, "no tools"),
            ("tool_choice naming an unknown tool", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                                    "tool_choice": {"type": "function", "function": {"name": "g"}}},
             "not among"),
            ("tool_choice of an unknown kind", {"tool_choice": "always"}, "tool_choice"),
            ("a forced call with a response format", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                                      "tool_choice": "required",
                                                      "response_format": {"type": "json_object"}}, "cannot be combined"),
            ("an earlier call with broken arguments", {"messages": QUESTION + [{"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "not valid JSON")]:
        cases.append(Case(f"chat {label}", "/v1/chat/completions", _body("/v1/chat/completions", **extra),
                          expect=400, says=says))
    cases.append(Case("chat response_format json_schema", "/v1/chat/completions",
                      _body("/v1/chat/completions", response_format={"type": "json_schema"}), expect=400))
    cases.append(Case("chat n=2", "/v1/chat/completions", _body("/v1/chat/completions", n=2), expect=400,
                      says="n must be 1"))
    cases.append(Case("chat 17 stop strings", "/v1/chat/completions",
                      _body("/v1/chat/completions", stop=[str(i) for i in range(17)]), expect=400))
    cases.append(Case("chat top_logprobs=21", "/v1/chat/completions",
                      _body("/v1/chat/completions", logprobs=True, top_logprobs=21), expect=400))
    cases.append(Case("completion suffix", "/v1/completions", _body("/v1/completions", suffix="x"), expect=400))
    for label, extra, says in [
            ("a tool without a name", {"tools": [{"description": "f"}]}, "name"),
            ("tool_choice any without tools", {"tool_choice": {"type": "any"}}, "no tools"),
            ("tool_choice tool without a name", {"tools": [{"name": "f"}], "tool_choice": {"type": "tool"}},
             "tool_choice"),
            ("a tool_use block without a name", {"messages": QUESTION + [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "input": {}}]}]}, "tool_use"),
            ("a tool_result without its tool_use_id", {"messages": [
                {"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "tool_use_id")]:
        cases.append(Case(f"messages {label}", "/v1/messages", _body("/v1/messages", **extra), expect=400, says=says))
    cases.append(Case("messages without max_tokens", "/v1/messages",
                      _dumps({"messages": QUESTION}).encode(), expect=400, says="max_tokens"))
    cases.append(Case("messages temperature 1.5", "/v1/messages", _body("/v1/messages", temperature=1.5), expect=400))
    return cases


def unknown_field_cases() -> list[Case]:
    """Unknown fields are accepted by design (clients send fields a server may not know)."""
    extra = {"foo": 1, "bar": {"nested": [1, {"x": None}]}, "__proto__": {"polluted": True}, "constructor": None,
             "": "empty key", "k" * 1000: "long key", "functions": [], "logit_bias": {"50256": -100},
             "parallel_tool_calls": False, "service_tier": "auto", "reasoning_effort": "high"}
    cases = []
    for path in POST_PATHS:
        cases.append(Case(f"{path} unknown top-level fields", path, _body(path, **extra), expect="ok"))
        many = {f"unknown_{i}": i for i in range(20_000)}
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
            cases.append(Case(f"{path} 20000 unknown fields", path, _body(path, **many), expect="ok"))
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"):
        msgs = [{"role": "user", "content": "What is the capital of France?", "weird": [1, 2],
                 "cache_control": {"x": 1}}]
        cases.append(Case(f"{path} unknown fields in a message", path, _body(path, messages=msgs), expect="ok"))
    cases.append(Case("chat unknown fields in stream_options", "/v1/chat/completions",
                      _body("/v1/chat/completions", stream_options={"include_usage": True, "zzz": 1}), expect="ok"))
    cases.append(Case("chat duplicate key, last one bad", "/v1/chat/completions",
                      _body("/v1/chat/completions")[:-1] + b',"max_tokens":"four"}', expect=400))
    cases.append(Case("chat duplicate key, last one good", "/v1/chat/completions",
                      b'{"max_tokens":"four",' + _body("/v1/chat/completions")[1:], expect="ok"))
    cases.append(Case("chat model of another name", "/v1/chat/completions",
                      _body("/v1/chat/completions", model="gpt-4o"), expect="ok"))
    return cases


def header_cases() -> list[Case]:
    cases = []
    for path in ("/tokenize", "/v1/messages/count_tokens"):
        for label, headers in {"text/plain": {"content-type": "text/plain"},
                               "form type": {"content-type": "application/x-www-form-urlencoded"},
                               "no content-type": {"content-type": ""},
                               "multipart type": {"content-type": "multipart/form-data; boundary=x"},
                               "garbage content-type": {"content-type": ";;;==; charset=\"nope"},
                               "gzip claimed": {"content-encoding": "gzip"},
                               "garbage auth": {"authorization": "Bearer ;;; \\x00"},
                               "expect 100-continue": {"expect": "100-continue"}}.items():
            cases.append(Case(f"{path} {label}", path, _body(path), headers=headers, expect="ok"))
    return cases


def method_cases() -> list[Case]:
    cases = []
    for path in POST_PATHS:
        for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"):
            cases.append(Case(f"{method} {path}", path, None, method=method, expect=405))
    for path in GET_PATHS:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            cases.append(Case(f"{method} {path}", path, b"{}", method=method, expect=405))
    return cases


def path_cases() -> list[Case]:
    unknown = ["/", "/v1", "/v2/chat/completions", "/v1/chat", "/v1/completion", "/v1/chat/completions/x",
               "/v1/messages/count", "/v1/messages/count_tokens/x", "/v1/messages/batches", "/V1/CHAT/COMPLETIONS",
               "/%00", "/..%2f..%2fetc%2fpasswd", "/v1/embeddings", "/v1/responses", "/docs", "/openapi.json",
               "/" + "a/" * 2000, "/v1/messages%00", "/tokenize%20", "/%ff%fe"]
    cases = []
    for path in unknown:
        for method in ("GET", "POST"):
            cases.append(Case(f"{method} unknown {path[:40]}", path, b"{}" if method == "POST" else None, method=method,
                              expect=404))
    cases.append(Case("GET a model that is not served", "/v1/models/gpt-5", method="GET", expect=404))
    cases.append(Case("GET a model path with slashes", "/v1/models/gpt-5/x/y", method="GET", expect=404))
    cases.append(Case("GET a model with a surrogate name", "/v1/models/%ED%A0%80", method="GET", expect=404))
    cases.append(Case("GET a model with invalid UTF-8", "/v1/models/%FF%FE", method="GET", expect=404))
    # a trailing slash redirects to the route; never a 5xx
    for path in POST_PATHS:
        cases.append(Case(f"POST {path}/ (trailing slash)", path + "/", _body(path), expect=(307, 404)))
    return cases


def size_cases() -> list[Case]:
    ten_mb = 10_000_000
    cases = []
    for path in POST_PATHS:
        padded = _body(path)[:-1] + b',"pad":"' + b"a" * ten_mb + b'"}'
        cases.append(Case(f"{path} 10 MB body", path, padded, expect=413, may_close=True))
        cases.append(Case(f"{path} a body just over 1 MiB", path,
                          _body(path)[:-1] + b',"pad":"' + b"a" * MAX_BODY + b'"}', expect=413, may_close=True))
    cases.append(Case("/tokenize a body just under 1 MiB", "/tokenize",
                      _dumps({"content": "a " * ((MAX_BODY - 64) // 2)}).encode(), expect=200))
    return cases


def _chunks(total: int, size: int = 1 << 16):
    yield b'{"content":"'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


# ---------------------------------------------------------------------------------------------
# Byte-level cases over raw sockets


@dataclass
class RawCase:
    name: str
    data: bytes
    half_close: bool = False  # shut our side after sending (the request is incomplete on purpose)
    expect: str | int = "4xx"  # "4xx": a 4xx or a close; "ok": anything but a 5xx or a hang; N: status N or a close
    path: str = "/"


def raw_exchange(port: int, data: bytes, half_close: bool,
                 timeout: float = 10.0) -> tuple[str, int | None, dict, bytes]:
    """Send ``data`` and read one HTTP answer: ("answer", status, headers, body), ("closed", ...) when
    the server closed without one, ("timeout", ...) when it said nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the server may answer (and close, or stop reading) while we still send
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in got:
            if time.monotonic() > deadline:
                return "timeout", None, {}, got
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return "timeout", None, {}, got
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return ("closed", None, {}, got) if not got else ("truncated", None, {}, got)
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/\d\.\d (\d{3})", lines[0])
        if not m:
            return "garbled", None, {}, got
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers["content-length"]) if headers.get("content-length", "").isdigit() else None
        chunked = "chunked" in headers.get("transfer-encoding", "")
        while (length is None and chunked and not body.endswith(b"0\r\n\r\n")) \
                or (length is not None and len(body) < length):
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            body += chunk
        if chunked:
            body = _dechunk(body)
        return "answer", int(m.group(1)), headers, body[:length] if length is not None else body
    finally:
        s.close()


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return body
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def raw_problem(port: int, case: RawCase) -> str | None:
    kind, status, headers, body = raw_exchange(port, case.data, case.half_close, timeout=3.0)
    if kind == "timeout" and not case.half_close:
        # the server waits for the rest of an incomplete request: hang up; it must close cleanly
        kind, status, headers, body = raw_exchange(port, case.data, True)
    if kind == "timeout":
        return "no answer and no close (a hang)"
    if kind in ("closed", "truncated"):
        return None
    if kind == "garbled":
        return f"not an HTTP answer: {body[:200]!r}"
    if status >= 500:
        return f"{status} {body[:300]!r}"
    if case.expect == "4xx" and not 400 <= status < 500:
        return f"expected a 4xx or a close, got {status} {body[:200]!r}"
    if isinstance(case.expect, int) and status != case.expect:
        return f"expected {case.expect} or a close, got {status} {body[:200]!r}"
    if 400 <= status < 500 and headers.get("content-type", "").startswith("application/json"):
        try:
            payload = json.loads(body)
        except ValueError:
            return f"{status}: a JSON error that does not parse: {body[:200]!r}"
        problem = shape_problem(case.path, payload)
        if problem:
            return f"{status}: {problem}"
    return None


def _req(method: str, path: str, headers: str = "", body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    return f"{method} {path} {version}\r\nHost: localhost\r\n{headers}\r\n".encode("latin-1") + body


TOK = b'{"content":"hi"}'


def raw_cases() -> list[RawCase]:
    cl = f"Content-Length: {len(TOK)}\r\n"
    cases = [
        RawCase("content-length not a number", _req("POST", "/tokenize", "Content-Length: abc\r\n", TOK)),
        RawCase("content-length negative", _req("POST", "/tokenize", "Content-Length: -1\r\n", TOK)),
        RawCase("content-length with a plus", _req("POST", "/tokenize", "Content-Length: +16\r\n", TOK)),
        RawCase("content-length in hex", _req("POST", "/tokenize", "Content-Length: 0x10\r\n", TOK)),
        RawCase("content-length 1e3", _req("POST", "/tokenize", "Content-Length: 1e3\r\n", TOK)),
        RawCase("content-length 2**70", _req("POST", "/tokenize", f"Content-Length: {2**70}\r\n", TOK)),
        RawCase("content-length empty", _req("POST", "/tokenize", "Content-Length: \r\n", TOK)),
        RawCase("content-length two values", _req("POST", "/tokenize", "Content-Length: 16, 17\r\n", TOK)),
        RawCase("content-length conflicting twice", _req("POST", "/tokenize", "Content-Length: 5\r\n" + cl, TOK)),
        RawCase("content-length shorter than the body", _req("POST", "/tokenize", "Content-Length: 5\r\n", TOK),
                path="/tokenize"),
        RawCase("content-length longer than the body, then hang up",
                _req("POST", "/tokenize", "Content-Length: 100\r\n", TOK), half_close=True),
        RawCase("content-length over the cap (messages)",
                _req("POST", "/v1/messages", f"Content-Length: {10**7}\r\n", b"{"), path="/v1/messages", expect=413),
        RawCase("content-length over the cap (chat)",
                _req("POST", "/v1/chat/completions", f"Content-Length: {10**7}\r\n", b"{"),
                path="/v1/chat/completions", expect=413),
        RawCase("content-length and chunked", _req("POST", "/tokenize", cl + "Transfer-Encoding: chunked\r\n",
                                                   b"10\r\n" + TOK + b"\r\n0\r\n\r\n"), expect="ok"),
        RawCase("transfer-encoding gzip", _req("POST", "/tokenize", "Transfer-Encoding: gzip\r\n", TOK)),
        RawCase("transfer-encoding garbage", _req("POST", "/tokenize", "Transfer-Encoding: \x01\x02\r\n", TOK)),
        RawCase("bad chunk size",
                _req("POST", "/tokenize", "Transfer-Encoding: chunked\r\n", b"zz\r\n" + TOK + b"\r\n")),
        RawCase("chunk size huge", _req("POST", "/tokenize", "Transfer-Encoding: chunked\r\n",
                                        b"ffffffffffffffffffff\r\n" + TOK + b"\r\n"), half_close=True),
        RawCase("chunk size negative", _req("POST", "/tokenize", "Transfer-Encoding: chunked\r\n", b"-5\r\nabc\r\n")),
        RawCase("chunked over the cap", _req("POST", "/tokenize", "Transfer-Encoding: chunked\r\n",
                                             b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(3 * MAX_BODY))
                                             + b"0\r\n\r\n"), path="/tokenize", expect=413),
        RawCase("chunked, then hang up", _req("POST", "/tokenize", "Transfer-Encoding: chunked\r\n", b"5\r\n{\"con"),
                half_close=True),
        RawCase("no Host header", b"POST /tokenize HTTP/1.1\r\n" + cl.encode() + b"\r\n" + TOK),
        RawCase("HTTP/1.0 without Host", b"POST /tokenize HTTP/1.0\r\n" + cl.encode() + b"\r\n" + TOK, expect="ok"),
        RawCase("HTTP/0.9", b"GET /health\r\n\r\n"),
        RawCase("HTTP/9.9", b"GET /nope HTTP/9.9\r\n\r\n"),
        RawCase("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        RawCase("lowercase method", _req("post", "/tokenize", cl, TOK), path="/tokenize"),
        RawCase("method of garbage", _req("P\x00ST", "/tokenize", cl, TOK)),
        RawCase("space in the path", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
        RawCase("raw invalid UTF-8 in the path", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"),
        RawCase("raw invalid UTF-8 in a header", _req("POST", "/tokenize", cl + "X-A: \xff\xfe\r\n", TOK), expect="ok"),
        RawCase("NUL in a header name", _req("POST", "/tokenize", cl + "X-\x00: y\r\n", TOK)),
        RawCase("header without a colon", _req("POST", "/tokenize", cl + "NoColonHere\r\n", TOK)),
        RawCase("header folded (obs-fold)", _req("POST", "/tokenize", cl + "X-A: b\r\n c\r\n", TOK), expect="ok"),
        RawCase("bare LF line ends", b"GET /health HTTP/1.1\nHost: x\n\n", expect="ok"),
        RawCase("bare CR line ends", b"GET /health HTTP/1.1\rHost: x\r\r", half_close=True),
        RawCase("1 MB header", _req("GET", "/health", "X-Big: " + "a" * (1 << 20) + "\r\n")),
        RawCase("10000 headers", _req("GET", "/health", "X-A: b\r\n" * 10000), expect="ok"),
        RawCase("1 MB request line", b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        RawCase("absolute-form URL", _req("GET", "http://evil.example/v1/nope"), expect="ok"),
        RawCase("asterisk-form URL", _req("OPTIONS", "*")),
        RawCase("CONNECT", _req("CONNECT", "evil.example:443")),
        RawCase("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256))),
        RawCase("NUL bytes", b"\x00" * 1000),
        RawCase("just CRLFs", b"\r\n" * 1000, half_close=True),
        RawCase("a word, then hang up", b"hello", half_close=True),
        RawCase("a request line cut, then hang up", b"POST /v1/chat/comp", half_close=True),
        RawCase("headers cut, then hang up", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Le", half_close=True),
        RawCase("pipelined good then garbage", _req("POST", "/tokenize", cl, TOK) + b"\x00\xff garbage\r\n\r\n",
                expect="ok"),
        RawCase("request smuggling: CL.TE",
                _req("POST", "/tokenize", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                     b"1\r\nZ\r\nQ\r\n\r\n"),
                expect="ok"),
        RawCase("websocket upgrade",
                _req("GET", "/v1/chat/completions", "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")),
        RawCase("h2c upgrade", _req("GET", "/health", "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"), expect="ok"),
    ]
    rng = random.Random(1234)
    for i in range(16):  # half of them end the head (the parser must decide), half hang up
        blob = bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64, 500, 4096))))
        if i % 2:
            cases.append(RawCase(f"random bytes #{i} ({len(blob)} B), then hang up", blob, half_close=True))
        else:
            cases.append(RawCase(f"random bytes #{i} ({len(blob)} B) and a blank line", blob + b"\r\n\r\n"))
    for i in range(8):
        junk = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(5, 200)))
        cases.append(RawCase(f"random printable request line #{i}", junk + b"\r\n\r\n"))
    for i in range(6):  # a valid request with one byte flipped
        good = _body("/v1/messages/count_tokens")
        data = bytearray(_req("POST", "/v1/messages/count_tokens", f"Content-Length: {len(good)}\r\n", good))
        data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(RawCase(f"count_tokens with a flipped byte #{i}", bytes(data), expect="ok",
                             path="/v1/messages/count_tokens"))
    return cases


# ---------------------------------------------------------------------------------------------
# The tests, in order: the groups, a good request midway, the byte level, slowloris, the end


def test_corpus_has_at_least_200_cases():
    groups = [truncation_cases(), wrong_type_cases(), edge_value_cases(), not_an_object_cases(), utf8_cases(),
              nesting_cases(), context_cases(), huge_max_tokens_cases(), role_cases(), unknown_field_cases(),
              header_cases(), method_cases(), path_cases(), size_cases(), raw_cases()]
    total = sum(map(len, groups)) + 2 + 50  # + the two chunked 10 MB bodies and the 50 slowloris sockets
    print(f"{total} hostile cases")
    assert total >= 200


def test_truncated_json(server):
    run_all(server, truncation_cases())


def test_wrong_types_nan_infinity_and_huge_numbers(server):
    run_all(server, wrong_type_cases())


def test_edge_values_that_are_valid_generate(server):
    run_all(server, edge_value_cases())


def test_bodies_that_are_not_a_request_object(server):
    run_all(server, not_an_object_cases())


def test_invalid_utf8_and_lone_surrogates(server):
    run_all(server, utf8_cases())


def test_deep_nesting(server):
    run_all(server, nesting_cases())


def test_a_good_request_works_midway(server):
    assert ask_paris(server) < 30


def test_prompts_past_the_context(server):
    run_all(server, context_cases())
    long = [{"role": "user", "content": "word " * 9000}]
    counted = httpx.post(server.url + "/v1/messages/count_tokens", json={"messages": long}).json()["input_tokens"]
    refused = httpx.post(server.url + "/v1/messages", json={"messages": long, "max_tokens": 4}).json()
    assert f"the prompt is {counted} tokens" in refused["error"]["message"], refused


def test_huge_max_tokens_do_not_hang(server):
    run_all(server, huge_max_tokens_cases())


def test_unknown_roles_parts_and_unsupported_options(server):
    run_all(server, role_cases())


def test_unknown_fields_are_accepted(server):
    run_all(server, unknown_field_cases())


def test_odd_headers(server):
    run_all(server, header_cases())


def test_wrong_methods(server):
    run_all(server, method_cases())


def test_unknown_paths_get_404_in_the_api_shape(server):
    run_all(server, path_cases())


def test_10_mb_bodies(server):
    run_all(server, size_cases())
    failures = []
    for path in ("/tokenize", "/v1/messages"):  # no declared length: the cap must hold as the body streams in
        try:
            r = httpx.post(server.url + path, content=_chunks(10_000_000), timeout=TIMEOUT)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            continue  # a closed connection is an answer
        except httpx.TimeoutException:
            failures.append(f"chunked 10 MB to {path}: a hang")
            continue
        if r.status_code != 413 or shape_problem(path, r.json()):
            failures.append(f"chunked 10 MB to {path}: expected 413, got {r.status_code} {r.text[:200]}")
    assert server.proc.poll() is None, server.output()[-3000:]
    assert not failures, "\n".join(failures)


def test_raw_bytes_over_a_socket(server):
    cases = raw_cases()
    assert len({c.name for c in cases}) == len(cases)
    failures = []
    for case in cases:
        problem = raw_problem(server.port, case)
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
        if server.proc.poll() is not None:
            failures.append(f"{case.name}: the server exited ({server.proc.returncode})")
            break
    assert server.proc.poll() is None, "the server died:\n" + server.output()[-3000:]
    assert not failures, f"{len(failures)} of {len(cases)} raw cases misbehaved:\n" + "\n".join(failures)


def test_slowloris_idle_connections_do_not_block_good_requests(server):
    partials = [
        b"",  # connect and say nothing
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Le",
        b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{\"messages\": [",
        b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"cont",
    ]
    sockets = []
    try:
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(partials[i % len(partials)])
            sockets.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        r = httpx.post(server.url + "/tokenize", json={"content": "hello"}, timeout=10)
        assert r.status_code == 200 and r.json()["tokens"], r.text
        r = httpx.post(server.url + "/v1/messages/count_tokens", json={"messages": QUESTION}, timeout=10)
        assert r.status_code == 200 and r.json()["input_tokens"] > 0, r.text
        assert ask_paris(server, timeout=30) < 30
        assert time.monotonic() - started < 30
        # a slow sender trickling a header a byte at a time does not block others either
        slow = sockets[1]
        for b in b"Host: localhost\r\n":
            slow.sendall(bytes([b]))
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        for s in sockets:
            s.close()
    assert server.proc.poll() is None, server.output()[-3000:]


def test_the_server_is_still_well_at_the_end(server):
    assert server.proc.poll() is None, server.output()[-3000:]
    assert ask_paris(server) < 30
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and "mlxllm_requests_total" in r.text
    assert re.search(r'mlxllm_requests_total\{[^}]*status="4\d\d"[^}]*\} [1-9]', r.text), "4xx answers are counted"
    # (the /health 503s are the fixture's polls while the model loaded)
    five = [line for line in r.text.splitlines() if line.startswith("mlxllm_requests_total{") and 'status="5' in line
            and 'endpoint="/health"' not in line]
    assert not five, "some requests got a 5xx:\n" + "\n".join(five)
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
