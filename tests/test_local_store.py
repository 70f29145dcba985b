"""LocalStore against the spec's vectors and its own invariants (no real Nix needed)."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import stat
import threading

import pytest

from storekeeper.errors import BadArchive, InvalidPath, StoreError
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore
from storekeeper.store.locks import lock_fd, open_lock_file

TV1 = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"


def make_dir1(base) -> str:
    d = base / "dir1"
    (d / "sub").mkdir(parents=True)
    (d / "Z").write_bytes(b"B")
    (d / "hello").write_bytes(b"hello\n")
    os.symlink("hello", d / "link")
    (d / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(d / "run.sh", 0o755)
    (d / "sub" / "e").write_bytes(b"")
    return str(d)


def store_entries(store: LocalStore) -> set[str]:
    return {n for n in os.listdir(store.real_store_dir) if n != ".links"}


def db_rows(store: LocalStore) -> list[tuple]:
    return store.db.conn.execute("select path, hash, deriver, narSize, ultimate, sigs, ca "
                                 "from ValidPaths order by path").fetchall()


def test_add_file_tv1(store, tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello\n")
    os.chmod(f, 0o644)
    info = store.add_path(str(f))
    assert store.print_path(info.path) == TV1
    assert db_rows(store) == [(TV1, "sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
                               None, 120, None, None,
                               "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")]
    st = os.lstat(store.real_path(info.path))
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime == 1
    assert b"".join(store.dump_path(info.path)) == dump_string(b"hello\n")


def test_add_directory_tv2_canonical(store, tmp_path):
    info = store.add_path(make_dir1(tmp_path))
    assert store.print_path(info.path) == "/nix/store/aw86ds5imvy8ds8434689rw2slfc8lvx-dir1"
    assert info.nar_size == 1264
    real = store.real_path(info.path)
    modes = {p: stat.S_IMODE(os.lstat(os.path.join(real, p)).st_mode) for p in ("", "Z", "run.sh", "sub")}
    assert modes == {"": 0o555, "Z": 0o444, "run.sh": 0o555, "sub": 0o555}
    for dirpath, dirs, files in os.walk(real):
        for n in dirs + files + [""]:
            assert os.lstat(os.path.join(dirpath, n)).st_mtime == 1


@pytest.mark.parametrize("recursive,algo,base", [
    (False, "sha256", "fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt"),
    (False, "sha1", "ai1nh82p4c5ylq44c5yqamdsl6s74p63-a.txt"),
    (False, "md5", "ql4vf9nr3hjsc5rjwh6bsycgb65khwb4-a.txt"),
    (True, "sha512", "kvjq34s6w9i0ikda7kkfp45ggkahc8ww-a.txt"),
])
def test_add_fixed_tv3(store, tmp_path, recursive, algo, base):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello\n")
    info = store.add_path(str(f), recursive=recursive, algo=algo)
    assert info.path.base == base
    # the DB keeps the NAR's sha256 whatever the fixed hash was
    assert info.nar_hash == Hash.of("sha256", dump_string(b"hello\n"))
    assert info.ca.startswith("fixed:" + ("r:" if recursive else "") + algo + ":")


def test_add_text_tv4_with_reference(store):
    foo = store.add_text("foo.txt", b"bar")
    assert store.print_path(foo.path) == "/nix/store/71bjzxqgii13agm1np9jl9aqxim5pp51-foo.txt"
    ref = store.add_text("ref.txt", f"see {store.print_path(foo.path)}".encode(), [foo.path])
    assert store.print_path(ref.path) == "/nix/store/mhvkn5ih8352mzkrvdyq8mxpnih2nx5a-ref.txt"
    assert store.query_references(ref.path) == {foo.path}
    assert store.query_referrers(foo.path) == {ref.path}
    assert store.query_closure([ref.path]) == {ref.path, foo.path}
    assert store.topo_sort({foo.path, ref.path}) == [ref.path, foo.path]
    assert ref.ca.startswith("text:sha256:")


def test_reference_must_be_valid(store):
    ghost = store.store_dir.make_text_path_for("ghost", b"boo")
    with pytest.raises(InvalidPath, match="is not valid"):
        store.add_text("x", b"y", [ghost])
    assert store.query_all_valid_paths() == set()


def test_add_is_idempotent_and_pins_before_checking(store, tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello\n")
    a = store.add_path(str(f))
    b = store.add_path(str(f))
    assert a == b and len(db_rows(store)) == 1
    with open(store.temp_roots.file_path, "rb") as fh:
        roots = fh.read().split(b"\0")
    assert TV1.encode() in roots
    assert store_entries(store) == {a.path.base}  # no temp dirs or lock files left behind


def test_schema_is_byte_identical_to_nix(store):
    conn = sqlite3.connect(os.path.join(store.layout.db_dir, "db.sqlite"))
    names = sorted(r[0] for r in conn.execute("select name from sqlite_master"))
    assert names == sorted(["ValidPaths", "sqlite_autoindex_ValidPaths_1", "sqlite_sequence", "Refs",
                            "sqlite_autoindex_Refs_1", "IndexReferrer", "IndexReference",
                            "DeleteSelfRefs", "DerivationOutputs",
                            "sqlite_autoindex_DerivationOutputs_1", "IndexDerivationOutputs"])
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    with open(os.path.join(store.layout.db_dir, "schema"), "rb") as fh:
        assert fh.read() == b"10"


def test_newer_schema_is_refused(chroot_root):
    LocalStore(LocalLayout.chroot(chroot_root)).close()
    with open(os.path.join(chroot_root, "nix/var/nix/db/schema"), "w") as fh:
        fh.write("11")
    with pytest.raises(StoreError, match="schema is version 11"):
        LocalStore(LocalLayout.chroot(chroot_root))


def test_nar_import_checks_hash_and_size(store):
    nar = dump_string(b"imported\n")
    sp = store.store_dir.make_text_path_for("imp", b"imported\n")
    good = ValidPathInfo(sp, Hash.of("sha256", nar), len(nar))
    bad = good.with_(nar_hash=Hash.of("sha256", b"other"))
    with pytest.raises(BadArchive, match="hash mismatch importing path"):
        store.add_nar(bad, io.BytesIO(nar))
    with pytest.raises(BadArchive, match="size mismatch"):
        store.add_nar(good.with_(nar_size=len(nar) + 8), io.BytesIO(nar))
    assert store.query_all_valid_paths() == set() and store_entries(store) == set()
    stream = io.BytesIO(nar + b"TRAILER")
    store.add_nar(good, stream)
    assert stream.read() == b"TRAILER"  # exactly the NAR was consumed
    assert store.path_info(sp).nar_hash == good.nar_hash


def test_nar_import_checks_content_address(store):
    nar = dump_string(b"hello\n")
    sp = store.parse_path(TV1)
    ca = "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    wrong_name = store.store_dir.make_text_path_for("b.txt", b"zzz")
    with pytest.raises(BadArchive, match="ca hash mismatch"):
        store.add_nar(ValidPathInfo(wrong_name, Hash.of("sha256", nar), len(nar), ca=ca), io.BytesIO(nar))
    store.add_nar(ValidPathInfo(sp, Hash.of("sha256", nar), len(nar), ca=ca), io.BytesIO(nar),
                  check_sigs=True)
    assert store.is_valid(sp)


def test_unsigned_import_refused_when_sigs_are_checked(store):
    nar = dump_string(b"x")
    sp = store.store_dir.make_text_path_for("unsigned", b"x")
    with pytest.raises(BadArchive, match="lacks a valid signature"):
        store.add_nar(ValidPathInfo(sp, Hash.of("sha256", nar), len(nar)), io.BytesIO(nar),
                      check_sigs=True)


MALFORMED = {
    "bad magic": lambda n: b"\x0d" + b"\0" * 7 + b"nix-archivX1\0\0\0" + n[16:],
    "truncated": lambda n: n[:-9],
    "non-zero padding": lambda n: n[:-2] + b"\x01\x00",
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_nar_leaves_nothing(store, what):
    nar = dump_string(b"hello\n")
    sp = store.parse_path(TV1)
    bad = MALFORMED[what](nar)
    with pytest.raises((BadArchive, StoreError)):
        store.add_nar(ValidPathInfo(sp, Hash.of("sha256", nar), len(nar)), io.BytesIO(bad))
    with pytest.raises((BadArchive, StoreError)):
        store.add_dump(io.BytesIO(bad), "a.txt", "recursive")
    assert store.query_all_valid_paths() == set()
    assert store_entries(store) == set()


def test_add_dump_methods(store):
    nar = dump_string(b"hello\n")
    assert store.print_path(store.add_dump(io.BytesIO(nar), "a.txt", "recursive").path) == TV1
    flat = store.add_dump(io.BytesIO(b"hello\n"), "a.txt", "flat", "sha256")
    assert flat.path.base == "fdwm55r4skpypx1gwzb7x69ckav1rv09-a.txt"
    text = store.add_dump(io.BytesIO(b"bar"), "foo.txt", "text", "sha256")
    assert text.path.base == "71bjzxqgii13agm1np9jl9aqxim5pp51-foo.txt"


def test_verify_finds_modification_and_repairs_metadata(store, tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello\n")
    info = store.add_path(str(f))
    real = store.real_path(info.path)
    assert store.verify(check_contents=True).ok
    os.chmod(real, 0o644)
    report = store.verify(check_contents=True)
    assert not report.ok and "non-canonical" in report.errors[0]
    assert store.verify(check_contents=True, repair=True).ok
    assert stat.S_IMODE(os.lstat(real).st_mode) == 0o444
    with open(real, "wb") as fh:
        fh.write(b"HELLO\n")
    report = store.verify(check_contents=True)
    assert any("was modified" in e for e in report.errors)


def test_verify_vanished_path(store, tmp_path):
    info = store.add_text("gone", b"soon")
    os.unlink(store.real_path(info.path))
    report = store.verify()
    assert not report.ok and "disappeared" in report.errors[0]
    assert store.is_valid(info.path)  # nothing dropped without --repair
    assert store.verify(repair=True).ok is True
    assert not store.is_valid(info.path)


def test_cycle_in_registration_is_rolled_back(store):
    sd = store.store_dir
    a = sd.make_text_path_for("a", b"a")
    b = sd.make_text_path_for("b", b"b")
    nar = dump_string(b"a")
    for p in (a, b):
        os.makedirs(store.real_store_dir, exist_ok=True)
        with open(store.real_path(p), "wb") as fh:
            fh.write(b"a")
    ia = ValidPathInfo(a, Hash.of("sha256", nar), len(nar), frozenset({b}))
    ib = ValidPathInfo(b, Hash.of("sha256", nar), len(nar), frozenset({a}))
    with pytest.raises(StoreError, match="cycle detected"):
        store.register_valid_paths([ia, ib])
    assert store.query_all_valid_paths() == set()


def test_temp_root_goes_through_running_gc_socket(store, tmp_path):
    """With gc.lock held EX, a pin is sent to gc-socket/socket and acknowledged first."""
    state = store.state_dir
    gc_fd = open_lock_file(os.path.join(state, "gc.lock"))
    lock_fd(gc_fd, exclusive=True)
    os.makedirs(os.path.join(state, "gc-socket"), exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.path.join(state, "gc-socket", "socket"))
    srv.listen(1)
    srv.settimeout(10)
    received: list[bytes] = []

    def fake_gc():
        conn, _ = srv.accept()
        conn.settimeout(10)
        received.append(conn.recv(4096))
        conn.sendall(b"1")
        conn.close()

    t = threading.Thread(target=fake_gc)
    t.start()
    sp = store.store_dir.make_text_path_for("pinned", b"x")
    store.pin(sp)
    t.join(10)
    srv.close()
    os.close(gc_fd)
    assert received == [store.print_path(sp).encode() + b"\n"]
    with open(store.temp_roots.file_path, "rb") as fh:
        assert store.print_path(sp).encode() + b"\0" in fh.read()


def test_temp_roots_file_removed_on_close(chroot_root):
    s = LocalStore(LocalLayout.chroot(chroot_root))
    s.add_text("t", b"t")
    path = s.temp_roots.file_path
    assert os.path.exists(path)
    s.close()
    assert not os.path.exists(path)


def test_custom_store_dir_layout(tmp_path):
    lay = LocalLayout.custom(str(tmp_path / "store"), str(tmp_path / "state"), str(tmp_path / "log"))
    with LocalStore(lay) as s:
        info = s.add_text("foo.txt", b"bar")
        p = s.print_path(info.path)
        assert p.startswith(str(tmp_path / "store") + "/") and os.path.isfile(p)


def test_read_only_store_refuses_writes(chroot_root, tmp_path):
    with LocalStore(LocalLayout.chroot(chroot_root)) as s:
        info = s.add_text("ro", b"ro")
    lay = LocalLayout.chroot(chroot_root, read_only=True)
    with LocalStore(lay, create=False) as s:
        assert s.is_valid(info.path)
        with pytest.raises(StoreError, match="read-only"):
            s.add_text("new", b"new")


def test_small_dump_in_memory_ignores_bytes_after_the_nar(store):
    """A small NAR dump is hashed in memory: bytes after the NAR in the frame are not
    hashed (as when it is streamed), and the recorded hash is the path's."""
    nar = dump_string(b"hello\n")
    info = store.add_dump(io.BytesIO(nar + b"trailing"), "a.txt", "recursive")
    assert store.print_path(info.path) == TV1
    assert info.nar_size == len(nar) and info.nar_hash == Hash.of("sha256", nar)
    assert store.verify(check_contents=True).ok
