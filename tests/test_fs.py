"""The file-system layer: the one walker and the one deleter, and every consumer of them
facing a directory swapped for a symlink at the worst moment (after its parent was
listed, before it is opened)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storekeeper import fs
from storekeeper.formats.url import LocalLayout
from storekeeper.fs import walker as walk_mod
from storekeeper.fs.narfs import TreeError, dump_path
from storekeeper.store import locks
from storekeeper.store.canonicalise import CanonicaliseError, canonicalise_paths
from storekeeper.store.gc.inspect import _lstats
from storekeeper.store.local import LocalStore
from storekeeper.store.locks import PathLocks
from storekeeper.store.roots import RootFinder
from storekeeper.store.verify import _first_uncanonical


def make_tree(top: str, spec: dict) -> None:
    os.mkdir(top)
    for name, v in spec.items():
        p = os.path.join(top, name)
        if isinstance(v, dict):
            make_tree(p, v)
        elif isinstance(v, tuple):  # ("link", target)
            os.symlink(v[1], p)
        else:
            with open(p, "wb") as f:
                f.write(v)


@pytest.fixture
def victim(tmp_path):
    """A directory the walk must never reach, with a file whose mode must not change."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "secret").write_bytes(b"secret")
    os.chmod(d / "secret", 0o600)
    os.chmod(d, 0o700)
    yield str(d)
    assert (d / "secret").read_bytes() == b"secret"
    st_ = os.stat(d / "secret")
    assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_mtime != 1
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


@pytest.fixture
def swap_after_listing(monkeypatch):
    """swap(parent, name, target): right after the walker lists ``parent``, replace
    ``parent/name`` (a directory) with a symlink to ``target``."""
    plan: dict[tuple[int, int], tuple[str, str]] = {}
    done: list[str] = []
    real_list = walk_mod._list

    def hooked(fd, sort):
        entries = real_list(fd, sort)
        st_ = os.fstat(fd)
        if (st_.st_dev, st_.st_ino) in plan:
            path, target = plan.pop((st_.st_dev, st_.st_ino))
            os.rename(path, path + ".moved")
            os.symlink(target, path)
            done.append(path)
        return entries

    monkeypatch.setattr(walk_mod, "_list", hooked)

    def swap(parent: str, name: str, target: str) -> list[str]:
        st_ = os.stat(parent)
        plan[(st_.st_dev, st_.st_ino)] = (os.path.join(parent, name), target)
        return done
    return swap


TREE = {"a": b"file a", "sub": {"x": b"x", "deeper": {"y": b"y"}}, "z": b"zzz"}


def test_walk_events_and_orders(tmp_path):
    top = str(tmp_path / "t")
    make_tree(top, {"b": b"1", "a": {"c": b"2"}, "l": ("link", "/nonexistent"), "\xe9": b"3"})
    events = [(ev, n.path, n.kind) for ev, n in fs.walk(top, sort=True)]
    assert events == [(fs.ENTER, "", fs.DIR), (fs.ENTER, "a", fs.DIR), (fs.ENTRY, "a/c", fs.REG),
                      (fs.LEAVE, "a", fs.DIR), (fs.ENTRY, "b", fs.REG), (fs.ENTRY, "l", fs.LNK),
                      (fs.ENTRY, "\xe9", fs.REG), (fs.LEAVE, "", fs.DIR)]
    # unsorted: a directory's files before its subdirectories
    kinds = [n.kind for ev, n in fs.walk(top) if ev != fs.LEAVE and n.depth == 1]
    assert kinds == sorted(kinds, key=lambda k: k == fs.DIR)
    # a file top, a symlink top (never followed), a missing top
    assert [(ev, n.kind) for ev, n in fs.walk(os.path.join(top, "b"))] == [(fs.ENTRY, fs.REG)]
    assert [(ev, n.kind) for ev, n in fs.walk(os.path.join(top, "l"))] == [(fs.ENTRY, fs.LNK)]
    with pytest.raises(FileNotFoundError):
        list(fs.walk(os.path.join(top, "missing")))


def test_walk_prune_and_on_error(tmp_path):
    top = str(tmp_path / "t")
    make_tree(top, {"skip": {"inner": b"x"}, "keep": {"inner": b"y"}})
    seen = []
    for ev, n in fs.walk(top, sort=True):
        if ev == fs.ENTER and n.path == "skip":
            n.prune = True
        if ev == fs.ENTRY:
            seen.append(n.path)
    assert seen == ["keep/inner"]
    errors = []
    gen = fs.walk(top, sort=True, on_error=lambda n, e: errors.append((n.path, e.errno)))
    for ev, n in gen:
        if ev == fs.ENTER and n.path == "":
            os.chmod(os.path.join(top, "keep"), 0)
    if os.geteuid() != 0:  # root reads a 0000 directory anyway
        assert errors and errors[0][0] == "keep"


@given(st.recursive(st.binary(max_size=8), lambda kids: st.dictionaries(
    st.text(alphabet="abcxyz", min_size=1, max_size=3), kids, max_size=4), max_leaves=12))
@settings(max_examples=40, deadline=None)
def test_remove_tree_removes_read_only_trees_and_counts_bytes(tmp_path_factory, spec):
    base = tmp_path_factory.mktemp("rm")
    top = str(base / "t")
    if isinstance(spec, dict):
        make_tree(top, spec)
    else:
        with open(top, "wb") as f:
            f.write(spec)
    size = sum(n.lstat().st_size for ev, n in fs.walk(top) if ev == fs.ENTRY)
    for ev, n in fs.walk(top):  # store-like modes: nothing writable
        if ev != fs.LEAVE:
            os.chmod(fs.proc_fd(n.fd) if n.fd is not None else os.path.join(top, n.path) if n.path else top,
                     0o555 if n.kind == fs.DIR else 0o444)
    assert fs.remove_tree(top) == size
    assert not os.path.lexists(top)
    assert fs.remove_tree(top) == 0  # a missing tree is fine


def test_remove_tree_of_an_unreadable_directory(tmp_path):
    top = str(tmp_path / "t")
    make_tree(top, {"d": {"f": b"x"}})
    os.chmod(os.path.join(top, "d"), 0)
    os.chmod(top, 0o111)
    fs.remove_tree(top)
    assert not os.path.lexists(top)


def test_remove_tree_never_follows_a_symlink_swapped_in(tmp_path, victim, swap_after_listing):
    top = str(tmp_path / "t")
    make_tree(top, TREE)
    done = swap_after_listing(top, "sub", victim)
    fs.remove_tree(top)
    assert done and not os.path.lexists(top)


def test_remove_tree_takes_entries_added_while_it_walks(tmp_path, monkeypatch):
    top = str(tmp_path / "t")
    make_tree(top, {"d": {"f": b"x"}})
    real_list = walk_mod._list
    added = []

    def hooked(fd, sort):
        entries = real_list(fd, sort)
        if not added:
            os.mkdir(os.path.join(top, "late"))
            open(os.path.join(top, "late", "g"), "w").close()
            added.append(1)
        return entries
    monkeypatch.setattr(walk_mod, "_list", hooked)
    fs.remove_tree(top)
    assert added and not os.path.lexists(top)


def test_canonicalise_never_follows_a_symlink_swapped_in(tmp_path, victim, swap_after_listing):
    top = str(tmp_path / "t")
    make_tree(top, TREE)
    done = swap_after_listing(top, "sub", victim)
    canonicalise_paths([top])
    assert done and os.path.islink(os.path.join(top, "sub"))
    assert os.lstat(os.path.join(top, "sub")).st_mtime == 1


def test_canonicalise_refuses_a_hard_link_added_after_the_check(tmp_path, monkeypatch):
    """Issue 11, attack 4 in-process: a link to an outside file appears in a
    world-writable output directory between the check pass and the change pass."""
    victim = tmp_path / "shadow"
    victim.write_bytes(b"secret")
    os.chmod(victim, 0o600)
    top = str(tmp_path / "out")
    make_tree(top, {"pub": {"f": b"x"}, "g": b"y"})
    os.chmod(os.path.join(top, "pub"), 0o777)
    from storekeeper.store import canonicalise
    real_check = canonicalise._check_tree

    def check_then_race(p, w):
        real_check(p, w)
        os.link(victim, os.path.join(top, "pub", "planted"))
    monkeypatch.setattr(canonicalise, "_check_tree", check_then_race)
    with pytest.raises(CanonicaliseError, match="hard link to a file outside"):
        canonicalise_paths([top], check_links=True)
    st_ = os.stat(victim)
    assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_mtime != 1


def test_nar_dump_never_follows_a_symlink_swapped_in(tmp_path, victim, swap_after_listing):
    top = str(tmp_path / "t")
    make_tree(top, TREE)
    done = swap_after_listing(top, "sub", victim)
    try:
        nar = b"".join(dump_path(top))
    except (TreeError, OSError):
        return  # refusing is fine too; following is not
    assert done and b"secret" not in nar and victim.encode() in nar  # the link, as a link


def test_sizes_and_uncanonical_scan_never_follow_a_symlink_swapped_in(tmp_path, victim, swap_after_listing):
    top = str(tmp_path / "t")
    make_tree(top, TREE)
    inode = os.stat(os.path.join(victim, "secret")).st_ino
    swap_after_listing(top, "sub", victim)
    assert inode not in {s.st_ino for s in _lstats(top)}
    make_tree(str(tmp_path / "u"), TREE)
    canonicalise_paths([str(tmp_path / "u")])
    swap_after_listing(str(tmp_path / "u"), "sub", victim)
    assert "secret" not in (_first_uncanonical(str(tmp_path / "u")) or "")


def test_roots_scan_never_follows_a_symlink_swapped_in(tmp_path, swap_after_listing):
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        info = store.add_text("kept.txt", b"kept")
        outside = tmp_path / "outside"
        outside.mkdir()
        os.symlink(store.print_path(info.path), outside / "r")  # a root, if it were followed
        user_dir = os.path.join(store.state_dir, "gcroots", "per-user", "someone")
        os.makedirs(os.path.join(user_dir, "sub"))
        swap_after_listing(user_dir, "sub", str(outside))
        roots = list(RootFinder(store.store_dir, store.real_store_dir, store.state_dir).permanent_roots())
        assert not any(r.path == info.path for r in roots)
    finally:
        store.close()


# --- lock squatting (issue 11, attack 8, in-process) --------------------------------------

def test_path_locks_remove_a_directory_or_symlink_squatting_the_lock_name(tmp_path):
    target = str(tmp_path / "abc-path")
    os.mkdir(target + ".lock")
    open(os.path.join(target + ".lock", "inner"), "w").close()
    with PathLocks() as pl:
        assert pl.lock([target])
        assert os.path.isfile(target + ".lock")
        pl.delete_on_release = True
    outside = tmp_path / "outside"
    outside.write_text("keep")
    os.symlink(outside, target + ".lock")
    with PathLocks() as pl:
        assert pl.lock([target])
        assert not os.path.islink(target + ".lock")
    assert outside.read_text() == "keep"


def test_path_locks_unlink_a_leftover_non_empty_lock_file(tmp_path, monkeypatch):
    target = str(tmp_path / "abc-path")
    with open(target + ".lock", "w") as f:
        f.write("d")  # no owner will ever unlink it for us
    result = []
    t = threading.Thread(target=lambda: result.append(PathLocks().lock([target])), daemon=True)
    t.start()
    t.join(10)
    assert result == [True], "the lock loop spun on a leftover lock file"


def test_path_locks_give_up_on_a_lock_name_that_keeps_being_replaced(tmp_path, monkeypatch):
    target = str(tmp_path / "abc-path")
    real_open = os.open

    def always_a_dir(path, flags, mode=0o777, *, dir_fd=None):
        if str(path).endswith(".lock"):
            os.makedirs(path, exist_ok=True)
        return real_open(path, flags, mode, dir_fd=dir_fd)
    monkeypatch.setattr(locks.os, "open", always_a_dir)
    with pytest.raises(locks.StoreError, match="keeps replacing it"):
        PathLocks().lock([target])


def _gnu_du(*paths: str) -> int:
    """GNU du's allocated bytes (each inode once, symlinks not followed)."""
    import subprocess
    out = subprocess.run(["du", "-s", "-c", "-B1", *paths], capture_output=True, text=True,
                         check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def _total(u: fs.Usage) -> int:
    return u[0] + sum(b for _, _, b in u[1])


def test_usage_counts_blocks_like_gnu_du_and_each_inode_once(tmp_path, victim):
    from storekeeper.fs.du import usage
    top = str(tmp_path / "t")
    make_tree(top, {"a": b"a" * 10000, "sub": {"big": os.urandom(70000), "deeper": {"y": b"y"}},
                    "out": ("link", victim), "rel": ("link", "a")})
    os.link(os.path.join(top, "sub", "big"), os.path.join(top, "big2"))  # linked twice inside
    os.link(os.path.join(top, "a"), str(tmp_path / "a-outside"))  # and a link from outside
    dfd = fs.open_dir(str(tmp_path))
    try:
        own, shared = usage("t", dfd)
        assert own + sum(b for _, _, b in shared) == _gnu_du(top)  # victim never counted
        assert len(shared) == 2 and len({(d, i) for d, i, _ in shared}) == 2
        a = os.stat(os.path.join(top, "a"))
        assert (a.st_dev, a.st_ino, a.st_blocks * 512) in shared
        # a single file or link is a tree of one entry; a missing name measures nothing
        assert _total(usage("a-outside", dfd)) == a.st_blocks * 512
        assert usage("missing", dfd) == (0, ())
    finally:
        os.close(dfd)


def test_usages_in_two_processes_equal_one(tmp_path, monkeypatch):
    from storekeeper.fs import du as usage_mod
    names = []
    for k in range(7):
        name = f"p{k}"
        make_tree(str(tmp_path / name), {"f": os.urandom(5000 * k), "d": {"g": b"g" * (k * 9000)}})
        names.append(name)
    (tmp_path / "single").write_bytes(b"s" * 20000)
    names += ["single", "gone"]
    dfd = fs.open_dir(str(tmp_path))
    try:
        one = fs.usages(names, dfd)
        monkeypatch.setattr(usage_mod, "PARALLEL_MIN", 1)
        for n in (2, 3):
            assert fs.usages(names, dfd, processes=n) == one
    finally:
        os.close(dfd)
    assert [_total(u) for u in one[:-1]] == [_gnu_du(str(tmp_path / n)) for n in names[:-1]]
    assert one[-1] == (0, ())


def test_usage_never_follows_a_symlink_swapped_in(tmp_path, victim, monkeypatch):
    from storekeeper.fs import du as usage_mod
    top = str(tmp_path / "t")
    make_tree(top, TREE)
    real_scan = usage_mod._scan
    done = []

    def hooked(fd, shared):
        out = real_scan(fd, shared)
        if not done and "sub" in out[1]:  # `sub` listed as a directory: now make it a link
            os.rename(os.path.join(top, "sub"), os.path.join(top, "sub.moved"))
            os.symlink(victim, os.path.join(top, "sub"))
            done.append(1)
        return out
    monkeypatch.setattr(usage_mod, "_scan", hooked)
    dfd = fs.open_dir(str(tmp_path))
    try:
        own, shared = usage_mod.usage("t", dfd)
    finally:
        os.close(dfd)
    assert done and not shared
    # the top, `a`, `z` and the lstat of `sub` as it was listed; nothing of the victim
    blocks = lambda p: os.lstat(os.path.join(top, p)).st_blocks * 512  # noqa: E731
    assert own == (_gnu_du(top) - _gnu_du(os.path.join(top, "sub.moved")) - blocks("sub")
                   + blocks("sub.moved"))


def test_readable_waits_on_fds_past_selects_limit():
    """select() refuses fd numbers >= 1024; builds and the daemon wait with poll."""
    import resource

    from storekeeper.fs.waiting import readable
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1600:
        pytest.skip("fd limit too low for an fd numbered 1500")
    if soft < 1600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1600, hard))  # this process only
    r, w = os.pipe()
    high = os.dup2(r, 1500)
    try:
        assert readable([high], 0.01) == []  # nothing yet: a timeout, not an error
        os.write(w, b"x")
        assert readable([high, r], 1.0) == [high, r]
        os.close(w)
        w = -1
        os.read(high, 1)
        assert readable([high], 1.0) == [high]  # at its end: readable, as with select
    finally:
        for fd in (r, high, w):
            if fd >= 0:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_dirs_batches_each_directory_and_never_follows_a_swapped_subdirectory(tmp_path, victim):
    top = str(tmp_path / "t")
    make_tree(top, {**TREE, "l": ("link", victim), "other": {"w": b"w"}})
    dfd = fs.open_dir(str(tmp_path))
    try:
        got = {rel: sorted((n, k) for n, _, k in files) for _, rel, files in fs.dirs("t", dfd)}
        assert got == {"": [("a", fs.REG), ("l", fs.LNK), ("z", fs.REG)], "sub": [("x", fs.REG)],
                       "sub/deeper": [("y", fs.REG)], "other": [("w", fs.REG)]}
        # d_ino comes with each entry
        for fd, _rel, files in fs.dirs("t", dfd):
            for name, ino, _ in files:
                assert os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino == ino
        # `sub` listed as a directory, then swapped for a link to the victim: reported, not followed
        seen = []
        for _, rel, files in fs.dirs("t", dfd):
            seen.append((rel, sorted((n, k) for n, _, k in files)))
            if len(seen) == 1:
                os.rename(os.path.join(top, "sub"), os.path.join(top, "sub.moved"))
                os.symlink(victim, os.path.join(top, "sub"))
        assert ("", [("sub", fs.SWAPPED)]) in seen
        assert [rel for rel, _ in seen if rel not in ("",)] == ["other"]
        # a top that is not a directory; a missing top
        assert list(fs.dirs("t/a", dfd)) == [(dfd, "", [("t/a", 0, fs.SWAPPED)])]
        with pytest.raises(FileNotFoundError):
            list(fs.dirs("t/missing", dfd))
    finally:
        os.close(dfd)


def _atime_updated_by_a_plain_read(path: str) -> bool:
    """Whether this mount updates atime on a read of a file whose atime is older than
    its ctime (relatime, strictatime: yes; noatime: no)."""
    os.utime(path, ns=(10**9, os.stat(path).st_mtime_ns))
    with open(path, "rb") as f:
        f.read()
    return os.stat(path).st_atime_ns != 10**9


def test_open_noatime_leaves_atime_alone(tmp_path):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    if not _atime_updated_by_a_plain_read(path):
        pytest.skip("this mount does not update atime on reads (noatime)")
    mtime = os.stat(path).st_mtime_ns
    os.utime(path, ns=(10**9, mtime))
    dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = fs.open_noatime("f", fs.O_FILE, dfd)
        try:
            assert os.read(fd, 200) == b"x" * 100
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    assert os.stat(path).st_atime_ns == 10**9


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_open_noatime_falls_back_for_a_file_that_is_not_ours(tmp_path):
    # O_NOATIME is only for the file's owner (or CAP_FOWNER): someone else reading a
    # world-readable file must still get it, just without the flag.
    import pwd
    import shutil
    import tempfile
    nobody = pwd.getpwnam("nobody").pw_uid
    top = tempfile.mkdtemp()  # pytest's tmp_path is under a 0700 directory
    os.chmod(top, 0o755)
    try:
        _noatime_as(nobody, os.path.join(top, "f"))
    finally:
        shutil.rmtree(top)


def _noatime_as(uid: int, path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"theirs")
    os.chmod(path, 0o644)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                os.close(os.open(path, fs.O_FILE | fs.O_NOATIME))
                plain = b"opened"
            except PermissionError:
                plain = b"eperm"
            fd = fs.open_noatime(path, fs.O_FILE)
            os.write(w, plain + b" " + os.read(fd, 100))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 200)
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out == b"eperm theirs"
