"""The store layer: files, SQLite, locks, roots, GC, optimise, builds."""
