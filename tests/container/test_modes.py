"""Which mode a model folder is served in, from serving.properties and the folder alone."""

from __future__ import annotations

import json

import pytest

from container.handler_loader import find_entry_point
from container.modes import infer_task
from djl_like.config import ServingConfig


def folder_with(tmp_path, architectures, extra_files=()):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
    for name in extra_files:
        (tmp_path / name).write_text("[]")
    return tmp_path


@pytest.mark.parametrize("architectures, extra, task", [
    (["BertModel"], (), "text-embedding"),
    (["XLMRobertaModel"], (), "text-embedding"),
    (["BertForMaskedLM"], (), "text-embedding"),
    (["LlamaForCausalLM"], (), "text-generation"),
    (["GPT2LMHeadModel"], (), "text-generation"),
    (["Qwen2ForCausalLM"], ("modules.json",), "text-embedding"),  # a sentence-transformers decoder (gte-Qwen2)
    ([], (), "text-generation"),
])
def test_task_is_inferred_from_the_folder(tmp_path, architectures, extra, task):
    folder = folder_with(tmp_path, architectures, extra)
    assert infer_task(ServingConfig(model_dir=str(folder)), str(folder)) == task


def test_option_task_wins(tmp_path):
    folder = folder_with(tmp_path, ["BertModel"])
    assert infer_task(ServingConfig(task="text-generation"), str(folder)) == "text-generation"
    llama = folder_with(tmp_path, ["LlamaForCausalLM"])
    assert infer_task(ServingConfig(task="text-embedding"), str(llama)) == "text-embedding"


def test_model_py_in_the_folder_is_the_handler(tmp_path):
    assert find_entry_point(ServingConfig(model_dir=str(tmp_path)), str(tmp_path)) is None
    (tmp_path / "model.py").write_text("def handle(inputs): pass\n")
    entry = find_entry_point(ServingConfig(model_dir=str(tmp_path)), str(tmp_path))
    assert entry.path == str(tmp_path / "model.py") and entry.function == "handle"


def test_entry_point_may_name_a_module_and_another_function(tmp_path):
    config = ServingConfig(model_dir=str(tmp_path), entry_point="tests.container.handlers.echo_batch", handler="go")
    entry = find_entry_point(config, str(tmp_path))
    assert (entry.module, entry.function, entry.path) == ("tests.container.handlers.echo_batch", "go", None)
