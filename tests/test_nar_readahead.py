"""The NAR reader through :class:`~storekeeper.formats.streams.ReadAhead` (how a binary
cache's verified NAR is unpacked): the same trees, the same refusals at the same
offsets, the bytes it handed out counted exactly, against our writer and NARs made by
real Nix; and a cache stream that holds more than its NAR is still refused."""

from __future__ import annotations

import io
import os
import random

import pytest
from conftest import needs_nix, run_nix
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nar import MALFORMED, TV2, ShortReads, trees

from storekeeper.errors import BadArchive
from storekeeper.formats.hashes import Hash
from storekeeper.formats.nar import NarError, NullSink, dump_node, parse_to_node, read_nar
from storekeeper.formats.pathinfo import ValidPathInfo
from storekeeper.formats.streams import ReadAhead, SelfChecking
from storekeeper.formats.url import LocalLayout
from storekeeper.fs.narfs import nar_hash_path
from storekeeper.store.local import LocalStore


def _parse(stream) -> object:
    sink = _Tree()
    read_nar(stream, sink)
    return sink.nodes


class _Tree:
    """Records every sink call, contents joined per file."""

    def __init__(self) -> None:
        self.nodes: list[tuple] = []

    def directory(self, path: bytes) -> None:
        self.nodes.append(("d", path))

    def regular_start(self, path: bytes, executable: bool, size: int) -> None:
        self.nodes.append(("f", path, executable, size, bytearray()))

    def regular_data(self, chunk: bytes) -> None:
        self.nodes[-1][4].extend(chunk)

    def regular_end(self) -> None:
        pass

    def symlink(self, path: bytes, target: bytes) -> None:
        self.nodes.append(("l", path, target))


@settings(max_examples=100)
@given(trees, st.integers(0, 2**32), st.integers(1, 80))
def test_same_tree_and_size_as_without_read_ahead(node, seed, chunk):
    nar = dump_node(node)
    ra = ReadAhead(ShortReads(nar, seed), chunk)
    assert _parse(ra) == _parse(io.BytesIO(nar))
    assert ra.size == len(nar)
    assert parse_to_node(nar) == node


@pytest.mark.parametrize("chunk", [1, 7, 8, 24, 1 << 16])
@pytest.mark.parametrize("data,problem", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_is_refused_the_same_way(data, problem, chunk):
    with pytest.raises(NarError) as direct:
        read_nar(io.BytesIO(data), NullSink())
    with pytest.raises(NarError) as ahead:
        read_nar(ReadAhead(io.BytesIO(data), chunk), NullSink())
    assert str(ahead.value) == str(direct.value) and problem in str(ahead.value)


def test_every_truncation_is_refused_at_its_offset():
    nar = dump_node(TV2)
    for cut in range(len(nar)):
        with pytest.raises(NarError, match="unexpected end of NAR") as ei:
            read_nar(ReadAhead(io.BytesIO(nar[:cut]), 16), NullSink())
        assert ei.value.offset == cut


@needs_nix
def test_nars_made_by_nix(tmp_path):
    rnd = random.Random(3)
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "big").write_bytes(rnd.randbytes(300_000))  # bigger than a read-ahead chunk
    (src / "empty").write_bytes(b"")
    (src / "odd").write_bytes(b"x" * 13)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "sub" / "deeper" / "f").write_bytes(rnd.randbytes(70_000))
    os.symlink("../big", src / "sub" / "link")
    nar = run_nix(["nix-store", "--dump", str(src)], str(tmp_path)).stdout
    for chunk in (5, 4096, 1 << 16):
        for seed in range(3):
            ra = ReadAhead(ShortReads(nar, seed) if seed else io.BytesIO(nar), chunk)
            assert _parse(ra) == _parse(io.BytesIO(nar))
            assert ra.size == len(nar)
    assert nar_hash_path(str(src))[0] == Hash.of("sha256", nar)


class _Checked(SelfChecking):
    """A cache-like stream of ``data`` whose NarHash and NarSize are those of all of it."""

    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)
        self._checks = (Hash.of("sha256", data), len(data))

    @property
    def checks(self) -> tuple[object, int]:
        return self._checks

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)

    def finish(self) -> None:
        self._io.read()


def test_a_nar_followed_by_more_bytes_is_refused(tmp_path):
    """NarHash and NarSize of the whole stream match, but the NAR in it is shorter: the
    read-ahead took the rest, the bytes the parser used are what is compared."""
    store = LocalStore(LocalLayout.chroot(str(tmp_path / "root")))
    try:
        nar = dump_node(TV2)
        data = nar + bytes(64)
        path = store.store_dir.parse("/nix/store/" + "a" * 32 + "-x")
        stream = _Checked(data)
        info = ValidPathInfo(path, *stream.checks)  # type: ignore[arg-type]
        with pytest.raises(BadArchive, match="size mismatch"):
            store.stage_nar(info, stream)
        assert not [n for n in os.listdir(store.real_store_dir) if n.startswith("tmp-sk-")]
        staged = store.stage_nar(ValidPathInfo(path, *_Checked(nar).checks), _Checked(nar))  # type: ignore[arg-type]
        assert staged.tree is not None and nar_hash_path(staged.tree)[0] == Hash.of("sha256", nar)
        staged.discard()
        assert not [n for n in os.listdir(store.real_store_dir) if n.startswith("tmp-sk-")]
    finally:
        store.close()
