"""HandlerService in-process: what each caller gets back when a handler misbehaves."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from container.handler_loader import EntryPoint
from container.handler_service import HandlerService
from djl_like.config import ServingConfig
from djl_like.errors import ConfigError, LmiError, ServiceUnavailableError
from djl_like.inputs import Input
from djl_like.outputs import Output
from djl_like.pair_list import PairList

ENTRY = EntryPoint("/tmp", "handle", path="/tmp/model.py")


def service(handler, **config) -> HandlerService:
    return HandlerService(handler, ENTRY, ServingConfig(**config)).start()


def request(text: str) -> Input:
    return Input({"Content-Type": "text/plain"}, PairList([("data", text.encode())]))


@pytest.mark.parametrize("returned, named", [({"text": "hi"}, "dict"), ("hi", "str"), (None, "NoneType")])
def test_wrong_return_type_is_a_424_naming_the_type(returned, named):
    with pytest.raises(LmiError) as error:
        service(lambda inputs: returned).infer(request("x"), 5)
    assert error.value.status == 424
    assert f"the handler returned {named} for a request" in error.value.message


def test_init_failure_is_a_config_error_with_the_last_line():
    def handler(inputs):
        raise RuntimeError("weights missing")

    with pytest.raises(ConfigError, match="init call .* failed: RuntimeError: weights missing"):
        service(handler).initialize({"model_dir": "/m"})


def test_init_answering_an_error_code_is_a_config_error():
    with pytest.raises(ConfigError, match="answered 500"):
        service(lambda inputs: Output().error("no GPU", code=500)).initialize({})


def test_batch_members_failing_alone_leave_the_others_answered():
    def handler(inputs):
        output = Output()
        for index, item in enumerate(inputs.get_batches()):
            if item.get_as_string() == "bad":
                raise KeyError("bad input")
            output.add(item.get_as_string().upper(), batch_index=index)
        return output

    handlers = service(handler, batch_size=4, max_batch_delay_ms=500)

    def call(text):
        try:
            return handlers.infer(request(text), 10).body.decode()
        except LmiError as error:
            return error.status

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(call, ["a", "bad", "c", "d"])) == ["A", 424, "C", "D"]


def test_a_full_queue_is_a_503():
    release = threading.Event()

    def handler(inputs):
        release.wait(10)
        return Output().add("done")

    handlers = service(handler, job_queue_size=1)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(handlers.infer, request("a"), 10)
        while handlers.stats()["requests_in_flight"] == 0:
            pass
        with pytest.raises(ServiceUnavailableError, match="queue is full"):
            handlers.infer(request("b"), 10)
        release.set()
        assert first.result().body == b"done"


def test_a_request_past_the_timeout_is_a_504():
    handlers = service(lambda inputs: threading.Event().wait(2) or Output().add("late"))
    with pytest.raises(LmiError) as error:
        handlers.infer(request("a"), 0.2)
    assert error.value.status == 504
