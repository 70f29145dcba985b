"""A store bind-mounted read-only, writable for the daemon alone.

A machine can mount its store dir read-only (a bind mount of the store on itself,
``mount -o remount,bind,ro``, as NixOS does): then no process outside the daemon,
root's included, can change a store path by accident (a ``.pyc`` written into a
package, an editor saving into the store).  The daemon, started as root, sees that
its store dir is a mount point of its own mounted read-only, moves into a private
mount namespace and remounts the store writable *there*: the daemon, its connection
processes and its builders write the store; everyone else still sees it read-only.
nix-daemon 2.8 does the same (``makeStoreWritable``).

It must run while the daemon is still one thread: a mount namespace is unshared for
the calling thread only.  A store that is read-only because the file system under it
is (not its own mount point) is left alone: remounting that would make the whole
file system writable in the daemon's namespace; such a store fails on its first
write, naming the file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from ..errors import StoreError

_CLONE_NEWNS = 0x20000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bits -> the MS_* flag a remount must repeat to keep it (all but ro)
_KEPT = ((2, _MS_NOSUID), (4, _MS_NODEV), (8, _MS_NOEXEC), (1024, _MS_NOATIME),
         (2048, _MS_NODIRATIME), (4096, _MS_RELATIME))


def _is_mount_point(path: str) -> bool:
    """Whether ``path`` is listed as a mount point in this process's mount table."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
            point = line.split(b" ")[4]
            for esc, ch in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"),
                            (b"\\134", b"\\")):
                point = point.replace(esc, ch)
            if os.fsdecode(point) == real:
                return True
    return False


def make_store_writable(real_store_dir: str) -> bool:
    """If the daemon runs as root and ``real_store_dir`` is its own mount point mounted
    read-only, remount it writable in a private mount namespace (module docstring).
    True if it did."""
    if os.geteuid() != 0:
        return False
    try:
        flags = os.statvfs(real_store_dir).f_flag
    except FileNotFoundError:
        return False  # (a store about to be made)
    if not flags & os.ST_RDONLY or not _is_mount_point(real_store_dir):
        return False
    if threading.active_count() != 1:
        raise StoreError("the store's read-only mount can only be made writable before the "
                         "daemon starts threads")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]

    def fail(what: str) -> StoreError:
        e = ctypes.get_errno()
        return StoreError(f"cannot make the read-only store '{real_store_dir}' writable for "
                          f"the daemon: {what}: {os.strerror(e or errno.EINVAL)}")

    if libc.unshare(_CLONE_NEWNS) != 0:
        raise fail("unshare(CLONE_NEWNS)")
    # Nothing mounted in here may reach the machine's namespace, or come back from it.
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise fail("making the mounts private")
    keep = sum(ms for st, ms in _KEPT if flags & st)
    if libc.mount(None, os.fsencode(real_store_dir), None, _MS_REMOUNT | _MS_BIND | keep,
                  None) != 0:
        raise fail("remounting it read-write")
    return True
