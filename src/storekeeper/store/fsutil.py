"""Small file-system primitives every state write goes through.

State files are written atomically: a temp file in the same directory, fsync,
rename over the target, fsync the directory.  A crash leaves either the old or
the new content, never a mix.
"""

from __future__ import annotations

import os
import secrets


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (NFS) refuse fsync on directories
    finally:
        os.close(fd)


def temp_name(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}{os.getpid()}-{secrets.token_hex(6)}")


def write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist, and is never a followed symlink) with ``data``, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    directory = os.path.dirname(path) or "."
    tmp = temp_name(directory, "." + os.path.basename(path) + ".tmp-")
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def symlink_atomic(target: str, link: str) -> None:
    tmp = temp_name(os.path.dirname(link) or ".", os.path.basename(link) + ".tmp-")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        os.unlink(tmp)
        raise
