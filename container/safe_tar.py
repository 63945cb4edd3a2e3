"""Extract a model archive (``model.tar.gz``) without trusting it.

A model archive comes from wherever ``option.model_id`` points, so a hostile or broken one must
not write outside its folder, plant links, devices or FIFOs, or fill the disk. Our own checks
run first on every entry; on Python releases that have it (3.11.4+), ``tarfile``'s ``data``
filter runs as a second line. Entries are written by this module (never ``extractall``), so
no owner, permission bit or timestamp is taken from the archive.

Extraction goes to a fresh sibling folder that is renamed onto the target at the end: a
refused archive leaves neither a partial target nor anything else behind.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from djl_like.errors import ConfigError

# NOTE: generous on purpose: the largest open models are several hundred GB in 16-bit weights.
DEFAULT_MAX_TOTAL_BYTES = 1 << 40  # 1 TiB
DEFAULT_MAX_MEMBERS = 100_000
_COPY_CHUNK_BYTES = 1 << 20


class UnsafeArchiveError(ConfigError):
    """The archive holds an entry, or expands to a size, that extraction refuses.

    A ``ConfigError`` (so a ``ValueError``): ``serve`` stops at start with this message.
    """


@dataclass
class _Budget:
    """Running totals checked before each entry is written (the tar-bomb guard)."""

    max_total_bytes: int
    max_members: int
    total_bytes: int = 0
    members: int = 0

    def charge(self, archive: str, member: tarfile.TarInfo) -> None:
        self.members += 1
        self.total_bytes += member.size if member.isfile() else 0
        if self.members > self.max_members:
            raise UnsafeArchiveError(
                f"{archive} has more than {self.max_members} entries; refusing to extract it")
        if self.total_bytes > self.max_total_bytes:
            raise UnsafeArchiveError(
                f"{archive} expands to more than {self.max_total_bytes} bytes (the limit); "
                "refusing to extract it (a tar bomb, or raise the limit)")


def extract_archive(
    archive_path: str | os.PathLike[str],
    target_dir: str | os.PathLike[str],
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Extract the tar archive (any compression ``tarfile`` reads) into ``target_dir``.

    Only regular files and folders are accepted. Refused, with ``UnsafeArchiveError``: absolute
    paths, paths that climb out with ``..``, symbolic and hard links, character and block
    devices, FIFOs, sparse files, duplicate entries, more than ``max_members`` entries, and
    regular files adding up to more than ``max_total_bytes``. ``target_dir`` must be absent or
    empty; it exists with the whole content on success and is left untouched on failure.
    Returns the target path.
    """
    target = Path(target_dir)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"cannot extract into {target}: the folder is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting",
                                    dir=target.parent))
    try:
        _extract_members(os.fspath(archive_path), staging, _Budget(max_total_bytes, max_members))
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _extract_members(archive: str, root: Path, budget: _Budget) -> None:
    # NOTE: stream mode ("r|*") reads the archive once, front to back; every entry is checked
    # before a byte of it is written, so the size limit holds before the disk fills.
    try:
        with tarfile.open(archive, mode="r|*") as reader:
            for member in reader:
                relative = check_member(archive, member, root)
                budget.charge(archive, member)
                _write_member(archive, reader, member, root, relative)
    except tarfile.TarError as error:
        raise UnsafeArchiveError(f"{archive} is not a readable tar archive: {error}") from error


def check_member(archive: str, member: tarfile.TarInfo, root: Path) -> PurePosixPath:
    """The entry's path relative to ``root``, or ``UnsafeArchiveError`` if it is refused."""
    kind = _refused_kind(member)
    if kind is not None:
        raise UnsafeArchiveError(f"{archive}: entry {member.name!r} is a {kind}; model archives "
                                 "may hold only regular files and folders")
    relative = _relative_path(archive, member.name)
    _check_inside(archive, member.name, root, relative)
    _second_line(archive, member, root)
    return relative


def _refused_kind(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    if not (member.isfile() or member.isdir()):
        return f"special entry (type {member.type!r})"
    return None


def _relative_path(archive: str, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path")
    parts = [part for part in path.parts if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} climbs out of the target with '..'")
    return PurePosixPath(*parts)


def _check_inside(archive: str, name: str, root: Path, relative: PurePosixPath) -> None:
    # Defence in depth: the resolved path must still lie inside the root.
    destination = root.joinpath(*relative.parts).resolve()
    if not destination.is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} resolves outside the target")


def _second_line(archive: str, member: tarfile.TarInfo, root: Path) -> None:
    # NOTE: tarfile.data_filter exists from 3.11.4 (and 3.12); older patch releases rely on the
    # checks above alone. Its return value (a sanitised copy) is not needed: we write entries
    # ourselves and take no metadata from them.
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    try:
        data_filter(member, os.fspath(root))
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"{archive}: entry {member.name!r} refused: {error}") from error


def _write_member(archive: str, reader: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                  relative: PurePosixPath) -> None:
    destination = root.joinpath(*relative.parts)
    try:
        if member.isdir():
            destination.mkdir(parents=True, exist_ok=True)
            return
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = reader.extractfile(member)
        # "xb": a second entry with the same name must not silently replace the first.
        with source, open(destination, "xb") as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK_BYTES)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        raise UnsafeArchiveError(
            f"{archive}: entry {member.name!r} collides with an earlier entry") from error
