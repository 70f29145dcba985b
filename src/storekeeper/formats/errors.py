"""Errors raised by the pure format layer."""


class FormatError(ValueError):
    """Input does not follow a Nix format; the message says what and where."""

    exit_code = 65  # sysexits EX_DATAERR (see storekeeper.errors)
