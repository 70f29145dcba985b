"""The database keeper of a running daemon (see :class:`DatabaseKeeper`)."""

from __future__ import annotations

import os
import signal
import sqlite3
from contextlib import suppress

from ..formats.url import LocalLayout
from ..fs.waiting import readable


class DatabaseKeeper:
    """A child process holding the store's database open until the daemon exits (why:
    :mod:`.server`).  It dies with the daemon: its pipe reaches end of file.

    The database may be removed and re-created under the running daemon (a test
    harness wiping the store): every :data:`_KEEPER_CHECK` seconds the keeper
    looks whether ``db.sqlite`` is still the file it holds, and if not lets go of
    the old one and holds the new one once it is initialised (``db/schema``
    exists; it never creates a database itself)."""

    def __init__(self, layout: LocalLayout) -> None:
        self.pid: int | None = None
        self._pipe: int | None = None
        if layout.read_only:
            return
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the keeper
            code = 0
            try:
                os.close(wfd)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we go
                _keep(layout.db_dir, rfd)
            except BaseException:  # noqa: BLE001 -- a keeper only ever exits
                code = 1
            finally:
                os._exit(code)
        os.close(rfd)
        self.pid, self._pipe = pid, wfd

    def close_in_child(self) -> None:
        """In a connection process: let go of the keeper's pipe."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def stop(self) -> None:
        self.close_in_child()
        if self.pid is not None:
            with suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = None


_KEEPER_CHECK = 1.0


def _keep(db_dir: str, pipe: int) -> None:
    """The keeper's loop (see :class:`_DatabaseKeeper`): until ``pipe`` reaches EOF."""
    db = os.path.join(db_dir, "db.sqlite")
    conn: sqlite3.Connection | None = None
    held: tuple[int, int] | None = None
    try:
        while True:
            try:
                st = os.stat(db)
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                current = None
            if current != held:
                if conn is not None:
                    conn.close()
                    conn, held = None, None
                if current is not None and os.path.exists(os.path.join(db_dir, "schema")):
                    c = None
                    try:
                        c = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=5.0)
                        c.execute("select count(*) from ValidPaths").fetchall()  # maps the WAL index
                        conn, held, c = c, current, None
                    except sqlite3.Error:
                        pass  # (not ready yet: tried again next time)
                    finally:
                        if c is not None:
                            c.close()
            ready = readable([pipe], _KEEPER_CHECK)
            if ready and not os.read(pipe, 1):
                return
    finally:
        if conn is not None:
            conn.close()
