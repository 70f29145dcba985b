"""Settings: nix.conf syntax (:mod:`.nixconf`) and the one table of every setting
storekeeper knows (:mod:`.settings`).

Layering: imports nothing from ``store``, ``build`` or ``daemon``; it sits
beside ``formats``, below ``store``.  Errors are :class:`SettingError`
(a ``ValueError``); the store's typed views turn them into ``StoreError``.
"""

from .nixconf import SettingError, nix_conf_path, parse_nix_conf, read_nix_conf
from .settings import SETTINGS, Setting, lookup

__all__ = ["SETTINGS", "Setting", "SettingError", "lookup", "nix_conf_path", "parse_nix_conf",
           "read_nix_conf"]
