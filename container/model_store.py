"""Find the model's files: a local folder, ``s3://``, a ``model.tar.gz``, or the local HF cache.

``resolve_model_path(config)`` is called once by ``serve`` before anything loads. It returns a
local folder holding ``config.json`` (the folder the runner loads), or ``None`` when nothing is
configured (the caller serves the embedded default model). Anything that cannot work raises
``ConfigError`` naming the location and what is wrong, so ``serve`` stops with that message.

Downloads go to ``<cache_dir>/s3/<bucket>/<prefix>``, only the files a model needs, several at
once, each written under a temporary name and renamed when complete. A manifest records the
size and ETag of every file fetched, so a restart fetches only what is missing or changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from djl_like.config import ServingConfig
from djl_like.errors import ConfigError
from djl_like.properties import PROPERTIES_FILE

from container.safe_tar import extract_archive

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MANIFEST_FILE = ".lmi-manifest.json"
ARCHIVE_NAME = "model.tar.gz"
CUSTOM_CODE_FILE = "model.py"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_DIR_VARIABLE = "LMI_CACHE_DIR"
MAX_PARALLEL_FILES = 8

# Files a model needs, matched on the file name (see select_model_files).
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json",
    "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "chat_template.*",
    # sentence-transformers metadata (embedding models: pooling and normalisation).
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    PROPERTIES_FILE, "requirements.txt",
    # model.py (option.entryPoint) and the modeling code of trust_remote_code models.
    "*.py",
)
# Only when the model has no safetensors weights: the files transformers loads as its
# PyTorch weights. Never optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin ...
PYTORCH_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# sentence-transformers keeps module settings in numbered folders: 1_Pooling/config.json.
_MODULE_FOLDER = re.compile(r"\d+_\w+")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def default_cache_dir() -> str:
    """``$LMI_CACHE_DIR``, else ``~/.cache/lmi-batching`` (the image sets the variable)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    return configured or os.path.join(os.path.expanduser("~"), ".cache", "lmi-batching")


def resolve_model_path(config: ServingConfig, cache_dir: str | None = None) -> str | None:
    """The local folder to load the model from, or ``None`` to serve the default model.

    ``config.model_id`` may be a local folder, a local ``model.tar.gz``, ``s3://bucket/prefix``,
    ``s3://bucket/key.tar.gz``, or a Hugging Face id found in the local HF cache. Without it,
    ``config.model_dir`` is used: a folder with ``config.json`` is the model; a folder holding
    only ``serving.properties`` (or nothing) means the default model; a ``model.tar.gz`` there is
    extracted. Raises ``ConfigError`` naming the location when no model can be found there.
    """
    cache = Path(cache_dir or default_cache_dir())
    if config.model_id is None:
        folder = _resolve_model_dir(Path(config.model_dir), config.entry_point is not None, cache)
    else:
        folder = _resolve_model_id(config.model_id, config, cache)
    if folder is not None:
        check_readable(Path(folder))
    return folder


def check_readable(folder: Path) -> None:
    """Refuse a model whose files this process cannot read, naming the first such file.

    NOTE: files from ``save_pretrained`` or a tarball are often mode 0600 and owned by whoever
    wrote them; the container runs as its own user, and transformers would report a misleading
    "file not found" for them.
    """
    for path in [folder, *(folder / name for name in select_model_files(_visible_entries(folder)))]:
        try:
            if path.is_dir():
                os.listdir(path)
            else:
                with open(path, "rb"):
                    pass
        except PermissionError:
            stat = path.stat()
            raise ConfigError(f"permission denied: cannot read {path} (mode {stat.st_mode & 0o777:04o}, owner uid "
                              f"{stat.st_uid}) as uid {os.geteuid()}; make the model files readable, for "
                              "example chmod -R a+rX on the model folder") from None


def _resolve_model_id(model_id: str, config: ServingConfig, cache: Path) -> str:
    if model_id.startswith("s3://"):
        location = S3Location.parse(model_id)
        if location.key.endswith(ARCHIVE_SUFFIXES):
            return _download_s3_archive(location, cache)
        return _download_s3_prefix(location, cache)
    local = _local_path(model_id, config.model_dir)
    if local is not None:
        return _resolve_local(local, cache)
    if _HUB_ID.fullmatch(model_id):
        return _resolve_hub_id(model_id, config.revision)
    raise ConfigError(
        f"option.model_id={model_id!r} is neither an existing local path, an s3:// URI, nor a "
        "Hugging Face id (org/name)")


def _local_path(model_id: str, model_dir: str) -> Path | None:
    """The existing local path ``model_id`` names (a relative one is tried in the model dir
    first, then in the working folder), or ``None``."""
    path = Path(model_id).expanduser()
    candidates = [path] if path.is_absolute() else [Path(model_dir) / path, path]
    return next((candidate for candidate in candidates if candidate.exists()), None)


def _resolve_local(path: Path, cache: Path) -> str:
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise ConfigError(f"option.model_id={str(path)!r} is a file but not a model "
                              f"archive ({', '.join(ARCHIVE_SUFFIXES)}) nor a folder")
        return _extract_local_archive(path, cache)
    if (path / CONFIG_FILE).is_file():
        return os.fspath(path)
    if (path / ARCHIVE_NAME).is_file():
        return _extract_local_archive(path / ARCHIVE_NAME, cache)
    raise ConfigError(f"model folder {path} has no {CONFIG_FILE} (found: {_listing(path)}); a "
                      f"model folder needs {CONFIG_FILE}, the weights and the tokenizer files")


def _resolve_model_dir(model_dir: Path, has_entry_point: bool, cache: Path) -> str | None:
    if (model_dir / CONFIG_FILE).is_file():
        return os.fspath(model_dir)
    if (model_dir / ARCHIVE_NAME).is_file():
        return _extract_local_archive(model_dir / ARCHIVE_NAME, cache)
    if has_entry_point or (model_dir / CUSTOM_CODE_FILE).is_file():
        return os.fspath(model_dir)  # custom code (as in LMI, model.py by default) loads it
    if not _visible_entries(model_dir) - {PROPERTIES_FILE}:
        return None
    raise ConfigError(
        f"model folder {model_dir} has no {CONFIG_FILE} (found: {_listing(model_dir)}); put a "
        f"Hugging Face model folder there, a {ARCHIVE_NAME}, or set option.model_id in "
        f"{PROPERTIES_FILE}")


def _visible_entries(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {entry.name for entry in folder.iterdir() if not entry.name.startswith(".")}


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(_visible_entries(folder))
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "nothing"


def _model_root(folder: Path, source: str) -> str:
    """``folder``, or its only subfolder when an archive wrapped the model in one."""
    if (folder / CONFIG_FILE).is_file():
        return os.fspath(folder)
    subfolders = [entry for entry in folder.iterdir() if entry.is_dir()]
    if len(subfolders) == 1 and (subfolders[0] / CONFIG_FILE).is_file():
        return os.fspath(subfolders[0])
    raise ConfigError(f"{source} holds no {CONFIG_FILE} (found: {_listing(folder)}); a model "
                      f"needs {CONFIG_FILE}, the weights and the tokenizer files")


# --- archives ----------------------------------------------------------------------------------


def _extract_local_archive(archive: Path, cache: Path) -> str:
    stat = archive.stat()
    # The cache key is the archive's absolute path; size and mtime tell a replaced archive.
    digest = hashlib.sha256(os.fspath(archive.resolve()).encode()).hexdigest()[:16]
    identity = {"source": os.fspath(archive.resolve()), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}
    target = cache / "archives" / digest
    with _locked(target):
        if _read_manifest(target) != identity:
            _replace_with_archive(archive, target, identity)
    return _model_root(target, os.fspath(archive))


def _replace_with_archive(archive: Path, target: Path, identity: dict) -> None:
    """Extract ``archive`` into ``target`` (dropping an older extraction) and mark it done."""
    logger.info("extracting %s into %s", archive, target)
    shutil.rmtree(target, ignore_errors=True)
    extract_archive(archive, target)
    _write_manifest(target, identity)


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_manifest(folder: Path, content: dict) -> None:
    # Written whole under another name, then renamed: a crash never leaves half a manifest.
    temporary = folder / f"{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, folder / MANIFEST_FILE)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (several worker processes may resolve at once:
    the second waits, then finds everything in place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- S3 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or key prefix) parsed from an ``s3://bucket/key`` URI."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """Split ``s3://bucket/key``; ``ConfigError`` when the URI has no bucket or holds
        ``.``/``..`` segments (the key becomes a local path under the cache)."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        key = key.rstrip("/")  # s3://b/llama/ and s3://b/llama are the same folder
        segments = set(key.split("/")) if key else set()
        if not uri.startswith("s3://") or not bucket or {".", "..", ""} & segments:
            raise ConfigError(f"{uri!r} is not a usable S3 URI; expected s3://bucket/prefix")
        return cls(bucket, key)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """The key as a folder prefix: ``models/llama`` -> ``models/llama/``."""
        return self.key + "/" if self.key else ""

    def cache_folder(self, cache: Path, kind: str = "s3") -> Path:
        return cache.joinpath(kind, self.bucket, *PurePosixPath(self.key).parts)


@dataclass(frozen=True)
class S3Object:
    """One object under the prefix: ``name`` is its key relative to the prefix."""

    key: str
    name: str
    size: int
    etag: str


def select_model_files(names: Iterable[str]) -> list[str]:
    """The names (relative to the model prefix) of the files a model needs.

    Top-level files matching ``MODEL_FILE_PATTERNS``, plus ``N_Name/*.json`` module settings of
    sentence-transformers models. PyTorch ``.bin`` weights only when there is no
    ``*.safetensors``. Never checkpoints in subfolders, optimizer states or other files.
    """
    names = list(names)
    top_level = [name for name in names if "/" not in name]
    patterns = MODEL_FILE_PATTERNS
    if not any(fnmatch.fnmatch(name, "*.safetensors") for name in top_level):
        patterns = patterns + PYTORCH_WEIGHT_PATTERNS
    selected = [name for name in top_level
                if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    return selected + [name for name in names if _is_module_setting(name)]


def _is_module_setting(name: str) -> bool:
    folder, _, file = name.partition("/")
    return bool(_MODULE_FOLDER.fullmatch(folder)) and "/" not in file and file.endswith(".json")


def _s3_client():
    import boto3
    from botocore.config import Config

    # NOTE: one client shared by the download threads (boto3 clients are thread-safe); the pool
    # must hold a connection per concurrent transfer or urllib3 drops and re-opens them.
    config = Config(max_pool_connections=4 * MAX_PARALLEL_FILES,
                    retries={"mode": "standard", "max_attempts": 5})
    return boto3.session.Session().client("s3", config=config)


@contextlib.contextmanager
def _s3_errors(location: S3Location) -> Iterator[None]:
    """Turn boto errors into ``ConfigError`` messages that say what to fix."""
    from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError,
                                     PartialCredentialsError)

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise ConfigError(
            f"no AWS credentials to read {location.uri}: on SageMaker the endpoint's execution "
            "role is used; elsewhere set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            f"AWS_PROFILE ({error})") from error
    except ClientError as error:
        raise ConfigError(_client_error_message(location, error)) from error
    except BotoCoreError as error:
        raise ConfigError(f"cannot read {location.uri}: {error}") from error


_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def _client_error_message(location: S3Location, error) -> str:
    code = error.response.get("Error", {}).get("Code", "")
    if code == "NoSuchBucket":
        return (f"S3 bucket {location.bucket!r} does not exist (reading {location.uri}); check "
                "the bucket name in option.model_id")
    if code in ("NoSuchKey", "404"):
        return f"{location.uri} does not exist (no such bucket or key)"
    if code in _DENIED_CODES:
        return (f"access denied reading {location.uri} ({code}): the role needs s3:ListBucket "
                f"on arn:aws:s3:::{location.bucket} and s3:GetObject on "
                f"arn:aws:s3:::{location.bucket}/{location.key}*")
    return f"cannot read {location.uri}: {code}: {error}"


def _list_objects(client, location: S3Location) -> list[S3Object]:
    paginator = client.get_paginator("list_objects_v2")
    objects = []
    for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(location.prefix):]
            if name and not name.endswith("/"):  # "folder" placeholder objects end with /
                objects.append(S3Object(item["Key"], name, item["Size"], item["ETag"]))
    return objects


def _download_s3_prefix(location: S3Location, cache: Path) -> str:
    target = location.cache_folder(cache)
    with _s3_errors(location), _locked(target):
        client = _s3_client()
        objects = _model_objects(_list_objects(client, location), location)
        target.mkdir(parents=True, exist_ok=True)
        _S3FolderSync(client, location, target).run(objects)
    return _model_root(target, location.uri)


def _model_objects(objects: list[S3Object], location: S3Location) -> list[S3Object]:
    if not objects:
        raise ConfigError(f"no objects under {location.uri}; check the prefix in "
                          "option.model_id (keys are case-sensitive)")
    wanted = set(select_model_files(obj.name for obj in objects))
    selected = [obj for obj in objects if obj.name in wanted]
    for obj in selected:
        _check_relative_name(obj.name, location)
    if not any(obj.name == CONFIG_FILE for obj in selected):
        found = ", ".join(sorted(obj.name for obj in objects)[:10])
        raise ConfigError(f"{location.uri} holds no {CONFIG_FILE} at its top level (found: "
                          f"{found}); point option.model_id at the folder of the model itself")
    return selected


def _check_relative_name(name: str, location: S3Location) -> None:
    if {".", "..", ""} & set(name.split("/")):
        raise ConfigError(f"{location.uri} holds the key {name!r}, which cannot be a local path")


class _S3FolderSync:
    """Brings a local folder up to date with selected S3 objects (one call per resolve).

    Owns the folder's manifest: ``files`` maps each name to the size and ETag last fetched, and
    ``complete`` is set once every selected file is in place.
    """

    def __init__(self, client, location: S3Location, target: Path):
        self.client = client
        self.location = location
        self.target = target
        self.lock = threading.Lock()
        manifest = _read_manifest(target) or {}
        same_source = manifest.get("source") == location.uri
        self.files: dict[str, dict] = dict(manifest.get("files", {})) if same_source else {}

    def run(self, objects: list[S3Object]) -> None:
        """Fetch what is missing or changed, drop files no longer wanted, mark complete."""
        self._remove_leftovers(objects)
        missing = [obj for obj in objects if not self._is_current(obj)]
        _check_free_space(self.target, sum(obj.size for obj in missing), self.location)
        logger.info("%s: %d files to download, %d already in %s", self.location.uri,
                    len(missing), len(objects) - len(missing), self.target)
        self._save(complete=False)
        self._fetch_all(missing)
        self._save(complete=True)

    def _is_current(self, obj: S3Object) -> bool:
        path = self.target / obj.name
        recorded = self.files.get(obj.name, {})
        return (path.is_file() and path.stat().st_size == obj.size
                and recorded.get("etag") == obj.etag and recorded.get("size") == obj.size)

    def _remove_leftovers(self, objects: list[S3Object]) -> None:
        # Partial files of an interrupted run, and files the source no longer holds (an old
        # shard next to a new index would otherwise be loaded or at least waste disk).
        for partial in self.target.rglob(".*.partial"):
            partial.unlink(missing_ok=True)
        wanted = {obj.name for obj in objects}
        for name in [name for name in self.files if name not in wanted]:
            (self.target / name).unlink(missing_ok=True)
            del self.files[name]

    def _fetch_all(self, missing: list[S3Object]) -> None:
        if not missing:
            return
        total = sum(obj.size for obj in missing)
        with (_progress_bar(total, self.location) as progress,
              ThreadPoolExecutor(min(MAX_PARALLEL_FILES, len(missing))) as pool):
            # list() re-raises the first failure in this thread.
            list(pool.map(lambda obj: self._fetch(obj, progress), missing))

    def _fetch(self, obj: S3Object, progress) -> None:
        from boto3.s3.transfer import TransferConfig

        destination = self.target / obj.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial",
                                             dir=destination.parent)
        os.close(handle)
        try:
            self.client.download_file(self.location.bucket, obj.key, temporary,
                                      Callback=self._progress_callback(progress),
                                      Config=TransferConfig(max_concurrency=4))
            _check_size(temporary, obj, self.location)
            os.replace(temporary, destination)
        finally:
            Path(temporary).unlink(missing_ok=True)
        self._record(obj)

    def _progress_callback(self, progress):
        def update(num_bytes: int) -> None:
            with self.lock:  # tqdm's counter is not atomic across threads
                progress.update(num_bytes)
        return update

    def _record(self, obj: S3Object) -> None:
        # Recorded per file, so a run interrupted halfway keeps what it already fetched.
        with self.lock:
            self.files[obj.name] = {"size": obj.size, "etag": obj.etag}
            self._save(complete=False)

    def _save(self, complete: bool) -> None:
        _write_manifest(self.target, {"source": self.location.uri, "complete": complete,
                                      "files": self.files})


def _progress_bar(total_bytes: int, location: S3Location):
    """A byte-counting tqdm bar on stderr (the container's log)."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, desc=f"downloading {location.uri}", mininterval=1.0)


def _check_size(path: str, obj: S3Object, location: S3Location) -> None:
    size = os.path.getsize(path)
    if size != obj.size:
        raise ConfigError(f"downloading {location.bucket}/{obj.key} gave {size} bytes, "
                          f"expected {obj.size}; the object changed during the download?")


def _check_free_space(folder: Path, needed: int, location: S3Location) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"downloading {location.uri} needs {needed / 1e9:.1f} GB but {folder} has "
            f"{free / 1e9:.1f} GB free; point {CACHE_DIR_VARIABLE} at a larger volume")


def _download_s3_archive(location: S3Location, cache: Path) -> str:
    archive_folder = location.cache_folder(cache, kind="s3-archives")
    target = archive_folder.with_name(_without_archive_suffix(archive_folder.name))
    with _s3_errors(location), _locked(target):
        client = _s3_client()
        head = client.head_object(Bucket=location.bucket, Key=location.key)
        identity = {"source": location.uri, "etag": head["ETag"], "size": head["ContentLength"]}
        if _read_manifest(target) != identity:
            _fetch_and_extract(client, location, head["ContentLength"], target, identity)
    return _model_root(target, location.uri)


def _without_archive_suffix(name: str) -> str:
    suffix = next(suffix for suffix in ARCHIVE_SUFFIXES if name.endswith(suffix))
    return name.removesuffix(suffix) or "model"


def _fetch_and_extract(client, location: S3Location, size: int, target: Path,
                       identity: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(target.parent, 2 * size, location)  # the archive plus its content
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as folder:
        archive = Path(folder) / ARCHIVE_NAME
        obj = S3Object(location.key, ARCHIVE_NAME, size, identity["etag"])
        _download_one(client, location, obj, archive)
        _replace_with_archive(archive, target, identity)


def _download_one(client, location: S3Location, obj: S3Object, destination: Path) -> None:
    with _progress_bar(obj.size, location) as progress:
        client.download_file(location.bucket, obj.key, os.fspath(destination),
                             Callback=progress.update)
    _check_size(os.fspath(destination), obj, location)


# --- Hugging Face cache ------------------------------------------------------------------------


def _resolve_hub_id(model_id: str, revision: str | None) -> str:
    """The model's snapshot folder in the local Hugging Face cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        raise ConfigError(f"option.model_id={model_id!r} looks like a Hugging Face id, but "
                          "huggingface_hub is not installed; use a local path or s3://") from error
    try:
        folder = snapshot_download(model_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError) as error:
        raise ConfigError(
            f"option.model_id={model_id!r} (revision {revision or 'main'}) is not in the local "
            "Hugging Face cache, and downloads from the Hugging Face Hub are not available in "
            "this container: set option.model_id to a local folder (e.g. the mounted "
            "/opt/ml/model) or to s3://bucket/prefix holding the model files") from error
    return _model_root(Path(folder), f"the Hugging Face cache entry of {model_id}")
