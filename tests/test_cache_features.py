"""Binary-cache features checked against real Nix 2.8 as the oracle (slow tier):
substitution by the local CLI with no daemon (``storekeeper build PATH`` with
``substituters``) next to ``nix-store -r`` on a local store; a wrong key, a tampered NAR,
a missing NAR and a wrong StoreDir falling through to the next cache; ``secret-key-files``
signing what we build; ``verify --sigs``; build logs in caches.  The caches are copies of
../shared/spec/binary-cache-vectors (written by Nix 2.8) or made here by real Nix."""

from __future__ import annotations

import bz2
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import needs_nix, nix_env, run_nix
from daemon_util import SHARED, start_daemon, stop_process
from realusers import needs_root_users, real_users

from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

pytestmark = [needs_nix, pytest.mark.nix]

VECTORS = os.path.join(SHARED, "spec", "binary-cache-vectors")
A = "/nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt"
B = "/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt"


def sk(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"storekeeper {' '.join(args)}: {r.returncode}\n{r.stderr}")
    return r


def nix(*args: str, env: dict, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120,
                          check=check)


def copy_cache(tmp_path, name: str, as_name: str) -> str:
    d = str(tmp_path / as_name)
    shutil.copytree(os.path.join(VECTORS, name), d)
    return d


def broken_caches(tmp_path) -> dict[str, str]:
    """Copies of Nix's uncompressed cache of b.txt -> a.txt, each broken one way."""
    caches = {k: copy_cache(tmp_path, "nix28-file-none", k)
              for k in ("other-dir", "missing", "tampered", "wrong-key", "good")}
    with open(os.path.join(caches["other-dir"], "nix-cache-info"), "w") as f:
        f.write("StoreDir: /other/store\n")
    nar_dir = os.path.join(caches["missing"], "nar")
    for f in os.listdir(nar_dir):
        os.unlink(os.path.join(nar_dir, f))
    nar_dir = os.path.join(caches["tampered"], "nar")
    for f in os.listdir(nar_dir):
        p = os.path.join(nar_dir, f)
        data = bytearray(open(p, "rb").read())
        data[data.rindex(b")") - 20] ^= 1  # a byte of the file's contents: NarHash mismatch
        with open(p, "wb") as out:
            out.write(bytes(data))
    # without its CA line a path needs a signature: the one there is by research-bc-1,
    # which is not in trusted-public-keys (the default key only)
    strip_ca(caches["wrong-key"])
    return caches


def strip_ca(cache: str) -> None:
    """Drop the narinfos' CA lines: the paths then count as input-addressed."""
    for f in os.listdir(cache):
        if f.endswith(".narinfo"):
            p = os.path.join(cache, f)
            text = open(p).read()
            with open(p, "w") as out:
                out.write("".join(line for line in text.splitlines(True)
                                  if not line.startswith("CA: ")))


# --- local substitution (no daemon) ---------------------------------------------------------

def test_local_cli_substitutes_like_nix_store_r(tmp_path):
    env = nix_env(str(tmp_path))
    cache = copy_cache(tmp_path, "nix28-file-zstd", "cache")
    opt = ["--option", "substituters", f"file://{cache}"]
    ours = sk("--store", str(tmp_path / "ours"), "build", B, *opt, env=env)
    theirs = nix("nix-store", "--store", str(tmp_path / "nix"), "-r", B, *opt, env=env)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.stdout == theirs.stdout == B + "\n"
    # what is fetched, and each copy, in Nix's words (Nix alone warns about --add-root)
    assert ours.stderr.splitlines() == [line for line in theirs.stderr.splitlines()
                                        if "--add-root" not in line]
    assert f"copying path '{A}' from 'file://{cache}'..." in ours.stderr
    for p in (A, B):
        h = [nix("nix-store", "--store", str(tmp_path / k), "-q", "--hash", p, env=env).stdout
             for k in ("ours", "nix")]
        assert h[0] == h[1] and h[0].startswith("sha256:")
    # the signatures came along, as Nix keeps them
    info = json.loads(sk("--store", str(tmp_path / "ours"), "path-info", "--json", B,
                         env=env).stdout)[0]
    assert any(s.startswith("research-bc-1:") for s in info.get("signatures", info.get("sigs", [])))
    # without substituters nothing is fetched: the path is simply not valid
    r = sk("--store", str(tmp_path / "none"), "build", B, env=env, check=False)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_local_cli_falls_through_broken_caches_as_nix_store_r(tmp_path):
    env = nix_env(str(tmp_path))
    c = broken_caches(tmp_path)
    broken = " ".join(f"file://{c[k]}" for k in ("other-dir", "missing", "tampered", "wrong-key"))
    got = {}
    for kind in ("ours", "nix"):
        root = str(tmp_path / kind)
        fail_root = str(tmp_path / f"{kind}-fail")
        if kind == "ours":
            fail = sk("--store", fail_root, "build", B, "--option", "substituters", broken,
                      env=env, check=False)
            ok = sk("--store", root, "build", B, "--option", "substituters",
                    broken + f" file://{c['good']}", env=env, check=False)
        else:
            fail = nix("nix-store", "--store", fail_root, "-r", B, "--option", "substituters",
                       broken, env=env)
            ok = nix("nix-store", "--store", root, "-r", B, "--option", "substituters",
                     broken + f" file://{c['good']}", env=env)
        got[kind] = (fail.returncode != 0, ok.returncode, ok.stdout)
        # each broken cache is named in one clear line (Nix's words where Nix has them)
        assert (f"binary cache 'file://{c['other-dir']}' is for Nix stores with prefix "
                "'/other/store', not '/nix/store'") in fail.stderr, (kind, fail.stderr)
        assert "does not exist in binary cache" in fail.stderr, (kind, fail.stderr)
        # (nix-store on a local store words it "NAR for '…' fetched from '…' is incomplete")
        assert (f"hash mismatch importing path '{A}'" in fail.stderr
                or f"NAR for '{A}' fetched from 'file://{c['tampered']}' is incomplete"
                in fail.stderr), (kind, fail.stderr)
        assert (f"the substitute for '{A}' from 'file://{c['wrong-key']}' is not signed by any "
                "of the keys in 'trusted-public-keys'") in fail.stderr, (kind, fail.stderr)
        assert "Traceback" not in fail.stderr + ok.stderr
    assert got["ours"] == got["nix"] == (True, 0, B + "\n")


# --- secret-key-files signs what we build -----------------------------------------------------

DEMO_NIX = ('derivation { name = "signed-demo"; system = builtins.currentSystem; '
            'builder = "/bin/sh"; args = [ "-c" "echo hello > $out" ]; }\n')


def test_built_outputs_are_signed_with_secret_key_files_like_nix(tmp_path):
    """The same derivation built at the same store path by Nix 2.8, then (its store moved
    aside) by us: the output's signature is byte-identical (ed25519 is deterministic)."""
    base = str(tmp_path)
    env = nix_env(base)
    run_nix(["nix-store", "--generate-binary-cache-key", "sign-test-1", f"{base}/sk",
             f"{base}/pk"], base, env=env)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(f"secret-key-files = {base}/sk\nexperimental-features = nix-command\n")
    (tmp_path / "d.nix").write_text(DEMO_NIX)
    (tmp_path / "f.txt").write_text("added, not built\n")
    nenv = {**env, "NIX_STORE_DIR": f"{base}/store", "NIX_STATE_DIR": f"{base}/nstate",
            "NIX_LOG_DIR": f"{base}/nlog", "NIX_REMOTE": "local"}
    drv = nix("nix-instantiate", f"{base}/d.nix", env=nenv, check=True).stdout.strip()
    out = nix("nix-store", "-r", drv, env=nenv, check=True).stdout.strip()
    theirs = json.loads(nix("nix", "path-info", "--json", out, env=nenv, check=True).stdout)[0]
    added = nix("nix-store", "--add", f"{base}/f.txt", env=nenv, check=True).stdout.strip()
    assert "signatures" not in json.loads(nix("nix", "path-info", "--json", added, env=nenv,
                                              check=True).stdout)[0]
    drv_text = open(drv).read()
    # a key file that cannot be read fails the build (Nix's words; checked on us below)
    (tmp_path / "d.nix").write_text(DEMO_NIX.replace("signed-demo", "signed-demo-2"))
    drv2 = nix("nix-instantiate", f"{base}/d.nix", env=nenv, check=True).stdout.strip()
    drv2_text = open(drv2).read()
    r = nix("nix-store", "-r", drv2, "--option", "secret-key-files", f"{base}/no-such-key",
            env=nenv)
    assert f"error: opening file '{base}/no-such-key': No such file or directory" in r.stderr
    shutil.move(f"{base}/store", f"{base}/nix-store")
    url = f"local?store={base}/store&state={base}/state&log={base}/log"
    (tmp_path / "drv").write_text(drv_text)
    assert sk("--store", url, "add-text", os.path.basename(drv)[33:], f"{base}/drv",
              env=env).stdout.strip() == drv
    assert sk("--store", url, "build", "-Q", drv, env=env).stdout.strip() == out
    ours = json.loads(sk("--store", url, "path-info", "--json", out, env=env).stdout)[0]
    assert theirs["signatures"][0].startswith("sign-test-1:")
    assert ours["signatures"] == theirs["signatures"]
    # as in Nix, a path added (not built) is not signed
    a2 = sk("--store", url, "add", f"{base}/f.txt", env=env).stdout.strip()
    assert a2 == added
    assert "signatures" not in json.loads(sk("--store", url, "path-info", "--json", a2,
                                             env=env).stdout)[0]
    # a key file that cannot be read fails the build, as in Nix (its words)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write(f"secret-key-files = {base}/no-such-key\n")
    (tmp_path / "drv").write_text(drv2_text)
    sk("--store", url, "add-text", os.path.basename(drv2)[33:], f"{base}/drv", env=env)
    r2 = sk("--store", url, "build", "-Q", drv2, env=env, check=False)
    assert r2.returncode != 0 and r.returncode != 0
    assert f"opening file '{base}/no-such-key': No such file or directory" in r2.stderr, r2.stderr
    # --option overrides nix.conf for the store's settings too
    r3 = sk("--store", url, "build", "-Q", drv2, "--option", "secret-key-files", f"{base}/sk",
            env=env)
    out2 = r3.stdout.strip()
    assert sk("--store", url, "verify", "--sigs", "--sigs-needed", "1", "--trusted-public-keys",
              (tmp_path / "pk").read_text(), out2, env=env, check=False).returncode == 0
    assert sk("--store", url, "verify", "--sigs", "--sigs-needed", "1", out2, env=env,
              check=False).returncode == 2


# --- verify --sigs, path-info --sigs, AddSignatures -------------------------------------------

CS = "/tmp/research-bc/cs/store"
DEMO = f"{CS}/qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak-demo-1.0"
DEP = f"{CS}/47azgk2sj1r1p469lpmqhmm00jsirb06-dep.txt"


def test_verify_sigs_reports_untrusted_paths_as_nix_store_verify(tmp_path):
    """One store (the signed, input-addressed demo-1.0 and its text-CA dep, substituted by
    real Nix from its own cache), checked by ``nix store verify`` and by ``storekeeper
    verify --sigs``: same untrusted paths, same words, same exit codes; then a signature
    added through each daemon (AddSignatures) makes it trusted for another key."""
    base = str(tmp_path)
    env = {**nix_env(base), "NIX_STORE_DIR": CS}
    cache = copy_cache(tmp_path, "nix28-file-xz", "cache")
    with open(os.path.join(VECTORS, "keys", "research-bc-1.public")) as f:
        key = f.read().strip()
    url = f"local?store={CS}&real={base}/real&state={base}/state&log={base}/log"
    r = nix("nix-store", "--store", url, "-r", DEMO, "--option", "substituters",
            f"file://{cache}", "--option", "trusted-public-keys", key, env=env)
    assert r.returncode == 0, r.stderr
    run_nix(["nix-store", "--generate-binary-cache-key", "other-1", f"{base}/o.sk",
             f"{base}/o.pk"], base, env=env)
    other = (tmp_path / "o.pk").read_text()

    def untrusted(stderr: str) -> list[str]:
        return re.findall(r"^path '([^']*)' is untrusted$", stderr, re.M)

    for extra in ([], ["--trusted-public-keys", key], ["--trusted-public-keys", key,
                                                         "--sigs-needed", "2"],
                  ["--trusted-public-keys", other]):
        theirs = nix("nix", "--extra-experimental-features", "nix-command", "store", "verify",
                     "--store", url, "--all", "--no-contents", *extra, env=env)
        ours = sk("--store", url, "verify", "--sigs", *extra, env=env, check=False)
        assert (ours.returncode, untrusted(ours.stderr)) == (theirs.returncode,
                                                            untrusted(theirs.stderr)), extra
        assert "Traceback" not in ours.stderr
    assert untrusted(ours.stderr) == [DEMO] and ours.returncode == 2
    # path-info --sigs: Nix's column ('ca:…' then the signatures)
    theirs = nix("nix", "--extra-experimental-features", "nix-command", "path-info", "--store",
                 url, "--sigs", DEMO, DEP, env=env, check=True).stdout
    ours = sk("--store", url, "path-info", "--sigs", DEMO, DEP, env=env).stdout
    assert ([line.split("\t")[-1] for line in ours.splitlines()]
            == [line.split("\t")[-1] for line in theirs.splitlines()])
    # AddSignatures through each daemon (nix store sign), then verify through it
    got = {}
    for kind in ("nix", "ours"):
        root = f"{base}/{kind}-root"
        no_ca = copy_cache(tmp_path, "nix28-file-none", kind)
        strip_ca(no_ca)  # input-addressed now: signed by research-bc-1, not by other-1
        r = nix("nix-store", "--store", root, "-r", "/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt",
                "--option", "substituters", f"file://{no_ca}", "--option", "trusted-public-keys",
                key, env={**env, "NIX_STORE_DIR": "/nix/store"})
        assert r.returncode == 0, r.stderr
        sock = f"{base}/{kind}.sock"
        denv = {**env, "NIX_STORE_DIR": "/nix/store"}
        proc = start_daemon(kind, root, sock, denv)
        try:
            b = "/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt"
            before = sk("--store", f"unix://{sock}", "verify", "--sigs", "--sigs-needed", "1",
                        "--trusted-public-keys", other, b, env=denv, check=False)
            signed = nix("nix", "--extra-experimental-features", "nix-command", "store", "sign",
                         "--store", f"unix://{sock}", "-k", f"{base}/o.sk", b, env=denv)
            after = sk("--store", f"unix://{sock}", "verify", "--sigs", "--sigs-needed", "1",
                       "--trusted-public-keys", other, b, env=denv, check=False)
            got[kind] = (before.returncode, signed.returncode, after.returncode,
                         untrusted(before.stderr), untrusted(after.stderr))
        finally:
            stop_process(proc)
    assert got["ours"] == got["nix"]
    assert got["ours"][:3] == (2, 0, 0)


# --- build logs in caches -----------------------------------------------------------------------

LOG_NIX = ('derivation { name = "logged-demo"; system = builtins.currentSystem; '
           'builder = "/bin/sh"; args = [ "-c" "echo line one; echo line two >&2; echo out > $out" ]; }\n')


def test_copy_logs_then_nix_log_reads_them_and_we_read_nixs(tmp_path):
    """The same derivation built by Nix 2.8 and by us at the same store path: ``nix store
    copy-log`` and ``storekeeper copy --logs`` write the same ``log/<drv>`` bytes, and
    ``nix log --store file://…`` reads ours (by the drv and by the output's Deriver)."""
    base = str(tmp_path)
    env = nix_env(base)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write("experimental-features = nix-command\n")
    (tmp_path / "d.nix").write_text(LOG_NIX)
    nenv = {**env, "NIX_STORE_DIR": f"{base}/store", "NIX_STATE_DIR": f"{base}/nstate",
            "NIX_LOG_DIR": f"{base}/nlog", "NIX_REMOTE": "local"}
    drv = nix("nix-instantiate", f"{base}/d.nix", env=nenv, check=True).stdout.strip()
    out = nix("nix-store", "-r", drv, env=nenv, check=True).stdout.strip()
    nix("nix", "store", "copy-log", "--to", f"file://{base}/ncache", drv, env=nenv, check=True)
    drv_text = open(drv).read()
    shutil.move(f"{base}/store", f"{base}/nix-store")
    url = f"local?store={base}/store&state={base}/state&log={base}/log"
    (tmp_path / "drv").write_text(drv_text)
    sk("--store", url, "add-text", os.path.basename(drv)[33:], f"{base}/drv", env=env)
    assert sk("--store", url, "build", "-Q", drv, env=env).stdout.strip() == out
    r = sk("--store", url, "copy", "--json", "--logs", "--to",
           f"file://{base}/cache?compression=none", out, env=env)
    assert json.loads(r.stdout)["logs"] == [drv]
    key = f"log/{os.path.basename(drv)}"
    ours = (tmp_path / "cache" / key).read_bytes()
    assert b"line one" in ours and b"line two" in ours
    assert ours == (tmp_path / "ncache" / key).read_bytes()
    # real Nix reads it back from our cache through the output's Deriver (by the .drv itself
    # Nix 2.8 wants the .drv valid in the cache: "is not a valid store path", for its own too)
    for p in (out,):
        got = subprocess.run(["nix", "log", "--store", f"file://{base}/cache", p],
                             env={**env, "NIX_STORE_DIR": f"{base}/store"}, capture_output=True,
                             timeout=60)
        assert got.returncode == 0, got.stderr
        assert got.stdout == ours
    # and we read what Nix wrote, with its words
    got2 = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "cache", "log",
                           f"file://{base}/ncache", drv], env=env, capture_output=True, timeout=60)
    assert got2.returncode == 0, got2.stderr
    assert got2.stdout == ours
    assert f"got build log for '{drv}' from 'file://{base}/ncache'".encode() in got2.stderr
    # that cache has no narinfo of the output, so no Deriver to go by: both say so
    no = [subprocess.run(cmd + [f"file://{base}/ncache", out], capture_output=True, timeout=60,
                         env={**env, "NIX_STORE_DIR": f"{base}/store"})
          for cmd in ([sys.executable, "-m", "storekeeper.cli.main", "cache", "log"],
                      ["nix", "log", "--store"])]
    assert no[0].returncode != 0 and no[1].returncode != 0
    assert no[0].stderr == no[1].stderr == f"error: build log of '{out}' is not available\n".encode()


def test_cache_log_reads_nixs_vector_like_nix_log(tmp_path):
    """The vector cache Nix 2.8 wrote with ``nix store copy-log``: our reader and ``nix log``
    print the same bytes, and the same error for a path with no log."""
    cache = f"file://{VECTORS}/nix28-file-ls"
    env = {**nix_env(str(tmp_path)), "NIX_STORE_DIR": CS}
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write("experimental-features = nix-command\n")
    drv = f"{CS}/0s9wh6al076z7hm4k0pmfxkzhrqf9p61-demo-1.0.drv"
    for p in (drv, DEMO, DEP):
        theirs = subprocess.run(["nix", "log", "--store", cache, p], env=env, capture_output=True,
                                timeout=60)
        ours = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "cache", "log",
                               cache, p], env=env, capture_output=True, timeout=60)
        assert (ours.returncode == 0) == (theirs.returncode == 0), p
        assert ours.stdout == theirs.stdout
        assert ours.stderr.splitlines()[-1] == theirs.stderr.splitlines()[-1], p
    assert theirs.stderr.endswith(f"error: build log of '{DEP}' is not available\n".encode())


def test_copy_log_into_our_daemon_like_into_nix_daemon(tmp_path):
    """``nix store copy-log --from file://CACHE --to unix://DAEMON DRV`` (AddBuildLog): both
    daemons keep the log where ``nix-store -l`` finds it (bzip2), the same bytes; a second
    copy keeps the first log, as Nix."""
    base = str(tmp_path)
    env = nix_env(base)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
        f.write("experimental-features = nix-command\n")
    (tmp_path / "d.nix").write_text(LOG_NIX)
    drv = nix("nix-instantiate", "--store", f"{base}/scratch", f"{base}/d.nix", env=env,
              check=True).stdout.strip()
    cache = f"{base}/cache"
    # (nix copy would build a .drv it is given)
    sk("--store", f"{base}/scratch", "copy", "-q", "--to", f"file://{cache}", drv, env=env)
    log = b"a log\nwith two lines\n"
    os.makedirs(f"{cache}/log", exist_ok=True)
    with open(f"{cache}/log/{os.path.basename(drv)}", "wb") as f:
        f.write(log)
    got = {}
    for kind in ("nix", "ours"):
        root, sock = f"{base}/{kind}-root", f"{base}/{kind}.sock"
        proc = start_daemon(kind, root, sock, env)
        try:
            for _ in range(2):
                r = nix("nix", "store", "copy-log", "--from", f"file://{cache}", "--to",
                        f"unix://{sock}", drv, env=env)
                assert r.returncode == 0, (kind, r.stderr)
                with open(f"{cache}/log/{os.path.basename(drv)}", "wb") as f:
                    f.write(b"replaced\n")  # the second copy must not replace the first
            name = os.path.basename(drv)
            with open(f"{root}/nix/var/log/nix/drvs/{name[:2]}/{name[2:]}.bz2", "rb") as f:
                got[kind] = bz2.decompress(f.read())
        finally:
            stop_process(proc)
            with open(f"{cache}/log/{os.path.basename(drv)}", "wb") as f:
                f.write(log)
    assert got["ours"] == got["nix"] == log


def test_local_build_substitutes_outputs_instead_of_building(tmp_path):
    """``storekeeper build DRV`` with no daemon: the output a cache has (signed by a trusted
    key) is downloaded, the builder (which would fail) never runs; as ``nix-store -r DRV``."""
    base = str(tmp_path)
    env = nix_env(base)
    (tmp_path / "d.nix").write_text(
        'derivation { name = "subst-local"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo the builder ran; exit 1" ]; }\n')
    drvs = {k: nix("nix-instantiate", "--store", f"{base}/{k}", f"{base}/d.nix", env=env,
                   check=True).stdout.strip() for k in ("ours", "nix", "src")}
    drv = drvs["src"]
    assert drvs["ours"] == drvs["nix"] == drv
    out = nix("nix-store", "--store", f"{base}/src", "-q", "--outputs", drv, env=env,
              check=True).stdout.strip()
    nar = dump_string(b"substituted, not built\n")
    with LocalStore(LocalLayout.chroot(f"{base}/src")) as store:
        sd = store.store_dir
        store.add_nar(ValidPathInfo(sd.parse(out), Hash("sha256", hashlib.sha256(nar).digest()),
                                    len(nar), frozenset(), sd.parse(drv)), io.BytesIO(nar))
    sk("key", "generate", "--name", "t-1", "--secret", f"{base}/sk", "--public", f"{base}/pk",
       env=env)
    sk("--store", f"{base}/src", "copy", "-q", "--to", f"file://{base}/cache?secret-key={base}/sk",
       out, env=env)
    opt = ["--option", "substituters", f"file://{base}/cache", "--option",
           "trusted-public-keys", (tmp_path / "pk").read_text()]
    ours = sk("--store", f"{base}/ours", "build", drv, *opt, env=env, check=False)
    theirs = nix("nix-store", "--store", f"{base}/nix", "-r", drv, *opt, env=env)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, out + "\n")
    assert "the builder ran" not in ours.stderr
    assert f"copying path '{out}' from 'file://{base}/cache'" in ours.stderr
    # without a trusted key for it neither takes it (and the builder cannot make it)
    nix("nix-instantiate", "--store", f"{base}/ours2", f"{base}/d.nix", env=env, check=True)
    bad = sk("--store", f"{base}/ours2", "build", drv, "--option", "substituters",
             f"file://{base}/cache", env=env, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert (f"the substitute for '{out}' from 'file://{base}/cache' is not signed by any of the "
            "keys in 'trusted-public-keys'") in bad.stderr, bad.stderr


def test_copy_from_honours_require_sigs_like_nix_copy(tmp_path):
    """An input-addressed path signed by an untrusted key: ``nix copy --from`` and
    ``storekeeper copy --from`` refuse it, and both take it with ``require-sigs = false``
    (NIX_CONFIG, read by both)."""
    env = nix_env(str(tmp_path))
    cache = copy_cache(tmp_path, "nix28-file-none", "cache")
    strip_ca(cache)
    got = {}
    for require in ("true", "false"):
        e = {**env, "NIX_CONFIG": f"require-sigs = {require}\nexperimental-features = nix-command"}
        theirs = nix("nix", "copy", "--from", f"file://{cache}", "--to",
                     str(tmp_path / f"nix-{require}"), B, env=e)
        ours = sk("--store", str(tmp_path / f"ours-{require}"), "copy", "-q", "--from",
                  f"file://{cache}", B, env=e, check=False)
        got[require] = (theirs.returncode == 0, ours.returncode == 0)
        if require == "true":
            assert f"cannot add path '{A}' because it lacks a valid signature" in theirs.stderr
            assert f"cannot add path '{A}' because it lacks a valid signature" in ours.stderr
    assert got == {"true": (False, False), "false": (True, True)}
    h = [nix("nix-store", "--store", str(tmp_path / f"{k}-false"), "-q", "--hash", B,
             env=env).stdout for k in ("nix", "ours")]
    assert h[0] == h[1] != ""


def test_local_cli_substitutes_over_http_with_the_narinfo_disk_cache(tmp_path):
    """From an http:// cache: the second substitution into a fresh store asks the server
    for no narinfo (the disk cache answers, positive TTL), for us as for nix-store -r."""
    www = tmp_path / "www"
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), www / "c")
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, format, *args):  # noqa: A002 -- the base class's name
            log.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/c"
    try:
        env = nix_env(str(tmp_path))
        got = {}
        for kind in ("nix", "ours"):
            runs = []
            for n in (1, 2):
                log.clear()
                root = str(tmp_path / f"{kind}-{n}")
                opt = ["--option", "substituters", url]
                r = (nix("nix-store", "--store", root, "-r", B, *opt, env=env) if kind == "nix"
                     else sk("--store", root, "build", B, *opt, env=env, check=False))
                assert r.returncode == 0, (kind, r.stderr)
                runs.append((r.stdout, sorted(p for p in log if p.endswith(".narinfo")),
                             sorted(p for p in log if "/nar/" in p)))
            got[kind] = runs
        assert got["ours"] == got["nix"]
        first, second = got["ours"]
        assert len(first[1]) == 2 and second[1] == [] and len(second[2]) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_an_untrusted_user_cannot_add_signatures(shared_dir):
    """``nix store sign`` (AddSignatures) through each daemon as an unprivileged user:
    refused, with the real daemon's words, and no signature added."""
    if needs_root_users.args[0]:
        pytest.skip(needs_root_users.kwargs["reason"])
    cache = os.path.join(shared_dir, "cache")
    shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), cache)
    key = os.path.join(shared_dir, "k.sk")
    subprocess.run(["nix-store", "--generate-binary-cache-key", "u-1", key, key + ".pub"],
                   env=nix_env(shared_dir), check=True)
    os.chmod(key, 0o644)
    with real_users(shared_dir, "u") as users:
        u = users["u"]
        got = {}
        for kind in ("nix", "ours"):
            base = os.path.join(shared_dir, kind)
            os.mkdir(base)
            env = nix_env(base)
            root, sock = os.path.join(base, "root"), os.path.join(base, "sock")
            r = nix("nix-store", "--store", root, "-r", B, "--option", "substituters",
                    f"file://{cache}", env=env)
            assert r.returncode == 0, r.stderr
            proc = start_daemon(kind, root, sock, env)
            try:
                def run(*args: str, sock: str = sock) -> subprocess.CompletedProcess:
                    return subprocess.run(
                        ["runuser", "-u", u.pw_name, "--", "env", "-i", f"HOME={u.home}",
                         f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
                         f"NIX_CONF_DIR={u.home}", "nix", "--extra-experimental-features",
                         "nix-command", *args, "--store", f"unix://{sock}"],
                        capture_output=True, text=True, timeout=60)
                sign = run("store", "sign", "-k", key, B)
                info = nix("nix", "--extra-experimental-features", "nix-command", "path-info",
                           "--json", "--store", f"unix://{sock}", B, env=env, check=True).stdout
                got[kind] = (sign.returncode != 0, "u-1:" in info)
                assert "you are not privileged to add signatures" in sign.stderr, (kind, sign.stderr)
            finally:
                stop_process(proc)
        assert got["ours"] == got["nix"] == (True, False)
