"""The storekeeper CLI: nix-store-like output, one-line errors, store selection."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from storekeeper.cli.main import main

TV1 = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt"


@pytest.fixture
def sk(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "root")
    monkeypatch.delenv("NIX_REMOTE", raising=False)

    def run(*args, stdin: bytes | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = main(["--store", root, *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    run.root = root
    return run


def test_add_and_query(sk, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    code, out, _ = sk("add", str(tmp_path / "a.txt"))
    assert (code, out) == (0, TV1 + "\n")
    assert sk("query", "--hash", TV1)[1] == "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\n"
    assert sk("query", "--size", TV1)[1] == "120\n"
    assert sk("query", "--deriver", TV1)[1] == "unknown-deriver\n"
    assert sk("query", "--references", TV1)[1] == ""
    code, out, _ = sk("add", "--flat", "--algo", "md5", str(tmp_path / "a.txt"))
    assert out == "/nix/store/ql4vf9nr3hjsc5rjwh6bsycgb65khwb4-a.txt\n"


def test_add_text_refs_requisites_and_path_info_json(sk, tmp_path):
    code, foo, _ = sk("add-text", "foo.txt", "-", stdin=b"bar")
    foo = foo.strip()
    (tmp_path / "t").write_bytes(f"see {foo}".encode())
    code, ref, _ = sk("add-text", "ref.txt", str(tmp_path / "t"), "--ref", foo)
    ref = ref.strip()
    assert ref == "/nix/store/mhvkn5ih8352mzkrvdyq8mxpnih2nx5a-ref.txt"
    assert sk("query", "--requisites", ref)[1].split() == [foo, ref]  # dependencies first
    assert sk("query", "--referrers", foo)[1].split() == [ref]
    code, out, _ = sk("path-info", "--json", "-r", ref)
    objs = json.loads(out)
    assert [o["path"] for o in objs] == sorted([foo, ref])
    by = {o["path"]: o for o in objs}
    assert by[ref]["references"] == [foo] and by[ref]["narSize"] > 0
    assert by[ref]["ca"].startswith("text:sha256:")


def test_dump_restore_round_trip(sk, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_bytes(b"x\n")
    sk("add", str(d))
    path = "/nix/store/sh3dfhbqwb9ms0j73f1zsx8k72hmdm74-d"
    nar = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "--store", sk.root, "dump", path],
                         capture_output=True, check=True).stdout
    assert len(nar) == 288
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "restore", str(tmp_path / "out")],
                       input=nar, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "x").read_bytes() == b"x\n"
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "restore", str(tmp_path / "bad")],
                       input=nar[:-3], capture_output=True)
    assert r.returncode == 65 and r.stderr.decode().count("\n") == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args,needle,exit_code", [
    (("query", "--hash", "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-missing"), "is not valid", 3),
    (("query", "--hash", "/etc/passwd"), "'/etc/passwd' is not in the Nix store", 2),
    (("add", "/does/not/exist"), "/does/not/exist", 74),
    (("add", "--name", "bad name", "/etc/hostname"), "forbidden character", 65),
])
def test_errors_are_one_line(sk, args, needle, exit_code):
    """One line each, with the exit code of its kind (storekeeper.errors)."""
    code, out, err = sk(*args)
    assert code == exit_code and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert "Traceback" not in err


def test_verify_exit_code(sk, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    sk("add", str(tmp_path / "a.txt"))
    assert sk("verify", "--check-contents")[0] == 0
    real = sk.root + TV1
    os.chmod(real, 0o644)
    with open(real, "wb") as f:
        f.write(b"changed\n")
    code, _, err = sk("verify", "--check-contents")
    assert code == 1 and "was modified" in err


def test_nix_remote_env_selects_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NIX_REMOTE", str(tmp_path / "envroot"))
    assert main(["add-text", "foo.txt", "/etc/hostname"]) == 0
    capsys.readouterr()
    assert os.path.isdir(tmp_path / "envroot" / "nix" / "store")


def test_default_store_is_under_the_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "storekeeper.cli.main", "init"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "data" / "storekeeper" / "root" / "nix" / "store") in r.stdout
    assert os.path.isfile(tmp_path / "data" / "storekeeper" / "root" / "nix/var/nix/db/db.sqlite")


def test_add_algo_choices_are_the_hash_algorithms():
    from storekeeper.cli.parser import HASH_ALGOS
    from storekeeper.formats.hashes import ALGO_SIZES
    assert HASH_ALGOS == tuple(sorted(ALGO_SIZES))


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["query", "--help"]])
def test_version_and_help_import_no_store(args):
    """Cold start (bench/startup.py): the parser alone, neither the store nor the client."""
    code = ("import sys; from storekeeper.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(m for m in sys.modules if m.startswith('storekeeper.')))")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    loaded = r.stdout.splitlines()[-1].split()
    assert not [m for m in loaded if m.split(".")[1] in ("store", "client", "daemon", "build")], loaded
    assert "storekeeper.cli.commands" not in " ".join(loaded)


def test_one_command_parser_parses_as_the_full_one():
    """main builds only the named command's parser (cold start): same parse, same help."""
    from storekeeper.cli.parser import COMMANDS, build_parser, named_command
    assert named_command(["--store", "x", "query", "--hash", "p"]) == "query"
    assert named_command(["--store=x", "gc"]) == "gc"
    assert named_command(["-h", "query"]) is None and named_command(["quer"]) is None
    argv = ["--store", "s", "query", "--hash", "/nix/store/p"]
    assert vars(build_parser("query").parse_args(argv)) == vars(build_parser().parse_args(argv))
    for name in COMMANDS:
        if name != "daemon":
            assert (build_parser(name)._subparsers._group_actions[0].choices[name].format_help()
                    == build_parser()._subparsers._group_actions[0].choices[name].format_help())
