"""After the builder: the outputs are checked, rewritten to their real paths and
registered.

Invariants:

* **Outputs are inspected only when nothing can change them**: the builder has
  exited, its process group and (with build users) every process of its uid
  have been killed (:meth:`~storekeeper.build.process.Run.collect`).  Then
  every output must exist; the outputs are checked together by
  ``canonicalise_paths`` (owned by the build user, no hard link to an inode
  outside them, also when building as the daemon's own user) before anything
  in them is changed; references are found by scanning each output's NAR for
  the hash parts of the input closure and of the outputs; fixed outputs must
  have their declared hash; outputs may not refer to each other in a cycle.
* **All outputs of a build are registered in one transaction** (deriver = the
  ``.drv``, ``ultimate``, NAR hash and size, references, content address for
  fixed outputs, a signature per ``secret-key-files`` key), or none is.  A failed build registers nothing (except, as in
  Nix 2.8, a fixed output with the wrong hash, which becomes valid under the
  path its actual content gives).
* ``--check`` compares the rebuilt outputs with the registered NAR hashes and
  keeps a differing copy at ``<out>.check`` with ``keep-failed``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from typing import Mapping

from .. import fs
from ..errors import StoreError
from ..formats.contentaddress import FLAT, RECURSIVE, ContentAddress
from ..formats.errors import FormatError
from ..formats.hashes import Hash, new_hasher
from ..formats.pathinfo import ValidPathInfo
from ..formats.refscan import RefScanner
from ..formats.storepath import StoreDir, StorePath
from ..fs import remove_tree
from ..fs.crash import crash_point
from ..fs.narfs import dump_path
from ..store.canonicalise import canonicalise_paths
from ..store.locks import PathLocks
from ..store.optimise import optimise_path
from ..store.signing import signed, signing_keys
from . import refgraph
from .attrs import AttrError, apply_checks, output_checks
from .goals import DrvGoal, GoalGraph
from .hooks import run_diff_hook
from .logger import BuildLogger
from .process import Run
from .results import BuildError, BuildMode, BuildResult, BuildStatus, Failure
from .rewrite import copy_rewritten, rewritten
from .settings import BuildSettings


def register_outputs(store, graph: GoalGraph, run: Run, settings: BuildSettings,
                     logger: BuildLogger) -> BuildResult:
    """Check the outputs of ``run``'s finished builder and register them (module
    docstring); raises :class:`~storekeeper.build.results.Failure` if they are rejected."""
    sd, g = store.store_dir, run.goal
    drv = g.drv
    assert drv is not None
    if os.path.lexists("/homeless-shelter"):
        raise Failure(BuildStatus.MISC_FAILURE, "home directory '/homeless-shelter' exists; "
                      "please remove it to assure purity of builds without sandboxing")
    scratch_reals = {name: store.real_path(run.scratch[name]) for name in sorted(g.outputs)}
    by_real = {real: name for name, real in scratch_reals.items()}

    def suspicious(shown: str, st: os.stat_result) -> None:
        # (Nix's test; canonicalise makes it again on the fd it then changes)
        name = by_real[shown]
        if (not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022) or \
                (run.user is not None and st.st_uid != run.user.uid):
            raise Failure(BuildStatus.OUTPUT_REJECTED,
                          f"suspicious ownership or permission on '{sd.print(run.scratch[name])}' "
                          f"for output '{name}'; rejecting this build output")

    sfd = fs.open_dir(store.real_store_dir)
    try:
        for name, real in scratch_reals.items():
            try:
                st = os.stat(run.scratch[name].base, dir_fd=sfd, follow_symlinks=False)
            except FileNotFoundError:
                raise Failure(BuildStatus.OUTPUT_REJECTED,
                              f"builder for '{sd.print(g.drv_path)}' failed to produce output path "
                              f"for output '{name}' at '{sd.print(run.scratch[name])}'") from None
            suspicious(real, st)
    finally:
        os.close(sfd)
    try:
        canonicalise_paths(list(scratch_reals.values()),
                           from_uid=run.user.uid if run.user is not None else None,
                           check_links=True, top_check=suspicious)
    except StoreError as e:
        raise Failure(BuildStatus.OUTPUT_REJECTED, str(e)) from None
    except FileNotFoundError as e:  # (gone since: only a racing writer does that)
        raise Failure(BuildStatus.OUTPUT_REJECTED, f"output '{e.filename}' vanished while it "
                      "was checked; rejecting this build output") from None

    # scratch hash part -> real one, in every output's bytes
    rewrites = {run.scratch[o].hash_part.encode(): g.outputs[o].hash_part.encode()
                for o in g.outputs if run.scratch[o] != g.outputs[o]}
    if g.mode == BuildMode.CHECK:
        check_outputs(store, run, rewrites, settings, logger)
        return graph.valid_result(g, BuildStatus.BUILT)

    new = {o: p for o, p in g.outputs.items() if not store.is_valid(p)}
    for name, path in new.items():
        if run.scratch[name] != path or rewrites:
            # Produce the final content: rewritten from the scratch copy
            # (or in place, through a temp sibling), then made canonical.
            src = scratch_reals[name]
            dest = store.real_path(path)
            tmp = dest + ".rewrite" if src == dest else dest
            copy_rewritten(src, tmp, rewrites)
            if tmp != dest:
                remove_tree(dest)
                _rename_in_store(store, tmp, dest)
            canonicalise_paths([dest])
            crash_point("build.output")

    candidates: dict[str, StorePath] = {p.hash_part: p for p in graph.input_closure(g)}
    candidates.update({p.hash_part: p for p in g.outputs.values()})
    infos: dict[str, ValidPathInfo] = {}
    refs_by_out: dict[str, set[StorePath]] = {}
    now = int(time.time())
    mismatch: str | None = None
    for name, path in sorted(new.items()):
        real = store.real_path(path)
        nar_hash, nar_size, found = _scan(real, candidates)
        refs = {candidates[h] for h in found}
        refs_by_out[name] = refs
        info = ValidPathInfo(path, nar_hash, nar_size, frozenset(refs), g.drv_path,
                             registration_time=now, ultimate=True)
        o = drv.outputs[name]
        if o.is_fixed:
            info, mismatch = check_fixed(store, g, name, info, real)
        infos[name] = info
    check_cycles(sd, g, refs_by_out)
    check_reference_rules(store, g, infos)
    try:
        keys = signing_keys(store.settings)
    except StoreError as e:
        raise Failure(BuildStatus.MISC_FAILURE, str(e)) from None
    infos = {name: signed(sd, info, keys) for name, info in infos.items()}
    _auto_optimise(store, [i.path for i in infos.values()])
    crash_point("build.moved")
    store.register_valid_paths(infos.values())
    crash_point("build.registered")
    if mismatch:
        raise Failure(BuildStatus.OUTPUT_REJECTED, mismatch)
    return graph.valid_result(g, BuildStatus.BUILT)


def check_fixed(store, g: DrvGoal, name: str, info: ValidPathInfo,
                real: str) -> tuple[ValidPathInfo, str | None]:
    """Fixed output: no references, content hash as declared.  On a mismatch the
    content is registered where its real hash puts it (Nix 2.8 does that too)."""
    sd = store.store_dir
    o = g.drv.outputs[name]  # type: ignore[union-attr]
    printed = sd.print(g.drv_path)
    if info.references - {info.path}:
        raise Failure(BuildStatus.OUTPUT_REJECTED,
                      f"illegal path references in fixed-output derivation '{printed}'")
    wanted = o.fixed_hash()
    if o.recursive:
        got = _nar_hash(real, wanted.algo)
        method = RECURSIVE
    else:
        got = _flat_hash(real, wanted.algo, f"output path '{sd.print(info.path)}' should be a "
                         "non-executable regular file since recursive hashing is not enabled "
                         "(outputHashMode=flat)")
        method = FLAT
    ca = ContentAddress(method, got)
    info = info.with_(references=frozenset(), ca=ca.render())
    if got == wanted:
        return info, None
    msg = (f"hash mismatch in fixed-output derivation '{printed}':\n"
           f"  specified: {wanted.sri}\n     got:    {got.sri}")
    actual = ca.store_path(sd, info.path.name)
    store.pin(actual)
    if store.is_valid(actual):
        remove_tree(real)
        return info.with_(path=actual), msg  # re-registering it changes nothing
    with PathLocks() as locks:
        locks.lock([store.real_path(actual)])
        remove_tree(store.real_path(actual))
        _rename_in_store(store, real, store.real_path(actual))
        locks.delete_on_release = True
    return info.with_(path=actual), msg


def check_cycles(sd: StoreDir, g: DrvGoal, refs_by_out: dict[str, set[StorePath]]) -> None:
    """Outputs may refer to each other, but not in a cycle (Nix's message).  As in Nix,
    a cycle fails the whole request (:class:`BuildError`), not just this build."""
    by_path = {p: o for o, p in g.outputs.items()}
    state: dict[str, int] = {}

    def visit(name: str, parent: str | None) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise BuildError(f"cycle detected in build of '{sd.print(g.drv_path)}' in the "
                             f"references of output '{name}' from output '{parent}'")
        state[name] = 1
        for ref in sorted(refs_by_out.get(name, ())):
            other = by_path.get(ref)
            if other is not None and other != name:
                visit(other, name)
        state[name] = 2

    for name in sorted(refs_by_out):
        visit(name, None)


def check_reference_rules(store, g: DrvGoal, infos: dict[str, ValidPathInfo]) -> None:
    """Each output against its checks (:func:`.attrs.output_checks`): ``outputChecks.<name>``
    when structured (with ``maxSize``, ``maxClosureSize``), else the derivation-wide
    ``allowedReferences`` & co.; paths or output names, against each output's references
    (or its closure, for the ``*Requisites`` forms)."""
    sd = store.store_dir
    new = {i.path: i for i in infos.values()}

    def info_of(p: StorePath) -> ValidPathInfo:
        return new[p] if p in new else store.path_info(p)

    def resolve(item: str) -> str | None:
        if item in g.outputs:
            return sd.print(g.outputs[item])
        try:
            return sd.print(sd.parse(item, lax=True))
        except FormatError:
            return None

    for name, info in sorted(infos.items()):
        def closure(info: ValidPathInfo = info) -> tuple[set[str], int]:
            paths = refgraph.closure([info.path], info_of)
            return {sd.print(p) for p in paths}, sum(info_of(p).nar_size for p in paths)

        try:
            checks = output_checks(g.parsed_attrs(sd), name)
            if checks is not None:
                apply_checks(checks, sd.print(info.path), info.nar_size,
                             [sd.print(r) for r in info.references], closure, resolve)
        except AttrError as e:
            raise Failure(BuildStatus.OUTPUT_REJECTED, str(e)) from None


def check_outputs(store, run: Run, rewrites: dict[bytes, bytes], settings: BuildSettings,
                  logger: BuildLogger) -> None:
    """--check: the rebuilt outputs must have the registered NAR hashes.  A differing
    copy is kept at ``<out>.check`` with ``keep-failed`` or ``run-diff-hook`` (and
    handed to the ``diff-hook``: :mod:`.hooks`), as Nix does."""
    sd, g = store.store_dir, run.goal
    printed = sd.print(g.drv_path)
    for name in sorted(g.outputs):
        path = g.outputs[name]
        info = store.path_info(path)
        src = store.real_path(run.scratch[name])
        h = new_hasher(info.nar_hash.algo)
        for chunk in rewritten(dump_path(src), rewrites):
            h.update(chunk)
        if h.digest() == info.nar_hash.digest:
            continue
        msg = f"derivation '{printed}' may not be deterministic: output '{sd.print(path)}' differs"
        if settings.keep_failed or settings.run_diff_hook:
            check = store.real_path(path) + ".check"
            remove_tree(check)
            copy_rewritten(src, check, rewrites)
            canonicalise_paths([check])
            if settings.run_diff_hook and settings.diff_hook:
                user = run.user
                run_diff_hook(settings.diff_hook, logger,
                              [store.real_path(path), check, printed, run.tmpdir],
                              user.uid if user is not None else None,
                              user.gid if user is not None else None)
            msg += f" from '{sd.print(path)}.check'"
        raise Failure(BuildStatus.NOT_DETERMINISTIC, msg)


def _auto_optimise(store, paths: list[StorePath]) -> None:
    """``auto-optimise-store``: new outputs join the ``.links`` pool before registration."""
    if not getattr(store.settings, "auto_optimise_store", False):
        return
    hook = getattr(store, "_auto_optimise", None)
    if hook is None:
        hook = lambda sp: optimise_path(store, sp)  # noqa: E731
    for sp in paths:
        hook(sp)


def _scan(real: str, candidates: Mapping[str, StorePath]) -> tuple[Hash, int, set[str]]:
    """NAR hash, NAR size and the candidate hash parts found, in one pass."""
    h = hashlib.sha256()
    scanner = RefScanner(candidates.keys())
    size = 0
    for chunk in dump_path(real):
        h.update(chunk)
        scanner.feed(chunk)
        size += len(chunk)
    return Hash("sha256", h.digest()), size, scanner.found


def _nar_hash(real: str, algo: str) -> Hash:
    h = new_hasher(algo)
    for chunk in dump_path(real):
        h.update(chunk)
    return Hash(algo, h.digest())


def _flat_hash(real: str, algo: str, refusal: str) -> Hash:
    """The hash of the regular, non-executable file at ``real``: checked and read on
    one ``O_NOFOLLOW`` fd (a symlink swapped in is refused, never followed).

    A process the builder left behind may swap the name for a hard link to another
    file and back while we look: the hashed inode must still be the one at ``real``
    afterwards and have no other link, else the output is refused without a hash
    (which would tell the content of a file outside the output)."""
    pfd, name = fs.split_top(real)
    try:
        try:
            fd = os.open(name, fs.O_FILE, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
                raise Failure(BuildStatus.OUTPUT_REJECTED, refusal) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o100:
                raise Failure(BuildStatus.OUTPUT_REJECTED, refusal)
            h = new_hasher(algo)
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            after = os.fstat(fd)
            try:
                now = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if (after.st_nlink != 1 or now is None
                    or (now.st_dev, now.st_ino) != (after.st_dev, after.st_ino)):
                raise Failure(BuildStatus.OUTPUT_REJECTED,
                              f"output path '{real}' was changed or linked elsewhere while it "
                              "was being checked")
            return Hash(algo, h.digest())
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def _rename_in_store(store, src: str, dest: str) -> None:
    """Rename an entry of the real store dir to another name there, relative to one
    fd of the store dir (no path above it is looked up again)."""
    for p in (src, dest):
        assert os.path.dirname(p) == os.path.normpath(store.real_store_dir), p
    sfd = fs.open_dir(store.real_store_dir)
    try:
        os.rename(os.path.basename(src), os.path.basename(dest), src_dir_fd=sfd, dst_dir_fd=sfd)
    finally:
        os.close(sfd)
