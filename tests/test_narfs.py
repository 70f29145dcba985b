"""File trees <-> NAR on a real filesystem, with real Nix as the oracle for dumps."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest
from conftest import needs_nix, nix_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_nar import MALFORMED, TV2, TV2_SHA256, dir_trees, nested, trees

from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import (
    MAX_DEPTH,
    Directory,
    NarError,
    Regular,
    Symlink,
    dump_node,
    nar_str,
)
from storekeeper.fs import remove_tree
from storekeeper.fs.narfs import (
    CHUNK_SIZE,
    TreeError,
    copy_tree_hashing,
    dump_path,
    dump_path_views,
    nar_hash_path,
    restore_nar,
)


def write_tree(path: bytes, node) -> None:
    """Put an in-memory tree on disk, independently of restore_nar."""
    if isinstance(node, Regular):
        with open(path, "wb") as f:
            f.write(node.contents)
        os.chmod(path, 0o755 if node.executable else 0o644)
    elif isinstance(node, Symlink):
        os.symlink(node.target, path)
    else:
        os.mkdir(path)
        for name, child in node.entries.items():
            write_tree(path + b"/" + name, child)


def dumped(path) -> bytes:
    return b"".join(dump_path(path))


@pytest.fixture
def tmp(tmp_path) -> bytes:
    return os.fsencode(tmp_path)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# hypothesis runs many examples per test call, so it gets fresh directories
# under one session-wide base rather than the function-scoped tmp_path.
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("narfs"))


def fresh(base: str) -> bytes:
    return os.fsencode(tempfile.mkdtemp(dir=base))


# --- golden vector on disk ------------------------------------------------------


def test_tv2_dir1_on_disk(tmp):
    d = tmp + b"/dir1"
    os.mkdir(d)
    for name, data, mode in [(b"Z", b"B", 0o644), (b"hello", b"hello\n", 0o644),
                             (b"run.sh", b"#!/bin/sh\necho hi\n", 0o755)]:
        with open(d + b"/" + name, "wb") as f:
            f.write(data)
        os.chmod(d + b"/" + name, mode)
    os.symlink(b"hello", d + b"/link")
    os.mkdir(d + b"/sub")
    open(d + b"/sub/e", "wb").close()

    nar = dumped(d)
    assert len(nar) == 1264 and hashlib.sha256(nar).hexdigest() == TV2_SHA256
    assert nar == dump_node(TV2)
    h, size = nar_hash_path(d)
    assert (h.base16, size) == (TV2_SHA256, 1264)
    h, size = copy_tree_hashing(d, tmp + b"/copy")
    assert (h.base16, size) == (TV2_SHA256, 1264)
    assert dumped(tmp + b"/copy") == nar
    assert nar_hash_path(d, "sha1")[0].base16 == "50837f93e20545dabad68b10d19004ed6f5457c6"


def test_single_file_and_symlink_roots(tmp):
    write_tree(tmp + b"/f", Regular(True, b"x"))
    assert dumped(tmp + b"/f") == dump_node(Regular(True, b"x"))
    # A symlink root is dumped as the link, never followed.
    os.symlink(tmp + b"/f", tmp + b"/l")
    assert dumped(tmp + b"/l") == dump_node(Symlink(tmp + b"/f"))
    os.mkdir(tmp + b"/d")
    os.symlink(b"../d", tmp + b"/d/up")
    assert dumped(tmp + b"/d") == dump_node(Directory({b"up": Symlink(b"../d")}))


def test_only_owner_exec_bit_counts(tmp):
    for name, mode in [(b"u", 0o744), (b"g", 0o654), (b"o", 0o645), (b"ro", 0o500)]:
        write_tree(tmp + b"/" + name, Regular(False, b"data"))
        os.chmod(tmp + b"/" + name, mode)
        assert dumped(tmp + b"/" + name) == dump_node(Regular(bool(mode & 0o100), b"data"))


def test_entries_sorted_by_raw_bytes(tmp):
    tree = Directory({b"\xc3\xa9": Regular(False, b"1"), b"\x80x": Regular(False, b"2"),
                      b"Z": Regular(False, b""), b"hello": Regular(False, b"")})
    write_tree(tmp + b"/d", tree)
    assert dumped(tmp + b"/d") == dump_node(tree)
    assert dumped(os.fsdecode(tmp + b"/d")) == dump_node(tree)  # str paths too


# --- hypothesis: memory <-> disk --------------------------------------------------

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])


@settings(max_examples=60, **SLOW)
@given(node=trees)
def test_disk_dump_equals_model_and_restore_is_identity(base, node):
    root = fresh(base)
    write_tree(root + b"/t", node)
    nar = dump_node(node)
    assert dumped(root + b"/t") == nar
    for size in (7, 4096, 1 << 20):  # views of one buffer: each taken before the next
        assert b"".join(bytes(v) for v in dump_path_views(root + b"/t", size)) == nar
    assert nar_hash_path(root + b"/t") == (Hash.of("sha256", nar), len(nar))

    stream = io.BytesIO(nar + b"trailing")
    restore_nar(stream, root + b"/r")
    assert stream.tell() == len(nar)
    assert dumped(root + b"/r") == nar

    assert copy_tree_hashing(root + b"/t", root + b"/c") == (Hash.of("sha256", nar), len(nar))
    assert dumped(root + b"/c") == nar
    remove_tree(root)
    assert not os.path.lexists(root)


@pytest.mark.nix
@needs_nix
@settings(max_examples=25, **SLOW)
@given(node=st.one_of(dir_trees, trees))
def test_dump_matches_nix_store_dump(base, node):
    root = fresh(base)
    write_tree(root + b"/t", node)
    env = nix_env(os.fsdecode(root))
    env["NIX_STORE_DIR"] = os.path.join(os.fsdecode(root), "store")
    env.pop("NIX_REMOTE")  # --dump needs no store at all
    theirs = subprocess.run(["nix-store", "--dump", root + b"/t"], env=env, capture_output=True,
                            check=True, timeout=60).stdout
    assert dumped(root + b"/t") == theirs == dump_node(node)
    remove_tree(root)


@pytest.mark.nix
@needs_nix
def test_big_file_matches_nix_store_dump(tmp):
    data = os.urandom(CHUNK_SIZE) * 3 + b"tail"
    tree = Directory({b"big": Regular(True, data), b"small": Regular(False, b"s")})
    write_tree(tmp + b"/t", tree)
    env = nix_env(os.fsdecode(tmp))
    env["NIX_STORE_DIR"] = os.path.join(os.fsdecode(tmp), "store")
    env.pop("NIX_REMOTE")
    theirs = subprocess.run(["nix-store", "--dump", tmp + b"/t"], env=env, capture_output=True,
                            check=True, timeout=60).stdout
    chunks = list(dump_path(tmp + b"/t"))
    assert b"".join(chunks) == theirs
    assert max(map(len, chunks)) <= CHUNK_SIZE + 512


def test_deep_tree_beyond_recursion_limit(tmp):
    # The walk and remove_tree are iterative; only the reader bounds depth.
    depth = 1100
    path = tmp + b"/t"
    os.mkdir(path)
    for _ in range(depth - 1):  # os.makedirs recurses too deep
        path += b"/d"
        os.mkdir(path)
    open(tmp + b"/t" + b"/d" * depth, "wb").close()
    nar = dumped(tmp + b"/t")
    assert nar == nested(depth)
    assert nar_hash_path(tmp + b"/t")[1] == len(nar)
    with pytest.raises(NarError, match=f"nested deeper than {MAX_DEPTH}"):
        restore_nar(io.BytesIO(nar), tmp + b"/r")
    remove_tree(tmp + b"/r")
    remove_tree(tmp + b"/t")
    assert os.listdir(tmp) == []


# --- big files and many files: the copy pipeline's two paths -----------------------


def test_copy_big_and_many_small_files(tmp):
    tree = Directory({
        # many chunks, all different: one hashed twice or skipped, or a
        # reused buffer refilled too early, would change the hash
        b"big": Regular(False, os.urandom(9 * CHUNK_SIZE + 3)),
        b"exe": Regular(True, os.urandom(300_000)),
        b"many": Directory({b"f%04d" % i: Regular(i % 3 == 0, os.urandom(i * 37))
                            for i in range(400)}),
        b"zlink": Symlink(b"big"),
    })
    write_tree(tmp + b"/t", tree)
    nar = dump_node(tree)
    assert copy_tree_hashing(tmp + b"/t", tmp + b"/c") == (Hash.of("sha256", nar), len(nar))
    assert nar_hash_path(tmp + b"/t") == (Hash.of("sha256", nar), len(nar))
    assert dumped(tmp + b"/c") == nar


def test_copy_other_algorithm(tmp):
    write_tree(tmp + b"/t", TV2)
    h, size = copy_tree_hashing(tmp + b"/t", tmp + b"/c", "sha512")
    assert h.algo == "sha512" and h.digest == hashlib.sha512(dump_node(TV2)).digest()


def test_copy_refuses_existing_dest(tmp):
    write_tree(tmp + b"/t", TV2)
    os.mkdir(tmp + b"/c")
    with pytest.raises(FileExistsError):
        copy_tree_hashing(tmp + b"/t", tmp + b"/c")


def test_file_shrinking_during_dump_is_an_error(tmp):
    write_tree(tmp + b"/t", Directory({b"big": Regular(False, bytes(3 * CHUNK_SIZE))}))
    chunks = dump_path(tmp + b"/t")
    next(chunks)
    next(chunks)  # the big file's header: its size is now announced
    os.truncate(tmp + b"/t/big", 10)
    with pytest.raises(TreeError, match="big' shrank while being read"):
        list(chunks)


def test_views_of_big_files_and_long_links_and_shrinking(tmp):
    tree = Directory({b"big": Regular(True, os.urandom(3 * CHUNK_SIZE + 5)), b"e": Regular(False, b""),
                      b"l": Symlink(b"x" * 3000), b"s": Regular(False, b"small")})
    write_tree(tmp + b"/t", tree)
    for size in (100, 64 << 10, 256 << 10):
        views = dump_path_views(tmp + b"/t", size)
        assert b"".join(bytes(v) for v in views) == dump_node(tree)
    views = dump_path_views(tmp + b"/t", 64 << 10)
    next(views)  # the big file's header and first bytes: its size is announced
    os.truncate(tmp + b"/t/big", 10)
    with pytest.raises(TreeError, match="big' shrank while being read"):
        list(views)


# --- unsupported file types ---------------------------------------------------------


def test_fifo_is_refused_naming_the_file(tmp):
    os.mkdir(tmp + b"/d")
    os.mkfifo(tmp + b"/d/pipe")
    for fn in (dumped, nar_hash_path, lambda p: copy_tree_hashing(p, tmp + b"/c")):
        with pytest.raises(TreeError, match=r"file '.*/d/pipe' has an unsupported type"):
            fn(tmp + b"/d")
    with pytest.raises(TreeError, match="unsupported type"):
        dumped(tmp + b"/d/pipe")


def test_socket_is_refused(tmp):
    os.mkdir(tmp + b"/d")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(tmp + b"/d/sock")
        with pytest.raises(TreeError, match=r"/d/sock' has an unsupported type"):
            dumped(tmp + b"/d")
    finally:
        s.close()


# --- restore ----------------------------------------------------------------------


def test_restore_modes_follow_umask(tmp, umask022):
    tree = Directory({b"f": Regular(False, b"x"), b"x": Regular(True, b"y"),
                      b"d": Directory({}), b"l": Symlink(b"f")})
    restore_nar(io.BytesIO(dump_node(tree)), tmp + b"/r")

    def mode(name):
        return stat.S_IMODE(os.lstat(tmp + b"/r/" + name).st_mode)

    assert (mode(b"f"), mode(b"x"), mode(b"d")) == (0o644, 0o755, 0o755)
    assert stat.S_ISLNK(os.lstat(tmp + b"/r/l").st_mode)


def test_restore_refuses_existing_dest(tmp):
    os.mkdir(tmp + b"/r")
    with pytest.raises(FileExistsError):
        restore_nar(io.BytesIO(dump_node(TV2)), tmp + b"/r")


@pytest.mark.parametrize("data,problem", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_restore_of_malformed_nar_raises_and_is_removable(tmp, data, problem):
    dest = tmp + b"/r"
    with pytest.raises(NarError, match=re.escape(problem)):
        restore_nar(io.BytesIO(data), dest)
    remove_tree(dest)
    assert not os.path.lexists(dest)


def test_restore_stops_at_first_error_after_writing_some(tmp):
    good = dump_node(Directory({b"a": Regular(False, b"1"), b"c": Regular(False, b"3")}))
    bad = good.replace(nar_str(b"c"), nar_str(b"A"))  # the name; contents are "1" and "3"
    with pytest.raises(NarError, match="not sorted"):
        restore_nar(io.BytesIO(bad), tmp + b"/r")
    assert os.listdir(tmp + b"/r") == [b"a"]
    remove_tree(tmp + b"/r")
    assert not os.path.lexists(tmp + b"/r")


# --- remove_tree ------------------------------------------------------------------


def _read_only_tree(root: bytes) -> None:
    write_tree(root, Directory({
        b"f": Regular(False, b"x"), b"x": Regular(True, b"y"), b"l": Symlink(b"/etc"),
        b"d": Directory({b"g": Regular(False, b"z"), b"e": Directory({b"h": Regular(False, b"")})}),
        b"noread": Directory({b"i": Regular(False, b"")}),
        b"nothing": Directory({b"j": Regular(False, b"")}),
    }))
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            if not os.path.islink(os.path.join(dirpath, f)):
                os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)
    os.chmod(root + b"/noread", 0o111)
    os.chmod(root + b"/nothing", 0o000)
    os.chmod(root + b"/d/e", 0o444)


def test_remove_tree_read_only_store_content(tmp):
    _read_only_tree(tmp + b"/t")
    remove_tree(tmp + b"/t")
    assert not os.path.lexists(tmp + b"/t")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as an unprivileged user")
def test_remove_tree_read_only_as_unprivileged_owner():
    # Root ignores permission bits, so the chmod logic only shows as another user.
    nobody = 65534
    top = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(top, 0o755)
        root = os.fsencode(top) + b"/t"
        _read_only_tree(root)
        os.lchown(root, nobody, nobody)
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), nobody, nobody)
        os.chown(top, nobody, nobody)
        # A forked child, since the interpreter itself may be unreadable to nobody.
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody)
                os.setuid(nobody)
                remove_tree(root)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not os.path.lexists(root)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_remove_tree_missing_file_and_symlink(tmp):
    remove_tree(tmp + b"/missing")
    os.mkdir(tmp + b"/target")
    open(tmp + b"/target/keep", "wb").close()
    os.symlink(tmp + b"/target", tmp + b"/link")
    remove_tree(tmp + b"/link")
    assert not os.path.lexists(tmp + b"/link")
    assert os.path.exists(tmp + b"/target/keep")
    remove_tree(tmp + b"/target/keep")
    assert os.listdir(tmp + b"/target") == []
