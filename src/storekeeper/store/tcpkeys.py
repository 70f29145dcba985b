"""Secrets that let a local user reach the daemon over TCP as themselves.

A key file, on the daemon's side and the client's alike, is text::

    # a comment
    user alice
    key <64 hex digits: 32 random bytes>

:class:`TcpKeys` keeps the daemon's copies; :func:`read_key_file` reads
either side's with the checks a secret needs.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

from ..errors import StoreError
from ..fs.atomic import open_private_dir, write_file_atomic

KEY_BYTES = 32


def format_key_file(user: str, key: bytes, comment: str = "") -> bytes:
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"user {user}", f"key {key.hex()}"]
    return ("\n".join(lines) + "\n").encode()


def parse_key_file(text: bytes, where: str) -> tuple[str, bytes]:
    """(user, key) from a key file's bytes; a clear error for anything else."""
    user = key = None
    try:
        lines = text.decode().splitlines()
    except UnicodeDecodeError:
        raise StoreError(f"key file '{where}' is not text") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        value = value.strip()
        if name == "user" and value and user is None:
            user = value
        elif name == "key" and key is None:
            try:
                key = bytes.fromhex(value)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise StoreError(f"key file '{where}' line {n}: the key must be {KEY_BYTES * 2} hex digits")
        else:
            raise StoreError(f"key file '{where}' line {n}: unexpected '{line[:40]}'")
    if user is None or key is None:
        raise StoreError(f"key file '{where}' needs a 'user' and a 'key' line")
    return user, key


def read_key_file(name: str, owner: int, dir_fd: int | None = None,
                  where: str | None = None) -> tuple[str, bytes]:
    """Read a key file that must be a regular file owned by ``owner`` and private to it
    (no group or other permission bits), as ssh insists for its keys.  ``name`` is
    opened relative to ``dir_fd`` if given, never through a symlink at its last component;
    ``where`` names it in messages."""
    path = where or name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"key file '{path}' is a symbolic link: refusing it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"key file '{path}' is not a regular file")
        if st.st_uid != owner:
            raise StoreError(f"key file '{path}' belongs to uid {st.st_uid}, not to uid {owner}: "
                             f"refusing to use it")
        if st.st_mode & 0o077:
            raise StoreError(f"key file '{path}' has mode {stat.S_IMODE(st.st_mode):04o}: it must be "
                             f"readable by its owner only (chmod 600)")
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > 4096:
                raise StoreError(f"key file '{path}' is too large")
    finally:
        os.close(fd)
    return parse_key_file(data, path)


class TcpKeys:
    """The daemon's TCP keys: ``<state>/tcp-keys/<uid>``.

    Invariants:

    * The directory is mode 0700 and owned by the daemon's user; every key file
      in it is a regular file of mode 0600, owned by the daemon's user, written
      atomically and named by the decimal uid it authenticates.  A directory or
      file that breaks this is never used (a key that others could read, or that
      someone else could have planted, proves nothing).
    * A file holds the user name the uid had when the key was issued; the key
      authenticates that uid only while ``getpwuid(uid)`` still has that name,
      so an account deleted and its uid reused does not inherit the key.
    * One key per uid: issuing replaces (so revokes) the previous one.
    * Only the daemon's connection processes touch it, on behalf of the uid
      the kernel (``SO_PEERCRED``) reported: nobody issues or revokes a key for
      someone else.
    """

    DIR = "tcp-keys"

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, self.DIR)

    def _open_dir(self, create: bool) -> int | None:
        fd, bad = open_private_dir(self.dir, create, os.geteuid(), 0o077)
        if bad is not None:
            raise StoreError(f"'{self.dir}' must be a directory of mode 0700 owned by the daemon's "
                             f"user (uid {os.geteuid()}); TCP keys are disabled until it is")
        return fd

    def issue(self, uid: int, user: str) -> bytes:
        """A new key for ``uid`` (replacing any other)."""
        fd = self._open_dir(create=True)
        assert fd is not None
        os.close(fd)
        key = secrets.token_bytes(KEY_BYTES)
        write_file_atomic(os.path.join(self.dir, str(uid)),
                          format_key_file(user, key, "issued by the storekeeper daemon"), 0o600)
        return key

    def revoke(self, uid: int) -> bool:
        fd = self._open_dir(create=False)
        if fd is None:
            return False
        try:
            os.unlink(str(uid), dir_fd=fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def lookup(self, uid: int, user: str) -> bytes | None:
        """The key of ``uid`` if it was issued to ``user``; None if there is none."""
        fd = self._open_dir(create=False)
        if fd is None:
            return None
        try:
            try:
                recorded, key = read_key_file(str(uid), os.geteuid(), dir_fd=fd,
                                              where=os.path.join(self.dir, str(uid)))
            except FileNotFoundError:
                return None
        finally:
            os.close(fd)
        return key if recorded == user else None
