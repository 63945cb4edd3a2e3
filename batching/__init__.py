"""The engine: sequences, the three batchers, the model runner, the sampler and the engine thread.

``from batching import LLM`` is the offline API (see ``batching.llm``)."""


def __getattr__(name: str):
    # NOTE: lazy, so importing a submodule (batching.block_manager ...) does not load the model stack.
    if name in ("LLM", "GenerationOutput"):
        from batching import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'batching' has no attribute {name!r}")
