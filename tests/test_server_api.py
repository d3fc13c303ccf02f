"""`mlxllm serve` through the official `openai` and `anthropic` clients, raw HTTP for the error
shapes, metrics, disconnects and a short load test, against one live server on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from conftest import ServerProcess

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # the anthropic client no longer takes sampling arguments; the API still does


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=server.key, max_retries=0, timeout=120)


def _headers(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key}"}


def _metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", headers=_headers(server)).text
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    assert found, f"{name} {labels} not in /metrics"
    return total


def test_chat_completion_answers_and_reports_usage(oai):
    r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.model == "smollm2"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_repeated_prompt_is_served_from_the_prefix_cache(oai):
    first = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    again = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_streaming_chat_matches_the_whole_answer(oai):
    whole = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_stop_strings(oai):
    r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20, temperature=0, stop=[" of"])
    assert r.choices[0].message.content == "The capital" and r.choices[0].finish_reason == "stop"


def test_seed_gives_the_same_sample_and_other_seeds_differ(oai):
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
               temperature=1.0)
    a = oai.chat.completions.create(seed=7, **ask).choices[0].message.content
    b = oai.chat.completions.create(seed=7, **ask).choices[0].message.content
    others = {oai.chat.completions.create(seed=s, **ask).choices[0].message.content for s in (8, 9)}
    assert a == b
    assert others - {a}


def test_logprobs_are_log_probabilities_of_the_chosen_tokens(oai):
    r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith("The capital")
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)  # greedy: the best one
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                       "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
        "required": ["city", "population"], "additionalProperties": False}


def test_response_format_constrains_chat_output(oai):
    """``json_schema`` (whole and streamed alike), ``json_object``, and the client's own ``parse`` with a
    pydantic model: the answer is always JSON of the requested shape."""
    pydantic = pytest.importorskip("pydantic")
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    ask = dict(model="smollm2", messages=QUESTION, max_tokens=60, temperature=0, response_format=fmt)
    whole = oai.chat.completions.create(**ask)
    jsonschema.validate(json.loads(whole.choices[0].message.content), CITY)
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(stream=True, **ask)
                       if c.choices)
    assert streamed == whole.choices[0].message.content
    sampled = oai.chat.completions.create(**{**ask, "temperature": 1.0, "seed": 3})
    jsonschema.validate(json.loads(sampled.choices[0].message.content), CITY)
    anything = oai.chat.completions.create(**{**ask, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)

    class Capital(pydantic.BaseModel):
        city: str
        country: str

    parse = getattr(oai.chat.completions, "parse", None) or oai.beta.chat.completions.parse
    parsed = parse(model="smollm2", messages=QUESTION, max_tokens=60, temperature=0, response_format=Capital)
    assert isinstance(parsed.choices[0].message.parsed, Capital)


def test_anthropic_structured_outputs(claude, server):
    jsonschema = pytest.importorskip("jsonschema")
    r = claude.messages.create(model="smollm2", max_tokens=60, messages=QUESTION, extra_body=GREEDY,
                               output_config={"format": {"type": "json_schema", "schema": CITY}})
    jsonschema.validate(json.loads(r.content[0].text), CITY)
    assert r.stop_reason == "end_turn"
    with claude.messages.stream(model="smollm2", max_tokens=60, messages=QUESTION, extra_body={
            **GREEDY, "output_format": {"type": "json_schema", "schema": CITY}}) as stream:
        assert "".join(stream.text_stream) == r.content[0].text
    bad = httpx.post(server.url + "/v1/messages", headers=_headers(server), json={
        "model": "smollm2", "max_tokens": 5, "messages": QUESTION, "output_config": {"format": {"type": "regex"}}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_llama_server_grammar_fields_on_completions(oai, server):
    r = oai.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=8, temperature=0,
                               extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no") and r.choices[0].finish_reason == "stop"
    r = oai.completions.create(model="smollm2", prompt="A number:", max_tokens=8, temperature=0,
                               extra_body={"json_schema": {"type": "integer", "minimum": 1, "maximum": 9}})
    assert 1 <= json.loads(r.choices[0].text) <= 9


@pytest.mark.parametrize("extra, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 3, "maximum": 1}}}}, "greater than maximum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "response_format type"),
    ({"response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""}, "at most one"),
    ({"grammar": "root ::= ("}, "grammar"),
])
def test_bad_response_formats_get_400(server, extra, says):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, **extra}, headers=_headers(server))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"], error


def test_completions_text_ids_echo_and_logprobs(oai, server):
    r = oai.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    ids = httpx.post(server.url + "/tokenize", json={"content": "The capital of France is"},
                     headers=_headers(server)).json()["tokens"]
    by_ids = oai.completions.create(model="smollm2", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    echoed = oai.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
                                    echo=True, logprobs=2)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text
    lp = echoed.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == echoed.usage.completion_tokens
    assert lp.text_offset[0] == len("The capital of France is") and all(len(t) == 2 for t in lp.top_logprobs)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_models_and_tokenize_round_trip(oai, server):
    assert [m.id for m in oai.models.list().data] == ["smollm2"]
    assert oai.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-5")
    ids = httpx.post(server.url + "/tokenize", json={"content": "héllo wörld"}, headers=_headers(server)).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=_headers(server)).json()["content"]
    assert text == "héllo wörld"


def test_anthropic_messages(claude):
    r = claude.messages.create(model="smollm2", max_tokens=60, system="You are a helpful assistant.", messages=QUESTION,
                               extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.stop_reason == "end_turn"
    assert "Paris" in r.content[0].text
    prompt = claude.messages.count_tokens(model="smollm2", system="You are a helpful assistant.", messages=QUESTION)
    assert r.usage.output_tokens > 0 and r.usage.input_tokens + r.usage.cache_read_input_tokens == prompt.input_tokens
    stopped = claude.messages.create(model="smollm2", max_tokens=20, messages=QUESTION, extra_body=GREEDY,
                                     stop_sequences=[" France"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " France"
    assert stopped.content[0].text == "The capital of"
    short = claude.messages.create(model="smollm2", max_tokens=2, messages=QUESTION, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_anthropic_streaming_and_count_tokens(claude):
    whole = claude.messages.create(model="smollm2", max_tokens=16, messages=QUESTION, extra_body=GREEDY)
    with claude.messages.stream(model="smollm2", max_tokens=16, messages=QUESTION, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens
    counted = claude.messages.count_tokens(model="smollm2", messages=QUESTION)
    assert counted.input_tokens == whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_key_is_required_except_for_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/messages", json={"messages": QUESTION, "max_tokens": 3},
                   headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["type"] == "error"
    r = httpx.post(server.url + "/v1/messages", json={"messages": QUESTION, "max_tokens": 3, "temperature": 0},
                   headers={"x-api-key": server.key})
    assert r.status_code == 200


@pytest.mark.parametrize("body, says", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "top_p": 0}, "top_p"),
    ({"messages": QUESTION, "n": 2}, "n must be 1"),
    ({"messages": QUESTION, "max_tokens": -5}, "max_tokens"),
    ({"messages": QUESTION, "stop": [""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "context is 8192 tokens"),
])
def test_bad_chat_requests_get_400_in_openai_shape(server, body, says):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=_headers(server))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"]


def test_bad_json_and_anthropic_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers=_headers(server))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", json={"messages": QUESTION}, headers=_headers(server))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", json={"messages": [{"role": "system", "content": "x"}],
                                                       "max_tokens": 3}, headers=_headers(server))
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_metrics_count_requests_and_tokens(oai, server):
    before = _metric(server, "mlxllm_generated_tokens_total")
    r = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0)
    assert _metric(server, "mlxllm_generated_tokens_total") - before == r.usage.completion_tokens
    assert _metric(server, "mlxllm_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert _metric(server, "mlxllm_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "mlxllm_prompt_cache_bytes") > 0
    for name in ("mlxllm_queue_depth", "mlxllm_running_batch_size", "mlxllm_kv_cache_bytes",
                 "mlxllm_inter_token_latency_seconds_count"):
        _metric(server, name)


def _wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(server, "mlxllm_running_batch_size") == 0 and _metric(server, "mlxllm_kv_cache_bytes") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the batch did not drain")


def test_dropped_streams_are_cancelled_and_free_their_cache(server):
    """8 streams; 4 clients hang up after their first chunk; the rest finish whole, the batch drains
    and the next request succeeds."""
    body = {"messages": [{"role": "user", "content": "Count from one to one hundred."}], "max_tokens": 64,
            "temperature": 0, "stream": True, "ignore_eos": True}

    async def one(client: httpx.AsyncClient, drop: bool) -> int:
        chunks = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if drop and chunks == 3:
                        return chunks  # leaving the block closes the connection
        return chunks

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, headers=_headers(server), timeout=120) as client:
            return await asyncio.gather(*(one(client, i % 2 == 0) for i in range(8)))

    _wait_idle(server)
    before = _metric(server, "mlxllm_generated_tokens_total")
    counts = asyncio.run(main())
    assert counts[0::2] == [3] * 4 and all(c > 40 for c in counts[1::2])
    _wait_idle(server)
    generated = _metric(server, "mlxllm_generated_tokens_total") - before
    assert generated < 8 * 64  # the dropped ones stopped early
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, "temperature": 0},
                   headers=_headers(server))
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_dir):
    server = ServerProcess("-m", str(tiny_chat_dir), "--model-name", "tiny", "--max-batch", "32")
    server.key = "unused"  # no --api-key: any key is accepted
    yield server
    assert server.stop() == 0, server.output()


def test_32_concurrent_streams_each_complete_once_with_the_right_count(tiny_server):
    """A short load test on a tiny model: 32 streaming clients at once, each gets one stream with
    its own id, exactly the tokens it asked for, one [DONE]; through both APIs."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int, int]:
        body = {"messages": [{"role": "user", "content": f"Say the number {i} in words, then keep talking."}],
                "max_tokens": 24 + i, "temperature": 0.8, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        ids, chunks, usage, done = set(), 0, None, 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done += 1
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    ids.add(chunk["id"])
                    chunks += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
                    usage = chunk.get("usage") or usage
        assert len(ids) == 1 and done == 1
        return ids.pop(), usage["completion_tokens"], chunks

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len({rid for rid, _, _ in results}) == 32
    assert [n for _, n, _ in results] == [24 + i for i in range(32)]
    assert all(chunks > 0 for _, _, chunks in results)
    claude = anthropic.Anthropic(base_url=tiny_server.url, api_key="none", max_retries=0, timeout=300)
    with claude.messages.stream(model="tiny", max_tokens=10, messages=QUESTION, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens <= 10
    assert _metric(tiny_server, "mlxllm_running_batch_size") == 0
