"""Finding GC roots: permanent (gcroots/, profiles/), temporary (temproots/) and runtime (/proc).

What counts as a root, as Nix 2.8 counts it (spec §6.2–6.4):

* Under ``<state>/gcroots`` and ``<state>/profiles``, recursively (symlinks to
  directories are not followed): a symlink into the store roots that store
  path; a symlink elsewhere (an *indirect* root, e.g. ``gcroots/auto/X →
  /home/u/result``) roots what its target links to, if that target is itself a
  symlink into the store; a regular file whose base name is a store path
  roots that path.
* In a user's own directory (``gcroots/per-user/<user>``,
  ``profiles/per-user/<user>``), an entry counts only if that user (or root)
  owns it, and a link that does not point into the store is followed only to
  a sibling inside the same directory (profile generations): a user cannot
  make the GC read, or keep alive through, files elsewhere.
* Every ``temproots/<pid>`` file whose owner is alive (it holds the flock).
* Paths that running processes use (exe, cwd, open files, mappings,
  environment), found in ``/proc`` (:func:`scan_proc`), unless
  ``runtime-roots = client``.
* What users registered with the daemon, and the runtime roots their clients
  reported while the lease lasts (unless ``runtime-roots = proc``): see
  :mod:`storekeeper.store.roots.registrations`.

* An indirect root whose target cannot be read at all (an unmounted or
  unreadable NFS home, another host's file system) keeps alive the store path
  it last resolved to, for ``grace`` seconds after it was first missed (see
  :class:`IndirectRootMemory`).  One whose link is definitely gone (see
  :func:`_definitely_gone`: missing in a readable directory, or with its whole
  directory removed from a file system that is still there) is dropped at
  once, as Nix does.

Finding roots never deletes or writes anything unless the caller asks
(``cleanup``, used only by a deleting GC): then stale ``gcroots/auto`` links,
expired unresolvable ones, temp-root files of dead processes and expired
leases are removed, and what each indirect root resolved to is remembered.
"""

from ...formats.gcroots import CENSORED, indirect_root_name
from .finder import RUNTIME_MODES, Root, RootFinder
from .indirect import (
                       DEFAULT_INDIRECT_GRACE,
                       UNCLAIMED,
                       IndirectRootMemory,
                       add_indirect_root,
                       link_owner,
                       make_perm_link,
                       make_perm_link_as,
                       read_link_as,
)

__all__ = [
    "CENSORED", "DEFAULT_INDIRECT_GRACE", "RUNTIME_MODES", "UNCLAIMED", "IndirectRootMemory", "Root",
    "RootFinder", "add_indirect_root", "indirect_root_name", "link_owner", "make_perm_link",
    "make_perm_link_as", "read_link_as",
]
