"""A custom handler that calls the project's engine: post-processing around text generation,
non-streaming or streamed, plus the engine's statistics (to see its batching)."""

from djl_python import Input, Output

from batching.handler_engine import HandlerEngine

engine = None


def handle(inputs: Input):
    global engine
    if inputs.is_empty():
        engine = HandlerEngine(inputs.get_properties())
        return None
    body = inputs.get_as_json()
    if body.get("stats"):
        return Output().add_as_json(engine.stats())
    parameters = body.get("parameters", {})
    if body.get("stream"):
        return Output().add_stream_content(engine.stream(body["prompt"], parameters))
    text = engine.generate(body["prompt"], parameters)
    return Output().add_as_json({"answer": text, "length": len(text)})
