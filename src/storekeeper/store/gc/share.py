"""Shared collections: full GCs that queue behind a running one share the next run.

A request to delete every dead path ("``--gc``": :data:`DELETE_DEAD` of the whole store,
no byte budget, liveness not ignored) asks for the store as it is *after* the
request: any collection that takes ``gc.lock`` after the request arrived and finds its
roots from then on sees every root the request's own run would have seen, and deletes
everything that run would have deleted.  So requests that queue while a collection is
running need one more run between them, not one each: on a busy daemon (one process
per connection, several clients collecting) N queued GCs cost two runs instead of N
serial ones.  Nothing else is shared: a byte budget, specific paths, the print actions
and auto-GC (which re-checks free space under the lock) always run themselves.

Invariants (files in ``<state>/gc-share/``; every process of this store, whatever user
it serves, takes part; Nix's own GC does not, and is simply never shared):

* ``started`` holds the number of the last shareable run that took ``gc.lock``; it is
  raised by that run, under ``gc.lock`` EX, **before** it reads any root.  A request
  reads it before it asks for the lock: a run whose number is higher started its
  root scan after the request arrived.
* ``done`` is the result of the last shareable run to finish: its number, its key (the
  settings that decide liveness: ``keep-outputs``, ``keep-derivations``,
  ``runtime-roots``, the indirect roots' grace), the bytes it freed and the paths it
  deleted.  It is written under ``gc.lock`` EX before the lock is released, only by a
  run that finished without an error.  A queued request whose key is the same and whose
  number at arrival is lower than ``done``'s is **served**: it returns that run's
  result (the paths that run deleted and the bytes it freed, as if it had run them
  itself: it asked for them to be gone, and they are) and deletes nothing itself.
* Both files carry the boot id: they are written without fsync (a lost one only costs
  a run), and a record from another boot counts as absent, so a number can never seem
  to have been reached before it was.
* A queued request waits for the running collection with ``gc.lock`` *shared* (it
  never holds up a pin, and all of them wake at once when the run ends).  One of those
  not served becomes the next collector by holding ``next.lock`` until it has
  ``gc.lock`` EX; the others wait for it to get there, then for its run.
* A run never trusts another process for safety: each run finds its own roots under
  the lock, as always.  Sharing only decides whether a request needs a run at all.
"""

from __future__ import annotations

import json
import os

from ...api import DELETE_DEAD, GCOptions, GCResult
from ...fs.atomic import write_file_atomic
from ..locks import lock_fd, open_lock_file, unlock_fd

ALL = 2**64 - 1


def shareable(opts: GCOptions) -> bool:
    """A request that any run starting after it can serve (see the module docstring)."""
    return (opts.action == DELETE_DEAD and not opts.specific and not opts.paths
            and not opts.ignore_liveness and opts.max_freed == ALL and opts.wait_for_lock
            and opts.only_if is None)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


class SharedRuns:
    """The ``gc-share`` records of one store, for one request (see the module docstring)."""

    def __init__(self, state_dir: str, key: str) -> None:
        self.dir = os.path.join(state_dir, "gc-share")
        self.key = key
        self.boot = _boot_id()
        self.seq: int | None = None  # this process's run, once started

    @classmethod
    def for_request(cls, store, opts: GCOptions) -> "SharedRuns | None":
        if not shareable(opts) or store.read_only:
            return None
        cfg = store.settings
        key = json.dumps({"keep-outputs": opts.keep_outputs, "keep-derivations": opts.keep_derivations,
                          "runtime-roots": cfg.runtime_roots,
                          "indirect-root-grace": cfg.indirect_root_grace}, sort_keys=True)
        runs = cls(store.state_dir, key)
        return runs if runs.boot is not None else None

    # --- the records -------------------------------------------------------------------

    def _read(self, name: str) -> tuple[dict, bytes] | None:
        """A record's header and the rest of it; None if absent, unreadable or from another boot."""
        try:
            fd = os.open(os.path.join(self.dir, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        head, _, rest = b"".join(chunks).partition(b"\n")
        try:
            rec = json.loads(head)
        except ValueError:
            return None
        if not isinstance(rec, dict) or rec.get("boot") != self.boot or not isinstance(rec.get("seq"), int):
            return None
        return rec, rest

    def _write(self, name: str, rec: dict, body: bytes = b"") -> None:
        # not durable: after a crash the boot id no longer matches (module docstring)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        write_file_atomic(os.path.join(self.dir, name), json.dumps(rec).encode() + b"\n" + body,
                          mode=0o600, durable=False)

    def last_started(self) -> int:
        got = self._read("started")
        return got[0]["seq"] if got is not None else 0

    def _served(self, arrived: int) -> GCResult | None:
        got = self._read("done")
        if got is None:
            return None
        rec, body = got
        if rec["seq"] <= arrived or rec.get("key") != self.key:
            return None
        paths = body.decode(errors="replace").split("\n")[:-1] if body else []
        if len(paths) != rec.get("count") or not isinstance(rec.get("bytes"), int):
            return None  # (not what a run wrote: run ourselves)
        return GCResult(paths=paths, bytes_freed=rec["bytes"])

    # --- a request that found gc.lock taken ------------------------------------------

    def wait(self, gc_fd: int, arrived: int) -> GCResult | None:
        """Wait for the running collection; the result of a run that started after the
        request arrived (``gc.lock`` not held), or None with ``gc.lock`` EX ours."""
        try:
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            next_fd = open_lock_file(os.path.join(self.dir, "next.lock"))
        except OSError:
            lock_fd(gc_fd, exclusive=True)  # (no room for the records: queue as before)
            return None
        try:
            while True:
                # shared: a pin is never held up by us, and every waiter wakes when the run ends
                lock_fd(gc_fd, exclusive=False)
                unlock_fd(gc_fd)
                served = self._served(arrived)
                if served is not None:
                    return served
                if lock_fd(next_fd, exclusive=True, wait=False):
                    # the next collector: the other waiters wait for its run
                    lock_fd(gc_fd, exclusive=True)
                    unlock_fd(next_fd)
                    served = self._served(arrived)  # (a run may have come and gone meanwhile)
                    if served is not None:
                        unlock_fd(gc_fd)
                    return served
                # another waiter is becoming the collector: once it holds gc.lock, wait for its run
                lock_fd(next_fd, exclusive=False)
                unlock_fd(next_fd)
        finally:
            os.close(next_fd)

    # --- the run (gc.lock EX held) ------------------------------------------------------

    def start(self) -> None:
        """Number this run, before it reads any root; unnumbered (never shared) if that fails."""
        seq = self.last_started() + 1
        try:
            self._write("started", {"boot": self.boot, "seq": seq})
        except OSError:
            return
        self.seq = seq

    def finish(self, result: GCResult) -> None:
        """Publish the result of a run that went to the end (still under gc.lock)."""
        if self.seq is None:
            return
        body = "".join(p + "\n" for p in result.paths).encode()
        try:
            self._write("done", {"boot": self.boot, "seq": self.seq, "key": self.key,
                                 "bytes": result.bytes_freed, "count": len(result.paths)}, body)
        except OSError:
            pass  # (an older record cannot serve a request this run could: its number is lower)
