"""vbatch.openai.protocol without a model: request parsing, sampling parameters, and response
bodies validated by the `openai` package's own types."""
from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from vbatch.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob, TopLogprob
from vbatch.openai import protocol
from vbatch.openai.protocol import OpenAIRequestError

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _entry(token_id: int, text: str, logprob: float) -> TokenLogprob:
    return TokenLogprob(token_id, text, logprob, 1,
                        [TopLogprob(token_id, text, logprob), TopLogprob(9, "z", logprob - 1)])


def _output(prompt_ids, texts, *, prompt="ab", with_logprobs=True) -> RequestOutput:
    completions = [CompletionOutput(i, text, [5, 6], "length",
                                    token_logprobs=[_entry(5, text[:1], -0.5),
                                                    _entry(6, text[1:], float("-inf"))]
                                    if with_logprobs else None)
                   for i, text in enumerate(texts)]
    return RequestOutput("r", prompt, prompt_ids, completions,
                         prompt_token_logprobs=[None, _entry(prompt_ids[1], "b", -1.0)])


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "foo": 1}, "foo"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.0}, "max_tokens"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "structured_outputs": {"choice": ["a"], "regex": "a"}},
     "structured_outputs"),
    ({"prompt": "x", "guided_choice": ["a"], "guided_regex": "a"}, "guided_regex"),
])
def test_bad_completion_bodies_name_the_field(body, param):
    with pytest.raises(OpenAIRequestError) as caught:
        protocol.parse_completion_request(body).to_sampling_params(100, 3)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    error = caught.value.to_dict()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_bad_chat_bodies_and_unknown_model():
    for body in ({"messages": []}, {"messages": [{"role": "bot", "content": "x"}]},
                 {**CHAT, "top_logprobs": 2}, [1, 2], {**CHAT, "max_completion_tokens": 0}):
        with pytest.raises(OpenAIRequestError):
            protocol.parse_chat_request(body)
    with pytest.raises(OpenAIRequestError) as caught:
        protocol.check_model("gpt-4", ["tiny"])
    assert caught.value.status_code == 404 and caught.value.param == "model"
    protocol.check_model(None, ["tiny"])
    protocol.check_model("tiny", ["tiny"])


def test_max_tokens_must_fit_the_context():
    request = protocol.parse_completion_request({"prompt": "x", "max_tokens": 98})
    with pytest.raises(OpenAIRequestError, match="at most 97"):
        request.to_sampling_params(100, 3)
    assert protocol.parse_completion_request({"prompt": "x"}).to_sampling_params(
        100, 3).max_tokens == 97
    with pytest.raises(OpenAIRequestError, match="no room"):
        request.to_sampling_params(100, 100)


def test_sampling_params_mapping():
    params = protocol.parse_completion_request(
        {"prompt": [1, 2], "logprobs": 2, "echo": True, "max_tokens": 0, "n": 3, "seed": 4,
         "temperature": 0, "stop": ["\n"], "top_k": 5}).to_sampling_params(50, 2)
    assert (params.logprobs, params.prompt_logprobs, params.max_tokens, params.n) == (2, 2, 1, 3)
    assert (params.seed, params.temperature, params.top_k) == (4, 0, 5)
    assert params.stop_strings == ("\n",)
    chat = protocol.parse_chat_request({**CHAT, "logprobs": True, "top_logprobs": 3,
                                        "max_completion_tokens": 7})
    params = chat.to_sampling_params(50, 5)
    assert (params.logprobs, params.max_tokens, params.prompt_logprobs) == (3, 7, None)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = protocol.parse_chat_request(
        {**CHAT, "response_format": {"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": schema}}}
    ).to_sampling_params(50, 5)
    assert params.structured_outputs.json == schema
    for body, kind in (({"guided_choice": ["a", "b"]}, "choice"),
                       ({"structured_outputs": {"regex": "[ab]+"}}, "regex"),
                       ({"response_format": {"type": "json_object"}}, "json_object")):
        params = protocol.parse_chat_request({**CHAT, **body}).to_sampling_params(50, 5)
        assert getattr(params.structured_outputs, kind)


def test_chat_response_and_chunks_are_openai_types():
    request = protocol.parse_chat_request({**CHAT, "logprobs": True, "top_logprobs": 1, "n": 2})
    body = protocol.chat_completion_response(request, [_output([1, 2], ["xy", "zw"])], "tiny",
                                             "chatcmpl-1", 123)
    parsed = ChatCompletion.model_validate(body)
    assert [c.message.content for c in parsed.choices] == ["xy", "zw"]
    assert parsed.choices[1].logprobs.content[1].logprob == -9999.0
    assert len(parsed.choices[0].logprobs.content[0].top_logprobs) == 1
    assert parsed.usage.prompt_tokens == 2 and parsed.usage.completion_tokens == 4
    with_prompt = protocol.parse_chat_request({**CHAT, "prompt_logprobs": 1})
    body = protocol.chat_completion_response(with_prompt, [_output([1, 2], ["xy"])], "tiny",
                                             "chatcmpl-2", 123)
    ChatCompletion.model_validate(body)
    assert body["prompt_logprobs"][0] is None
    assert body["prompt_logprobs"][1][2] == {"logprob": -1.0, "rank": 1, "decoded_token": "b"}
    chunk = protocol.chat_completion_chunk("chatcmpl-1", 123, "tiny", [
        protocol.chat_chunk_choice(0, {"role": "assistant", "content": "x"}, "stop")])
    ChatCompletionChunk.model_validate(chunk)
    usage = protocol.usage_chunk("chatcmpl-1", 123, "tiny", "chat.completion.chunk",
                                 protocol.usage(2, 3))
    assert ChatCompletionChunk.model_validate(usage).usage.total_tokens == 5


def _validate_echo(body: dict) -> Completion:
    """`Completion.model_validate` of a body whose echoed first prompt token has null logprobs
    (as OpenAI's legacy API and vLLM send it, and lm-eval skips it; the openai package's type
    says float): the nulls are checked here, then swapped for the type's sake."""
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    swapped = {**body, "choices": [
        {**c, "logprobs": {**c["logprobs"],
                           "token_logprobs": [0.0, *c["logprobs"]["token_logprobs"][1:]],
                           "top_logprobs": [{}, *c["logprobs"]["top_logprobs"][1:]]}}
        for c in body["choices"]]}
    Completion.model_validate(swapped)
    return Completion.model_construct(**body)


def test_completion_response_echo_logprobs_as_lm_eval_reads_them():
    request = protocol.parse_completion_request({"prompt": ["ab", "ab"], "logprobs": 1,
                                                 "echo": True, "max_tokens": 2})
    outputs = [_output([1, 2], ["xy"]), _output([1, 2], ["zw"])]
    body = protocol.completion_response(request, outputs, "tiny", "cmpl-1", 1,
                                        token_text=lambda token_id: "a")
    _validate_echo(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    first = body["choices"][0]
    assert first["text"] == "abxy"
    assert first["logprobs"]["tokens"] == ["a", "b", "x", "y"]
    assert first["logprobs"]["token_logprobs"] == [None, -1.0, -0.5, -9999.0]
    assert first["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert first["logprobs"]["top_logprobs"][1] == {"b": -1.0}
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    # lm-eval's local-completions: sum(token_logprobs[ctxlen:-1]) with max_tokens=1
    echo_only = protocol.parse_completion_request({"prompt": "ab", "logprobs": 0,
                                                   "echo": True, "max_tokens": 0})
    body = protocol.completion_response(echo_only, [_output([1, 2], ["xy"])], "tiny", "c", 1)
    _validate_echo(body)
    assert body["choices"][0]["text"] == "ab" and body["usage"]["completion_tokens"] == 0
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.0]
    chunk = protocol.completion_chunk("c", 1, "tiny", [protocol.completion_chunk_choice(
        0, "x", "length", protocol.completion_logprobs([_entry(5, "x", -0.1)], 1))])
    assert Completion.model_validate(chunk).choices[0].logprobs.tokens == ["x"]
