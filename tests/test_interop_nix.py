"""Real Nix 2.8 as the oracle: same paths, same NAR bytes, and each reads the other's store."""

from __future__ import annotations

import os
import tempfile

import pytest
from conftest import needs_nix, run_nix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

pytestmark = [needs_nix, pytest.mark.nix]

# File names Nix accepts in a tree: any bytes but '/' and NUL, not '.'/'..'.
names = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
files = st.tuples(st.just("file"), st.binary(max_size=300), st.booleans())
links = st.tuples(st.just("link"), st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t))
trees = st.recursive(
    st.one_of(files, links),
    lambda kids: st.tuples(st.just("dir"), st.dictionaries(names, kids, max_size=4)),
    max_leaves=10,
)


def materialise(node, path: bytes) -> None:
    kind = node[0]
    if kind == "file":
        with open(path, "wb") as f:
            f.write(node[1])
        os.chmod(path, 0o755 if node[2] else 0o644)
    elif kind == "link":
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        for name, child in node[1].items():
            materialise(child, path + b"/" + name)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.tuples(st.just("dir"), st.dictionaries(names, trees, min_size=1, max_size=4)) | files)
def test_random_trees_same_path_and_nar_as_nix(tree):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.fsencode(os.path.join(tmp, "src-tree"))
        materialise(tree, src)
        ours_root, nix_root = os.path.join(tmp, "ours"), os.path.join(tmp, "nix")
        with LocalStore(LocalLayout.chroot(ours_root)) as store:
            info = store.add_path(os.fsdecode(src))
            ours = store.print_path(info.path)
            our_nar = b"".join(store.dump_path(info.path))
        theirs = run_nix(["nix-store", "--store", nix_root, "--add", os.fsdecode(src)], tmp)
        assert ours == theirs.stdout.decode().strip()
        nar = run_nix(["nix-store", "--dump", os.fsdecode(src)], tmp).stdout
        assert our_nar == nar
        assert info.nar_size == len(nar)


def populate_ours(root: str, work: str) -> dict[str, str]:
    """A small store of every kind of path we write; returns name -> store path."""
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "a.txt"), "wb") as f:
        f.write(b"hello\n")
    d = os.path.join(work, "tree")
    os.makedirs(os.path.join(d, "bin"))
    with open(os.path.join(d, "bin", "tool"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(os.path.join(d, "bin", "tool"), 0o755)
    os.symlink("bin/tool", os.path.join(d, "alias"))
    out = {}
    with LocalStore(LocalLayout.chroot(root)) as s:
        foo = s.add_text("foo.txt", b"bar")
        ref = s.add_text("ref.txt", f"see {s.print_path(foo.path)}".encode(), [foo.path])
        out["foo"], out["ref"] = s.print_path(foo.path), s.print_path(ref.path)
        out["a"] = s.print_path(s.add_path(os.path.join(work, "a.txt")).path)
        out["flat"] = s.print_path(s.add_path(os.path.join(work, "a.txt"), recursive=False, algo="sha1").path)
        out["tree"] = s.print_path(s.add_path(d).path)
    return out


def test_nix_verifies_and_queries_a_store_we_wrote(tmp_path):
    root = str(tmp_path / "root")
    paths = populate_ours(root, str(tmp_path / "work"))
    r = run_nix(["nix-store", "--store", root, "--verify", "--check-contents"], str(tmp_path))
    assert r.returncode == 0 and b"error" not in r.stderr.lower(), r.stderr
    with LocalStore(LocalLayout.chroot(root)) as s:
        for p in paths.values():
            sp = s.parse_path(p)
            info = s.path_info(sp)
            q = lambda *a, p=p: run_nix(["nix-store", "--store", root, "-q", *a, p],  # noqa: E731
                                   str(tmp_path)).stdout.decode().split()
            assert q("--hash") == [info.nar_hash.typed("nix32")]
            assert q("--size") == [str(info.nar_size)]
            assert sorted(q("--references")) == sorted(s.print_path(r) for r in info.references)
            assert sorted(q("--referrers")) == sorted(s.print_path(r) for r in s.query_referrers(sp))
            assert sorted(q("--requisites")) == sorted(s.print_path(r) for r in s.query_closure([sp]))
    # Nix can also read our NARs back byte-for-byte
    # (nix-store --dump serialises a file-system path: give it the real one)
    dump = run_nix(["nix-store", "--dump", root + paths["tree"]], str(tmp_path)).stdout
    with LocalStore(LocalLayout.chroot(root)) as s:
        assert b"".join(s.dump_path(s.parse_path(paths["tree"]))) == dump


def test_we_verify_and_query_a_store_nix_wrote(tmp_path):
    root, tmp = str(tmp_path / "root"), str(tmp_path)
    work = tmp_path / "work"
    (work / "dir" / "sub").mkdir(parents=True)
    (work / "dir" / "sub" / "x").write_bytes(b"x\n")
    (work / "f").write_bytes(b"flat\n")
    added = run_nix(["nix-store", "--store", root, "--add", str(work / "dir")], tmp).stdout.decode().strip()
    fixed = run_nix(["nix-store", "--store", root, "--add-fixed", "sha256", str(work / "f")],
                    tmp).stdout.decode().strip()
    ref = run_nix(["nix-instantiate", "--store", root, "--read-write-mode", "--eval", "-E",
                   'builtins.toFile "ref.txt" "see ${builtins.toFile "foo.txt" "bar"}"'],
                  tmp).stdout.decode().strip().strip('"')
    drv = run_nix(["nix-instantiate", "--store", root, "-E",
                   'derivation { name = "d"; system = "x86_64-linux"; builder = "/bin/sh"; '
                   'outputs = ["out" "dev"]; src = builtins.toFile "s" "s"; }'],
                  tmp).stdout.decode().strip()
    with LocalStore(LocalLayout.chroot(root)) as s:
        report = s.verify(check_contents=True)
        assert report.ok, report.errors
        for p in (added, fixed, ref, drv):
            sp = s.parse_path(p)
            info = s.path_info(sp)
            q = lambda *a, p=p: run_nix(["nix-store", "--store", root, "-q", *a, p],  # noqa: E731
                                   tmp).stdout.decode().split()
            assert q("--hash") == [info.nar_hash.typed("nix32")]
            assert q("--size") == [str(info.nar_size)]
            assert sorted(q("--references")) == sorted(s.print_path(r) for r in info.references)
            nar = run_nix(["nix-store", "--dump", root + p], tmp).stdout
            assert b"".join(s.dump_path(sp)) == nar
        outs = s.query_derivation_outputs(s.parse_path(drv))
        expect = run_nix(["nix-store", "--store", root, "-q", "--outputs", drv], tmp).stdout.decode().split()
        assert sorted(s.print_path(o) for o in outs.values()) == sorted(expect)
        # the outputs are not built, but the DerivationOutputs rows are there, as Nix wrote them
        assert set(outs) == {"out", "dev"}
        assert s.query_valid_derivers(outs["dev"]) == {s.parse_path(drv)}


def test_same_rows_as_nix_for_the_same_adds(tmp_path):
    tmp = str(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    ours, nix = str(tmp_path / "ours"), str(tmp_path / "nix")
    with LocalStore(LocalLayout.chroot(ours)) as s:
        s.add_path(str(tmp_path / "a.txt"))
        s.add_path(str(tmp_path / "a.txt"), recursive=False, algo="md5")
        s.add_text("foo.txt", b"bar")
    run_nix(["nix-store", "--store", nix, "--add", str(tmp_path / "a.txt")], tmp)
    run_nix(["nix-store", "--store", nix, "--add-fixed", "md5", str(tmp_path / "a.txt")], tmp)
    run_nix(["nix-instantiate", "--store", nix, "--read-write-mode", "--eval", "-E",
             'builtins.toFile "foo.txt" "bar"'], tmp)
    import sqlite3

    def rows(root):
        c = sqlite3.connect(os.path.join(root, "nix/var/nix/db/db.sqlite"))
        return sorted(c.execute("select path, hash, deriver, narSize, ultimate, sigs, ca from ValidPaths"))

    assert rows(ours) == rows(nix)
