"""The goal graph: one goal per target path and per derivation reachable from the
targets, what each must build, and its output paths and hashes.

Invariant, **pin, then check** (as :class:`~storekeeper.store.local.LocalStore`):
every ``.drv``, input and output path is pinned (a temp root that lives as long
as the store object, i.e. the daemon connection) before its validity is looked
at.  Inputs therefore survive a concurrent GC for the whole build, an output
being built (an invalid store-path name in the store) is left alone by the GC,
and a client is handed outputs that stay valid until it has made its own root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..errors import StoreError
from ..formats.derivation import (
    Derivation,
    DerivationType,
    derivation_type,
    hash_derivation_modulo,
)
from ..formats.errors import FormatError
from ..formats.storepath import StoreDir, StorePath, output_path_name
from .attrs import AttrError, DrvAttrs
from .results import BuildMode, BuildResult, BuildStatus, Failure


@dataclass(eq=False)
class Goal:
    top: bool = False
    result: BuildResult | None = None
    deps: list["Goal"] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def failed(self) -> bool:
        return self.result is not None and not self.result.success


@dataclass(eq=False, kw_only=True)
class PathGoal(Goal):
    path: StorePath


@dataclass(eq=False, kw_only=True)
class DrvGoal(Goal):
    drv_path: StorePath
    drv: Derivation | None = None  # read when the goal is first expanded
    basic: bool = False                       # from BuildDerivation: no input drvs to realise
    wanted: set[str] | None = field(default_factory=set)  # None: all outputs
    mode: BuildMode = BuildMode.NORMAL
    outputs: dict[str, StorePath] = field(default_factory=dict)
    hashes: dict[str, bytes] = field(default_factory=dict)
    need_build: bool = False
    expanded: bool = False
    ready: bool = False
    waiting_note: str = ""                   # what we already told the client we wait for
    wait_act: int | None = None
    attrs: DrvAttrs | None = None  # parsed on first use (:meth:`parsed_attrs`)

    def parsed_attrs(self, sd: StoreDir) -> DrvAttrs:
        """The derivation's attributes (``__json`` parsed once)."""
        if self.attrs is None:
            assert self.drv is not None
            try:
                self.attrs = DrvAttrs(self.drv.env, sd.print(self.drv_path))
            except AttrError as e:
                raise Failure(BuildStatus.MISC_FAILURE, str(e)) from None
        return self.attrs

    def want(self, outputs: Iterable[str] | None) -> bool:
        """Add wanted outputs (None = all); True if that changed anything."""
        if self.wanted is None:
            return False
        if outputs is None:
            self.wanted = None
            return True
        new = set(outputs) - self.wanted
        self.wanted |= new
        return bool(new)

    def wanted_names(self) -> list[str]:
        assert self.drv is not None
        return sorted(self.drv.outputs) if self.wanted is None else sorted(self.wanted)


class GoalGraph:
    """The goals of one build request on one store (module docstring)."""

    def __init__(self, store) -> None:
        self.store = store
        self.sd = store.store_dir
        self.drvs: dict[StorePath, DrvGoal] = {}
        self.paths: dict[StorePath, PathGoal] = {}
        self._hash_cache: dict = {}

    def drv_goal(self, drv_path: StorePath) -> DrvGoal:
        g = self.drvs.get(drv_path)
        if g is None:
            g = self.drvs[drv_path] = DrvGoal(drv_path=drv_path)
        return g

    def path_goal(self, path: StorePath) -> PathGoal:
        g = self.paths.get(path)
        if g is None:
            g = self.paths[path] = PathGoal(path=path)
            if self.store.pin_valid(path):
                g.result = BuildResult(BuildStatus.ALREADY_VALID)
            else:
                g.result = BuildResult(
                    BuildStatus.NO_SUBSTITUTERS,
                    f"path '{self.sd.print(path)}' is required, but there is no substituter "
                    "that can build it", own_error=False)
        return g

    def evaluate(self, g: DrvGoal) -> list[DrvGoal]:
        """Decide whether ``g`` must be built; the input goals to (re)evaluate."""
        store, sd = self.store, self.sd
        printed = sd.print(g.drv_path)
        if g.drv is None:
            if not store.pin_valid(g.drv_path):
                raise Failure(BuildStatus.MISC_FAILURE, f"cannot build missing derivation '{printed}'")
            g.drv = store._read_drv_file(g.drv_path)
        drv = g.drv
        if not g.outputs:
            g.outputs = self.output_paths(g)
            for p in g.outputs.values():
                store.pin(p)
        missing = [o for o in (g.wanted or ()) if o not in drv.outputs]
        if missing:
            raise Failure(BuildStatus.MISC_FAILURE, f"derivation '{printed}' does not have wanted "
                          f"outputs {', '.join(repr(m) for m in sorted(missing))}")
        valid = {o: store.is_valid(p) for o, p in g.outputs.items()}
        if g.mode == BuildMode.CHECK:
            if not all(valid.values()):
                raise Failure(BuildStatus.MISC_FAILURE, f"some outputs of '{printed}' are not "
                              "valid, so checking is not possible")
            g.need_build = True
        else:
            g.need_build = not all(valid[o] for o in g.wanted_names())
        if not g.need_build or g.expanded:
            return []
        g.expanded = True
        more: list[DrvGoal] = []
        if not g.basic:
            for path, outs in sorted(drv.input_drvs.items()):
                child = self.drv_goal(sd.parse(path, lax=True))
                g.deps.append(child)
                if child.want(outs) or not child.expanded:
                    more.append(child)
        for path in sorted(drv.input_srcs):
            g.deps.append(self.path_goal(sd.parse(path, lax=True)))
        return more

    def output_paths(self, g: DrvGoal) -> dict[str, StorePath]:
        """The output paths of a derivation; fixed ones are recomputed from their hash."""
        drv, sd = g.drv, self.sd
        assert drv is not None and g.drv_path is not None
        printed = sd.print(g.drv_path)
        try:
            kind = derivation_type(drv)
        except FormatError as e:
            raise Failure(BuildStatus.MISC_FAILURE, f"derivation '{printed}': {e}") from None
        if kind not in (DerivationType.INPUT_ADDRESSED, DerivationType.CA_FIXED):
            raise Failure(BuildStatus.MISC_FAILURE,
                          f"cannot build '{printed}': {kind.value} derivations (experimental "
                          "content-addressed or impure derivations) are not supported")
        out: dict[str, StorePath] = {}
        for name, o in drv.outputs.items():
            p = sd.parse(o.path, lax=True)
            if o.is_fixed:
                should = sd.make_fixed_output_path(output_path_name(g.drv_path.name[:-4], name),
                                                   o.recursive, o.fixed_hash())
                if should != p:
                    raise Failure(BuildStatus.MISC_FAILURE,
                                  f"derivation '{printed}' has incorrect output '{o.path}', "
                                  f"should be '{sd.print(should)}'")
            out[name] = p
        return out

    def output_hashes(self, g: DrvGoal) -> dict[str, bytes]:
        if not g.hashes:
            assert g.drv is not None  # evaluate read it
            def read(path: str) -> Derivation:
                return self.store.read_derivation(self.sd.parse(path, lax=True))
            g.hashes = hash_derivation_modulo(g.drv, self.sd, read, True, self._hash_cache,
                                              drv_name=g.drv_path.name[:-4])
        return g.hashes

    def valid_result(self, g: DrvGoal, status: BuildStatus, **kw) -> BuildResult:
        """A success for ``g``: its wanted outputs and their hashes."""
        built = {o: g.outputs[o] for o in g.wanted_names()}
        try:
            hashes = self.output_hashes(g)
        except (FormatError, StoreError):
            hashes = {}
        return BuildResult(status, built_outputs=built, output_hashes=hashes, **kw)

    def input_closure(self, g: DrvGoal) -> set[StorePath]:
        """The closure of what ``g``'s builder may refer to (its inputs' outputs, sources)."""
        store, sd, drv = self.store, self.sd, g.drv
        assert drv is not None
        start: set[StorePath] = {sd.parse(p, lax=True) for p in drv.input_srcs}
        for path, outs in drv.input_drvs.items():
            dep = self.drvs.get(sd.parse(path, lax=True))
            if dep is not None and dep.outputs:
                start.update(dep.outputs[o] for o in outs if o in dep.outputs)
            else:
                paths = store.query_derivation_outputs(sd.parse(path, lax=True))
                start.update(paths[o] for o in outs if o in paths)
        return store.query_closure(start)
