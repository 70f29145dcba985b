"""`roots --no-size` (store.gc.rootlist): the roots real Nix's `--gc --print-roots` prints,
runtime roots found in a process's environment and mappings, and a cold start that loads
none of the modules it does not need."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest
from conftest import needs_nix, run_nix
from test_gc import generate

from storekeeper.formats.storepath import StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.store.gc.rootlist import RootInfo, list_roots
from storekeeper.store.local import LocalStore
from storekeeper.store.roots import Root

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def _holder(env_path: str, mapped: str) -> subprocess.Popen:
    """A process naming ``env_path`` in its environment and mapping the file ``mapped``."""
    code = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nf.close()\n"
            "print('ok', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, mapped], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SK_TEST_HELD": env_path}, cwd="/")
    assert proc.stdout is not None and proc.stdout.readline() == "ok\n"
    return proc


def test_runtime_roots_from_environment_and_mappings(tmp_path):
    root = str(tmp_path / "s")
    with LocalStore(LocalLayout.chroot(root)) as s:
        in_env = s.add_text("in-env", b"e").path
        mapped = s.add_text("mapped", b"m" * mmap.PAGESIZE).path
        named = s.print_path(in_env)
        real = s.real_path(mapped)
    proc = _holder(named, real)
    try:
        with LocalStore(LocalLayout.chroot(root)) as s:
            found = {(r.kind, r.link, r.target) for r in list_roots(s)}
        assert ("runtime", f"/proc/{proc.pid}/environ", named) in found
        assert ("runtime", f"/proc/{proc.pid}/maps", s.store_dir.print(mapped)) in found
    finally:
        proc.kill()
        proc.wait()


@needs_nix
@pytest.mark.nix
@pytest.mark.slow
def test_listing_equals_nix_print_roots(tmp_path):
    """Every (link, target) Nix prints, and nothing else, for the generated roots and a
    process's environment (Nix reads only the logical store prefix there)."""
    root = str(tmp_path / "s")
    generate(root, seed=21, n=30, roots=8)
    with LocalStore(LocalLayout.chroot(root)) as s:
        held = s.add_text("held", b"h").path
        named = s.print_path(held)
    other = tmp_path / "not-in-the-store"
    other.write_bytes(b"x" * mmap.PAGESIZE)
    proc = _holder(named, str(other))
    try:
        out = run_nix(["nix-store", "--store", root, "--gc", "--print-roots"], str(tmp_path)).stdout.decode()
        with LocalStore(LocalLayout.chroot(root)) as s:
            ours = {(r.link, r.target) for r in list_roots(s) if r.valid}
    finally:
        proc.kill()
        proc.wait()
    theirs = {tuple(line.split(" -> ")) for line in out.splitlines()}
    assert (f"/proc/{proc.pid}/environ", named) in theirs
    # Nix's runtime roots are those of every process: compare our own process's and the files'
    assert {t for t in theirs if not t[0].startswith("/proc/")} == \
        {t for t in ours if not t[0].startswith("/proc/")}
    assert (f"/proc/{proc.pid}/environ", named) in ours


def test_root_and_root_info_are_values():
    a = StorePath("00000000000000000000000000000000-a")
    b = StorePath("11111111111111111111111111111111-b")
    r = Root(a, "/x", "direct")
    assert r == Root(a, "/x", "direct", uid=5) and hash(r) == hash(Root(a, "/x", "direct", uid=5))
    assert sorted([Root(b, "/x", "direct"), r, Root(a, "/w", "direct")]) == \
        [Root(a, "/w", "direct"), r, Root(b, "/x", "direct")]
    assert len({r, Root(a, "/x", "direct", expires=1.0), Root(a, "/x", "profile")}) == 2
    with pytest.raises(AttributeError):
        r.link = "/y"  # type: ignore[misc]
    info = RootInfo("lease", "{lease:x}", "/nix/store/a", "alice", None, None, True, 1000, None, 7.0)
    assert RootInfo.from_json(info.to_json()) == info
    assert info != RootInfo.from_json({**info.to_json(), "uid": 1001})
    assert info.detail() == "lease until 1970-01-01 00:00:07 UTC"


def test_no_size_listing_starts_without_the_modules_it_does_not_need(tmp_path):
    """The cold start of `roots --no-size` (issue 20): none of these is imported (with
    --json, json is)."""
    root = str(tmp_path / "s")
    generate(root, seed=22, n=10, roots=4)
    heavy = ["dataclasses", "inspect", "typing", "json", "re", "hashlib", "threading", "signal",
             "argparse", "storekeeper.store.gc.graph", "storekeeper.store.gc.inspect", "storekeeper.api"]
    code = ("import sys\nfrom storekeeper.cli.main import main\ncode = main(sys.argv[1:])\n"
            f"print('LOADED', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": SRC}

    def loaded(*args: str) -> list[str]:
        p = subprocess.run([sys.executable, "-c", code, "--store", root, "roots", *args], env=env,
                           capture_output=True, text=True, check=True)
        assert "direct" in p.stdout or "[" in p.stdout
        return eval(p.stderr.split("LOADED ", 1)[1])

    assert loaded("--no-size") == []
    assert loaded("--no-size", "--json") == ["json", "re"]
