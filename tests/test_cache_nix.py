"""Real Nix 2.8 against caches storekeeper writes, and storekeeper against caches Nix writes
(spec binary-cache.md; the oracle is nix-store / nix copy in temp stores)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import needs_nix, nix_env, run_nix

from storekeeper.formats import nar as narfmt
from storekeeper.formats.hashes import Hash
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir, StorePath
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

pytestmark = [needs_nix, pytest.mark.nix]
COMPRESSIONS = ["xz", "zstd", "br", "bzip2", "none", "gzip"]


def sk(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"storekeeper {' '.join(args)}: {r.returncode}\n{r.stderr}")
    return r


@pytest.fixture
def source(tmp_path):
    """Our chroot store with a CA pair (b.txt -> a.txt) and an input-addressed path (ia)
    referring to b.txt and to itself, like a built output; and a key pair made by the CLI."""
    root = str(tmp_path / "ours")
    store = LocalStore(LocalLayout.chroot(root))
    a = store.add_text("a.txt", b"aaa").path
    b = store.add_text("b.txt", f"ref to {store.print_path(a)}".encode(), [a]).path
    sd = StoreDir()
    ia = sd.make_output_path("out", Hash.of("sha256", os.urandom(8)).digest, "ia-1.0")
    nar = narfmt.dump_string(f"{store.print_path(b)} {sd.print(ia)}\n".encode())
    info = ValidPathInfo(ia, Hash.of("sha256", nar), len(nar), frozenset({b, ia}))
    store.add_nar(info, io.BytesIO(nar))
    store.close()
    sk("key", "generate", "--name", "test-cache-1", "--secret", str(tmp_path / "sk"),
       "--public", str(tmp_path / "pk"))
    return root, sd.print(ia), sd.print(b), sd.print(a)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_nix_substitutes_from_our_cache(tmp_path, source, compression):
    root, ia, b, a = source
    cache = tmp_path / "cache"
    r = sk("--store", root, "copy", "--json", "--to",
           f"file://{cache}?compression={compression}&secret-key={tmp_path / 'sk'}", ia)
    summary = json.loads(r.stdout)
    assert sorted(summary["copied"]) == sorted([ia, b, a]) and summary["uploadedNars"] == 3
    pk = (tmp_path / "pk").read_text()
    nixroot = str(tmp_path / "nix")
    run_nix(["nix-store", "--store", nixroot, "-r", ia, "--option", "substituters",
             f"file://{cache}", "--option", "trusted-public-keys", pk], str(tmp_path))
    out = run_nix(["nix", "--extra-experimental-features", "nix-command", "path-info",
                   "--store", nixroot, "--json", "-r", ia], str(tmp_path)).stdout
    infos = {i["path"]: i for i in json.loads(out)}
    assert set(infos) == {ia, b, a}
    ours = json.loads(sk("--store", root, "path-info", "--json", ia).stdout)[0]
    assert Hash.parse(infos[ia]["narHash"]) == Hash.parse(ours["narHash"])
    assert infos[ia]["signatures"][0].startswith("test-cache-1:")
    assert infos[ia]["references"] == sorted([ia, b])


def test_nix_refuses_a_wrong_key_and_copy_from_checks_it(tmp_path, source):
    root, ia, _b, _a = source
    cache = tmp_path / "cache"
    sk("--store", root, "copy", "-q", "--to", f"file://{cache}?secret-key={tmp_path / 'sk'}", ia)
    sk("key", "generate", "--name", "test-cache-1", "--secret", str(tmp_path / "sk2"),
       "--public", str(tmp_path / "pk2"))
    nixroot = str(tmp_path / "nix")
    r = run_nix(["nix-store", "--store", nixroot, "-r", ia, "--option", "substituters",
                 f"file://{cache}", "--option", "trusted-public-keys",
                 (tmp_path / "pk2").read_text()], str(tmp_path), check=False)
    assert r.returncode != 0
    assert b"is not signed by any of the keys in 'trusted-public-keys'" in r.stderr
    # nix copy --from with the right key: accepted
    run_nix(["nix", "--extra-experimental-features", "nix-command", "copy", "--from",
             f"file://{cache}", "--to", nixroot, ia, "--option", "trusted-public-keys",
             (tmp_path / "pk").read_text()], str(tmp_path))
    # and our copy --from, the same rule
    dest = str(tmp_path / "dest")
    bad = sk("--store", dest, "copy", "--from", f"file://{cache}", ia,
             "--trusted-public-keys", (tmp_path / "pk2").read_text(), check=False)
    assert bad.returncode != 0 and "lacks a valid signature" in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    good = sk("--store", dest, "copy", "--json", "--from", f"file://{cache}", ia,
              "--trusted-public-keys", (tmp_path / "pk").read_text())
    assert ia in json.loads(good.stdout)["copied"]


def test_we_read_what_nix_copy_writes(tmp_path):
    """nix copy --to file:// (zstd, signed by Nix's own key tool) -> our copy --from."""
    env = nix_env(str(tmp_path))
    nixroot = str(tmp_path / "nix")
    (tmp_path / "f.txt").write_text("hello from nix\n")
    p = run_nix(["nix-store", "--store", nixroot, "--add", str(tmp_path / "f.txt")],
                str(tmp_path), env=env).stdout.decode().strip()
    run_nix(["nix-store", "--generate-binary-cache-key", "nixkey-1", str(tmp_path / "nsk"),
             str(tmp_path / "npk")], str(tmp_path), env=env)
    for comp in ("zstd", "xz", "br"):
        cache = tmp_path / f"nixcache-{comp}"
        run_nix(["nix", "--extra-experimental-features", "nix-command", "--store", nixroot, "copy",
                 "--to", f"file://{cache}?compression={comp}&secret-key={tmp_path / 'nsk'}", p],
                str(tmp_path), env=env)
        dest = str(tmp_path / f"dest-{comp}")
        r = sk("--store", dest, "copy", "--json", "--from", f"file://{cache}", p,
               "--trusted-public-keys", (tmp_path / "npk").read_text())
        assert json.loads(r.stdout)["copied"] == [p]
        info = json.loads(sk("--store", dest, "path-info", "--json", p).stdout)[0]
        assert info["signatures"][0].startswith("nixkey-1:")
        # Nix's key file (secret) works for our sign, and its signature is the same bytes
    ours = LocalStore(LocalLayout.chroot(str(tmp_path / "dest-zstd")))
    try:
        sp = StorePath.from_base(os.path.basename(p))
        assert len(ours.path_info(sp).sigs) == 1
    finally:
        ours.close()
    sk("--store", str(tmp_path / "dest-zstd"), "sign", "-k", str(tmp_path / "nsk"), p)
    after = json.loads(sk("--store", str(tmp_path / "dest-zstd"), "path-info", "--json", p).stdout)
    assert len(after[0]["signatures"]) == 1  # ed25519 is deterministic: same signature


def test_sign_then_nix_verifies(tmp_path, source):
    """storekeeper sign adds a signature real Nix accepts (copy without ?secret-key=)."""
    root, ia, _b, _a = source
    r = sk("--store", root, "sign", "-k", str(tmp_path / "sk"), ia)
    assert "added 1 signatures" in r.stderr
    cache = tmp_path / "cache"
    sk("--store", root, "copy", "-q", "--to", f"file://{cache}?compression=none", ia)
    run_nix(["nix", "--extra-experimental-features", "nix-command", "store", "verify",
             "--store", f"file://{cache}", "--trusted-public-keys", (tmp_path / "pk").read_text(),
             ia], str(tmp_path))
    r = run_nix(["nix", "--extra-experimental-features", "nix-command", "store", "verify",
                 "--store", f"file://{cache}", "--trusted-public-keys",
                 "other-1:q3eDsFtacHQsCEHabxXsDlh6VxzQeFSb0s0rJoUx2Tw=", ia], str(tmp_path), check=False)
    assert r.returncode != 0 and b"is untrusted" in r.stderr


@pytest.mark.parametrize("kind", ["ours", "nix"])
def test_copy_through_a_daemon(tmp_path, source, kind):
    """copy --from into a daemon's store (AddToStoreNar, the daemon checks: CA paths pass)
    and copy --to out of it (NarFromPath, one connection: NARs one after the other)."""
    from daemon_util import start_daemon, stop_process
    root, _ia, b, a = source
    c1, c2 = tmp_path / "c1", tmp_path / "c2"
    sk("--store", root, "copy", "-q", "--to", f"file://{c1}?compression=none", b)
    sock = str(tmp_path / "daemon.sock")
    env = nix_env(str(tmp_path / "d"))
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = start_daemon(kind, str(tmp_path / "droot"), sock, env, log=log, cwd=str(tmp_path))
    try:
        r = sk("--store", f"unix://{sock}", "copy", "--json", "--from", f"file://{c1}", b)
        assert sorted(json.loads(r.stdout)["copied"]) == sorted([a, b])
        sk("--store", f"unix://{sock}", "copy", "-q", "--to", f"file://{c2}?compression=none", b)
    finally:
        stop_process(proc)
    for name in os.listdir(c1):
        if name.endswith(".narinfo"):
            assert (c1 / name).read_text() == (c2 / name).read_text()


def test_nix_copy_from_cache_into_our_daemon_checks_signatures(tmp_path, source):
    """Spec §9.4: nix copy --from <cache> into a daemon sends AddMultipleToStore with
    dontCheckSigs=0 and the narinfo's Sig; our daemon verifies against its
    trusted-public-keys (a signed input-addressed path: accepted with the key, refused
    without)."""
    from daemon_util import start_daemon, stop_process
    root, ia, _b, _a = source
    cache = tmp_path / "cache"
    sk("--store", root, "copy", "-q", "--to", f"file://{cache}?secret-key={tmp_path / 'sk'}", ia)
    pk = (tmp_path / "pk").read_text()
    for trusted, n in ((False, 0), (True, 1)):
        env = nix_env(str(tmp_path / f"d{n}"))
        if trusted:
            with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
                f.write(f"trusted-public-keys = {pk}\n")
        sock = str(tmp_path / f"d{n}.sock")
        with open(tmp_path / f"d{n}.log", "wb") as log:
            proc = start_daemon("ours", str(tmp_path / f"droot{n}"), sock, env, log=log,
                                cwd=str(tmp_path))
        try:
            r = run_nix(["nix", "--extra-experimental-features", "nix-command", "copy", "--from",
                         f"file://{cache}", "--to", f"unix://{sock}", ia], str(tmp_path / f"d{n}"),
                        env=env, check=False)
            if trusted:
                assert r.returncode == 0, r.stderr
                info = json.loads(sk("--store", f"unix://{sock}", "path-info", "--json", ia).stdout)[0]
                assert info["signatures"][0].startswith("test-cache-1:")
            else:
                assert r.returncode != 0 and b"lacks a valid signature" in r.stderr
        finally:
            stop_process(proc)
