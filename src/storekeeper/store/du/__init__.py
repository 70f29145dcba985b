"""Where the store's space goes (``storekeeper du``): per root, exclusive and shared bytes
(:mod:`.space`), and the self-contained HTML treemap of it (:mod:`.html`)."""

from .space import SpaceReport, by_owner, compute

__all__ = ["SpaceReport", "by_owner", "compute"]
