"""Substitution through our daemon with real Nix 2.8 clients (slow tier): from the
caches Nix 2.8 wrote (../shared/spec/binary-cache-vectors, copied to a temp dir) and
from a cache ``nix copy --to file://`` makes here; signatures; a tampered NAR, a
missing NAR and a wrong StoreDir falling through to the next cache; ``nix-build`` of
a derivation whose output is in a cache (its builder would fail).  The oracle is
real nix-daemon / real Nix given the same caches."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess

import pytest
from conftest import needs_nix, nix_env
from daemon_util import SHARED, start_daemon, stop_process

from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import dump_string
from storekeeper.formats.narinfo import NarInfo
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.storepath import StoreDir
from storekeeper.formats.url import LocalLayout
from storekeeper.store.local import LocalStore

pytestmark = needs_nix

VECTORS = os.path.join(SHARED, "spec", "binary-cache-vectors")
A = "/nix/store/2qzxavkmc1a53hdc058phqdqyic53b67-a.txt"
B = "/nix/store/abdy0gp06c21k6cn2fd0w9l07x5drjgh-b.txt"
HELLO = "/nix/store/5m5ci15djpxd4bs7xa0208nhkhi6cbp3-hello.txt"
#: the store dir of the vectors' signed, input-addressed demo-1.0 (a logical dir only:
#: both daemons keep its files under the test's temp dir)
CS = "/tmp/research-bc/cs/store"
DEMO = f"{CS}/qsy18l8rk7lnkvv5cn8zf7xa7hvmz2ak-demo-1.0"
DEP = f"{CS}/47azgk2sj1r1p469lpmqhmm00jsirb06-dep.txt"


def copy_cache(tmp_path, name: str, as_name: str | None = None) -> str:
    d = str(tmp_path / (as_name or name))
    shutil.copytree(os.path.join(VECTORS, name), d)
    return d


def narinfo(cache: str, path: str, sd: str = "/nix/store") -> NarInfo:
    with open(os.path.join(cache, os.path.basename(path)[:32] + ".narinfo"), "rb") as f:
        return NarInfo.parse(f.read(), StoreDir(sd))


class Daemons:
    def __init__(self, tmp_path, store_dir: str | None = None) -> None:
        self.tmp = tmp_path
        self.env = nix_env(str(tmp_path))
        self.procs: dict[str, subprocess.Popen] = {}
        self.socks: dict[str, str] = {}
        if store_dir:
            self.env["NIX_STORE_DIR"] = store_dir

    def start(self, kind: str) -> str:
        sock = str(self.tmp / f"{kind}.sock")
        sd = self.env.get("NIX_STORE_DIR")
        if sd:
            url = (f"local?store={sd}&state={self.tmp}/{kind}-state&log={self.tmp}/{kind}-log"
                   f"&real={self.tmp}/{kind}-real")
        else:
            url = str(self.tmp / f"{kind}-root")
        self.procs[kind] = start_daemon(kind, url, sock, self.env)
        self.socks[kind] = sock
        return sock

    def nix_store(self, kind: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nix-store", "--store", f"unix://{self.socks[kind]}", *args],
                              env=self.env, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p)


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path)
    yield d
    d.stop()


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", ["nix28-file-zstd", "nix28-file-bzip2", "nix28-file-none",
                                  "nix28-file-br", "nix28-file-gzip"])
def test_our_daemon_substitutes_from_each_cache_nix_wrote(tmp_path, daemons, name):
    if name.endswith("br") and not have("brotli"):
        pytest.skip("the [brotli] extra is not installed")
    cache = copy_cache(tmp_path, name)
    target = HELLO if name.endswith("gzip") else B
    daemons.start("ours")
    r = daemons.nix_store("ours", "-r", target, "--option", "substituters", f"file://{cache}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [target]
    for p in ([A, B] if target == B else [HELLO]):
        ni = narinfo(cache, p)
        q = daemons.nix_store("ours", "-q", "--hash", p)
        assert q.stdout.strip() == ni.nar_hash.typed("nix32")
        refs = daemons.nix_store("ours", "-q", "--references", p).stdout.split()
        assert sorted(refs) == sorted(StoreDir("/nix/store").print(x) for x in ni.references)


def test_what_the_client_is_told_is_what_nix_daemon_tells(tmp_path, daemons):
    cache = copy_cache(tmp_path, "nix28-file-zstd")
    got = {}
    for kind in ("ours", "nix"):
        daemons.start(kind)
        opt = ["--option", "substituters", f"file://{cache}"]
        dry = daemons.nix_store(kind, "-r", "--dry-run", B, *opt)
        real = daemons.nix_store(kind, "-r", B, *opt)
        got[kind] = (dry.returncode, dry.stderr, real.returncode, real.stdout,
                     sorted(real.stderr.splitlines()))
    assert got["ours"] == got["nix"]
    assert "these 2 paths will be fetched" in got["ours"][1]


def test_a_signed_input_addressed_path_needs_a_trusted_key(tmp_path):
    cache = copy_cache(tmp_path, "nix28-file-xz")
    with open(os.path.join(VECTORS, "keys", "research-bc-1.public")) as f:
        good = f.read().strip()
    d = Daemons(tmp_path, CS)
    try:
        subprocess.run(["nix-store", "--generate-binary-cache-key", "other-1",
                        str(tmp_path / "o.sk"), str(tmp_path / "o.pk")], env=d.env, check=True)
        other = (tmp_path / "o.pk").read_text().strip()
        out = {}
        for kind in ("ours", "nix"):
            d.start(kind)
            opt = ["--option", "substituters", f"file://{cache}"]
            bad = d.nix_store(kind, "-r", DEMO, *opt, "--option", "trusted-public-keys", other)
            ok = d.nix_store(kind, "-r", DEMO, *opt, "--option", "trusted-public-keys", good)
            deriver = d.nix_store(kind, "-q", "--deriver", DEMO).stdout
            out[kind] = (bad.returncode != 0, ok.returncode, ok.stdout, deriver)
            assert (f"the substitute for '{DEMO}' from 'file://{cache}' is not signed by any "
                    "of the keys in 'trusted-public-keys'") in bad.stderr, (kind, bad.stderr)
        assert out["ours"] == out["nix"] == (True, 0, DEMO + "\n", f"{CS}/" + narinfo(
            cache, DEMO, CS).deriver.base + "\n")  # type: ignore[union-attr]
        with LocalStore(LocalLayout.custom(CS, f"{tmp_path}/ours-state", f"{tmp_path}/ours-log",
                                           f"{tmp_path}/ours-real")) as store:
            info = store.query_path_info(store.store_dir.parse(DEMO))
            assert info is not None and info.sigs == narinfo(cache, DEMO, CS).sigs
            assert store.is_valid(store.store_dir.parse(DEP))  # the reference came first
    finally:
        d.stop()


def _break(cache: str, how: str) -> None:
    nar_dir = os.path.join(cache, "nar")
    for f in os.listdir(nar_dir):
        p = os.path.join(nar_dir, f)
        if how == "missing":
            os.unlink(p)
        else:  # flip a byte of the contents (an uncompressed NAR): NarHash mismatch
            data = bytearray(open(p, "rb").read())
            i = data.rindex(b")") - 20
            data[i] ^= 1
            with open(p, "wb") as out:
                out.write(bytes(data))


def test_missing_tampered_and_other_store_dir_fall_through_to_the_next_cache(tmp_path, daemons):
    other_dir = copy_cache(tmp_path, "nix28-file-none", "other-dir")
    with open(os.path.join(other_dir, "nix-cache-info"), "w") as f:
        f.write("StoreDir: /other/store\n")
    missing = copy_cache(tmp_path, "nix28-file-none", "missing")
    _break(missing, "missing")
    tampered = copy_cache(tmp_path, "nix28-file-none", "tampered")
    _break(tampered, "tampered")
    # without its CA line a path needs a signature: research-bc-1's is not trusted here
    wrong_key = copy_cache(tmp_path, "nix28-file-none", "wrong-key")
    for f in os.listdir(wrong_key):
        if f.endswith(".narinfo"):
            with open(os.path.join(wrong_key, f)) as fh:
                text = fh.read()
            with open(os.path.join(wrong_key, f), "w") as fh:
                fh.write("".join(x for x in text.splitlines(True) if not x.startswith("CA: ")))
    good = copy_cache(tmp_path, "nix28-file-none", "good")
    broken = " ".join(f"file://{c}" for c in (other_dir, missing, tampered, wrong_key))
    results = {}
    for kind in ("ours", "nix"):
        daemons.start(kind)
        fail = daemons.nix_store(kind, "-r", B, "--option", "substituters", broken)
        ok = daemons.nix_store(kind, "-r", B, "--option", "substituters", broken + f" file://{good}")
        results[kind] = (fail.returncode != 0, ok.returncode, ok.stdout)
        if kind == "ours":
            # one clear line per cache that could not give it
            assert f"binary cache 'file://{other_dir}' is for Nix stores with prefix " \
                   "'/other/store', not '/nix/store'" in fail.stderr
            assert "does not exist in binary cache" in fail.stderr
            assert f"hash mismatch importing path '{A}'" in fail.stderr
            assert "Traceback" not in fail.stderr + ok.stderr
        assert (f"the substitute for '{A}' from 'file://{wrong_key}' is not signed by any of "
                "the keys in 'trusted-public-keys'") in fail.stderr, (kind, fail.stderr)
    assert results["ours"] == results["nix"] == (True, 0, B + "\n")


def test_nix_build_substitutes_an_output_a_cache_has_instead_of_building(tmp_path, daemons):
    env = daemons.env
    (tmp_path / "default.nix").write_text(
        'derivation { name = "subst-demo"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo the builder ran; exit 1" ]; }\n')
    scratch = str(tmp_path / "scratch")
    drv = subprocess.run(["nix-instantiate", "--store", scratch, str(tmp_path / "default.nix")],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run(["nix-store", "--store", scratch, "-q", "--outputs", drv], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    # the output, made by hand in another store, then put in a cache by real Nix
    nar = dump_string(b"substituted, not built\n")
    src = LocalLayout.chroot(str(tmp_path / "src"))
    with LocalStore(src) as store:
        sd = store.store_dir
        info = ValidPathInfo(sd.parse(out), Hash("sha256", hashlib.sha256(nar).digest()),
                             len(nar), frozenset(), sd.parse(drv))
        store.add_nar(info, io.BytesIO(nar))
    subprocess.run(["nix-store", "--generate-binary-cache-key", "t-1", str(tmp_path / "sk"),
                    str(tmp_path / "pk")], env=env, check=True)
    cache = str(tmp_path / "cache")
    subprocess.run(["nix", "--extra-experimental-features", "nix-command", "copy", "--store",
                    str(tmp_path / "src"), "--to", f"file://{cache}?secret-key={tmp_path}/sk",
                    out], env=env, check=True, capture_output=True)
    daemons.start("ours")
    r = subprocess.run(["nix-build", "--store", f"unix://{daemons.socks['ours']}", "--no-out-link",
                        str(tmp_path / "default.nix"), "--option", "substituters", f"file://{cache}",
                        "--option", "trusted-public-keys", (tmp_path / "pk").read_text()],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out
    assert "the builder ran" not in r.stderr
    assert f"copying path '{out}' from 'file://{cache}'" in r.stderr
    # without the cache the builder runs and fails: the cache is what made it work
    (tmp_path / "default.nix").write_text((tmp_path / "default.nix").read_text().replace(
        "subst-demo", "subst-demo-2"))
    r2 = subprocess.run(["nix-build", "--store", f"unix://{daemons.socks['ours']}", "--no-out-link",
                         str(tmp_path / "default.nix"), "--option", "substituters", f"file://{cache}"],
                        env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode != 0



@pytest.fixture
def user(shared_dir):
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, useradd and runuser to create a real user")
    import pwd
    name = f"sks{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        u = pwd.getpwnam(name)
        home = os.path.join(shared_dir, f"home-{name}")
        os.mkdir(home, 0o700)
        os.chown(home, u.pw_uid, u.pw_gid)
        yield u, home
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_an_untrusted_user_may_only_use_trusted_substituters(user, shared_dir):
    u, home = user
    allowed = os.path.join(shared_dir, "allowed")
    other = os.path.join(shared_dir, "other")
    for d in (allowed, other):
        shutil.copytree(os.path.join(VECTORS, "nix28-file-zstd"), d)
    client_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
                  "XDG_CACHE_HOME": os.path.join(home, ".cache"),
                  "NIX_CONF_DIR": os.path.join(home, "etc")}
    got = {}
    for kind in ("ours", "nix"):
        base = os.path.join(shared_dir, kind)
        os.mkdir(base)
        env = nix_env(base)
        with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "a") as f:
            f.write(f"trusted-substituters = file://{allowed}\n")
        sock = os.path.join(base, "sock")
        proc = start_daemon(kind, os.path.join(base, "root"), sock, env)
        try:
            def run(url: str, sock: str = sock) -> subprocess.CompletedProcess:
                return subprocess.run(
                    ["runuser", "-u", u.pw_name, "--", "env", "-i",
                     *(f"{k}={v}" for k, v in {**client_env, "NIX_REMOTE": f"unix://{sock}"}.items()),
                     "nix-store", "-r", B, "--option", "substituters", url],
                    capture_output=True, text=True, timeout=120)
            refused, ok = run(f"file://{other}"), run(f"file://{allowed}")
            got[kind] = (refused.returncode != 0, ok.returncode, ok.stdout)
            assert f"ignoring untrusted substituter 'file://{other}'" in refused.stderr, refused.stderr
        finally:
            stop_process(proc)
    assert got["ours"] == got["nix"] == (True, 0, B + "\n")


def test_a_corrupt_narinfo_fails_unless_fallback(tmp_path, daemons):
    bad = copy_cache(tmp_path, "nix28-file-zstd", "bad")
    good = copy_cache(tmp_path, "nix28-file-zstd", "good")
    with open(os.path.join(bad, os.path.basename(B)[:32] + ".narinfo"), "w") as f:
        f.write(f"StorePath: {B}\nURL: x\nNarHash: garbage\n")
    subs = ["--option", "substituters", f"file://{bad} file://{good}"]
    got = {}
    for kind in ("ours", "nix"):
        daemons.start(kind)
        strict = daemons.nix_store(kind, "-r", B, *subs)
        lenient = daemons.nix_store(kind, "-r", B, *subs, "--fallback")
        got[kind] = (strict.returncode != 0, lenient.returncode, lenient.stdout)
        assert "narinfo" in strict.stderr and "Traceback" not in strict.stderr
    assert got["ours"] == got["nix"] == (True, 0, B + "\n")


def test_nix_copy_substitute_on_destination(tmp_path, daemons):
    """``nix copy -s`` asks QueryValidPaths(substitute=1): the daemon fetches what its
    caches have itself, and the client sends nothing."""
    cache = copy_cache(tmp_path, "nix28-file-zstd")
    src = str(tmp_path / "src")
    subprocess.run(["nix-store", "--store", src, "-r", B, "--option", "substituters",
                    f"file://{cache}"], env=daemons.env, check=True, capture_output=True)
    os.unlink(os.path.join(cache, "nar", os.listdir(os.path.join(cache, "nar"))[0]))
    got = {}
    for kind in ("ours", "nix"):
        daemons.start(kind)
        r = subprocess.run([*["nix", "--extra-experimental-features", "nix-command"], "copy",
                            "--store", src, "--to", f"unix://{daemons.socks[kind]}", "-s", B,
                            "--option", "substituters", f"file://{cache}"],
                           env=daemons.env, capture_output=True, text=True, timeout=120)
        valid = daemons.nix_store(kind, "-q", "--hash", A, B)
        got[kind] = (r.returncode, valid.returncode, valid.stdout)
    assert got["ours"] == got["nix"]
    assert got["ours"][:2] == (0, 0)
