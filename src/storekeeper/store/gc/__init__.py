"""Garbage collection: the collector (its invariants: :mod:`.collector`), the reference
graph it walks (:mod:`.graph`), and the read-only views of roots and liveness that the
``roots``, ``why-alive`` and ``gc --dry-run`` commands show (:mod:`.inspect`).

Nothing is imported here: a read-only view (``roots``) loads neither the collector
nor its threads; import from the submodules.
"""
