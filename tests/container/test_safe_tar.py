"""Model archives are extracted only when every entry is a plain file or folder inside the
target, and the whole content fits the size limit; a refused archive leaves nothing behind."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from container.safe_tar import UnsafeArchiveError, extract_archive
from djl_like.errors import ConfigError


def _file(name: str, data: bytes = b"data", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _archive(path: Path, entries, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.fixture(params=["with data filter", "without data filter"])
def second_line(request, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run with and without tarfile's data filter: our checks alone must refuse everything
    (3.11 releases before 3.11.4 have no filter)."""
    if request.param == "without data filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding the archive (in incoming/) and the extraction target's parent."""
    (tmp_path / "incoming").mkdir()
    (tmp_path / "cache").mkdir()
    return tmp_path


def test_extracts_files_and_folders_without_archive_permissions(work: Path):
    archive = _archive(work / "incoming" / "model.tar.gz", [
        _file("./config.json", b'{"model_type": "llama"}'),
        _special("tokenizer", tarfile.DIRTYPE),
        _file("tokenizer/tokenizer.json", b"{}"),
        _file("run.sh", b"#!/bin/sh", mode=0o6777),  # setuid + setgid + world-writable
    ])
    target = extract_archive(archive, work / "cache" / "model")

    assert (target / "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert (target / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    mode = (target / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)
    assert _tree(work / "cache") == {"model", "model/config.json", "model/tokenizer",
                                     "model/tokenizer/tokenizer.json", "model/run.sh"}


def test_an_empty_existing_target_is_filled(work: Path):
    archive = _archive(work / "incoming" / "model.tar", [_file("config.json")], mode="w")
    (work / "cache" / "model").mkdir()
    extract_archive(archive, work / "cache" / "model")
    assert (work / "cache" / "model" / "config.json").is_file()


HOSTILE = {
    "absolute path": lambda outside: [_file(str(outside / "evil"))],
    "dot-dot escape": lambda outside: [_file("../outside/evil")],
    "dot-dot inside a path": lambda outside: [_file("tokenizer/../../outside/evil")],
    "symlink then write through it": lambda outside: [
        _special("link", tarfile.SYMTYPE, str(outside)), _file("link/evil")],
    "relative symlink": lambda outside: [_special("link", tarfile.SYMTYPE, "../outside")],
    "hard link": lambda outside: [_special("evil", tarfile.LNKTYPE, str(outside / "secret"))],
    "character device": lambda outside: [_special("evil", tarfile.CHRTYPE)],
    "block device": lambda outside: [_special("evil", tarfile.BLKTYPE)],
    "FIFO": lambda outside: [_special("evil", tarfile.FIFOTYPE)],
    "duplicate entry": lambda outside: [_file("config.json"), _file("config.json", b"other")],
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_entries_are_refused_and_nothing_is_written(work: Path, case: str, second_line):
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    # A harmless entry first: the refusal must also undo what was already extracted.
    entries = [_file("config.json")] + HOSTILE[case](outside)
    archive = _archive(work / "incoming" / "model.tar.gz", entries)
    before = _tree(work)

    with pytest.raises(UnsafeArchiveError) as refused:
        extract_archive(archive, work / "cache" / "model")

    assert "model.tar.gz" in str(refused.value)
    assert _tree(work) == before  # no target, no staging folder, nothing in outside/
    assert (outside / "secret").read_text() == "do not touch"


def test_tar_bomb_over_the_size_limit_is_refused_before_writing_it(work: Path):
    # 8 MiB of zeros gzip to a few KiB: the archive looks small, its content is not.
    archive = _archive(work / "incoming" / "bomb.tar.gz", [
        _file("config.json"), _file("model.safetensors", bytes(8 << 20))])
    assert archive.stat().st_size < 64 << 10
    before = _tree(work)

    # ConfigError: serve catches it and stops with this message.
    with pytest.raises(ConfigError, match="expands to more than 1048576 bytes"):
        extract_archive(archive, work / "cache" / "model", max_total_bytes=1 << 20)
    assert _tree(work) == before


def test_size_limit_counts_the_sum_of_all_files(work: Path):
    entries = [_file(f"shard-{index}.safetensors", bytes(400)) for index in range(3)]
    archive = _archive(work / "incoming" / "model.tar.gz", entries)
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, work / "cache" / "refused", max_total_bytes=1000)
    extract_archive(archive, work / "cache" / "accepted", max_total_bytes=1200)
    assert len(list((work / "cache" / "accepted").iterdir())) == 3


def test_too_many_entries_are_refused(work: Path):
    archive = _archive(work / "incoming" / "model.tar.gz",
                       [_file(f"file-{index}") for index in range(6)])
    with pytest.raises(UnsafeArchiveError, match="more than 5 entries"):
        extract_archive(archive, work / "cache" / "model", max_members=5)
    assert not (work / "cache" / "model").exists()


def test_a_file_that_is_not_a_tar_archive_is_refused(work: Path):
    archive = work / "incoming" / "model.tar.gz"
    archive.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(UnsafeArchiveError, match="not a readable tar archive"):
        extract_archive(archive, work / "cache" / "model")
    assert _tree(work / "cache") == set()


def test_a_non_empty_target_is_not_overwritten(work: Path):
    archive = _archive(work / "incoming" / "model.tar.gz", [_file("config.json", b"new")])
    target = work / "cache" / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(ValueError, match="not empty"):
        extract_archive(archive, target)
    assert (target / "config.json").read_text() == "old"

