"""The file-system layer: every tree walk, delete, chmod/chown and metadata
change on a store or user-controlled tree goes through here.

The store dir is shared with build users (it is ``root:nixbld 1775``), build
directories and outputs belong to build users while a build runs, and roots
live in users' homes: any name below a top we were given may be swapped for a
symlink, a hard link or another file at any moment by someone else.  So:

1. **One path-based open, then fds.**  A caller names a top (a path, or a name
   relative to a directory fd it already holds).  Below it every open is
   relative to the parent's fd (``openat``), and every change is made through
   the fd of the inode that was checked (``fchmod``, or ``chmod``/``chown``/
   ``utime`` of ``/proc/self/fd/N`` for an ``O_PATH`` fd) or by a name
   relative to a directory fd (``unlinkat``, ``rmdir`` with ``dir_fd``), never
   by a full path.
2. **Never follow a link.**  Directories are opened ``O_DIRECTORY |
   O_NOFOLLOW``, other entries ``O_PATH | O_NOFOLLOW`` (or ``O_NOFOLLOW |
   O_NONBLOCK`` to read them: a fifo swapped in does not hang us).  A directory
   swapped for a symlink after it was listed is met as the symlink it now is.
3. **Check on the fd you change.**  Ownership, type, mode and link count are
   read with ``fstat`` on the very fd that is then changed: no check by name
   followed by an act by name.
4. **Lock a directory down before listing it** where others could add to it
   (canonicalising a build output): the walker yields a directory before it
   lists it, so its mode and owner can be fixed first; whatever was added
   before is then seen and checked.
5. **One walker, one deleter.**  :func:`walk` is the only tree traversal
   (:func:`usage` its cut-down twin for counting blocks, :func:`dirs` the one
   for working a directory's files as a batch, same rules),
   :func:`remove_tree` the only recursive delete.  Code outside this package
   calls them; it does not ``os.walk``, ``os.scandir(path)``, ``shutil.rmtree``
   or ``os.chmod(path)`` a store or user tree.

Top-level scans of a single directory (the store dir, ``/proc``) are not
trees; they open the directory once and act on names relative to that fd.
"""

from .du import Usage, usage, usages
from .openat import (
    FS_IMMUTABLE_FL,
    HAVE_PROC_FD,
    O_DIR,
    O_FILE,
    O_HANDLE,
    O_NOATIME,
    O_PATH,
    chmod_fd,
    chown_fd,
    clear_immutable,
    entries,
    open_dir,
    open_dir_forcing_access,
    open_handle,
    open_noatime,
    proc_fd,
    set_mtime_fd,
    split_top,
    write_all,
)
from .tree import remove_tree
from .walker import DIR, ENTER, ENTRY, LEAVE, LNK, OTHER, REG, SWAPPED, Node, dirs, kind_of, walk

__all__ = [
    "DIR", "ENTER", "ENTRY", "FS_IMMUTABLE_FL", "HAVE_PROC_FD", "LEAVE", "LNK", "Node", "OTHER",
    "O_DIR", "O_FILE", "O_HANDLE", "O_NOATIME", "O_PATH", "REG", "chmod_fd", "chown_fd", "clear_immutable", "entries",
    "kind_of", "open_dir", "open_dir_forcing_access", "open_handle", "open_noatime", "proc_fd", "remove_tree",
    "SWAPPED", "dirs", "set_mtime_fd", "split_top", "usage", "usages", "Usage", "walk", "write_all",
]
