"""A streaming custom handler: answers with the words of its input one at a time (LMI's default
stream frames), or breaks down mid-stream when asked to."""

from djl_python.inputs import Input
from djl_python.outputs import Output


def words(text: str, break_after: int | None):
    for index, word in enumerate(text.split()):
        if break_after is not None and index == break_after:
            raise RuntimeError(f"broke after {break_after} words")
        yield word


def handle(inputs: Input) -> Output | None:
    if inputs.is_empty():
        return None
    body = inputs.get_as_json()
    output = Output()
    output.add_property("Content-Type", "application/jsonlines")
    return output.add_stream_content(words(body["inputs"], body.get("break_after")))
