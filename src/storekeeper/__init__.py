"""storekeeper: a Nix-compatible package store and store daemon.

Layers import only downward: ``formats`` (pure bytes) <- ``store`` (files,
SQLite, locks) <- ``daemon`` / ``client`` <- ``cli``.
"""

__version__ = "0.1.0"
