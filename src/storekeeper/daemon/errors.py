"""Errors an operation raises for the session to report to the client."""

from __future__ import annotations

from ..errors import StoreError


class OpError(StoreError):
    """An operation is refused or failed; the message is shown to the client."""


class NotSupported(OpError):
    """An operation storekeeper's daemon does not implement yet."""
