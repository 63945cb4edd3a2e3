"""Where serve finds the model: local folders, archives, S3 (a real moto server over HTTP) and
the local Hugging Face cache, with clear ConfigErrors for every way it can go wrong."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from container.model_store import MANIFEST_FILE, resolve_model_path, select_model_files
from djl_like.config import ServingConfig
from djl_like.errors import ConfigError
from tests.s3_server import isolate_from_aws, moto_server, s3, s3_env, s3_requests  # noqa: F401

BUCKET = "models"
# What a training job leaves next to the model: none of it may be downloaded.
JUNK = {
    "optimizer.pt": b"optimizer state",
    "scheduler.pt": b"scheduler state",
    "rng_state.pth": b"rng",
    "training_args.bin": b"args",
    "pytorch_model.bin": b"duplicate weights in the old format",
    "model.gguf": b"another format",
    "README.md": b"# notes",
    "checkpoint-500/model.safetensors": b"an intermediate checkpoint",
    "checkpoint-500/config.json": b"{}",
    "runs/events.out.tfevents.1": b"tensorboard",
}
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, bytes]:
    """A small model folder's files, with real safetensors bytes, plus training junk."""
    import torch
    from safetensors.torch import save_file

    weights = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({"embed.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, weights)
    return {
        "config.json": json.dumps({"model_type": "llama", "vocab_size": 3}).encode(),
        "generation_config.json": b'{"eos_token_id": 2}',
        "model.safetensors": weights.read_bytes(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        **JUNK,
    }


def _upload(s3, files: dict[str, bytes], prefix: str, bucket: str = BUCKET) -> None:
    if bucket not in {entry["Name"] for entry in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fingerprints(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: a file written again (temporary file + rename) changes both."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in folder.iterdir() if path.is_file() and path.name != MANIFEST_FILE}


def _resolve(model_id: str | None, cache: Path, model_dir: Path | str = "/nonexistent/model",
             **fields) -> str | None:
    config = ServingConfig(model_dir=str(model_dir), model_id=model_id, **fields)
    return resolve_model_path(config, cache_dir=str(cache))


# --- S3 prefix -----------------------------------------------------------------------------


def test_s3_prefix_downloads_only_the_files_a_model_needs(s3, model_files, tmp_path):
    _upload(s3, model_files, "llama/v1")

    path = Path(_resolve(f"s3://{BUCKET}/llama/v1", tmp_path))

    assert path == tmp_path / "s3" / BUCKET / "llama" / "v1"
    downloaded = {str(file.relative_to(path)) for file in path.rglob("*") if file.is_file()}
    assert downloaded == MODEL_FILES | {MANIFEST_FILE}
    for name in MODEL_FILES:
        assert (path / name).read_bytes() == model_files[name]
    from safetensors.torch import load_file
    assert load_file(path / "model.safetensors")["embed.weight"][2, 3].item() == 11.0


def test_the_cache_folder_comes_from_lmi_cache_dir(s3, model_files, tmp_path, monkeypatch):
    _upload(s3, model_files, "llama/v1")
    monkeypatch.setenv("LMI_CACHE_DIR", str(tmp_path / "declared"))
    config = ServingConfig(model_id=f"s3://{BUCKET}/llama/v1")
    assert resolve_model_path(config) == str(tmp_path / "declared" / "s3" / BUCKET / "llama/v1")


def test_a_second_resolve_downloads_nothing(s3, s3_requests, model_files, tmp_path):
    _upload(s3, model_files, "llama/v1")
    path = Path(_resolve(f"s3://{BUCKET}/llama/v1", tmp_path))
    assert sorted(s3_requests.object_reads()) == sorted(
        f"/{BUCKET}/llama/v1/{name}" for name in MODEL_FILES)
    before = _fingerprints(path)
    s3_requests.requests.clear()

    assert _resolve(f"s3://{BUCKET}/llama/v1/", tmp_path) == str(path)

    assert s3_requests.object_reads() == []  # one listing, no download
    assert _fingerprints(path) == before
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["complete"] is True
    assert set(manifest["files"]) == MODEL_FILES


def test_a_missing_file_is_the_only_one_fetched_again(s3, s3_requests, model_files, tmp_path):
    _upload(s3, model_files, "llama/v1")
    path = Path(_resolve(f"s3://{BUCKET}/llama/v1", tmp_path))
    (path / "tokenizer.json").unlink()
    before = _fingerprints(path)
    s3_requests.requests.clear()

    _resolve(f"s3://{BUCKET}/llama/v1", tmp_path)

    assert s3_requests.object_reads() == [f"/{BUCKET}/llama/v1/tokenizer.json"]
    assert (path / "tokenizer.json").read_bytes() == model_files["tokenizer.json"]
    after = _fingerprints(path)
    assert {name: after[name] for name in before} == before


def test_a_changed_object_is_fetched_again_and_a_removed_one_deleted(s3, model_files, tmp_path):
    _upload(s3, model_files, "llama/v1")
    path = Path(_resolve(f"s3://{BUCKET}/llama/v1", tmp_path))
    # Same size, new content: only the ETag tells the difference.
    new_tokenizer = model_files["tokenizer.json"].replace(b"BPE", b"XYZ")
    s3.put_object(Bucket=BUCKET, Key="llama/v1/tokenizer.json", Body=new_tokenizer)
    s3.delete_object(Bucket=BUCKET, Key="llama/v1/generation_config.json")
    unchanged = _fingerprints(path)["model.safetensors"]

    _resolve(f"s3://{BUCKET}/llama/v1", tmp_path)

    assert (path / "tokenizer.json").read_bytes() == new_tokenizer
    assert not (path / "generation_config.json").exists()
    assert _fingerprints(path)["model.safetensors"] == unchanged


def test_pytorch_bin_weights_only_when_there_is_no_safetensors(s3, model_files, tmp_path):
    files = {name: data for name, data in model_files.items() if name != "model.safetensors"}
    _upload(s3, files, "old-format")

    path = Path(_resolve(f"s3://{BUCKET}/old-format", tmp_path))

    assert {file.name for file in path.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "pytorch_model.bin",
        MANIFEST_FILE}


def test_selection_keeps_tokenizer_code_and_embedding_files():
    names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.model", "vocab.txt", "merges.txt", "chat_template.jinja",
             "special_tokens_map.json", "tokenizer_config.json", "serving.properties",
             "model.py", "requirements.txt", "modeling_custom.py", "modules.json",
             "1_Pooling/config.json", "pytorch_model.bin", "optimizer.pt",
             "checkpoint-1/model.safetensors", "nested/deeper/config.json", "2_Dense/model.bin"]
    selected = select_model_files(names)
    assert set(selected) == set(names[:15])


# --- S3 archive -----------------------------------------------------------------------------


def test_model_tar_gz_on_s3_is_downloaded_and_extracted_once(s3, model_files, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    # A training job's archive often wraps the model in one folder.
    archive = _tar_gz({f"model/{name}": model_files[name] for name in MODEL_FILES})
    s3.put_object(Bucket=BUCKET, Key="jobs/7/output/model.tar.gz", Body=archive)

    path = Path(_resolve(f"s3://{BUCKET}/jobs/7/output/model.tar.gz", tmp_path))

    assert {file.name for file in path.iterdir()} == MODEL_FILES
    assert (path / "model.safetensors").read_bytes() == model_files["model.safetensors"]
    before = _fingerprints(path)
    assert _resolve(f"s3://{BUCKET}/jobs/7/output/model.tar.gz", tmp_path) == str(path)
    assert _fingerprints(path) == before
    assert not list(tmp_path.rglob("*.tar.gz"))  # the downloaded archive is not kept


def test_a_hostile_archive_on_s3_is_refused(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="evil/model.tar.gz",
                  Body=_tar_gz({"config.json": b"{}", "../../escaped": b"x"}))
    with pytest.raises(ConfigError, match="climbs out"):
        _resolve(f"s3://{BUCKET}/evil/model.tar.gz", tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped"))
    assert not list(tmp_path.rglob("config.json"))


# --- S3 errors ------------------------------------------------------------------------------


def test_a_missing_bucket_is_named(s3_env, tmp_path):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        _resolve("s3://no-such-bucket/llama", tmp_path)


def test_a_missing_prefix_is_named(s3, model_files, tmp_path):
    _upload(s3, model_files, "llama/v1")
    with pytest.raises(ConfigError, match="no objects under s3://models/llama/v2"):
        _resolve(f"s3://{BUCKET}/llama/v2", tmp_path)


def test_a_missing_archive_is_named(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    with pytest.raises(ConfigError, match="s3://models/absent/model.tar.gz does not exist"):
        _resolve(f"s3://{BUCKET}/absent/model.tar.gz", tmp_path)


def test_a_prefix_without_config_json_says_so(s3, model_files, tmp_path):
    files = {name: data for name, data in model_files.items() if name != "config.json"}
    _upload(s3, files, "no-config")
    with pytest.raises(ConfigError, match="s3://models/no-config holds no config.json"):
        _resolve(f"s3://{BUCKET}/no-config", tmp_path)


def test_no_credentials_is_a_clear_error(moto_server, monkeypatch, tmp_path_factory, tmp_path):
    isolate_from_aws(monkeypatch, tmp_path_factory)  # no keys, no files, no instance role
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    with pytest.raises(ConfigError, match="no AWS credentials to read s3://models/llama"):
        _resolve(f"s3://{BUCKET}/llama", tmp_path)


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://bucket/../escape",
                                 "s3://bucket/a//b"])
def test_unusable_s3_uris_are_refused(uri, tmp_path):
    with pytest.raises(ConfigError, match="not a usable S3 URI"):
        _resolve(uri, tmp_path)


# --- local folders and archives ---------------------------------------------------------------


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_local_model_folder_is_used_in_place(model_files, tmp_path):
    folder = _write(tmp_path / "llama", {name: model_files[name] for name in MODEL_FILES})
    assert _resolve(str(folder), tmp_path / "cache") == str(folder)
    assert not (tmp_path / "cache").exists()


def test_a_relative_model_id_is_looked_up_in_the_model_dir(model_files, tmp_path):
    _write(tmp_path / "model" / "weights", {"config.json": model_files["config.json"]})
    assert _resolve("weights", tmp_path / "cache", model_dir=tmp_path / "model") == str(
        tmp_path / "model" / "weights")


def test_a_local_folder_without_config_json_is_named(tmp_path):
    folder = _write(tmp_path / "half", {"model.safetensors": b"x", "tokenizer.json": b"{}"})
    with pytest.raises(ConfigError) as error:
        _resolve(str(folder), tmp_path / "cache")
    assert str(folder) in str(error.value)
    assert "has no config.json (found: model.safetensors, tokenizer.json)" in str(error.value)


def test_a_model_id_that_is_nothing_known_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither an existing local path"):
        _resolve("/mnt/models/absent", tmp_path)


def test_model_dir_with_config_json_is_the_model(model_files, tmp_path):
    folder = _write(tmp_path / "model", {"config.json": model_files["config.json"],
                                         "serving.properties": b"option.dtype=fp32"})
    assert _resolve(None, tmp_path / "cache", model_dir=folder) == str(folder)


@pytest.mark.parametrize("content", [{}, {"serving.properties": b"option.dtype=fp32"}])
def test_model_dir_with_only_serving_properties_means_the_default_model(content, tmp_path):
    folder = _write(tmp_path / "model", content)
    folder.mkdir(exist_ok=True)
    assert _resolve(None, tmp_path / "cache", model_dir=folder) is None


def test_model_dir_with_other_files_but_no_config_json_is_an_error(tmp_path):
    folder = _write(tmp_path / "model", {"serving.properties": b"", "weights.bin": b"x"})
    with pytest.raises(ConfigError, match=f"model folder {folder} has no config.json"):
        _resolve(None, tmp_path / "cache", model_dir=folder)


def test_model_dir_with_custom_code_is_handed_to_it(tmp_path):
    folder = _write(tmp_path / "model", {"serving.properties": b"",
                                         "model.py": b"def handle(inputs): pass"})
    assert _resolve(None, tmp_path / "cache", model_dir=folder) == str(folder)


def test_model_tar_gz_in_model_dir_is_extracted_into_the_cache_once(model_files, tmp_path):
    files = {name: model_files[name] for name in MODEL_FILES}
    folder = _write(tmp_path / "model", {"model.tar.gz": _tar_gz(files)})

    path = Path(_resolve(None, tmp_path / "cache", model_dir=folder))

    assert path.is_relative_to(tmp_path / "cache")
    assert {file.name for file in path.iterdir()} == MODEL_FILES | {MANIFEST_FILE}
    before = _fingerprints(path)
    assert _resolve(None, tmp_path / "cache", model_dir=folder) == str(path)
    assert _fingerprints(path) == before


def test_a_replaced_local_archive_is_extracted_again(model_files, tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(_tar_gz({"config.json": b'{"v": 1}'}))
    path = Path(_resolve(str(archive), tmp_path / "cache"))
    archive.write_bytes(_tar_gz({"config.json": b'{"v": 2, "longer": true}'}))

    assert _resolve(str(archive), tmp_path / "cache") == str(path)
    assert json.loads((path / "config.json").read_text())["v"] == 2


def test_an_archive_without_config_json_is_named(tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(_tar_gz({"weights/model.safetensors": b"x", "notes.txt": b""}))
    with pytest.raises(ConfigError, match="model.tar.gz holds no config.json"):
        _resolve(str(archive), tmp_path / "cache")


# --- Hugging Face ids -----------------------------------------------------------------------


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: refs/main -> a commit, snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return _write(repo / "snapshots" / commit, files)


def test_a_hub_id_in_the_local_cache_is_used(model_files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama",
                               {name: model_files[name] for name in MODEL_FILES})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _resolve("acme/tiny-llama", tmp_path / "cache") == str(snapshot)


def test_a_hub_id_not_in_the_cache_says_hub_downloads_are_unavailable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ConfigError) as error:
        _resolve("meta-llama/Llama-3.1-8B", tmp_path / "cache", revision="v2")
    message = str(error.value)
    assert "'meta-llama/Llama-3.1-8B' (revision v2) is not in the local" in message
    assert "downloads from the Hugging Face Hub are not available" in message
    assert "s3://" in message
