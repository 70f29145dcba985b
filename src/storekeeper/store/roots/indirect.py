"""Indirect roots (``gcroots/auto``): adding them, who claimed them, what they last
resolved to, and reading a link with a peer's rights."""

from __future__ import annotations

import errno
import os
import stat
import time
from contextlib import contextmanager

from ...formats.gcroots import indirect_root_name
from ...fs.atomic import symlink_atomic, write_file_atomic
from ...fs.waiting import readable
from ..locks import lock_fd, open_shared_lock

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .finder import RootFinder


class IndirectRootMemory:
    """``<state>/storekeeper/indirect/<auto name>``: what each indirect root last resolved to,
    and who added it.

    A record (JSON: link, store path or null, first-missed time or null,
    ``uids``) is written atomically under ``indirect/.lock``: by a deleting GC
    each time it resolves the root (``first_missed`` is set the first time the
    root cannot be read), and by the daemon's AddIndirectRoot, which adds the
    peer's uid to ``uids``.  Records never count as roots by themselves: they
    only stand in for an unreadable indirect root while its ``gcroots/auto``
    link exists.  A user may remove only their own claim on a root
    (:meth:`release`); the link goes when no claim is left.

    An entry that existed before anyone claimed it (made by real Nix, or before
    the daemon kept claims) gets the claim :data:`UNCLAIMED` when a user first
    claims it, so that a user who claims someone else's link and releases it
    again cannot remove it; only the link's owner (its ``lstat`` owner, read by
    the daemon) or a trusted user may drop that claim.  Records are private to
    the store's owner (0600 in a 0700 directory): they name what other users'
    links point at.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "storekeeper", "indirect")

    def get(self, name: str) -> dict | None:
        """The record, if any; its ``path`` may be None (never resolved)."""
        try:
            with open(os.path.join(self.dir, name)) as f:
                import json  # noqa: PLC0415 -- only when there is a record: kept off `roots`' start-up
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), (str, type(None))):
            return None
        return rec

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if os.stat(self.dir).st_mode & 0o077:
            os.chmod(self.dir, 0o700)  # (made 0755 by earlier versions)
        fd = open_shared_lock(os.path.join(self.dir, ".lock"))
        try:
            lock_fd(fd, exclusive=True)
            yield
        finally:
            os.close(fd)

    def _write(self, name: str, rec: dict) -> None:
        # Not synced (two fsyncs were most of an AddIndirectRoot's time): a record
        # lost or emptied by a crash reads as none.  The link then roots its path
        # as in Nix 2.8 (while it is readable), and the next claim of an existing
        # link without a record marks it UNCLAIMED (the cautious reading).
        import json  # noqa: PLC0415 -- (as in get)
        if self.get(name) != rec:
            write_file_atomic(os.path.join(self.dir, name), json.dumps(rec).encode(), mode=0o600,
                              durable=False)

    def put(self, name: str, link: str, path: str | None, first_missed: float | None) -> None:
        rec = self.get(name)
        if rec is not None and rec.get("link") == link and rec.get("path") == path \
                and rec.get("first_missed") == first_missed:
            # Already so (what every GC finds for every root that still resolves): no
            # lock, no write.  A claim racing with us is simply the later change.
            return
        with self._locked():
            old = self.get(name) or {}
            rec = {"link": link, "path": path, "first_missed": first_missed}
            for key in ("uids", "dev"):
                if key in old:
                    rec[key] = old[key]
            self._write(name, rec)

    def claim(self, auto: str, link: str, uid: int, path: str | None) -> None:
        """Make ``auto`` (a ``gcroots/auto`` entry) point to ``link`` and record ``uid``'s claim
        (``path``: what the link points at now, if known); one step under the lock, so a
        release racing with it cannot remove the link it just made."""
        name = os.path.basename(auto)
        with self._locked():
            try:
                unclaimed = os.readlink(auto) == link
            except OSError:
                unclaimed = False
            old = self.get(name) or {}
            keep = old.get("link") == link
            if keep and old.get("uids"):
                unclaimed = False
            symlink_atomic(link, auto)
            uids = sorted({*(u for u in (old.get("uids") or ()) if keep and isinstance(u, int)), uid,
                           *((UNCLAIMED,) if unclaimed else ())})
            rec = {"link": link, "path": path or (old.get("path") if keep else None),
                   "first_missed": old.get("first_missed") if keep and path is None else None,
                   "uids": uids}
            try:  # the file system the link's directory is on (see _definitely_gone)
                rec["dev"] = os.stat(os.path.dirname(link)).st_dev
            except OSError:
                if keep and isinstance(old.get("dev"), int):
                    rec["dev"] = old["dev"]
            self._write(name, rec)

    def release(self, auto: str, uid: int, link: str, owner_or_trusted: bool = False) -> bool:
        """Drop ``uid``'s claim on ``auto`` (for ``link``); the entry and its record go with
        the last claim.  With ``owner_or_trusted`` (``uid`` owns the link, or is trusted)
        also the :data:`UNCLAIMED` claim, or an entry without any record.  False if
        ``uid`` had nothing to drop."""
        name = os.path.basename(auto)
        with self._locked():
            rec = self.get(name)
            drop = {uid, UNCLAIMED} if owner_or_trusted else {uid}
            if rec is None or rec.get("link") != link:
                if not owner_or_trusted:
                    return False
                try:
                    if os.readlink(auto) != link:
                        return False
                except OSError:
                    return False
                rec = {"link": link, "uids": [UNCLAIMED]}
            if not drop & set(rec.get("uids") or [UNCLAIMED]):
                return False
            rec["uids"] = [u for u in (rec.get("uids") or [UNCLAIMED]) if u not in drop]
            if rec["uids"]:
                self._write(name, rec)
                return True
            try:
                if os.readlink(auto) == rec.get("link"):
                    os.unlink(auto)
            except OSError:
                pass
            self.forget(name)
            return True

    def forget(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass


DEFAULT_INDIRECT_GRACE = 14 * 86400
#: the claim of an indirect root that existed before anyone claimed it (see IndirectRootMemory)
UNCLAIMED = -1



def _definitely_gone(link: str, err: OSError, rec: dict | None) -> bool:
    """Whether an indirect root's link was removed (as opposed to being unreadable).

    Gone: the link is missing (ENOENT/ENOTDIR) in a directory the daemon can
    read; or its directory is missing too (``nix-build --no-out-link`` removes
    its temp dir) and the nearest existing ancestor is readable and on the
    file system the directory was on when the root was added (``dev`` in the
    record): not an unmounted or unreachable home, which keeps its grace.
    """
    if err.errno not in (errno.ENOENT, errno.ENOTDIR):
        return False
    parent = os.path.dirname(link)
    if os.access(parent, os.R_OK | os.X_OK):
        return True
    dev = rec.get("dev") if rec is not None else None
    if not isinstance(dev, int):
        return False
    ancestor = parent
    while ancestor != "/":
        ancestor = os.path.dirname(ancestor)
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        return st.st_dev == dev and os.access(ancestor, os.R_OK | os.X_OK)
    return False


def link_owner(path: str) -> int | None:
    """The owner of the symlink ``path`` itself (``O_PATH|O_NOFOLLOW``, then ``fstat`` on
    that fd: never a file it points to), or None if it is not a readable symlink."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_uid if stat.S_ISLNK(st.st_mode) else None


def _as_user(action: Callable[[], bytes], uid: int, gid: int, groups: list[int], limit: int,
             timeout: float) -> tuple[bool, bytes]:
    """Run ``action`` in a short-lived child that drops to ``uid``/``gid``/``groups`` and
    write what it returns back (at most ``limit`` bytes): (it succeeded, its bytes).
    An ``OSError`` comes back as ``errno\0message`` with success False; a child that
    hangs (a dead file system) is killed after ``timeout`` seconds."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, act, report, exit
        code = 1
        try:
            os.close(rfd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            out = action()
            os.write(wfd, out[:limit])
            code = 0
        except OSError as e:
            with _suppress_all():
                os.write(wfd, f"{e.errno or 0}\0{e.strerror or e}".encode()[:limit])
        except BaseException:  # noqa: BLE001 -- reported as a failure
            pass
        finally:
            os._exit(code)
    os.close(wfd)
    data = b""
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not readable([rfd], left):
                import signal  # noqa: PLC0415 -- (with its enum: kept off `roots`' start-up)
                os.kill(pid, signal.SIGKILL)  # (a hung file system)
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, data


def read_link_as(path: str, uid: int, gid: int, groups: list[int], timeout: float = 5.0) -> str | None:
    """What the symlink ``path`` points at, read with the rights of ``uid``/``gid``/``groups``
    (a short-lived child that drops to them), or None if that user cannot read it.

    A root daemon must not read, on a user's behalf, what the user could not read
    (a link in someone else's private directory).  Not root, or for root: read here.
    """
    if os.geteuid() != 0 or uid == 0:
        try:
            return os.readlink(path)
        except (OSError, ValueError):
            return None
    ok, data = _as_user(lambda: os.fsencode(os.readlink(path)), uid, gid, groups, 65536, timeout)
    return os.fsdecode(data) if ok else None


def add_indirect_root(state_dir: str, link: str, uid: int | None = None,
                      finder: RootFinder | None = None,
                      read_link: Callable[[str], str | None] | None = None) -> str:
    """Register ``link`` (a symlink the client made) as an indirect root; atomic, idempotent.

    With ``uid`` the root is claimed for that user (see :class:`IndirectRootMemory`),
    with what it points at now if ``finder`` can read it (through ``read_link``:
    the daemon passes one that reads with the peer's rights), so that it is kept
    even if it is never readable again (until ``indirect-root-grace`` passes).
    """
    if not link.startswith("/") or "\0" in link:
        raise ValueError(f"indirect root '{link}' is not an absolute path")
    auto = os.path.join(state_dir, "gcroots", "auto")
    os.makedirs(auto, mode=0o755, exist_ok=True)
    name = os.path.join(auto, indirect_root_name(link))
    if uid is None:
        symlink_atomic(link, name)
        return name
    path = None
    if finder is not None:
        if read_link is None:
            try:
                target: str | None = os.readlink(link)
            except OSError:
                target = None
        else:
            target = read_link(link)
        sp = finder._to_store_path(target) if target is not None else None
        path = finder.store_dir.print(sp) if sp is not None else None
    IndirectRootMemory(state_dir).claim(name, link, uid, path)
    return name


def make_perm_link(link: str, target: str, store_prefixes: tuple[str, ...]) -> None:
    """Point the symlink ``link`` at ``target`` (a store path), atomically: as Nix's
    ``addPermRoot``, something already at ``link`` is replaced only if it is a symlink
    into the store (``store_prefixes``: the store dir and its real location)."""
    try:
        st = os.lstat(link)
    except FileNotFoundError:
        st = None
    if st is not None:
        old = os.readlink(link) if stat.S_ISLNK(st.st_mode) else None
        if old is None or not any(old.startswith(p + "/") for p in store_prefixes):
            raise FileExistsError(errno.EEXIST, "already exists and is not a symlink into the store",
                                  link)
    symlink_atomic(target, link)


def make_perm_link_as(link: str, target: str, store_prefixes: tuple[str, ...],
                      uid: int, gid: int, groups: list[int], timeout: float = 5.0) -> None:
    """:func:`make_perm_link` with the rights of ``uid``/``gid``/``groups`` (a short-lived
    child that drops to them; here when we are not root or ``uid`` is root): a user
    makes roots only where they may write.  Errors are raised as :class:`OSError`."""
    if os.geteuid() != 0 or uid == 0:
        make_perm_link(link, target, store_prefixes)
        return

    def make() -> bytes:
        make_perm_link(link, target, store_prefixes)
        return b""
    ok, data = _as_user(make, uid, gid, groups, 4096, timeout)
    if ok:
        return
    num, _, text = data.decode(errors="replace").partition("\0")
    raise OSError(int(num) if num.isdigit() else errno.EIO, text or "cannot create the link", link)


@contextmanager
def _suppress_all() -> Iterator[None]:
    try:
        yield
    except BaseException:  # noqa: BLE001
        pass
