"""Bulk reads of the DB for the GC's graph walks: whole columns as one hex text that SQLite
formats in one step, turned into machine integers without a Python loop.

Apart from :mod:`.graph` so that ``why-alive``, which reads only part of the graph
(:mod:`.chain`), starts without the graph's modules.
"""

from __future__ import annotations

import sqlite3
import sys
from array import array
from contextlib import contextmanager

from ..db import database_error

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    from collections.abc import Iterator

# (path id, its valid deriver's id) pairs, and (derivation id, valid output id) pairs in
# derivation then output-name order: 8 hex digits per id (see ids_of_hex)
DERIVER_PAIRS = ("select group_concat(printf('%08x%08x', v.id, d.id), '') from ValidPaths v "
                 "join ValidPaths d on d.path = v.deriver where v.deriver is not null")
OUTPUT_PAIRS = ("select group_concat(printf('%08x%08x', drv, id), '') from (select o.drv, v.id "
                "from DerivationOutputs o join ValidPaths v on v.path = o.path order by o.drv, o.id)")


def ids_of_hex(hex_text: str | None, typecode: str = "I") -> array:
    """'0000002a00000007…' (8 hex digits per id, big-endian) → array('I', [42, 7, …]);
    with typecode 'Q', 16 digits per item (an edge: referrer << 32 | reference)."""
    out = array(typecode)
    if hex_text:
        out.frombytes(bytes.fromhex(hex_text))
        if sys.byteorder == "little":
            out.byteswap()
    return out


@contextmanager
def snapshot(conn) -> Iterator:
    """One read transaction (unless the caller has one open); statements on plain
    cursors, so rows are stepped in C, with SQLite errors translated as the DB's own."""
    own = not conn.in_transaction
    try:
        if own:
            conn.execute("begin")
        try:
            yield lambda sql, params=(): sqlite3.Cursor(conn).execute(sql, params)
        finally:
            if own and conn.in_transaction:
                conn.execute("commit")
    except sqlite3.Error as e:
        raise database_error(e, getattr(conn, "db_path", "")) from None
