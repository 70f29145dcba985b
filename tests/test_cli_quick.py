"""The hand parser of the hot path (storekeeper.cli.quick) against argparse
(storekeeper.cli.parser): what it takes parses to the same values, and every command
line, good or bad, gives the same output, errors and exit code either way."""

from __future__ import annotations

import subprocess
import sys

import pytest

from storekeeper.cli import quick
from storekeeper.cli.main import main
from storekeeper.cli.parser import parse_args

P = "/nix/store/p49w25yn5waa0h5f84jyn2msibdrjzdk-README.md"

#: command lines (after ``--store ROOT``, ``{p}`` a valid path, ``{q}`` an invalid one)
CASES = [
    ["query", "--hash", "{p}"],
    ["query", "--size", "{p}"],
    ["query", "--references", "{p}"],
    ["query", "--referrers", "{p}"],
    ["query", "--requisites", "{p}"],
    ["query", "--requisites", "--include-outputs", "{p}"],
    ["query", "--include-outputs", "--requisites", "{p}"],
    ["query", "--deriver", "{p}"],
    ["query", "--outputs", "{p}"],
    ["query", "--hash", "{p}", "{p}"],
    ["query", "--hash", "{p}/sub/dir"],
    ["query", "--hash", "{q}"],                     # not valid: exit 3
    ["query", "--hash", "{p}", "{q}"],
    ["query", "--hash", "/tmp/not-in-the-store"],   # usage: exit 2
    ["query", "--hash", "relative/path"],
    # argparse decides these (the hand parser declines them)
    ["query", "{p}", "--hash"],
    ["query", "--hash", "{p}", "--include-outputs"],
    ["query", "--ha", "{p}"],                       # an abbreviation argparse accepts
    ["query", "--hash=x", "{p}"],
    ["query", "--hash", "--", "{p}"],
    ["query", "--hash", ""],
    ["query", "--hash", "-x"],
    ["query", "--hash", "--hash", "{p}"],
    ["query", "--include-outputs", "--include-outputs", "--hash", "{p}"],
    ["query", "--hash", "--size", "{p}"],           # mutually exclusive
    ["query", "--hash"],                            # no path
    ["query", "{p}"],                               # no --what
    ["query"],
    ["query", "--bogus", "{p}"],
    ["query", "-h"],
    ["query", "--hash", "{p}", "--store", "x"],
    # the plain roots and verify (issue 20), and what argparse decides for them
    ["roots"],
    ["roots", "--no-size"],
    ["roots", "--json", "--no-size"],
    ["verify"],
    ["verify", "--json"],
    ["verify", "--check-contents", "--json"],
    ["verify", "--repair"],
    ["roots", "--no-size", "--no-size"],
    ["roots", "--no"],
    ["roots", "-h"],
    ["verify", "--json", "--json"],
    ["verify", "--sigs"],
    ["verify", "{p}"],
    # why-alive PATH (issue 20), and what argparse decides for it
    ["why-alive", "{p}"],                           # not alive: exit 1
    ["why-alive", "{q}"],                           # not valid: exit 3
    ["why-alive", "relative/path"],
    ["why-alive", "-h"],
    ["why-alive"],
    ["why-alive", "{p}", "{p}"],
    ["why-alive", "--", "{p}"],
    ["why-alive", ""],
]


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """A chroot store with one path: (its root, the path)."""
    tmp = tmp_path_factory.mktemp("quick")
    root, src = str(tmp / "root"), tmp / "hello.txt"
    src.write_text("hello, quick parser\n")
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "--store", root, "add",
                        str(src)], capture_output=True, text=True, check=True)
    return root, r.stdout.strip()


@pytest.fixture(scope="module")
def store(added):
    return added[0]


@pytest.fixture(scope="module")
def path(added):
    return added[1]


def _argv(case: list[str], store: str, path: str) -> list[str]:
    q = path[:-len("hello.txt")] + "other.txt"
    return ["--store", store] + [a.format(p=path, q=q) for a in case]


def _run(argv: list[str], capsys, monkeypatch, use_argparse: bool) -> tuple[object, str, str]:
    with monkeypatch.context() as m:
        if use_argparse:
            m.setattr(quick, "parse", lambda _argv: None)
        try:
            code: object = main(list(argv))
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(c))
def test_same_output_and_exit_code_as_argparse(case, store, path, capsys, monkeypatch):
    argv = _argv(case, store, path)
    quick_run = _run(argv, capsys, monkeypatch, use_argparse=False)
    argparse_run = _run(argv, capsys, monkeypatch, use_argparse=True)
    assert quick_run == argparse_run


@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(c))
def test_what_it_takes_parses_as_argparse_does(case, store, path):
    argv = _argv(case, store, path)
    parsed = quick.parse(argv)
    if parsed is None:
        return  # argparse's (the test above checks the whole run)
    assert not isinstance(parsed, str)
    assert vars(parsed) == vars(parse_args(argv))


def test_it_takes_the_hot_path():
    """The plain shapes are taken (else the hand parser would save nothing)."""
    taken = [["--version"], ["query", "--hash", P], ["--store", "/s", "query", "--size", P, P],
             ["--store", "", "query", "--include-outputs", "--requisites", P],
             ["roots"], ["--store", "/s", "roots", "--no-size"], ["verify"],
             ["verify", "--check-contents", "--repair", "--json"], ["why-alive", P]]
    for argv in taken:
        assert quick.parse(argv) is not None, argv
    declined = [["--version", "x"], ["--store", "-x", "query", "--hash", P], ["query", "--hash"],
                ["gc"], ["query", P, "--hash"], ["--store"], [], ["roots", "--size"],
                ["verify", "--sigs"], ["verify", P], ["why-alive"], ["why-alive", P, P], ["why-alive", "-h"]]
    for argv in declined:
        assert quick.parse(argv) is None, argv


@pytest.mark.parametrize("argv", [["--version"], ["--store", "x", "--version"], ["--version", "x"]])
def test_version_as_argparse(argv, capsys, monkeypatch):
    assert _run(argv, capsys, monkeypatch, False) == _run(argv, capsys, monkeypatch, True)


def test_query_imports_no_parser_and_no_heavy_module(store, path):
    """Cold start (bench/startup.py): a plain query loads neither argparse nor the modules
    that cost most of a start (dataclasses with inspect, typing, socket, re with enum)."""
    code = ("import sys; from storekeeper.cli.main import main\n"
            "code = main(sys.argv[1:])\n"
            "print(' '.join(sorted(sys.modules)))\n"
            "sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code, "--store", store, "query", "--hash", path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sha256:")
    loaded = set(r.stdout.splitlines()[-1].split())
    assert "storekeeper.store.reader" in loaded  # (it did open the store)
    heavy = {"argparse", "dataclasses", "inspect", "typing", "socket", "re", "enum", "random",
             "base64", "shlex", "storekeeper.cli.parser", "storekeeper.api"}
    assert not heavy & loaded, sorted(heavy & loaded)


@pytest.mark.parametrize("command", [["roots", "--no-size"], ["verify"]])
def test_roots_and_verify_import_no_parser_and_no_local_store(command, store):
    """Issue 20: `roots --no-size` (Nix's --print-roots is 0.03 s) and a plain verify open
    a StoreReader: no argparse, and none of the LocalStore's, the collector's (threads),
    the policies' or the signatures' (cryptography) modules."""
    code = ("import sys; from storekeeper.cli.main import main\n"
            "code = main(sys.argv[1:])\n"
            "print(' '.join(sorted(sys.modules)))\n"
            "sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code, "--store", store, *command],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.splitlines()[-1].split())
    assert "storekeeper.store.reader" in loaded
    heavy = {"argparse", "storekeeper.cli.parser", "storekeeper.store.local",
             "storekeeper.store.gc.collector", "storekeeper.store.policy", "concurrent.futures",
             "cryptography"}
    assert not heavy & loaded, sorted(heavy & loaded)
