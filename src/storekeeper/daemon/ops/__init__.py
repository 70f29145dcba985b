"""The worker operations: request fields, work, response (spec §6, §7).

Each handler reads its request fields from ``s.r``, calls ``s.start_work()``,
does the work, calls ``s.stop_work()`` and writes the response fields into
``s.w``.  Everything about errors, draining and closing is the session's job
(see :class:`~storekeeper.daemon.session.Session`); a handler just raises.

Operations that storekeeper cannot do yet still read their request in full,
so the client gets a clear error and the connection stays usable.  Each module
here registers its handlers in :data:`storekeeper.daemon.registry.OPS` with
``@op``; importing this package loads them all (the server does, once).
"""

from . import add, build, inspect, options, query, roots, substitute, tcp_keys, user_roots, verify

__all__ = ["add", "build", "inspect", "options", "query", "roots", "substitute", "tcp_keys", "user_roots", "verify"]
