"""Creating files in directories that other users may write to: ``/tmp``, a shared trace or checkpoint folder.

Owns how Shoal creates every file it writes (timelines, PartialFC checkpoints, benchmark results). What goes
into the files belongs to their modules; which directory is the caller's choice.

Design constraints:

1. Never write through a link at the final name. The names Shoal derives from a user's path are predictable
   (``trace.rank0.json``, ``partial_fc.json``, a dated result file), so in a directory that others can write
   to, anyone may plant a symlink there first; ``open(path, "w")`` would then truncate and overwrite the
   link's target with the writer's permissions (a planted ``trace.rank0.json`` link did exactly that to
   ``start_timeline``). Every file is therefore created either exclusively (``O_CREAT | O_EXCL |
   O_NOFOLLOW``: any existing name, a link included, is an error) or as a new file under a random name in
   the target's directory that ``os.replace`` then renames onto the final name: ``rename(2)`` replaces a
   link itself, never its target.
2. All or nothing for files read by others. :func:`atomic_write` writes the temporary file in full, fsyncs
   it, renames it, then fsyncs the directory: after a crash or power loss the name holds the old content or
   the new one, never a prefix (without the file's fsync, ext4's delayed allocation can leave a renamed file
   empty; without the directory's, the rename itself may be lost). That rename is the commit point that a
   multi-file format (PartialFC's index) can build on.
3. The permissions ``open()`` would give: temporary files are created by ``os.open`` with mode ``0o666``
   minus the umask (``tempfile.mkstemp`` makes them ``0o600``, unreadable to the group sharing a checkpoint
   directory).
4. Nothing left behind: a write that raises removes its temporary file. A process killed mid-write leaves
   one ``.<name>.<random>.tmp`` file; it never hides or damages the final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from typing import IO, Iterator

__all__ = ["create_new", "open_replacing", "atomic_write", "fsync_directory"]

log = logging.getLogger(__name__)

# O_NOFOLLOW and O_CLOEXEC are POSIX; elsewhere O_EXCL alone still refuses an existing name.
_EXCL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_TMP_SUFFIX = ".tmp"


def _fdopen(fd: int, mode: str, encoding: str | None) -> IO:
    if "b" in mode:
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, encoding=encoding or "utf-8")


def _check_mode(mode: str) -> None:
    if mode not in ("w", "wb"):
        raise ValueError(f"shoal: files are created with mode 'w' or 'wb', got {mode!r}.")


def create_new(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None) -> IO:
    """Create ``path`` and open it for writing; refuse if any file or link already has that name.

    Args:
        path: the file to create; its directory must exist.
        mode: ``"w"`` (text, UTF-8 unless ``encoding``) or ``"wb"``.
        encoding: for text mode.

    Returns:
        The open file.

    Raises:
        FileExistsError: ``path`` exists (a symlink too, even a dangling one).

    Example:
        >>> with create_new("results/2026-01-02-bench.json") as f:
        ...     f.write("{}")
    """
    _check_mode(mode)
    return _fdopen(os.open(os.fspath(path), _EXCL_FLAGS, 0o666), mode, encoding)


def _create_temp(path: str) -> tuple[int, str]:
    """A new file under a random name beside ``path`` (constraints 1 and 3): ``(fd, its path)``."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, _EXCL_FLAGS, 0o666), tmp
        except FileExistsError:  # 48 random bits: someone planted this very name, or chance
            continue
    raise FileExistsError(errno.EEXIST, "shoal: could not create a temporary file beside it", path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def open_replacing(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None) -> IO:
    """Open a new, empty file that has already replaced whatever had the name ``path`` (file or link).

    For files written over time (a timeline): the name shows the new file from the start, so a process
    killed later leaves what it wrote so far there. A symlink at ``path`` is replaced, its target untouched.

    Args:
        path: the final name; its directory must exist.
        mode: ``"w"`` or ``"wb"``.
        encoding: for text mode (default UTF-8).

    Returns:
        The open file.

    Raises:
        OSError: the directory is not writable, or ``path`` is a directory.

    Example:
        >>> f = open_replacing("/tmp/trace.rank0.json"); f.write("[]"); f.close()
    """
    _check_mode(mode)
    path = os.fspath(path)
    fd, tmp = _create_temp(path)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return _fdopen(fd, mode, encoding)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the names created or renamed in ``directory`` durable (constraint 2).

    A no-op where directories cannot be opened (Windows) or synced (some network file systems).
    """
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        log.debug("shoal: cannot open %s to fsync it: %s", directory, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        log.debug("shoal: %s does not support fsync of a directory: %s", directory, exc)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None,
                 durable: bool = True) -> Iterator[IO]:
    """Write a file that readers see complete or not at all; a link at ``path`` is replaced, not followed.

    The block writes into a new temporary file beside ``path``; when it ends without an exception the file is
    flushed, fsynced (``durable``), renamed onto ``path`` in one step, and the directory fsynced
    (``durable``). When it raises, the temporary file is removed and ``path`` is untouched.

    Args:
        path: the final name; its directory must exist.
        mode: ``"w"`` (text, UTF-8 unless ``encoding``) or ``"wb"``.
        encoding: for text mode.
        durable: fsync the file and the directory (constraint 2); off for scratch files.

    Yields:
        The open temporary file.

    Raises:
        OSError: from creating, writing, syncing or renaming.

    Example:
        >>> with atomic_write("ckpt/index.json") as f:
        ...     json.dump(index, f)
    """
    _check_mode(mode)
    path = os.fspath(path)
    fd, tmp = _create_temp(path)
    try:
        with _fdopen(fd, mode, encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_directory(os.path.dirname(os.path.abspath(path)))
