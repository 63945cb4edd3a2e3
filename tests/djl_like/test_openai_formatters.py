"""OpenAI shapes: chat completions and chunks, completions and chunks, logprobs, usage, errors."""

from __future__ import annotations

import pytest

from djl_like.errors import BadRequestError, ServiceUnavailableError
from djl_like.openai_formatters import (ResponseHeader, Usage, chat_chunk, chat_completion, completion,
                                        completion_logprobs, error_body, model_list, stream_end, usage_chunk)
from djl_like.protocol import FinishReason, GenerationResult, TokenLogProb, TokenOutput

HEADER = ResponseHeader("chatcmpl-1", 1_700_000_000, "smollm2")


def token(token_id: int, text: str, log_prob: float, reason: FinishReason | None = None, *,
          top: tuple[TokenLogProb, ...] = ()) -> TokenOutput:
    return TokenOutput(token_id, text, log_prob, reason, sampled=TokenLogProb(token_id, text, log_prob),
                       top_logprobs=top)


def result(prompt: str = "Deep Learning is", pieces=(" a", " cool", " field"),
           reason: FinishReason = FinishReason.LENGTH) -> GenerationResult:
    last = len(pieces) - 1
    return GenerationResult(prompt, [token(100 + i, text, -0.5 * (i + 1), reason if i == last else None)
                                     for i, text in enumerate(pieces)])


def test_chat_completion_has_one_choice_per_result_and_usage():
    completion_object = chat_completion([result(), result(pieces=("x",), reason=FinishReason.EOS)],
                                        header=HEADER, usage=Usage(11, 4), logprobs=False)
    assert completion_object == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "smollm2",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " a cool field"}, "logprobs": None,
             "finish_reason": "length"},
            {"index": 1, "message": {"role": "assistant", "content": "x"}, "logprobs": None,
             "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
    }


@pytest.mark.parametrize("reason, expected", [(FinishReason.LENGTH, "length"), (FinishReason.EOS, "stop"),
                                              (FinishReason.STOP_SEQUENCE, "stop")])
def test_finish_reasons_use_openai_names(reason, expected):
    answer = chat_completion([result(reason=reason)], header=HEADER, usage=Usage(1, 3), logprobs=False)
    assert answer["choices"][0]["finish_reason"] == expected


def test_chat_logprobs_report_the_token_alone_and_its_alternatives():
    alternatives = (TokenLogProb(7, "é", -0.1), TokenLogProb(8, "e", -2.5))
    answer = chat_completion([GenerationResult("p", [token(7, "é", -0.1, FinishReason.LENGTH, top=alternatives)])],
                             header=HEADER, usage=Usage(1, 1), logprobs=True)
    assert answer["choices"][0]["logprobs"] == {"content": [{
        "token": "é", "logprob": -0.1, "bytes": [195, 169],
        "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [195, 169]},
                         {"token": "e", "logprob": -2.5, "bytes": [101]}]}]}


def test_chat_chunks_carry_role_first_finish_reason_last_and_null_usage_when_asked():
    tokens = result().tokens
    chunks = [chat_chunk(t, header=HEADER, index=2, first=i == 0, logprobs=False, with_usage=True)
              for i, t in enumerate(tokens)]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": " a"}, {"content": " cool"}, {"content": " field"}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert {c["choices"][0]["index"] for c in chunks} == {2}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert "usage" not in chat_chunk(tokens[0], header=HEADER, index=0, first=True, logprobs=False)


def test_usage_chunk_has_no_choices():
    assert usage_chunk(HEADER, "chat.completion.chunk", Usage(5, 7))["choices"] == []
    assert usage_chunk(HEADER, "chat.completion.chunk", Usage(5, 7))["usage"]["total_tokens"] == 12


def test_completion_echo_prepends_the_prompt_and_logprobs_offsets_follow_it():
    answer = completion([result()], header=HEADER, usage=Usage(3, 3), echo=True, logprobs=True)
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion"
    assert choice["text"] == "Deep Learning is a cool field"
    assert choice["logprobs"]["tokens"] == [" a", " cool", " field"]
    assert choice["logprobs"]["token_logprobs"] == [-0.5, -1.0, -1.5]
    assert choice["logprobs"]["text_offset"] == [16, 18, 23]


def test_completion_top_logprobs_hold_the_alternatives_and_the_chosen_token():
    sampled = token(9, " b", -3.0, top=(TokenLogProb(1, " a", -0.2),))
    assert completion_logprobs([sampled])["top_logprobs"] == [{" a": -0.2, " b": -3.0}]


def test_non_finite_logprob_is_null():
    assert completion_logprobs([token(1, "x", float("-inf"))])["token_logprobs"] == [None]


def test_stream_end_is_done_under_sse_only():
    assert stream_end("sse") == b"data: [DONE]\n\n"
    assert stream_end("jsonlines") == b""


def test_model_list_names_the_served_model():
    assert model_list("llama", 5) == {"object": "list", "data": [
        {"id": "llama", "object": "model", "created": 5, "owned_by": "lmi-batching"}]}


def test_error_body_is_openai_shaped_with_the_status_as_code():
    assert error_body(BadRequestError("max_tokens must be ..."), "max_tokens") == {"error": {
        "message": "max_tokens must be ...", "type": "invalid_request_error", "param": "max_tokens", "code": 400}}
    assert error_body(ServiceUnavailableError("loading"))["error"]["type"] == "service_unavailable_error"
