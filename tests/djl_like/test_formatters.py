"""Output shapes: LMI JSON responses, jsonlines/SSE streams, error bodies (OpenAI shapes:
test_openai_formatters.py)."""

from __future__ import annotations

import json

import pytest

from djl_like.errors import BadRequestError, DeviceOutOfMemoryError, PayloadTooLargeError
from djl_like.formatters import (
    content_type,
    error_body,
    format_generation,
    format_response,
    frame,
    stream_chunk,
)
from djl_like.protocol import FinishReason, GenerationParams, GenerationResult, TokenOutput
from djl_like.requests import parse_invocation

PROMPT = "Deep Learning is"


def make_result(
    prompt: str = PROMPT,
    pieces: tuple[str, ...] = (" a", " cool", " field"),
    finish_reason: FinishReason = FinishReason.LENGTH,
    num_prompt_tokens: int | None = None,
) -> GenerationResult:
    last = len(pieces) - 1
    tokens = [
        TokenOutput(
            token_id=100 + i,
            text=text,
            log_prob=-0.5 * (i + 1),
            finish_reason=finish_reason if i == last else None,
            num_prompt_tokens=num_prompt_tokens if i == last else None,
        )
        for i, text in enumerate(pieces)
    ]
    return GenerationResult(prompt=prompt, tokens=tokens)


def strict_loads(text: str | bytes):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# --- format_generation -------------------------------------------------------------------


def test_generation_without_details_is_only_the_generated_text():
    output = format_generation(PROMPT, make_result(), GenerationParams())
    assert output == {"generated_text": " a cool field"}


def test_return_full_text_prepends_the_prompt():
    output = format_generation(PROMPT, make_result(), GenerationParams(return_full_text=True))
    assert output == {"generated_text": "Deep Learning is a cool field"}


def test_details_carry_finish_reason_counts_inputs_and_tokens():
    output = format_generation(PROMPT, make_result(), GenerationParams(details=True))
    assert output == {
        "generated_text": " a cool field",
        "details": {
            "finish_reason": "length",
            "generated_tokens": 3,
            "inputs": PROMPT,
            "tokens": [
                {"id": 100, "text": " a", "log_prob": -0.5},
                {"id": 101, "text": " cool", "log_prob": -1.0},
                {"id": 102, "text": " field", "log_prob": -1.5},
            ],
        },
    }


@pytest.mark.parametrize(
    "reason, expected",
    [
        (FinishReason.LENGTH, "length"),
        (FinishReason.EOS, "eos_token"),
        (FinishReason.STOP_SEQUENCE, "stop_sequence"),
    ],
)
def test_details_finish_reason_uses_lmi_names(reason, expected):
    result = make_result(finish_reason=reason)
    output = format_generation(PROMPT, result, GenerationParams(details=True))
    assert output["details"]["finish_reason"] == expected


def test_generated_tokens_counts_tokens_whose_text_is_held_back():
    # A token can make no text visible yet (half a character); it still counts as generated.
    result = make_result(pieces=("", "é", "!"))
    output = format_generation(PROMPT, result, GenerationParams(details=True))
    assert output["generated_text"] == "é!"
    assert output["details"]["generated_tokens"] == 3


@pytest.mark.parametrize(
    "argument, on_last_token, expected",
    [(12, None, 12), (None, 9, 9), (12, 9, 12), (None, None, None)],
)
def test_details_report_prompt_tokens_when_known(argument, on_last_token, expected):
    result = make_result(num_prompt_tokens=on_last_token)
    details = format_generation(PROMPT, result, GenerationParams(details=True), argument)["details"]
    assert details.get("prompt_tokens") == expected


@pytest.mark.parametrize("log_prob", [float("-inf"), float("nan")])
def test_non_finite_log_prob_becomes_null_so_output_is_strict_json(log_prob):
    result = GenerationResult(PROMPT, [TokenOutput(5, "x", log_prob, FinishReason.EOS)])
    output = format_generation(PROMPT, result, GenerationParams(details=True))
    assert output["details"]["tokens"][0]["log_prob"] is None
    assert strict_loads(frame(output, "jsonlines"))["details"]["tokens"][0]["log_prob"] is None


# --- format_response ---------------------------------------------------------------------


def request_for(body: dict):
    return parse_invocation(json.dumps(body).encode())


def test_single_prompt_response_is_an_object():
    request = request_for({"inputs": PROMPT, "parameters": {"details": True}})
    response = format_response(request, [make_result()])
    assert isinstance(response, dict)
    assert response["generated_text"] == " a cool field"
    assert response["details"]["inputs"] == PROMPT


def test_batch_response_is_a_list_in_prompt_order():
    request = request_for({"inputs": ["first", "second"], "parameters": {"return_full_text": True}})
    results = [make_result("first", ("1",)), make_result("second", ("2",))]
    assert format_response(request, results) == [
        {"generated_text": "first1"},
        {"generated_text": "second2"},
    ]


def test_batch_of_one_is_still_a_list():
    request = request_for({"inputs": ["only"]})
    assert format_response(request, [make_result("only", ("!",))]) == [{"generated_text": "!"}]


def test_response_needs_one_result_per_prompt():
    request = request_for({"inputs": ["a", "b"]})
    with pytest.raises(ValueError):
        format_response(request, [make_result("a")])


# --- streaming ---------------------------------------------------------------------------


def stream_of(result: GenerationResult, params: GenerationParams) -> list[dict]:
    so_far = GenerationResult(result.prompt)
    chunks = []
    for token in result.tokens:
        so_far.tokens.append(token)
        chunks.append(stream_chunk(token, result_so_far=so_far, params=params))
    return chunks


def test_stream_chunks_before_the_last_carry_only_the_token():
    chunks = stream_of(make_result(), GenerationParams(details=True))
    assert chunks[0] == {"token": {"id": 100, "text": " a", "log_prob": -0.5}}
    assert chunks[1] == {"token": {"id": 101, "text": " cool", "log_prob": -1.0}}


def test_last_stream_chunk_carries_generated_text_and_details():
    result = make_result(finish_reason=FinishReason.EOS, num_prompt_tokens=4)
    last = stream_of(result, GenerationParams(details=True))[-1]
    assert last == {
        "token": {"id": 102, "text": " field", "log_prob": -1.5},
        "generated_text": " a cool field",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 3,
            "inputs": PROMPT,
            "prompt_tokens": 4,
        },
    }


def test_last_stream_chunk_without_details_has_no_details():
    last = stream_of(make_result(), GenerationParams())[-1]
    assert last == {
        "token": {"id": 102, "text": " field", "log_prob": -1.5},
        "generated_text": " a cool field",
    }


def test_last_stream_chunk_with_return_full_text_has_the_prompt():
    last = stream_of(make_result(), GenerationParams(return_full_text=True))[-1]
    assert last["generated_text"] == PROMPT + " a cool field"


def test_streamed_token_texts_add_up_to_the_generated_text():
    chunks = stream_of(make_result(pieces=("Hel", "", "lo", " ✓")), GenerationParams())
    assert "".join(c["token"]["text"] for c in chunks) == chunks[-1]["generated_text"] == "Hello ✓"


# --- framing -----------------------------------------------------------------------------

CHUNK = {"token": {"id": 1, "text": "line one\nline two ✓", "log_prob": -0.25}}


def test_jsonlines_frame_is_one_json_line():
    data = frame(CHUNK, "jsonlines")
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert strict_loads(data) == CHUNK


def test_sse_frame_is_a_data_event():
    data = frame(CHUNK, "sse")
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    assert data.count(b"\n") == 2
    assert strict_loads(data[len(b"data: "):]) == CHUNK


def test_frames_are_utf8():
    assert "✓".encode("utf-8") in frame(CHUNK, "jsonlines")


def test_consecutive_jsonlines_frames_split_back_into_objects():
    chunks = stream_of(make_result(), GenerationParams(details=True))
    body = b"".join(frame(c, "jsonlines") for c in chunks)
    assert [strict_loads(line) for line in body.splitlines()] == chunks


@pytest.mark.parametrize("formatter", ["json", "xml", ""])
def test_frame_refuses_a_formatter_that_does_not_stream(formatter):
    with pytest.raises(ValueError):
        frame(CHUNK, formatter)


@pytest.mark.parametrize(
    "formatter, expected",
    [
        ("json", "application/json"),
        ("jsonlines", "application/jsonlines; charset=utf-8"),
        ("sse", "text/event-stream; charset=utf-8"),
    ],
)
def test_content_types(formatter, expected):
    assert content_type(formatter) == expected


def test_unknown_formatter_has_no_content_type():
    with pytest.raises(ValueError):
        content_type("xml")


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, code, kind",
    [
        (BadRequestError("parameters.top_p must be ..."), 400, "BadRequest"),
        (PayloadTooLargeError("too big"), 413, "PayloadTooLarge"),
        (DeviceOutOfMemoryError("oom"), 507, "OutOfMemory"),
    ],
)
def test_error_body_is_code_type_message(error, code, kind):
    assert error_body(error) == {"code": code, "type": kind, "message": error.message}
