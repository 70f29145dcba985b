"""A hand parser for the command lines run most often from scripts: ``--version``,
``query``, ``why-alive PATH``, and the plain ``roots`` and ``verify`` (cold start, issues 12 and 20:
argparse, with the gettext, locale and shutil it loads, is a third of a query's start).

It takes only the plain shape of those command lines and answers None for anything
else (an abbreviation, ``--opt=value``, ``--``, ``-h``, a repeated or missing option, an
argument that starts with ``-``): the caller then parses with argparse
(:mod:`storekeeper.cli.parser`), which gives every usage error and all help.  So what
it takes parses to the same values argparse gives (``tests/test_cli_quick.py``).
"""

from __future__ import annotations

from .. import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from argparse import Namespace as Args
    from collections.abc import Sequence
else:
    class Args:
        """The parsed command line: the attributes argparse's Namespace would have."""

        def __init__(self, **values: object) -> None:
            self.__dict__.update(values)


#: ``query``'s mutually exclusive (and required) choice of what to print (the argparse
#: parser's too)
QUERY_WHAT = ("references", "referrers", "requisites", "hash", "size", "deriver", "outputs")
_WHAT_OPTS = {f"--{w}": w for w in QUERY_WHAT}


#: the plain shapes of ``roots`` and ``verify`` taken here: each flag at most once, nothing else
_FLAGS = {"roots": ("--json", "--no-size"), "verify": ("--check-contents", "--repair", "--json")}


def verify_reads_only(repair: bool, sigs: bool) -> bool:
    """Whether ``verify`` can run on a :class:`~storekeeper.store.reader.StoreReader`
    (``queries_only``): all but a repair, which invalidates paths through the
    LocalStore, and the signature check (the trust settings of a LocalStore)."""
    return not (repair or sigs)


def parse(argv: Sequence[str]) -> Args | str | None:
    """``query``'s, ``why-alive``'s, ``roots``' or ``verify``'s arguments as argparse would parse them; the
    text to print for a lone ``--version``; None when argparse must decide."""
    if list(argv) == ["--version"]:
        return f"storekeeper {__version__}"
    i, store = 0, None
    if len(argv) >= 2 and argv[0] == "--store":
        store, i = argv[1], 2
        if store.startswith("-"):
            return None
    if i < len(argv) and argv[i] in _FLAGS:
        return _flags_only(argv[i], argv[i + 1:], store)
    if argv[i:i + 1] == ["why-alive"] and len(argv) == i + 2 and argv[i + 1] and not argv[i + 1].startswith("-"):
        return Args(store=store, command="why-alive", path=argv[i + 1], func="why.cmd_why_alive",
                    queries_only=True)
    if i >= len(argv) or argv[i] != "query":
        return None
    what, include_outputs = None, False
    paths: list[str] = []
    for a in argv[i + 1:]:
        if paths or not a.startswith("-"):
            if not a or a.startswith("-"):
                return None
            paths.append(a)
        elif a in _WHAT_OPTS and what is None:
            what = _WHAT_OPTS[a]
        elif a == "--include-outputs" and not include_outputs:
            include_outputs = True
        else:
            return None
    if what is None or not paths:
        return None
    return Args(store=store, command="query", what=what, include_outputs=include_outputs,
                paths=paths, func="paths.cmd_query", queries_only=True)


def _flags_only(command: str, rest: Sequence[str], store: str | None) -> Args | None:
    allowed = _FLAGS[command]
    if len(set(rest)) != len(rest) or not set(rest) <= set(allowed):
        return None
    flags = {a[2:].replace("-", "_"): a in rest for a in allowed}
    if command == "roots":
        return Args(store=store, command="roots", **flags, func="roots.cmd_roots", queries_only=True)
    return Args(store=store, command="verify", **flags, sigs=False, sigs_needed=0,
                trusted_public_keys=None, paths=[], func="paths.cmd_verify",
                queries_only=verify_reads_only(flags["repair"], False))
