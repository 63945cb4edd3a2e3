"""The OpenAI routes with the official ``openai`` SDK as the client, against real ``serve``
processes, one per batching strategy (tiny random Llama models, fp32 on CPU).

Every strategy answers the same SDK checks: chat and completions, streamed and not, logprobs
with alternatives, n > 1, the usage chunk, the model list and an error. The paged server (with
the prefix cache on) also answers the finer points: the prompt of n choices computed once, the
same tokens through ``/invocations`` and ``/v1``, sampling parameters, echo, errors' ``param``.
"""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests

from tests.container.test_serve_http import QUIET_ENV, model_folder
from tests.server import start_server

STRATEGIES = {
    "paged": {"option.rolling_batch": "auto", "option.paged_attention": "true",
              "option.enable_prefix_caching": "true", "option.served_model_name": "tiny-llama"},
    "rolling": {"option.rolling_batch": "auto", "option.paged_attention": "false"},
    "dynamic": {"batch_size": "4", "max_batch_delay": "50", "option.rolling_batch": "disable",
                # NOTE: LMI's formatter streams /invocations; /v1 must still answer JSON and SSE.
                "option.output_formatter": "jsonlines"},
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Not what a tiny random model ends with, so generations run to max_tokens.
LONG = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module", params=list(STRATEGIES))
def server(request, tiny_llama, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp(request.param), tiny_llama, STRATEGIES[request.param])
    with start_server(folder, QUIET_ENV) as running:
        running.strategy = request.param
        yield running


@pytest.fixture(scope="module")
def paged(tiny_llama, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("paged-details"), tiny_llama, STRATEGIES["paged"])
    with start_server(folder, QUIET_ENV) as running:
        yield running


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_id(server) -> str:
    return client(server).models.list().data[0].id


# --- every strategy -------------------------------------------------------------------------------


def test_models_list_names_the_served_model(server):
    models = client(server).models.list().data
    assert len(models) == 1
    expected = "tiny-llama" if server.strategy == "paged" else "model"  # option.served_model_name, or the folder
    assert models[0].id == expected and models[0].object == "model"
    assert client(server).models.retrieve(expected).id == expected


def test_chat_completion_whole_and_streamed_agree(server):
    sdk = client(server)
    whole = sdk.chat.completions.create(model=model_id(server), messages=QUESTION, max_tokens=8, **LONG)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8 and whole.usage.prompt_tokens > 0

    chunks = list(sdk.chat.completions.create(model=model_id(server), messages=QUESTION, max_tokens=8,
                                              stream=True, stream_options={"include_usage": True}, **LONG))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in content)


def test_completion_whole_and_streamed_agree(server):
    sdk = client(server)
    whole = sdk.completions.create(model=model_id(server), prompt="Once upon a time", max_tokens=6, **LONG)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    chunks = list(sdk.completions.create(model=model_id(server), prompt="Once upon a time", max_tokens=6,
                                         stream=True, **LONG))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_report_the_sampled_token_and_its_alternatives(server):
    answer = client(server).chat.completions.create(model=model_id(server), messages=QUESTION, max_tokens=4,
                                                    logprobs=True, top_logprobs=3, **LONG)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the sampled token is the likeliest one.
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, values[0], abs_tol=1e-5)

    completion = client(server).completions.create(model=model_id(server), prompt="Hello", max_tokens=3,
                                                    logprobs=2, **LONG)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    assert logprobs.text_offset[0] == 0


def test_n_choices_from_one_prompt(server):
    answer = client(server).chat.completions.create(model=model_id(server), messages=QUESTION, max_tokens=6, n=3,
                                                    temperature=1.0, seed=11, **LONG)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert all(choice.finish_reason == "length" for choice in answer.choices)
    assert answer.usage.completion_tokens == 18
    assert len({choice.message.content for choice in answer.choices}) > 1  # seeds 11, 12, 13 differ

    chunks = list(client(server).completions.create(model=model_id(server), prompt="Hi", max_tokens=4, n=2,
                                                     stream=True, **LONG))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    greedy = client(server).completions.create(model=model_id(server), prompt="Hi", max_tokens=4, **LONG)
    assert texts == {0: greedy.choices[0].text, 1: greedy.choices[0].text}  # no temperature: greedy


def test_errors_are_openai_shaped_with_todays_status_codes(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model=model_id(server), messages=QUESTION, max_tokens=0)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "max_tokens" and info.value.body["type"] == "invalid_request_error"
    assert "max_tokens must be an integer >= 1" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client(server).models.retrieve("no-such-model")
    assert "does not exist" in missing.value.body["message"]
    too_long = requests.post(server.url + "/v1/completions", json={"prompt": "pages " * 2000}, timeout=30)
    assert too_long.status_code == 400 and "model length limit" in too_long.json()["error"]["message"]


# --- details, on the paged server with prefix caching ---------------------------------------------


def stats(server) -> dict:
    return requests.get(server.url + "/stats", timeout=10).json()


def test_n_choices_compute_the_prompt_once_with_the_prefix_cache(paged):
    # Sent once in this module: no block of it is cached before.
    prompt = "Zebras quietly jump over the lazy dog, and then they run away into the woods. " * 2
    before = stats(paged)
    answer = client(paged).completions.create(model="tiny-llama", prompt=prompt, max_tokens=3, n=4,
                                              temperature=0.8, seed=3, **LONG)
    after = stats(paged)
    assert len(answer.choices) == 4 and answer.usage.completion_tokens == 12
    prompt_tokens = answer.usage.prompt_tokens
    full_blocks = (prompt_tokens - 1) // 16  # block_size 16; the last token is always computed
    assert full_blocks >= 2, prompt_tokens
    # The first choice computes the prompt; the other three only what follows its cached blocks;
    # then each choice decodes its 2nd and 3rd tokens.
    tail = prompt_tokens - full_blocks * 16
    computed = after["tokens_computed"] - before["tokens_computed"]
    assert computed == prompt_tokens + 3 * tail + 4 * 2, (computed, prompt_tokens)
    assert after["blocks"]["prefix_hits"] - before["blocks"]["prefix_hits"] == 3 * full_blocks


def test_invocations_and_v1_give_the_same_tokens(paged):
    prompt = "Paged attention splits the cache"
    lmi = requests.post(paged.url + "/invocations", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 10, "ignore_eos": True, "details": True}}).json()
    v1 = client(paged).completions.create(model="tiny-llama", prompt=prompt, max_tokens=10, logprobs=0, **LONG)
    assert v1.choices[0].text == lmi["generated_text"]
    assert [round(value, 4) for value in v1.choices[0].logprobs.token_logprobs] == [
        round(token["log_prob"], 4) for token in lmi["details"]["tokens"]]

    seeded = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 42}
    lmi_sampled = requests.post(paged.url + "/invocations", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 10, "ignore_eos": True, **seeded}}).json()
    v1_sampled = client(paged).completions.create(model="tiny-llama", prompt=prompt, max_tokens=10,
                                                  temperature=0.9, top_p=0.95, seed=42, **LONG)
    assert v1_sampled.choices[0].text == lmi_sampled["generated_text"]

    chat_lmi = requests.post(paged.url + "/invocations", timeout=60, json={
        "messages": QUESTION, "max_tokens": 7, "ignore_eos": True}).json()
    chat_v1 = client(paged).chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=7, **LONG)
    assert chat_v1.choices[0].message.content == chat_lmi["choices"][0]["message"]["content"]


def test_stop_logit_bias_and_penalties_change_the_answer(paged):
    sdk = client(paged)
    plain = sdk.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12, logprobs=0, **LONG)
    tokens = plain.choices[0].logprobs.tokens
    stop_text = next(token for token in tokens[2:] if token.strip())
    stopped = sdk.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12, stop=[stop_text], **LONG)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == plain.choices[0].text[:plain.choices[0].text.index(stop_text)]

    first = sdk.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=1, logprobs=2, **LONG)
    alternatives = first.choices[0].logprobs.top_logprobs[0]
    banned = first.choices[0].logprobs.tokens[0]
    token_ids = requests.post(paged.url + "/invocations", timeout=60, json={
        "inputs": "Hello there", "parameters": {"max_new_tokens": 1, "details": True}}).json()["details"]["tokens"]
    biased = sdk.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=1, logprobs=0, **LONG,
                                    logit_bias={str(token_ids[0]["id"]): -100})
    second_best = biased.choices[0].logprobs.tokens[0]
    assert second_best != banned and second_best in alternatives

    assert len(set(tokens)) < len(tokens)  # the plain answer repeats a token: penalties must change it
    penalised = sdk.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12, frequency_penalty=2.0,
                                       presence_penalty=2.0, logprobs=0, **LONG)
    penalised_tokens = penalised.choices[0].logprobs.tokens
    assert penalised_tokens != tokens


def test_echo_several_prompts_and_token_id_prompts(paged):
    sdk = client(paged)
    answer = sdk.completions.create(model="tiny-llama", prompt=["One", "Two"], max_tokens=3, echo=True, n=2, **LONG)
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    one = sdk.completions.create(model="tiny-llama", prompt="One", max_tokens=3, **LONG)
    alone = sdk.completions.create(model="tiny-llama", prompt="Two", max_tokens=3, **LONG)
    assert [choice.text for choice in answer.choices] == [
        "One" + one.choices[0].text, "One" + one.choices[0].text, "Two" + alone.choices[0].text,
        "Two" + alone.choices[0].text]  # greedy: both choices alike
    # Each prompt counts once, whatever n is; every choice's tokens count.
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens + alone.usage.prompt_tokens
    assert answer.usage.completion_tokens == 12

    ids = sdk.completions.create(model="tiny-llama", prompt=[[5, 6, 7]], max_tokens=2, echo=True, **LONG)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].finish_reason == "length"

    streamed = list(sdk.completions.create(model="tiny-llama", prompt="Two", max_tokens=3, echo=True, stream=True,
                                           **LONG))
    assert "".join(chunk.choices[0].text for chunk in streamed) == "Two" + alone.choices[0].text


@pytest.mark.parametrize("route, body, param, message", [
    ("/v1/chat/completions", {"messages": QUESTION, "stream_options": {"include_usage": True}},
     "stream_options", "only allowed when stream is true"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logit_bias": {"99999": 5}}, None, "outside the vocabulary"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("/v1/chat/completions", {"inputs": "hi"}, "messages", "messages is missing"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo", "prompt's log-probabilities"),
    ("/v1/completions", {"messages": QUESTION}, "prompt", "prompt is missing"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", "n must be"),
])
def test_bad_openai_requests_are_400_naming_the_param(paged, route, body, param, message):
    response = requests.post(paged.url + route, json={"model": "tiny-llama", **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]


def test_user_is_accepted_and_unknown_fields_are_named_in_a_header(paged):
    response = requests.post(paged.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny-llama", "messages": QUESTION, "max_tokens": 2, "user": "u-1", "store": True})
    assert response.status_code == 200
    assert response.headers["X-LMI-Ignored-Parameters"] == "store"


def test_invocations_keeps_lmi_errors_and_formatter(paged):
    response = requests.post(paged.url + "/invocations", json={"messages": QUESTION, "max_tokens": 0}, timeout=30)
    assert response.status_code == 400 and response.json()["type"] == "BadRequest"
    stream = requests.post(paged.url + "/invocations", json={"messages": QUESTION, "max_tokens": 3, "stream": True},
                           timeout=30, stream=True)
    lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert stream.headers["Content-Type"].startswith("application/jsonlines")
    assert lines[-1]["choices"][0]["finish_reason"] is not None
