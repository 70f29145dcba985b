"""NAR listings: the JSON tree of a ``<hash>.ls`` file (spec binary-cache.md §6).

``{"version":1,"root":<node>}``; a regular node is ``{"type":"regular","size":N}``
plus ``"executable":true`` when executable and ``"narOffset":N`` (where its
contents start in the uncompressed NAR) when non-zero; directories have
``"entries"``, symlinks ``"target"``.  Key order is Nix's; the text is compact
JSON with no trailing newline (the caller's ``json.dumps``).
"""

from __future__ import annotations

from typing import Any, Callable


class ListingSink:
    """A :class:`~storekeeper.formats.nar.NarSink` that builds the listing; ``position()``
    is the number of NAR bytes read so far (the contents offset at ``regular_start``)."""

    def __init__(self, position: Callable[[], int]) -> None:
        self._position = position
        self.root: dict[str, Any] = {}
        self._nodes: dict[bytes, dict[str, Any]] = {}

    def _place(self, path: bytes, node: dict[str, Any]) -> None:
        if not path:
            self.root = node
        else:
            parent, _, name = path.rpartition(b"/")
            self._nodes[parent]["entries"][name.decode("utf-8", "surrogateescape")] = node
        self._nodes[path] = node

    def directory(self, path: bytes) -> None:
        self._place(path, {"type": "directory", "entries": {}})

    def regular_start(self, path: bytes, executable: bool, size: int) -> None:
        node: dict[str, Any] = {"type": "regular", "size": size}
        if executable:
            node["executable"] = True
        offset = self._position()
        if offset:
            node["narOffset"] = offset
        self._place(path, node)

    def regular_data(self, chunk: bytes) -> None:
        pass

    def regular_end(self) -> None:
        pass

    def symlink(self, path: bytes, target: bytes) -> None:
        self._place(path, {"type": "symlink", "target": target.decode("utf-8", "surrogateescape")})
