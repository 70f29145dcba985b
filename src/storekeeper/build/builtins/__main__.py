"""``python -m storekeeper.build.builtins NAME``: run one builtin builder in this
process, with the builder environment it was given (see ``__init__``)."""

from __future__ import annotations

import os
import sys

from . import run

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m storekeeper.build.builtins NAME\n")
        sys.exit(2)
    sys.exit(run(sys.argv[1], os.environ))
