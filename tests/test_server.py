"""`vbatch serve` end to end: a real server process (tiny random LLaMA, float32) on a free
loopback port, spoken to with the official `openai` client (and httpx for raw bodies); the
bodies are validated with the `openai` package's own types.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import jsonschema
import openai
import psutil
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server_process import metric, running_server

from vbatch import LLM, SamplingParams

API_KEY = "test-key"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
#: Malformed requests sent in the fuzz test (issue 13's acceptance asks for 200).
FUZZ_COUNT = int(os.environ.get("VBATCH_TEST_FUZZ_COUNT", "200"))


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models["llama-gqa-untied"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--model", str(model_dir), "--dtype", "float32", "--served-model-name", MODEL,
            "--api-key", API_KEY, "--max-num-seqs", "16", "--kv-cache-memory-gb", "0.05"]
    with running_server(args, tmp_path_factory.mktemp("server") / "server.log") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _post(server: str, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, timeout=30,
                      headers={**_auth(), "Content-Type": "application/json"}, **kwargs)


def test_listens_on_loopback_only_by_default(server):
    port = int(server.rsplit(":", 1)[1])
    [pid] = [c.pid for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    addresses = {c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert addresses == {"127.0.0.1"}


def test_models_health_and_api_key(server, client):
    [model] = client.models.list().data
    assert Model.model_validate(model.model_dump()).id == MODEL
    assert httpx.get(f"{server}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_completions_text_token_ids_n_and_logprobs(client):
    text = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=4,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    Completion.model_validate(text.model_dump())
    [choice] = text.choices
    assert len(choice.logprobs.tokens) == 4 == text.usage.completion_tokens
    assert all(token in top for token, top in zip(choice.logprobs.tokens,
                                                  choice.logprobs.top_logprobs))
    # greedy: every token is the most likely one
    assert all(lp == max(top.values())
               for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
    tokens = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2,
                                       temperature=0.9, seed=3,
                                       extra_body={"ignore_eos": True})
    Completion.model_validate(tokens.model_dump())
    assert [c.index for c in tokens.choices] == [0, 1, 2, 3]
    assert tokens.usage.prompt_tokens == 5 and tokens.usage.completion_tokens == 12
    again = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2,
                                      temperature=0.9, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in tokens.choices]  # seeded


@pytest.fixture(scope="module")
def llm(model_dir):
    """The same model in this process, as the reference."""
    engine = LLM(str(model_dir), dtype="float32", kv_cache_memory_gb=0.01)
    yield engine
    engine.llm_engine.shutdown()


def test_echo_logprobs_score_a_continuation_as_lm_eval_does(server, llm):
    """lm-eval's local-completions: prompt = context + continuation ids, echo, max_tokens=1,
    logprobs=1; the continuation's logprobs are token_logprobs[ctxlen:-1]."""
    context = [10, 11, 12, 13]
    [greedy] = llm.generate([{"prompt_token_ids": context}], SamplingParams(
        temperature=0, max_tokens=3, logprobs=1, ignore_eos=True))
    continuation = greedy.outputs[0].token_ids
    body = _post(server, "/v1/completions", {"model": MODEL, "prompt": context + continuation,
                                             "max_tokens": 1, "logprobs": 1, "echo": True,
                                             "temperature": 0}).json()
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(context) + len(continuation) + 1
    scored = logprobs["token_logprobs"][len(context):-1]
    expected = [entry.logprob for entry in greedy.outputs[0].token_logprobs]
    assert scored == pytest.approx(expected, abs=1e-4)
    tops = logprobs["top_logprobs"][len(context):-1]
    assert all(lp == max(top.values()) for lp, top in zip(scored, tops))   # is_greedy
    assert body["usage"]["prompt_tokens"] == len(context) + len(continuation)


def test_greedy_chat_equals_llm_chat(client, llm):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True})
    ChatCompletion.model_validate(reply.model_dump())
    [expected] = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8,
                                                    ignore_eos=True))
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    content = reply.choices[0].logprobs.content
    assert len(content) == 8 and all(len(entry.top_logprobs) == 2 for entry in content)


def test_chat_stream_with_usage_equals_the_plain_reply(client):
    settings = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0.8,
                "seed": 11, "n": 2, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True,
                                                 stream_options={"include_usage": True}))
    texts = ["", ""]
    finish = [None, None]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert finish[choice.index] is None
                finish[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in plain.choices]
    assert finish == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len(chunks) >= 10        # streamed step by step, not in one piece


def test_completion_stream_with_echo(client):
    plain = client.completions.create(model=MODEL, prompt="Batch inference", max_tokens=6,
                                      temperature=0, echo=True, extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL, prompt="Batch inference", max_tokens=6,
                                       temperature=0, echo=True, stream=True,
                                       extra_body={"ignore_eos": True})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == plain.choices[0].text and text.startswith("Batch inference")


def test_structured_outputs(client):
    labels = ["positive", "negative", "it's mixed"]
    for extra in ({"structured_outputs": {"choice": labels}}, {"guided_choice": labels}):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20,
                                               temperature=1.0, n=3, seed=1, extra_body=extra)
        assert {c.message.content for c in reply.choices} <= set(labels)
    schema = {"type": "object", "properties": {
        "mood": {"enum": ["happy", "sad"]}, "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
        "required": ["mood", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # OpenAI's response_format allows free whitespace, which a random model takes a lot of:
    # sampled, several samples still end within max_tokens
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=200, temperature=1.0, n=4, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema}})
    ended = [c.message.content for c in reply.choices if c.finish_reason == "stop"]
    assert ended
    for text in ended:
        jsonschema.validate(json.loads(text), schema)


def test_tokenize_detokenize_round_trip(server, client):
    tokens = _post(server, "/tokenize", {"model": MODEL, "prompt": "Paris is the capital"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    text = _post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()
    assert text["prompt"].endswith("Paris is the capital")
    assert _post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400
    chat = _post(server, "/tokenize", {"messages": MESSAGES}).json()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens


def test_errors_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", extra_body={"best_of": 2})
    assert caught.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       stream=True, extra_body={"guided_regex": "(unclosed"})
    response = _post(server, "/v1/chat/completions", b"{not json")
    assert response.status_code == 400 and response.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/nothing", headers=_auth()).status_code == 404


VALID_BODIES = {"/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
                "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}}
_TEXT = ["x", "1", "\ud800"]
#: field -> values both endpoints refuse for it (wrong types, out of range, inconsistent)
WRONG_VALUES = {
    "model": [1, [], "\ud800", "other-model"], "max_tokens": [*_TEXT, -1, 1.5, True, 10**30],
    "temperature": [*_TEXT, -1, [0.5]], "top_p": [0, 2, *_TEXT], "n": [0, 1.5, 10**6, "2"],
    "stop": [5, [5], [""]], "seed": [-1, 2**64, "7"], "echo": ["yes", 1], "stream": ["true", 1],
    "stream_options": [{"include_usage": True}, 5], "top_k": [-2, 1.5], "min_p": [2, -1],
    "presence_penalty": [3, *_TEXT], "prompt_logprobs": [21, True], "user": [5],
    "structured_outputs": [{}, {"choice": []}, {"regex": "a", "choice": ["a"]}, 5,
                           {"regex": "(unclosed"}],
    "response_format": [{"type": "xml"}, {"type": "json_schema"}, "json"],
}
WRONG_PROMPTS = {"/v1/completions": ("prompt", [[], [[]], [-1], [1.5], ["x", 5], None, {},
                                                [10**7], "", ["ok", ""]]),
                 "/v1/chat/completions": ("messages", [[], [{}], [{"role": "bot",
                                                                   "content": "x"}], "x",
                                                       [{"role": "user", "content": 5}]])}


def _malformed_requests(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(path, body) pairs, `count` of them: broken JSON, a wrong type or value, an unknown
    field, a max_tokens beyond the context, a body that is not an object."""
    rng = random.Random(seed)
    requests = []
    while len(requests) < count:
        path = rng.choice(sorted(VALID_BODIES))
        valid = VALID_BODIES[path]
        kind = len(requests) % 6
        if kind == 0:       # broken JSON
            text = json.dumps(valid)
            cut = rng.randrange(1, len(text) - 1)
            body = (text[:cut] + rng.choice(["", "}", "]]", ",", "\x00"])).encode()
        elif kind == 1:     # a wrong type or value
            field = rng.choice(sorted(WRONG_VALUES))
            body = json.dumps({**valid, field: rng.choice(WRONG_VALUES[field])}).encode()
        elif kind == 2:     # a wrong prompt
            field, values = WRONG_PROMPTS[path]
            body = json.dumps({**valid, field: rng.choice(values)}).encode()
        elif kind == 3:     # an unknown field
            body = json.dumps({**valid, f"field_{rng.randrange(1000)}": 1}).encode()
        elif kind == 4:     # more than fits
            body = json.dumps({**valid, "max_tokens": rng.choice([511, 10**6, 2**63])}).encode()
        else:               # not an object, or random bytes
            body = rng.choice([b"[]", b"null", b"42", b'"prompt"', b"",
                               bytes(rng.randrange(256) for _ in range(20))])
        requests.append((path, body))
    return requests


def test_a_burst_of_malformed_requests_each_gets_a_4xx(server, client):
    async def send_all() -> list[int]:
        async with httpx.AsyncClient(timeout=30, headers={**_auth(),
                                                          "Content-Type": "application/json"}
                                     ) as http:
            async def one(path: str, body: bytes) -> int:
                return (await http.post(f"{server}{path}", content=body)).status_code
            return await asyncio.gather(*(one(path, body) for path, body
                                          in _malformed_requests(FUZZ_COUNT)))
    statuses = asyncio.run(send_all())
    assert len(statuses) == FUZZ_COUNT
    assert all(400 <= status < 500 for status in statuses), sorted(set(statuses))
    for path, body in VALID_BODIES.items():     # the fuzzer's base bodies are fine
        assert _post(server, path, body).status_code == 200
    assert httpx.get(f"{server}/health").status_code == 200


def test_64_concurrent_streams_all_complete_with_the_offline_greedy_text(server, llm):
    conversations = [[{"role": "user", "content": f"Row {i}: the quick brown fox"}]
                     for i in range(64)]
    expected = [o.outputs[0].text for o in llm.chat(conversations, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))]

    async def stream_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY,
                                      max_retries=0) as async_client:
            async def one(messages) -> str:
                stream = await async_client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
                return "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            return await asyncio.gather(*(one(m) for m in conversations))
    assert asyncio.run(stream_all()) == expected


def test_clients_that_leave_leak_no_kv_blocks(server):
    idle = metric(server, "vbatch_kv_free_blocks")
    generated = metric(server, "vbatch_generation_tokens_total")
    long_request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 480,
                    "temperature": 0, "ignore_eos": True}
    for _ in range(3):      # streams read a little, then dropped
        with httpx.stream("POST", f"{server}/v1/chat/completions", headers=_auth(),
                          json={**long_request, "stream": True}, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
    with pytest.raises(httpx.ReadTimeout):      # a plain request given up on
        httpx.post(f"{server}/v1/chat/completions", headers=_auth(), json=long_request,
                   timeout=0.3)
    deadline = time.monotonic() + 20
    while metric(server, "vbatch_kv_free_blocks") != idle or \
            metric(server, "vbatch_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the aborted requests still hold KV blocks"
        time.sleep(0.1)
    # none of them ran to its end (finished requests add their tokens here)
    assert metric(server, "vbatch_generation_tokens_total") == generated
