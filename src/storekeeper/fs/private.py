"""Reading secrets: private files checked on the fd that is read."""

from __future__ import annotations

import errno
import os
import stat

from ..errors import StoreError
from ..formats.tcpauth import parse_key_file


def read_private_file(name: str, owner: int, dir_fd: int | None = None,
                      where: str | None = None, what: str = "file", limit: int = 4096) -> bytes:
    """The bytes of a file that must be a regular file owned by ``owner`` and private to it
    (no group or other permission bits), as ssh insists for its keys.  ``name`` is
    opened relative to ``dir_fd`` if given, never through a symlink at its last component;
    the checks are made on the fd that is read.  ``where`` names it in messages."""
    path = where or name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{what} '{path}' is a symbolic link: refusing it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{what} '{path}' is not a regular file")
        if st.st_uid != owner:
            raise StoreError(f"{what} '{path}' belongs to uid {st.st_uid}, not to uid {owner}: "
                             f"refusing to use it")
        if st.st_mode & 0o077:
            raise StoreError(f"{what} '{path}' has mode {stat.S_IMODE(st.st_mode):04o}: it must be "
                             f"readable by its owner only (chmod 600)")
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > limit:
                raise StoreError(f"{what} '{path}' is too large")
    finally:
        os.close(fd)
    return data


def read_key_file(name: str, owner: int, dir_fd: int | None = None,
                  where: str | None = None) -> tuple[str, bytes]:
    """(user, key) from a TCP key file (:func:`read_private_file`'s checks, then
    :func:`storekeeper.formats.tcpauth.parse_key_file`)."""
    return parse_key_file(read_private_file(name, owner, dir_fd, where, "key file"), where or name)
