"""The crash-point harness shared by tests/test_crash_points.py (each point once) and
bench/crashes.py (every occurrence): stores prepared once per scenario, the points an
operation really reaches counted (``STOREKEEPER_CRASH_LOG``), a SIGKILL at a chosen
``(point, n)`` (``STOREKEEPER_CRASH_AT``) on a fresh copy, and the checks after it.

After each kill: no path that was valid is lost (unless the uninterrupted operation
deletes it too: GC) or changed (its recorded and its on-disk NAR hash as before); our
``verify --check-contents`` and real ``nix-store --verify --check-contents`` pass; a
profile still points at a valid generation; the killed command then succeeds and the
same checks pass again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from storekeeper.formats.url import LocalLayout
from storekeeper.fs.crash import ENV, LOG_ENV, arrivals
from storekeeper.fs.narfs import nar_hash_path
from storekeeper.store.local import LocalStore
from storekeeper.store.optimise import optimise_store
from storekeeper.store.verify import verify_store

SK = [sys.executable, "-m", "storekeeper.cli.main"]
SYSTEM = "x86_64-linux"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
GEN_PROFILE = "nix/var/nix/profiles/per-user/root/profile"  # under the chroot


def _drv(name: str, script: str) -> str:
    return (f'derivation {{ name = "{name}"; system = "{SYSTEM}"; builder = "/bin/sh"; '
            f'args = ["-c" "{script}"]; }}')


#: two builds, the second reading (and referring to) the first
CHAIN = ("let a = " + _drv("crash-a", r"PATH=/bin; mkdir $out; echo from-a > $out/x; echo a2 > $out/y")
         + "; in " + _drv("crash-b", r"read v < ${a}/x; echo $v ${a} > $out"))
#: the same shape, its outputs in a binary cache: substituted, not built
SUBST = ("let a = " + _drv("subst-a", r"PATH=/bin; mkdir $out; echo sub-a > $out/x")
         + "; in " + _drv("subst-b", r"read v < ${a}/x; echo $v ${a} > $out"))


def nix_env(scratch: str, extra_conf: str = "") -> dict[str, str]:
    """Real Nix and our CLI confined to ``scratch`` (never /nix, never the user's config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIX_", "STOREKEEPER_CRASH"))}
    env.update(HOME=os.path.join(scratch, "home"), NIX_CONF_DIR=os.path.join(scratch, "etc"),
               NIX_STATE_DIR=os.path.join(scratch, "nixstate"), NIX_LOG_DIR=os.path.join(scratch, "nixlog"),
               NIX_REMOTE=os.path.join(scratch, "unused"), XDG_CACHE_HOME=os.path.join(scratch, "cache"))
    os.makedirs(env["NIX_CONF_DIR"], exist_ok=True)
    os.makedirs(env["HOME"], exist_ok=True)
    with open(os.path.join(env["NIX_CONF_DIR"], "nix.conf"), "w") as f:
        f.write("substituters =\nsandbox = false\nbuild-users-group =\n"
                # builds on a chroot store are sandboxed: a static busybox is their shell
                f"sandbox-paths = /bin/sh={BUSYBOX} /bin/mkdir={BUSYBOX}\n" + extra_conf)
    return env


def sk(root: str, args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*SK, "--store", root, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"storekeeper {' '.join(args)}: {r.returncode} {r.stderr}")
    return r


def copy_tree(src: str, dst: str) -> None:
    subprocess.run(["cp", "-a", src, dst], check=True)  # keeps hard links (the .links pool)


def remove(path: str) -> None:
    subprocess.run(["chmod", "-R", "u+w", path], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _instantiate(root: str, expr: str, env: dict[str, str]) -> str:
    r = subprocess.run(["nix-instantiate", "--store", root, "-E", expr], capture_output=True,
                       text=True, env=env, timeout=120, check=True)
    return r.stdout.strip()


def make_base(d: str, env: dict[str, str]) -> dict[str, str]:
    """The stores the scenarios start from; returns name -> root (and files to add)."""
    root = os.path.join(d, "plain")
    sd = "/nix/store"
    with LocalStore(LocalLayout.chroot(root)) as store:
        gcroots = os.path.join(store.state_dir, "gcroots")
        gens = []
        for i in range(12):
            src = os.path.join(d, "src", f"tree{i}")
            _write(os.path.join(src, "same"), b"shared content\n" * 200)
            _write(os.path.join(src, "sub", "own"), f"tree {i}\n".encode() * 40)
            _write(os.path.join(src, "sub", "dead-only" if i % 2 else "live-only"), f"u{i}\n".encode() * 60)
            os.symlink("sub/own", os.path.join(src, "link"))
            p = store.print_path(store.add_path(src).path)
            if i % 3 == 0:
                os.symlink(p, os.path.join(gcroots, f"r{i}"))
            elif i % 3 == 1:
                gens.append(p)
        for i in range(6):
            store.add_text(f"dead{i}", f"dead {i}\n".encode() * 40)
        # a profile with four generations, the newest current (gc -d deletes 1-3)
        prof = os.path.join(root, GEN_PROFILE)
        os.makedirs(os.path.dirname(prof))
        for n, p in enumerate(gens[:4], 1):
            os.symlink(p, f"{prof}-{n}-link")
        os.symlink("profile-4-link", prof)
        real_store = store.real_store_dir
    # leftovers a GC removes: an unregistered path, an old scratch dir, a stale lock
    junk = os.path.join(real_store, "0" * 32 + "-junk")
    _write(os.path.join(junk, "f"), b"junk\n")
    scratch = os.path.join(real_store, "tmp-1-old")
    _write(os.path.join(scratch, "x"), b"old\n")
    os.utime(scratch, (1, 1))
    _write(os.path.join(real_store, "1" * 32 + "-gone.lock"), b"")
    drvs = {"chain": _instantiate(root, CHAIN, env), "subst": _instantiate(root, SUBST, env)}
    # the binary cache holding SUBST's outputs, built in a store of its own
    other = os.path.join(d, "other")
    sub_drv = _instantiate(other, SUBST, env)
    outs = sk(other, ["build", "--quiet", sub_drv], env).stdout.split()
    cache = os.path.join(d, "cache")
    sk(other, ["copy", "-q", "--to", f"file://{cache}", *outs], env)
    assert drvs["subst"] == sub_drv and sd
    # the same store with its files hard-linked through .links (for GC's pool step)
    optimised = os.path.join(d, "optimised")
    copy_tree(root, optimised)
    with LocalStore(LocalLayout.chroot(optimised)) as store:
        optimise_store(store)
    # what `add` is given: files and a tree, some content shared with the store
    for i in range(8):
        _write(os.path.join(d, "new", f"f{i}"), f"new {i}\n".encode() * 300)
    for i in range(6):
        _write(os.path.join(d, "new", "tree", f"d{i % 2}", f"g{i}"), f"g {i}\n".encode() * 100)
    _write(os.path.join(d, "new", "tree", "same"), b"shared content\n" * 200)
    return {"plain": root, "optimised": optimised, "chain": drvs["chain"], "subst": drvs["subst"],
            "cache": cache, "new": os.path.join(d, "new")}


@dataclass
class Scenario:
    name: str
    base: str               # "plain" or "optimised"
    args: list[str]         # the command (placeholders filled from make_base's dict)
    conf: str = ""          # extra nix.conf lines
    may_delete: bool = False  # the operation deletes paths (GC): compared with a full run
    counts: dict[str, int] = field(default_factory=dict)  # point -> arrivals in a full run
    before: dict[str, str] = field(default_factory=dict)  # valid path -> NAR hash
    kept: set[str] = field(default_factory=set)  # valid before and after a full run


SCENARIOS = [
    Scenario("add", "plain", ["add", "{new}/f0", "{new}/f1", "{new}/f2", "{new}/f3", "{new}/tree"]),
    Scenario("add-optimised", "optimised", ["add", "{new}/tree", "{new}/f4"],
             conf="auto-optimise-store = true\n"),
    Scenario("gc", "optimised", ["gc", "--max-freed", str(2**40)], may_delete=True),
    Scenario("gc-d", "optimised", ["gc", "-d"], may_delete=True),
    Scenario("optimise", "plain", ["optimise"]),
    Scenario("build", "plain", ["build", "--quiet", "{chain}"]),
    # one path at a time: the parallel fetcher's batches (cache.fetch) depend on timing, so
    # its points' occurrence counts would differ between the survey and the kill runs
    Scenario("substitute", "plain", ["build", "--quiet", "{subst}", "--option", "substituters",
                                     "file://{cache}", "--option", "require-sigs", "false",
                                     "--option", "max-substitution-jobs", "1"]),
    Scenario("rollback", "plain", ["profile", "rollback", "-p", "{root}/" + GEN_PROFILE]),
]


def valid_hashes(root: str) -> dict[str, str]:
    with LocalStore(LocalLayout.chroot(root)) as store:
        return {store.print_path(p): store.path_info(p).nar_hash.typed("base32")
                for p in store.query_all_valid_paths()}


class Harness:
    def __init__(self, scratch: str) -> None:
        self.scratch = scratch
        self.env = nix_env(os.path.join(scratch, "env"))
        self.base = make_base(os.path.join(scratch, "base"), self.env)
        self.runs = 0

    def _env(self, sc: Scenario) -> dict[str, str]:
        return nix_env(os.path.join(self.scratch, "env-" + sc.name), sc.conf) if sc.conf else self.env

    def _args(self, sc: Scenario, root: str) -> list[str]:
        return [a.format(root=root, **self.base) for a in sc.args]

    def _fresh(self, sc: Scenario) -> str:
        self.runs += 1
        root = os.path.join(self.scratch, f"run{self.runs}")
        copy_tree(self.base[sc.base], root)
        return root

    def survey(self, sc: Scenario) -> None:
        """One uninterrupted run: which points it reaches how often, what it keeps."""
        root = self._fresh(sc)
        try:
            sc.before = valid_hashes(root)
            log = os.path.join(self.scratch, f"log-{sc.name}")
            sk(root, self._args(sc, root), {**self._env(sc), LOG_ENV: log})
            sc.counts = dict(arrivals(log))
            after = valid_hashes(root)
            sc.kept = {p for p in sc.before if p in after}
            problem = self.check(sc, root)
            assert problem is None, f"{sc.name} without a crash: {problem}"
        finally:
            remove(root)

    def check(self, sc: Scenario, root: str) -> str | None:
        """None if the store is sound (module docstring), else what is wrong."""
        with LocalStore(LocalLayout.chroot(root)) as store:
            valid = {store.print_path(p): p for p in store.query_all_valid_paths()}
            for p, h in sc.before.items():
                if p not in valid:
                    if not sc.may_delete or p in sc.kept:
                        return f"{p} lost"
                    continue
                info = store.path_info(valid[p])
                if info.nar_hash.typed("base32") != h:
                    return f"{p}: its recorded hash changed"
                try:
                    if nar_hash_path(store.real_path(valid[p]))[0].typed("base32") != h:
                        return f"{p} changed on disk"
                except OSError as e:
                    return f"{p} is valid but cannot be read: {e}"
            prof = os.path.join(root, GEN_PROFILE)
            try:  # profile -> profile-N-link -> /nix/store/... (in the chroot)
                target = os.readlink(os.path.join(os.path.dirname(prof), os.readlink(prof)))
            except OSError as e:
                return f"the profile is broken: {e}"
            if target not in valid:
                return f"the profile points at {target}, not a valid path"
            report = verify_store(store, check_contents=True)
            if report.errors:
                return "our verify: " + "; ".join(report.errors[:5])
        n = subprocess.run(["nix-store", "--store", root, "--verify", "--check-contents"],
                           capture_output=True, text=True, env=self.env, timeout=300)
        if n.returncode != 0 or "modified" in n.stderr:
            return "nix verify: " + n.stderr.strip()
        return None

    def kill(self, sc: Scenario, point: str, n: int) -> str | None:
        """SIGKILL ``sc`` at the n-th arrival at ``point``; None if the store passed every check."""
        root = self._fresh(sc)
        try:
            env = self._env(sc)
            args = self._args(sc, root)
            r = sk(root, args, {**env, ENV: f"{point}:{n}"}, check=False)
            if r.returncode != -9:
                return f"not killed (exit {r.returncode}): {r.stderr.strip()[-300:]}"
            problem = self.check(sc, root)
            if problem:
                return "after the kill: " + problem
            again = sk(root, args, env, check=False)
            if again.returncode != 0:
                return "the rerun failed: " + again.stderr.strip()[-500:]
            problem = self.check(sc, root)
            return "after the rerun: " + problem if problem else None
        finally:
            remove(root)


def occurrences(count: int, limit: int) -> list[int]:
    """Which arrivals to kill at: all up to ``limit``, else the first ones, spread ones and the last."""
    if count <= limit:
        return list(range(1, count + 1))
    head = max(1, limit * 2 // 3)
    picks = set(range(1, head + 1)) | {count}
    rest = limit - len(picks)
    for k in range(1, rest + 1):
        picks.add(head + (count - head) * k // (rest + 1))
    return sorted(picks)
