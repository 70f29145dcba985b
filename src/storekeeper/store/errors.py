"""Errors of the store layer; the CLI prints their message as one line."""


class StoreError(Exception):
    """A store operation failed; the message names the path or setting at fault."""


class InvalidPath(StoreError):
    """A path was expected to be valid in the store and is not."""


class ReadOnlyStore(StoreError):
    """A write was attempted on a store that is read-only."""


class BadArchive(StoreError):
    """An incoming NAR or its metadata did not check out; nothing was registered."""
