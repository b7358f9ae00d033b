"""The spool: a durable file store for received instances and the objects radgate derives.

A file is durable before `store` returns: it is written to a temporary file in its
final folder, flushed (`fsync`), renamed into place, and the folder is flushed so the
new name survives a power loss too. The database row written afterwards is what makes
a file part of the gateway's state; a file without a row is an orphan and harmless.

Names come from hashes, never from values a peer sent: a SOP Instance UID such as
``../../etc/x`` cannot choose where a file goes. Received instances go to
``instances/ab/cd/<sha256(key)>-<random>.dcm``; each stored copy gets its own name,
so removing a refused or duplicate copy never touches a copy a row refers to. Derived
objects (Grad-CAM captures, tagged originals, reports, PNGs) go to
``derived/<kind>/ab/cd/<sha256(key)><suffix>``: one name per key, so regenerating an
output replaces it atomically.

Paths handed out and taken back are relative to the root, in POSIX form, which is
what the database stores; `path` refuses any that would leave the root.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from inference.errors import RadgateError

log = logging.getLogger(__name__)

# Temporary files start with this; `sweep_temp` removes the ones a killed process left.
TEMP_PREFIX = ".tmp-"
INSTANCES_FOLDER = "instances"
DERIVED_FOLDER = "derived"
INSTANCE_SUFFIX = ".dcm"
# Errors that mean "no room": disk full, quota exceeded, file size limit (RLIMIT_FSIZE).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_DERIVED_KIND = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")
_MEBIBYTE = 1024 * 1024


class SpoolError(RadgateError):
    """A file could not be stored, read or located in the spool."""


class SpoolFull(SpoolError):
    """No room left: the disk or quota is full, or a file size limit was hit."""


# What `store` takes: one buffer, or parts written in order.
Content = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


def _parts(encoded: Content) -> Sequence[bytes | bytearray | memoryview]:
    if isinstance(encoded, bytes | bytearray | memoryview):
        return [encoded]
    return encoded


@dataclass(frozen=True)
class StoredFile:
    """A file made durable in the spool; `path` is relative to the spool root."""

    path: str
    sha256: str
    size: int


def key_digest(key: str) -> str:
    """The hex SHA-256 that names a key's files (UTF-8; lone surrogates kept as escapes)."""
    return hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()


def _fan_out(digest: str) -> str:
    # Two folder levels of 256 each keep every folder small up to millions of files.
    return f"{digest[0:2]}/{digest[2:4]}"


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """The file store under `root` (created if missing). Safe to use from many threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._resolved_root = self.root.resolve()
        # Folders whose entries are known to be durable: no mkdir or parent flush needed.
        self._durable_folders: set[Path] = set()
        self._folders_lock = threading.Lock()
        try:
            self._flush_created(self._ensure_folder(self.root))
        except OSError as error:
            raise SpoolError(f"spool folder {self.root} cannot be created: {error}") from error

    # --- writing -------------------------------------------------------------------------

    def store(self, encoded: Content, *, key: str) -> StoredFile:
        """Store a received instance durably; `key` (the SOP Instance UID) names it.

        `encoded` may be a list of parts written one after the other (e.g. a file
        preamble and the data set as received), which saves copying a large data set
        into one buffer. Raises `SpoolFull` when the disk or quota is full, `SpoolError` on any other
        I/O error; either way no temporary file is left behind.
        """
        digest = key_digest(key)
        # 64 random bits: two copies of one instance (a resend) never share a file.
        name = f"{digest}-{secrets.token_hex(8)}{INSTANCE_SUFFIX}"
        relative = f"{INSTANCES_FOLDER}/{_fan_out(digest)}/{name}"
        return self._write(relative, encoded)

    def store_derived(
        self, encoded: Content, *, key: str, kind: str, suffix: str = ".dcm"
    ) -> StoredFile:
        """Store an object radgate made (e.g. kind ``gradcam``, ``tagged``, ``sr``, ``png``).

        The same `kind` and `key` (e.g. the output's SOP Instance UID, or a source UID
        plus a purpose) always name the same file, which is replaced atomically.
        """
        if not _DERIVED_KIND.fullmatch(kind):
            raise ValueError(
                f"derived kind {kind!r} is not valid; expected 1 to 32 lower-case letters,"
                " digits, '_' or '-'"
            )
        if not _SUFFIX.fullmatch(suffix):
            raise ValueError(
                f"suffix {suffix!r} is not valid; expected '.' and 1 to 8 lower-case"
                " letters or digits"
            )
        digest = key_digest(key)
        relative = f"{DERIVED_FOLDER}/{kind}/{_fan_out(digest)}/{digest}{suffix}"
        return self._write(relative, encoded)

    def _write(self, relative: str, encoded: Content) -> StoredFile:
        target = self.root / relative
        folder = target.parent
        parts = [memoryview(part).cast("B") for part in _parts(encoded)]
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        size = sum(part.nbytes for part in parts)
        temporary: str | None = None
        try:
            created = self._ensure_folder(folder)
            descriptor, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
            try:
                for part in parts:
                    written = 0
                    while written < len(part):
                        written += os.write(descriptor, part[written:])
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, target)
            temporary = None
            _fsync_folder(folder)
            self._flush_created(created)
        except OSError as error:
            if temporary is not None:
                _remove_quietly(Path(temporary))
            if error.errno in NO_SPACE_ERRNOS:
                raise SpoolFull(f"spool {self.root} is full: {error}") from error
            raise SpoolError(f"spool {self.root}: cannot store {relative}: {error}") from error
        finally:
            for part in parts:
                part.release()
        return StoredFile(path=relative, sha256=digest.hexdigest(), size=size)

    def _ensure_folder(self, folder: Path) -> list[Path]:
        """Create `folder` and missing parents; returns the folders created here.

        A new folder's name lives in its parent, so each parent of a created folder
        must be flushed too (`_flush_created`). A folder found already there is taken
        as durable: whoever created it flushed its parent.
        """
        if folder in self._durable_folders:
            return []
        missing: list[Path] = []
        current = folder
        while not current.is_dir():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        created: list[Path] = []
        for path in reversed(missing):
            # Another thread may be first: its parent is flushed here anyway rather
            # than relying on that thread having done so before this file is stored.
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o750)
            created.append(path)
        if not created:
            with self._folders_lock:
                self._durable_folders.add(folder)
        return created

    def _flush_created(self, created: list[Path]) -> None:
        # Flushed after the file's own folder: on journaling file systems these are
        # already committed by then and cost almost nothing.
        for path in reversed(created):
            _fsync_folder(path.parent)
        if created:
            with self._folders_lock:
                self._durable_folders.update(created)

    # --- reading and housekeeping --------------------------------------------------------

    def path(self, relative: str) -> Path:
        """The absolute path of a spool-relative path; `SpoolError` if it leaves the root."""
        pure = PurePosixPath(relative)
        if not relative or pure.is_absolute() or ".." in pure.parts or "\\" in relative:
            raise SpoolError(f"spool path {relative!r} is not a path inside the spool")
        candidate = (self.root / pure).resolve()
        if not candidate.is_relative_to(self._resolved_root) or candidate == self._resolved_root:
            raise SpoolError(f"spool path {relative!r} resolves outside the spool")
        return candidate

    def read_bytes(self, relative: str) -> bytes:
        """The content of a stored file."""
        try:
            return self.path(relative).read_bytes()
        except OSError as error:
            raise SpoolError(f"spool file {relative} cannot be read: {error}") from error

    def remove(self, relative: str) -> bool:
        """Delete a stored file; False if it was not there.

        Not flushed: a removed file that reappears after a power loss has no row and
        is an orphan.
        """
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            raise SpoolError(f"spool file {relative} cannot be removed: {error}") from error
        return True

    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's file system."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_room(self, min_free_mb: int, incoming_bytes: int = 0) -> bool:
        """Whether `incoming_bytes` more still leave at least `min_free_mb` MiB free."""
        return self.free_bytes() - incoming_bytes >= min_free_mb * _MEBIBYTE

    def sweep_temp(self, older_than_s: float = 0.0) -> int:
        """Remove temporary files older than `older_than_s` seconds; returns how many.

        At start-up (0 s) they can only be left over from a process that was killed
        while writing. Gateways sharing one spool should pass an age well above the
        time one write takes.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = Path(folder) / name
                try:
                    if path.lstat().st_mtime <= cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            log.info("spool: removed %d temporary file(s) left by an interrupted write", removed)
        return removed


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError as error:
        log.warning("spool: temporary file %s could not be removed: %s", path, error)
