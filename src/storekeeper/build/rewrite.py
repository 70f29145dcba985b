"""Hash rewriting (Nix's): how outputs that are already valid get rebuilt without
ever being written to.

Invariant: **outputs that are already valid are never written to.**  If some
outputs of a derivation are valid but must be built again (``--check``, or a
sibling output is missing), the builder writes them to a scratch path of the
same name, so of the same length (:func:`scratch_path`), and the scratch hash
part is rewritten to the real one afterwards, in the bytes of every output
(:func:`copy_rewritten`); the builder sees the scratch paths wherever the
derivation names those outputs (:func:`input_rewrites`), and the paths it
writes to wherever the derivation has an output's placeholder.

Strings are rewritten as Nix does: pair by pair in key order, each replacing
every occurrence (:func:`rewrite_str`).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

from ..formats.hashes import Hash
from ..formats.storepath import StoreDir, StorePath
from ..fs import remove_tree
from ..fs.narfs import dump_path, restore_nar
from .attrs import placeholder


def scratch_path(sd: StoreDir, drv_path: StorePath, name: str, output: StorePath) -> StorePath:
    """Where output ``name`` (valid at ``output``) is built again."""
    # Same name, so same length: the hash part can be rewritten in place.
    inner = Hash("sha256", bytes(32))
    return sd.make_path(f"rewrite:{sd.print(drv_path)}:name:{name}", inner, output.name)


def input_rewrites(sd: StoreDir, outputs: Mapping[str, StorePath],
                   scratch: Mapping[str, StorePath]) -> dict[str, str]:
    """Each output's placeholder -> the path the builder writes it to, and the real
    hash part -> the scratch one, for the outputs built at a scratch path."""
    rw = {placeholder(o): sd.print(p) for o, p in scratch.items()}
    rw.update({outputs[o].hash_part: p.hash_part for o, p in scratch.items() if p != outputs[o]})
    return rw


def rewrite_str(value: str, rewrites: Mapping[str, str]) -> str:
    for old in sorted(rewrites):
        value = value.replace(old, rewrites[old])
    return value


def rewritten(chunks: Iterable[bytes], rewrites: Mapping[bytes, bytes]) -> Iterator[bytes]:
    """The byte stream with every (32-byte) key replaced by its value, across chunk bounds."""
    if not rewrites:
        yield from chunks
        return
    keep = max(len(k) for k in rewrites) - 1
    buf = b""
    for chunk in chunks:
        buf += chunk
        for old, new in rewrites.items():
            buf = buf.replace(old, new)
        if len(buf) > keep:
            yield buf[:-keep] if keep else buf
            buf = buf[-keep:] if keep else b""
    if buf:
        yield buf


class ChunkReader:
    """``read(n)`` over an iterator of chunks (what ``restore_nar`` consumes)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data


def copy_rewritten(src: str, dest: str, rewrites: Mapping[bytes, bytes]) -> None:
    """A copy of the tree at ``src`` at ``dest`` with hash parts rewritten (through its NAR)."""
    try:
        restore_nar(ChunkReader(rewritten(dump_path(src), rewrites)), dest)
    except BaseException:
        remove_tree(dest)
        raise
