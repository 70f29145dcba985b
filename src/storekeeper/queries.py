"""The queries every store derives from its primitive ones (``query_path_info`` and
friends): :class:`DerivedQueries`, the base of both the local store's reader and the
daemon client's store.

Apart from :mod:`storekeeper.api` (which re-exports it) so that a local query need not
import the store contract's protocol and value types (cold start, bench/startup.py).
"""

from __future__ import annotations

from collections import deque

from .errors import InvalidPath, StoreError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .formats.pathinfo import ValidPathInfo
    from .formats.storepath import StorePath


class DerivedQueries:
    """Answers built on ``query_path_info`` and friends (see module docstring)."""

    def path_info(self, sp: StorePath) -> ValidPathInfo:
        """The info of a valid path; :class:`InvalidPath` otherwise."""
        info = self.query_path_info(sp)  # type: ignore[attr-defined]
        if info is None:
            raise InvalidPath(f"path '{self.store_dir.print(sp)}' is not valid")  # type: ignore[attr-defined]
        return info

    def query_references(self, sp: StorePath) -> set[StorePath]:
        return set(self.path_info(sp).references)

    def query_closure(self, paths: Iterable[StorePath], include_outputs: bool = False,
                      include_derivers: bool = False) -> set[StorePath]:
        """Requisites: everything reachable through references (``-q --requisites``).

        Every start path must be valid; ``include_outputs`` adds the valid
        outputs of derivations met on the way, ``include_derivers`` the valid
        derivers of the paths met.
        """
        seen: set[StorePath] = set()
        queue = deque(paths)
        while queue:
            p = queue.popleft()
            if p in seen:
                continue
            info = self.path_info(p)
            seen.add(p)
            queue.extend(info.references)
            if include_outputs and p.is_derivation:
                queue.extend(o for o in self.query_derivation_outputs(p).values()  # type: ignore[attr-defined]
                             if self.is_valid(o))  # type: ignore[attr-defined]
            if include_derivers and info.deriver and self.is_valid(info.deriver):  # type: ignore[attr-defined]
                queue.append(info.deriver)
        return seen

    def topo_sort(self, paths: Iterable[StorePath]) -> list[StorePath]:
        """Referrers before references within ``paths``; a cycle is an error.

        Deterministic: ties are broken by path order, so every store gives the
        same order for the same graph.
        """
        wanted = set(paths)
        refs: dict[StorePath, list[StorePath]] = {}

        def references(p: StorePath) -> list[StorePath]:
            if p not in refs:
                refs[p] = sorted(self.path_info(p).references & wanted)
            return refs[p]

        order = references_first(
            sorted(wanted), references,
            self.store_dir.print)  # type: ignore[attr-defined]
        order.reverse()
        return order


def references_first(starts: Iterable[StorePath],
                     references: Callable[[StorePath], Iterable[StorePath]],
                     print_path: Callable[[StorePath], str]) -> list[StorePath]:
    """Every path reachable from ``starts`` (in that order) through ``references``,
    each after all of its references (a self-reference is ignored); a cycle is a
    :class:`StoreError`.  Iterative: a long chain does not hit the recursion limit."""
    order: list[StorePath] = []
    state: dict[StorePath, int] = {}  # 1 = on the stack, 2 = done
    for start in starts:
        if state.get(start):
            continue
        stack = [(start, iter(references(start)))]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif nxt == node or state.get(nxt) == 2:
                continue
            elif state.get(nxt) == 1:
                raise StoreError(f"cycle detected in the references of '{print_path(nxt)}'")
            else:
                state[nxt] = 1
                stack.append((nxt, iter(references(nxt))))
    return order
