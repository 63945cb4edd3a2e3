"""Request parsing and validation: what clients may send to /invocations and what they get back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djl_like.errors import BadRequestError, PayloadTooLargeError
from djl_like.requests import (MAX_STOP_SEQUENCE_CHARS, MAX_STOP_SEQUENCES, InvocationRequest,
                               check_body_size, parse_invocation)


def parse(body: dict, **kwargs) -> InvocationRequest:
    return parse_invocation(json.dumps(body).encode(), **kwargs)


def assert_bad_request(body: dict | bytes, field: str, **kwargs) -> BadRequestError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(BadRequestError) as info:
        parse_invocation(raw, **kwargs)
    assert info.value.status == 400
    assert field in info.value.message
    return info.value


# --- body --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe{}",
        b'{"inputs": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"inputs": "x", "parameters": {"temperature": NaN}}',
        b'{"inputs": "x", "parameters": {"top_p": Infinity}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["empty", "truncated", "utf16-bytes", "latin1", "nan", "infinity", "deeply-nested"],
)
def test_malformed_body_is_400_naming_the_body(raw):
    assert_bad_request(raw, "body")


@pytest.mark.parametrize("raw", [b"[]", b'["hi"]', b'"hi"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_400(raw):
    assert_bad_request(raw, "JSON object")


def test_utf8_body_with_bom_and_non_ascii_prompt_is_accepted():
    request = parse_invocation('\ufeff{"inputs": "héllo ✓"}'.encode("utf-8"))
    assert request.prompts == ("héllo ✓",)


@pytest.mark.parametrize(
    "raw, field",
    [
        (rb'{"inputs": "abc \ud800 def"}', "inputs is not valid Unicode"),
        (rb'{"inputs": ["fine", "x\uDFFF"]}', "inputs[1] is not valid Unicode"),
        (rb'{"messages": [{"role": "user", "content": "hi \udc00"}]}',
         "messages[0].content is not valid Unicode"),
        (rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}',
         "messages[0].content[0].text is not valid Unicode"),
        (rb'{"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}',
         "messages[0].name is not valid Unicode"),
        (rb'{"inputs": "x", "parameters": {"stop_sequences": ["\ud800"]}}',
         "parameters.stop_sequences[0] is not valid Unicode"),
        (rb'{"inputs": "x", "parameters": {"\ud800": 1}}', "a key of parameters"),
        (rb'{"inputs": "x", "model": "\udbff"}', "model is not valid Unicode"),
    ],
    ids=["inputs", "list-item", "chat-content", "chat-text-part", "chat-name", "stop", "key",
         "ignored-field"],
)
def test_lone_surrogate_anywhere_is_400_naming_the_field(raw, field):
    error = assert_bad_request(raw, field)
    assert "lone surrogate" in error.message


def test_escaped_surrogate_pairs_are_ordinary_characters():
    request = parse_invocation(rb'{"inputs": "rocket \ud83d\ude80", "parameters": {"stop": "\\ud800"}}')
    assert request.prompts == ("rocket \U0001F680",)
    assert request.params.stop_sequences == ("\\ud800",)


# --- inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"parameters": {"max_new_tokens": 5}}, {"inputs": None}],
    ids=["empty-object", "parameters-only", "null"],
)
def test_missing_inputs_is_400(body):
    assert_bad_request(body, "inputs")


@pytest.mark.parametrize(
    "inputs, field",
    [
        ("", "inputs"),
        ([], "inputs"),
        (5, "inputs"),
        (True, "inputs"),
        ({"text": "hi"}, "inputs"),
        ([1, 2], "inputs[0]"),
        (["ok", ""], "inputs[1]"),
        (["ok", None], "inputs[1]"),
        (["ok", ["nested"]], "inputs[1]"),
    ],
)
def test_bad_inputs_is_400_naming_the_field(inputs, field):
    assert_bad_request({"inputs": inputs}, field)


def test_single_string_input_is_not_a_batch():
    request = parse({"inputs": "What is Deep Learning?"})
    assert request.prompts == ("What is Deep Learning?",)
    assert request.is_batch is False
    assert request.is_chat is False


@pytest.mark.parametrize("inputs", [["one"], ["one", "two", "three"]])
def test_list_inputs_are_a_batch_in_order(inputs):
    request = parse({"inputs": inputs, "parameters": {"max_new_tokens": 7}})
    assert request.prompts == tuple(inputs)
    assert request.is_batch is True
    assert request.params.max_new_tokens == 7


# --- parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [[], "max_new_tokens=5", 3, True])
def test_parameters_not_an_object_is_400(parameters):
    assert_bad_request({"inputs": "x", "parameters": parameters}, "parameters")


def test_defaults_are_the_lmi_defaults():
    request = parse({"inputs": "hi"})
    params = request.params
    assert params.max_new_tokens == 30
    assert params.do_sample is False
    assert params.temperature == 1.0
    assert params.top_k == 0
    assert params.top_p == 1.0
    assert params.repetition_penalty == 1.0
    assert params.seed is None
    assert params.stop_sequences == ()
    assert params.details is False
    assert params.return_full_text is False
    assert params.ignore_eos is False
    assert params.is_greedy
    assert (request.stream, request.output_formatter) == (False, "json")
    assert request.unknown_parameters == ()
    assert not request.is_chat


def test_null_parameters_mean_defaults():
    # TGI-style clients send every parameter, null where unset.
    request = parse(
        {"inputs": "hi", "parameters": {"seed": None, "top_k": None, "max_new_tokens": None}}
    )
    assert request.params.seed is None
    assert request.params.top_k == 0
    assert request.params.max_new_tokens == 30
    assert parse({"inputs": "hi", "parameters": None}).params.max_new_tokens == 30


def test_every_known_parameter_reaches_generation_params():
    parameters = {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 50,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 42,
        "stop_sequences": ["\n\n"],
        "ignore_eos": True,
        "details": True,
        "return_full_text": True,
        "decoder_input_details": True,
    }
    params = parse({"inputs": "x", "parameters": parameters}).params
    for name, value in parameters.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(params, name) == expected, name
    assert not params.is_greedy


BAD_PARAMETERS = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -5),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", 10.0),
    ("max_new_tokens", True),
    ("max_new_tokens", "10"),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", [1.0]),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", "0.9"),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_k", "5"),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", "1.2"),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", False),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("frequency_penalty", "0"),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", True),
    ("seed", -1),
    ("seed", 2**64),
    ("stop_sequences", 5),
    ("stop_sequences", [1]),
    ("stop_sequences", ["ok", 2]),
    ("stop_sequences", [""]),
    ("stop_sequences", ""),
    ("stop_sequences", {"a": 1}),
    ("stop", 5),
    ("stop", [None]),
    ("do_sample", "true"),
    ("do_sample", 1),
    ("details", 1),
    ("return_full_text", "yes"),
    ("ignore_eos", 0),
    ("decoder_input_details", "false"),
    ("stream", "true"),
]


@pytest.mark.parametrize("name, value", BAD_PARAMETERS)
def test_bad_parameter_is_400_naming_it(name, value):
    error = assert_bad_request({"inputs": "x", "parameters": {name: value}}, f"parameters.{name}")
    assert json.dumps(value)[:20] in error.message


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("temperature", 0, 0.0),
        ("temperature", 2, 2.0),
        ("top_p", 1, 1.0),
        ("top_p", 1e-6, 1e-6),
        ("min_p", 0, 0.0),
        ("min_p", 1, 1.0),
        ("top_k", 0, 0),
        ("seed", 0, 0),
        ("seed", 2**64 - 1, 2**64 - 1),
        ("repetition_penalty", 0.5, 0.5),
        ("max_new_tokens", 1, 1),
    ],
)
def test_boundary_values_are_accepted(name, value, expected):
    params = parse({"inputs": "x", "parameters": {name: value}}).params
    assert getattr(params, name) == expected


def test_temperature_zero_with_sampling_is_greedy():
    params = parse({"inputs": "x", "parameters": {"do_sample": True, "temperature": 0}}).params
    assert params.do_sample is True
    assert params.is_greedy


@pytest.mark.parametrize("temperature", [1e-40, 1e-6, 0.0])
def test_temperature_below_the_epsilon_with_sampling_is_greedy(temperature):
    params = parse({"inputs": "x", "parameters": {"do_sample": True, "temperature": temperature}}).params
    assert params.is_greedy


def test_small_positive_temperature_still_samples():
    assert not parse({"inputs": "x", "parameters": {"do_sample": True, "temperature": 1e-3}}).params.is_greedy


@pytest.mark.parametrize("name", ["stop", "stop_sequences"])
def test_stop_sequences_up_to_the_limits_are_accepted(name):
    stops = [f"{index:03d}" + "x" * (MAX_STOP_SEQUENCE_CHARS - 3) for index in range(MAX_STOP_SEQUENCES)]
    assert parse({"inputs": "x", "parameters": {name: stops}}).params.stop_sequences == tuple(stops)


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"stop_sequences": ["s"] * 50_000}, "parameters.stop_sequences: 50000 stop sequences, over the limit of 16"),
        ({"stop": [str(i) for i in range(17)]}, "parameters.stop: 17 stop sequences"),
        ({"stop": [f"a{i}" for i in range(9)], "stop_sequences": [f"b{i}" for i in range(9)]},
         "parameters.stop + parameters.stop_sequences: 18 stop sequences"),
        ({"stop_sequences": ["ok", "x" * 1_000_000]},
         "parameters.stop_sequences[1] is 1000000 characters long; a stop sequence may have at most 256"),
        ({"stop": "y" * 257}, "parameters.stop[0] is 257 characters long"),
    ],
    ids=["50000-stops", "17-stops", "merged-18", "1-MB-stop", "257-characters"],
)
def test_too_many_or_too_long_stop_sequences_are_400(parameters, message):
    assert_bad_request({"inputs": "x", "parameters": parameters}, message)


def test_chat_stop_over_the_limit_is_400():
    assert_bad_request({"messages": USER_HI, "stop": [str(i) for i in range(17)]}, "stop: 17 stop sequences")


def test_max_new_tokens_over_max_model_len_is_400_naming_both_numbers():
    body = {"inputs": "x", "parameters": {"max_new_tokens": 5000}}
    error = assert_bad_request(body, "parameters.max_new_tokens", max_model_len=4096)
    assert "5000" in error.message and "4096" in error.message


def test_max_new_tokens_up_to_max_model_len_is_accepted():
    body = {"inputs": "x", "parameters": {"max_new_tokens": 4096}}
    assert parse(body, max_model_len=4096).params.max_new_tokens == 4096


def test_default_max_new_tokens_is_not_checked_against_a_small_max_model_len():
    # The engine caps a default at what fits; only an explicit request beyond the limit is wrong.
    assert parse({"inputs": "x"}, max_model_len=16).params.max_new_tokens == 30


def test_unknown_parameters_are_listed_not_refused():
    body = {
        "inputs": "x",
        "model": "my-model",
        "parameters": {"max_new_tokens": 5, "best_of": 2, "typical_p": 0.9},
    }
    request = parse(body)
    assert request.params.max_new_tokens == 5
    assert set(request.unknown_parameters) == {"model", "best_of", "typical_p"}


@pytest.mark.parametrize(
    "parameters, expected",
    [
        ({"stop": "###"}, ("###",)),
        ({"stop": ["a", "b"]}, ("a", "b")),
        ({"stop_sequences": "###"}, ("###",)),
        ({"stop_sequences": ["a"], "stop": ["b", "a"]}, ("a", "b")),
        ({"stop_sequences": [], "stop": None}, ()),
    ],
)
def test_stop_is_an_alias_merged_into_stop_sequences(parameters, expected):
    assert parse({"inputs": "x", "parameters": parameters}).params.stop_sequences == expected


# --- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_level, in_parameters, default, expected",
    [
        (True, None, "json", (True, "jsonlines")),
        (True, None, "jsonlines", (True, "jsonlines")),
        (True, None, "sse", (True, "sse")),
        (None, True, "json", (True, "jsonlines")),
        (None, True, "sse", (True, "sse")),
        (False, True, "json", (True, "jsonlines")),
        (None, None, "json", (False, "json")),
        (False, None, "json", (False, "json")),
        # option.output_formatter=jsonlines|sse streams a request that does not say otherwise
        (None, None, "jsonlines", (True, "jsonlines")),
        (None, None, "sse", (True, "sse")),
        (False, None, "sse", (False, "json")),
        (None, False, "jsonlines", (False, "json")),
    ],
)
def test_stream_and_output_formatter_selection(top_level, in_parameters, default, expected):
    body: dict = {"inputs": "x", "parameters": {}}
    if top_level is not None:
        body["stream"] = top_level
    if in_parameters is not None:
        body["parameters"]["stream"] = in_parameters
    request = parse(body, default_output_formatter=default)
    assert (request.stream, request.output_formatter) == expected
    assert "stream" not in request.unknown_parameters


@pytest.mark.parametrize("value", ["true", 1, 0, [True]])
def test_top_level_stream_not_a_bool_is_400(value):
    assert_bad_request({"inputs": "x", "stream": value}, "stream")


@pytest.mark.parametrize("where", ["top-level", "parameters"])
def test_streaming_a_list_of_prompts_is_400(where):
    body: dict = {"inputs": ["a", "b"]}
    if where == "top-level":
        body["stream"] = True
    else:
        body["parameters"] = {"stream": True}
    assert_bad_request(body, "stream")


def test_a_list_of_prompts_under_a_streaming_default_gets_one_json_response():
    request = parse({"inputs": ["a", "b"]}, default_output_formatter="sse")
    assert (request.stream, request.output_formatter) == (False, "json")


# --- body size ---------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted():
    check_body_size(6 * 1024 * 1024, 6 * 1024 * 1024)


def test_body_over_the_limit_is_413_naming_both_sizes():
    with pytest.raises(PayloadTooLargeError) as info:
        check_body_size(7_000_001, 6_291_456)
    assert info.value.status == 413
    assert "7000001" in info.value.message and "6291456" in info.value.message


# --- chat --------------------------------------------------------------------------------

USER_HI = [{"role": "user", "content": "hi"}]


def test_chat_body_is_parsed_with_messages_and_no_prompts():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ]
    request = parse({"model": "m", "messages": messages})
    assert request.is_chat
    assert request.messages == tuple(messages)
    assert request.prompts == ()
    assert request.n == 1
    assert request.unknown_parameters == ()
    assert (request.stream, request.output_formatter) == (False, "json")


def test_chat_without_temperature_is_greedy_with_lmi_defaults():
    params = parse({"messages": USER_HI}).params
    assert params.do_sample is False
    assert params.max_new_tokens == 30
    assert params.logprobs is None


def test_chat_openai_parameters_map_to_generation_params():
    body = {
        "messages": USER_HI,
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": "\n",
        "seed": 7,
        "logprobs": True,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
    }
    params = parse(body).params
    assert params.max_new_tokens == 64
    assert params.do_sample is True
    assert params.temperature == 0.7
    assert params.top_p == 0.9
    assert params.stop_sequences == ("\n",)
    assert params.seed == 7
    assert params.logprobs == 0  # logprobs without top_logprobs: the sampled token only
    assert params.frequency_penalty == 0.5
    assert params.presence_penalty == -0.5


@pytest.mark.parametrize(
    "temperature, do_sample", [(0, False), (0.0, False), (1e-3, True), (1, True)]
)
def test_chat_samples_exactly_when_temperature_is_positive(temperature, do_sample):
    params = parse({"messages": USER_HI, "temperature": temperature}).params
    assert params.do_sample is do_sample


def test_chat_max_completion_tokens_wins_over_max_tokens():
    body = {"messages": USER_HI, "max_tokens": 10, "max_completion_tokens": 20}
    assert parse(body).params.max_new_tokens == 20


def test_chat_text_parts_are_joined_into_one_content_string():
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    request = parse({"messages": [{"role": "user", "content": content}]})
    assert request.messages[0]["content"] == "Hello, world"


@pytest.mark.parametrize(
    "stream, default, expected",
    [
        (True, "json", (True, "jsonlines")),
        (True, "sse", (True, "sse")),
        (None, "sse", (True, "sse")),
        (False, "sse", (False, "json")),
        (None, "json", (False, "json")),
    ],
)
def test_chat_stream_selection_follows_the_same_rule(stream, default, expected):
    body: dict = {"messages": USER_HI}
    if stream is not None:
        body["stream"] = stream
    request = parse(body, default_output_formatter=default)
    assert (request.stream, request.output_formatter) == expected


def test_chat_unknown_keys_are_listed_and_model_user_and_empty_tools_are_not():
    request = parse({"messages": USER_HI, "model": "gpt", "tools": [], "user": "u1", "store": True})
    assert set(request.unknown_parameters) == {"store"}


@pytest.mark.parametrize(
    "messages, field",
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role"),
        ([{"role": "bot", "content": "hi"}], "messages[0].role"),
        ([{"role": ["user"], "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
        ),
    ],
)
def test_bad_chat_messages_are_400_naming_the_index(messages, field):
    assert_bad_request({"messages": messages}, field)


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("max_completion_tokens", -1),
        ("temperature", -1),
        ("temperature", "0.5"),
        ("top_p", 0),
        ("stop", [1]),
        ("seed", "x"),
        ("logprobs", "yes"),
        ("logprobs", 5),
        ("stream", "yes"),
        ("frequency_penalty", "high"),
        ("presence_penalty", 9),
        ("n", 0),
        ("n", 1000),
        ("top_logprobs", 21),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 101}),
        ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}),
        ("best_of", 3),
        ("stream_options", {"include_usage": True}),  # without stream: true
    ],
)
def test_bad_chat_parameter_is_400_naming_it(name, value):
    assert_bad_request({"messages": USER_HI, name: value}, name)


def test_chat_max_tokens_over_max_model_len_is_400():
    body = {"messages": USER_HI, "max_tokens": 100}
    error = assert_bad_request(body, "max_tokens", max_model_len=64)
    assert "100" in error.message and "64" in error.message


def test_chat_with_inputs_too_is_400():
    assert_bad_request({"messages": USER_HI, "inputs": "x"}, "inputs")


# --- robustness --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
body_keys = st.sampled_from(["inputs", "parameters", "stream", "messages", "max_tokens", "other"])
parameter_keys = st.sampled_from(
    ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_sequences", "details"]
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(body_keys, json_values, max_size=4),
    parameters=st.dictionaries(parameter_keys, json_values, max_size=4),
)
def test_any_json_body_gives_a_request_or_a_bad_request(body, parameters):
    if "parameters" in body:
        body["parameters"] = parameters
    try:
        request = parse(body, max_model_len=1000)
    except BadRequestError:
        return
    assert isinstance(request, InvocationRequest)
    assert request.is_chat or len(request.prompts) >= 1


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_give_a_request_or_a_bad_request(raw):
    try:
        parse_invocation(raw)
    except BadRequestError:
        pass


def test_djl_like_imports_without_torch_flask_or_the_engine():
    code = (
        "import sys, djl_like.requests, djl_like.formatters\n"
        "heavy = [m for m in ('torch', 'transformers', 'flask', 'batching', 'container')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
