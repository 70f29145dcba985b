"""Secrets that let a local user reach the daemon over TCP as themselves.

A key file, on the daemon's side and the client's alike, is text::

    # a comment
    user alice
    key <64 hex digits: 32 random bytes>

:class:`TcpKeys` keeps the daemon's copies; :func:`storekeeper.fs.private.read_key_file`
reads either side's with the checks a secret needs (the format:
:mod:`storekeeper.formats.tcpauth`).
"""

from __future__ import annotations

import os
import secrets

from ..errors import StoreError
from ..formats.tcpauth import KEY_BYTES, format_key_file
from ..fs.atomic import open_private_dir, write_file_atomic
from ..fs.private import read_key_file


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
