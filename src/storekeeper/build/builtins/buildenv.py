"""``builtin:buildenv``: a user environment (a profile generation) as a tree of
symlinks into the packages it holds, as Nix 2.8 builds it for ``nix-env``.

Input (the derivation's attributes): ``out``; ``manifest`` (a store path,
linked as ``$out/manifest.nix``); ``derivations``, whitespace-separated groups
``ACTIVE PRIORITY N PATH1 … PATHN`` (``ACTIVE`` is ``false`` for a package
that is installed but not linked; a lower ``PRIORITY`` wins).

The tree it makes (each rule seen in Nix 2.8's output, see tests/test_builtins.py):

* Packages are linked in order of (priority, store path); then the packages
  they name in ``nix-support/propagated-user-env-packages`` (space or newline
  separated), round by round in path order, with priorities 1000, 1001, …;
  each package at most once.
* A directory of a package becomes one symlink to it, until a second package
  has the same directory: the link is then replaced by a real directory holding
  links to the first package's entries (at the first package's priority: the
  link target is resolved fully first), and the second package's entries are
  added to it.  A real directory already there is merged into the same way.
* A file (or anything not a directory) meets an existing link: the lower
  priority number keeps the place; equal priorities are a conflict, reported as
  Nix reports it.  A directory meeting a link to a non-directory, and a
  non-directory meeting a real directory, are collisions.
* Entries named ``propagated-build-inputs``, ``nix-support``, ``perllocal.pod``,
  ``log``, ``manifest.nix``, ``manifest.json``, and ``dir`` inside a directory
  named ``info``, are left out at any depth.  A dangling symlink in a package
  is skipped with a warning.

Writes happen only inside ``$out``, through directory fds opened without
following links (``mkdirat``/``symlinkat``/``unlinkat``), so no link in the tree
being built can redirect a write outside it.  Packages are read by path and
their links followed, as Nix does: they are store paths, and this runs as the
build user, who may read them anyway.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from ... import fs
from .common import Attrs, BuiltinError, shown, warn

_SKIPPED = ("/propagated-build-inputs", "/nix-support", "/perllocal.pod", "/info/dir", "/log",
            "/manifest.nix", "/manifest.json")
_MISSING = (errno.ENOENT, errno.ENOTDIR)
#: priority of the first round of propagated packages (each one after it: +1)
PROPAGATED_PRIORITY = 1000


@dataclass(frozen=True)
class Package:
    path: str
    active: bool
    priority: int


def parse_packages(spec: str) -> list[Package]:
    tokens = spec.split()
    pkgs: list[Package] = []
    i = 0
    try:
        while i < len(tokens):
            active, priority, count = tokens[i] != "false", int(tokens[i + 1]), int(tokens[i + 2])
            i += 3
            if count < 0 or i + count > len(tokens):
                raise IndexError
            pkgs += [Package(p, active, priority) for p in tokens[i:i + count]]
            i += count
    except (IndexError, ValueError):
        raise BuiltinError("malformed 'derivations' attribute of builtin:buildenv (expected "
                           "groups of 'ACTIVE PRIORITY COUNT PATH…')") from None
    return pkgs


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Tree:
    """The environment being built: ``$out`` open as a directory fd, and the
    priority of every link made so far (by path relative to ``$out``)."""

    def __init__(self, out: str, out_fd: int) -> None:
        self.out = out
        self.out_fd = out_fd
        self.priorities: dict[str, int] = {}
        self.symlinks = 0

    def link(self, src_dir: str, dst_fd: int, rel: str, priority: int) -> None:
        """Link the entries of ``src_dir`` into the directory ``rel`` (open at ``dst_fd``)."""
        try:
            # directory order, not sorted: as Nix, so that of two conflicts the same
            # one is reported (and a warning before it is printed or not)
            names = os.listdir(src_dir)
        except OSError as e:
            raise BuiltinError(f"reading directory {shown(src_dir)}: {e.strerror}") from None
        for name in names:
            src = f"{src_dir}/{name}"
            if src.endswith(_SKIPPED):
                continue
            dst_rel = f"{rel}/{name}" if rel else name
            try:
                src_st = os.stat(src)
            except OSError as e:
                if e.errno in _MISSING:
                    warn(f"skipping dangling symlink '{self.out}/{dst_rel}'")
                    continue
                raise BuiltinError(f"getting status of {shown(src)}: {e.strerror}") from None
            dst_st = _lstat_at(name, dst_fd)
            if dst_st is not None:
                if stat.S_ISDIR(src_st.st_mode):
                    if stat.S_ISDIR(dst_st.st_mode):
                        self._into(name, dst_fd, [(src, priority)], dst_rel)
                        continue
                    if stat.S_ISLNK(dst_st.st_mode):
                        target = os.path.realpath(os.readlink(name, dir_fd=dst_fd))
                        try:
                            target_is_dir = stat.S_ISDIR(os.lstat(target).st_mode)
                        except OSError:
                            target_is_dir = False
                        if not target_is_dir:
                            raise BuiltinError(f"collision between '{shown(src)}' and "
                                               f"non-directory '{shown(target)}'")
                        os.unlink(name, dir_fd=dst_fd)
                        os.mkdir(name, 0o755, dir_fd=dst_fd)
                        self._into(name, dst_fd, [(target, self.priorities.get(dst_rel, 0)),
                                                  (src, priority)], dst_rel)
                        continue
                elif stat.S_ISLNK(dst_st.st_mode):
                    before = self.priorities.get(dst_rel, 0)
                    if before == priority:
                        raise BuiltinError(
                            f"packages '{shown(src)}' and "
                            f"'{shown(os.readlink(name, dir_fd=dst_fd))}' have the same priority {shown(priority)}; use "
                            "'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change "
                            "the priority of one of the conflicting packages (0 being the "
                            "highest priority)")
                    if before < priority:
                        continue
                    os.unlink(name, dir_fd=dst_fd)
                elif stat.S_ISDIR(dst_st.st_mode):
                    raise BuiltinError(f"collision between non-directory '{shown(src)}' and "
                                       f"directory '{shown(f'{self.out}/{dst_rel}')}'")
            os.symlink(src, name, dir_fd=dst_fd)
            self.priorities[dst_rel] = priority
            self.symlinks += 1

    def _into(self, name: str, dst_fd: int, sources: list[tuple[str, int]], rel: str) -> None:
        fd = fs.open_dir(name, dst_fd)
        try:
            for src, priority in sources:
                self.link(src, fd, rel, priority)
        finally:
            os.close(fd)


def _propagated(pkg: str) -> list[str]:
    try:
        with open(f"{pkg}/nix-support/propagated-user-env-packages", "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        if e.errno in _MISSING:
            return []
        raise BuiltinError(f"reading {shown(pkg + '/nix-support/propagated-user-env-packages')}: "
                           f"{e.strerror}") from None
    return [p for p in re.split("[ \n]", text) if p]


def build_env(out: str, packages: list[Package], manifest: str) -> int:
    """Make the environment at ``out``; returns the number of links made for packages."""
    try:
        os.mkdir(out, 0o777)
    except FileExistsError:
        pass
    out_fd = fs.open_dir(out)
    try:
        tree = _Tree(out, out_fd)
        done: set[str] = set()
        postponed: set[str] = set()

        def add(pkg: str, priority: int) -> None:
            if pkg in done:
                return
            done.add(pkg)
            tree.link(pkg, out_fd, "", priority)
            postponed.update(p for p in _propagated(pkg) if p not in done)

        for p in sorted(packages, key=lambda p: (p.priority, p.path)):
            if p.active:
                add(p.path, p.priority)
        priority = PROPAGATED_PRIORITY
        while postponed:
            round_, postponed = sorted(postponed), set()
            for pkg in round_:
                add(pkg, priority)
                priority += 1
        os.symlink(manifest, "manifest.nix", dir_fd=out_fd)
        return tree.symlinks
    finally:
        os.close(out_fd)


def run(attrs: Attrs) -> None:
    build_env(attrs.get("out"), parse_packages(attrs.get("derivations")), attrs.get("manifest"))
