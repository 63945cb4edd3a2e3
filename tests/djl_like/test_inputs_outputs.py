"""Input and Output behave as LMI handlers expect them to (djl_python's names and methods)."""

from __future__ import annotations

import json

import pytest

from djl_like.errors import BadRequestError
from djl_like.inputs import Input, batch_input
from djl_like.outputs import BatchOutputError, Output, member_outputs
from djl_like.pair_list import PairList


def request(body: bytes, **headers: str) -> Input:
    return Input(headers, PairList([("data", body)]))


def test_djl_python_names_are_the_same_classes():
    import djl_python
    from djl_python.inputs import Input as AliasInput
    from djl_python.outputs import Output as AliasOutput

    assert djl_python.Input is AliasInput is Input
    assert djl_python.Output is AliasOutput is Output


def test_properties_are_case_insensitive_like_http_headers():
    inputs = request(b"{}", **{"Content-Type": "application/json", "X-Amzn-SageMaker-Custom-Attributes": "a=1"})
    assert inputs.get_property("content-type") == "application/json"
    assert inputs.get_property("x-amzn-sagemaker-custom-attributes") == "a=1"
    assert inputs.get_property("missing") is None


def test_init_call_is_empty_and_carries_properties():
    init = Input({"model_dir": "/opt/ml/model", "tensor_parallel_degree": "1"})
    assert init.is_empty()
    assert init.get_data() is None
    assert init.get_properties()["model_dir"] == "/opt/ml/model"


def test_body_as_json_string_bytes_and_by_content_type():
    inputs = request('{"inputs": "café"}'.encode(), **{"Content-Type": "application/json; charset=utf-8"})
    assert inputs.get_as_json() == {"inputs": "café"}
    assert inputs.get_as_string() == '{"inputs": "café"}'
    assert inputs.get_as_bytes() == '{"inputs": "café"}'.encode()
    assert inputs.get_data() == {"inputs": "café"}
    assert request(b"hello", **{"Content-Type": "text/plain"}).get_data() == "hello"
    assert request(b"\x00\x01", **{"Content-Type": "application/octet-stream"}).get_data() == b"\x00\x01"


def test_invalid_json_is_a_bad_request_and_a_value_error():
    with pytest.raises(BadRequestError) as error:
        request(b"{not json").get_as_json()
    assert isinstance(error.value, ValueError)
    assert error.value.status == 400


def test_a_batch_splits_into_its_members_in_order():
    members = [request(json.dumps({"inputs": str(index)}).encode(), **{"Content-Type": "application/json"})
               for index in range(12)]
    batch = batch_input(members)
    assert batch.is_batch() and batch.get_batch_size() == 12
    assert "batch_011.data" in batch.get_content().get_keys()
    split = batch.get_batches()
    assert [member.get_as_json()["inputs"] for member in split] == [str(index) for index in range(12)]
    assert split[3].get_property("content-type") == "application/json"


def test_one_request_is_not_a_batch():
    only = request(b"x")
    assert batch_input([only]) is only
    assert not only.is_batch() and only.get_batches() == [only]


def test_output_add_encodes_text_bytes_and_json():
    output = Output().add("héllo", key="a").add(b"\x01", key="b").add({"x": [1, 2]}, key="c")
    assert output.content.get("a") == "héllo".encode()
    assert output.content.get("b") == b"\x01"
    assert json.loads(output.content.get("c")) == {"x": [1, 2]}


def test_output_json_takes_numpy_like_values():
    class Vector:
        def tolist(self):
            return [0.5, 1.5]

    assert json.loads(Output().add_as_json({"v": Vector()}).body) == {"v": [0.5, 1.5]}


def test_output_error_is_lmi_shaped():
    output = Output().error("bad thing")
    assert output.code == 424
    assert output.get_property("Content-Type") == "application/json"
    assert json.loads(output.body) == {"code": 424, "message": "invoke handler failure", "error": "bad thing"}


def test_each_batch_member_gets_its_own_slice():
    output = Output().add_property("X-Shared", "yes")
    for index in (2, 0, 1):
        output.add_as_json({"echo": index}, batch_index=index)
        output.add_property(f"batch_{index}_Content-Type", f"application/x-{index}")
    members = member_outputs(output, 3)
    assert [json.loads(member.body) for member in members] == [{"echo": 0}, {"echo": 1}, {"echo": 2}]
    assert [member.get_property("content-type") for member in members] == [f"application/x-{i}" for i in range(3)]
    assert all(member.get_property("X-Shared") == "yes" for member in members)


def test_a_batch_output_missing_a_member_is_refused():
    output = Output().add("a", batch_index=0)
    with pytest.raises(BatchOutputError, match=r"no content for batch member\(s\) \[1\]"):
        member_outputs(output, 2)
    with pytest.raises(BatchOutputError, match="batch_<i>.<name>"):
        member_outputs(Output().add("unkeyed"), 2)


def test_an_error_code_goes_to_every_member():
    output = Output().error("model exploded", code=500)
    assert [member.code for member in member_outputs(output, 3)] == [500, 500, 500]


def test_stream_chunks_use_lmi_default_formatter_or_none():
    streamed = Output().add_stream_content(iter(["a", "b"]))
    assert list(streamed.stream_chunks()) == [b'{"outputs":"a"}\n', b'{"outputs":"b"}\n']
    raw = Output().add_stream_content(["x", b"y", {"z": 1}], output_formatter=None)
    assert list(raw.stream_chunks()) == [b"x", b"y", b'{"z":1}']


def test_a_lone_request_of_a_batch_aware_handler_is_unkeyed():
    output = Output().add_as_json({"ok": 1}, batch_index=0).add_property("batch_0_Content-Type", "application/x")
    (single,) = member_outputs(output, 1)
    assert json.loads(single.body) == {"ok": 1}
    assert single.get_properties() == {"Content-Type": "application/x"}
    plain = Output().add("text").add_property("X-A", "1")
    assert member_outputs(plain, 1)[0].body == b"text"
    assert member_outputs(plain, 1)[0].get_property("x-a") == "1"
