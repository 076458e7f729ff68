"""The shadow's files on disk: one private directory per user, files written atomically, never through a link.

The state file (engine announcements) and the address file (where `shadow status` finds a running shadow) used
to live in the shared temporary directory, where anyone can plant a symlink under a name the shadow writes or
an address file the status command believes. Now they live in a directory only the user can enter:
`$XDG_RUNTIME_DIR/vllm-shadow` when the session has one (per user, cleared at logout), else
`<tmp>/vllm-shadow-<uid>`; it is created 0700 and refused unless it is a real directory owned by the user and
closed to everyone else. A file is written to a fresh name in its own directory (O_CREAT|O_EXCL|O_NOFOLLOW:
never an existing file, never a link) and renamed over the target, which replaces a planted link rather than
writing through it; a crash mid-write leaves the previous file. Files are read with O_NOFOLLOW and must be the
user's own regular files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

DIR_NAME = "vllm-shadow"


class UnsafePathError(PermissionError, ValueError):
    """A path the shadow will not write or trust: a link, someone else's, or open to other users. A ValueError
    too, so that the command line reports it in one line."""


def user_dir() -> Path:
    """The user's private directory for the shadow's files, created if missing and checked either way."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        path = Path(runtime) / DIR_NAME
    else:
        path = Path(tempfile.gettempdir()) / f"{DIR_NAME}-{os.geteuid()}"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can use: created 0700 if missing, refused if it is a link, is not a
    directory, belongs to another user, or lets others in (someone may have put files in it already)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path} is not a directory (a link or a file is in its place): remove it")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})")
    if info.st_mode & 0o077:
        raise UnsafePathError(
            f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}): `chmod 700 {path}`"
        )
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600) through a fresh file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_own_file(path: Path) -> str:
    """The text of `path` if it is this user's own regular file; FileNotFoundError if there is none;
    UnsafePathError if it is a link, not a regular file, or another user's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symbolic link: not trusted") from None
        raise
    with os.fdopen(fd, "r", encoding="utf-8") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to you: not trusted")
        return file.read()
