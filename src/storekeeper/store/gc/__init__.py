"""Garbage collection: the collector (its invariants: :mod:`.collector`), the reference
graph it walks (:mod:`.graph`), and the read-only views of roots and liveness that the
``roots``, ``why-alive`` and ``gc --dry-run`` commands show (:mod:`.inspect`)."""

from .collector import SCRATCH_GRACE_SECONDS, GarbageCollector, delete_tree
from .graph import Graph

__all__ = ["SCRATCH_GRACE_SECONDS", "GarbageCollector", "Graph", "delete_tree"]
