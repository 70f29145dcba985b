"""``python -m storekeeper.daemon …`` is ``storekeeper daemon …``."""

from .cli import daemon_entry

daemon_entry()
