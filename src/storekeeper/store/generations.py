"""Profile generations as Nix keeps them, and what ``nix-env --delete-generations``,
``--rollback`` and ``nix-collect-garbage -d`` do to them.

A profile ``P`` is a symlink to ``P-N-link`` (a name relative to P's directory), and
``P-N-link`` is a symlink to a store path: generation ``N``.  A generation's creation time
is its link's own mtime.  The *current* generation is the one ``P`` points to: no deletion
ever removes it.  Changes hold ``P.lock`` (flock, as Nix does) and replace ``P`` atomically
(a new link renamed over it).

Profiles live in directories users own (``profiles/per-user/<user>``, homes), and a root GC
with ``--delete-generations`` acts on them: every change is made relative to one fd of the
profile's directory, opened without following its last component (storekeeper.fs rule 1),
and :func:`profiles_under` finds profiles with the no-follow walker; a directory swapped for a
symlink meanwhile is met as that symlink, never entered.  Deletion rules, as Nix 2.8 applies them:

* ``IDS``: those generations (naming the current one is an error);
* ``old``: every generation but the current one;
* ``+N`` (``keep N``): the current one and the N-1 before it stay, and every generation
  newer than the current one (after a rollback) stays too;
* ``Nd`` (older than): going from the newest down, the first generation created before the
  cut-off stays (it was the live one at that time); every older one goes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import NotFound, UsageError
from ..fs import ENTRY, LNK, open_dir, proc_fd, split_top, walk
from ..fs.atomic import temp_name
from ..fs.crash import crash_point

_GEN = re.compile(r"^(.*)-(\d+)-link$")


@dataclass
class Generation:
    number: int
    link: str
    target: str
    created: float  # the link's own mtime

    def to_json(self, current: int | None) -> dict:
        return {"number": self.number, "link": self.link, "target": self.target,
                "created": self.created, "current": self.number == current}


def gen_link(profile: str, n: int) -> str:
    return f"{profile}-{n}-link"


def open_profile_dir(profile: str) -> tuple[int, str]:
    """(fd of the profile's directory, opened without following its last component; the
    profile's name in it).  The caller closes the fd."""
    d, base = os.path.split(os.path.abspath(profile))
    pfd, name = split_top(d) if d != "/" else (os.open("/", os.O_RDONLY | os.O_DIRECTORY), b".")
    try:
        return open_dir(name, pfd), base
    finally:
        os.close(pfd)


def generations(profile: str, dir_fd: int | None = None) -> tuple[list[Generation], int | None]:
    """The profile's generations, oldest first, and the current one's number (listed
    relative to ``dir_fd``, the profile's directory, when given)."""
    d, base = os.path.split(os.path.abspath(profile))
    out = []
    try:
        names = os.listdir(d if dir_fd is None else dir_fd)
    except FileNotFoundError:
        names = []
    for name in names:
        m = _GEN.match(name)
        if m is None or m.group(1) != base:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if dir_fd is not None \
                else os.lstat(os.path.join(d, name))
            target = os.readlink(name if dir_fd is not None else os.path.join(d, name), dir_fd=dir_fd)
        except OSError:
            continue
        out.append(Generation(int(m.group(2)), os.path.join(d, name), target, st.st_mtime))
    out.sort(key=lambda g: g.number)
    return out, current_generation(profile, dir_fd)


def current_generation(profile: str, dir_fd: int | None = None) -> int | None:
    try:
        target = os.readlink(profile if dir_fd is None else os.path.basename(profile), dir_fd=dir_fd)
    except OSError:
        return None
    m = _GEN.match(os.path.basename(target))
    if m is None or m.group(1) != os.path.basename(profile):
        return None
    return int(m.group(2))


class ProfileLock:
    """``P.lock`` held with flock while a profile changes; removed after, as Nix does.
    Holds the fd of the profile's directory (:func:`open_profile_dir`) as ``dir_fd``: every
    change under the lock is made relative to it."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.dir_fd = -1
        self.name = ""
        self.fd = -1

    def __enter__(self) -> "ProfileLock":
        self.dir_fd, base = open_profile_dir(self.profile)
        self.name = base + ".lock"
        while True:
            fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                         dir_fd=self.dir_fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder before us may have removed the file: lock the one on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.name, dir_fd=self.dir_fd,
                                                              follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        os.close(self.dir_fd)


@dataclass(frozen=True)
class Selection:
    """Which generations to delete: ``kind`` is "ids", "old", "keep" or "older"."""
    kind: str
    ids: frozenset[int] = frozenset()
    keep: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, words: list[str]) -> "Selection":
        """nix-env's spellings: ``old``, ``+N``, ``Nd``, or generation numbers."""
        if len(words) == 1:
            w = words[0]
            if w == "old":
                return cls("old")
            if w.startswith("+"):
                return cls.keep_last(_number(w[1:], w))
            if w.endswith("d"):
                days = w[:-1]
                if not days.isdigit() or int(days) < 1:
                    raise UsageError(f"invalid number of days specifier '{w}'")
                return cls.older_than(int(days) * 86400)
        return cls("ids", ids=frozenset(_number(w, w) for w in words))

    @classmethod
    def keep_last(cls, n: int) -> "Selection":
        if n < 1:
            raise UsageError("must keep at least one generation, otherwise the current one "
                             "would be deleted")
        return cls("keep", keep=n)

    @classmethod
    def older_than(cls, seconds: float) -> "Selection":
        return cls("older", seconds=seconds)


def _number(s: str, word: str) -> int:
    if not s.isdigit():
        raise UsageError(f"invalid generation specifier '{word}' (want generation numbers, "
                         "'old', '+N' or 'Nd')")
    return int(s)


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` (or plain seconds) as seconds."""
    m = re.fullmatch(r"(\d+)([dhms]?)", text.strip())
    if m is None:
        raise UsageError(f"invalid age '{text}' (want e.g. 30d, 12h, 90m)")
    return int(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]


def select(gens: list[Generation], current: int | None, sel: Selection,
           now: float | None = None) -> list[Generation]:
    """The generations ``sel`` deletes (never the current one), oldest first."""
    if sel.kind == "ids":
        if current is not None and current in sel.ids:
            raise UsageError(f"cannot delete the current generation ({current})")
        return [g for g in gens if g.number in sel.ids]
    if sel.kind == "old":
        return [g for g in gens if g.number != current]
    doomed = []
    if sel.kind == "keep":
        left, seen_current = sel.keep, False
        for g in reversed(gens):
            if g.number == current:
                seen_current = True
                left -= 1
            elif seen_current:
                if left > 0:
                    left -= 1
                else:
                    doomed.append(g)
        return doomed[::-1]
    cutoff = (time.time() if now is None else now) - sel.seconds
    found_live_then = False
    for g in reversed(gens):
        if found_live_then:
            if g.number != current:
                doomed.append(g)
        elif g.created < cutoff:
            found_live_then = True  # the one in use at the cut-off stays
    return doomed[::-1]


def delete_generations(profile: str, sel: Selection, now: float | None = None,
                       dry_run: bool = False) -> list[Generation]:
    """Delete what ``sel`` names in ``profile``; the generations deleted (or that would be)."""
    with ProfileLock(profile) as lock:
        gens, current = generations(profile, lock.dir_fd)
        doomed = select(gens, current, sel, now)
        if not dry_run:
            for g in doomed:
                try:
                    os.unlink(os.path.basename(g.link), dir_fd=lock.dir_fd)
                except FileNotFoundError:
                    pass
                crash_point("profile.deleted")
        return doomed


def switch(profile: str, number: int | None = None) -> tuple[int | None, int]:
    """Point the profile at generation ``number`` (None: the newest one before the current,
    i.e. ``--rollback``); returns (from, to)."""
    with ProfileLock(profile) as lock:
        gens, current = generations(profile, lock.dir_fd)
        if number is None:
            older = [g.number for g in gens if current is None or g.number < current]
            if not older:
                raise NotFound(f"no generation older than the current ({current}) exists")
            number = older[-1]
        elif number not in {g.number for g in gens}:
            raise NotFound(f"generation {number} does not exist")
        base = os.path.basename(profile)
        tmp = temp_name(".", base + ".tmp-")[2:]  # (a name in the profile's directory)
        os.symlink(os.path.basename(gen_link(profile, number)), tmp, dir_fd=lock.dir_fd)
        try:
            crash_point("profile.linked")
            os.replace(tmp, base, src_dir_fd=lock.dir_fd, dst_dir_fd=lock.dir_fd)
        except BaseException:
            os.unlink(tmp, dir_fd=lock.dir_fd)
            raise
        crash_point("profile.switched")
        return current, number


def profiles_under(top: str) -> Iterator[str]:
    """Every profile under ``top``, as nix-collect-garbage picks them: a symlink whose target
    names a generation link (``…-link``), in a directory this process may write.  Found with
    the no-follow walker (a user's directory is never followed elsewhere)."""
    found = []
    try:
        for ev, node in walk(top, sort=True, on_error=lambda n, e: None):
            if ev != ENTRY or node.kind != LNK or node.parent_fd is None:
                continue
            if not os.access(proc_fd(node.parent_fd), os.W_OK):
                continue
            try:
                if "link" in os.readlink(node.name, dir_fd=node.parent_fd):
                    found.append(os.path.join(top, node.path))
            except OSError:
                continue
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
            return iter(())
        raise
    return iter(found)


def delete_all_generations(profiles_dir: str, sel: Selection, now: float | None = None,
                           dry_run: bool = False) -> list[tuple[str, list[Generation]]]:
    """``sel`` applied to every profile under ``profiles_dir`` (``nix-collect-garbage -d`` is
    ``old``, ``--delete-older-than Nd`` is ``Nd``)."""
    out = []
    for p in profiles_under(profiles_dir):
        try:
            out.append((p, delete_generations(p, sel, now, dry_run)))
        except OSError as e:
            # its directory was swapped for a symlink (or removed) since the walk: not a
            # profile under profiles_dir any more
            if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise
    return out
