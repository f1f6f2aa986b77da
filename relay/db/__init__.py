"""The relay's one door to PostgreSQL: every query it runs, named, per concern.

- ``names``: the tables, locks and channel, built once from OUTBOX_SCHEMA / OUTBOX_TABLE
- ``connection``: connecting, held connections, LISTEN, and PostgreSQL errors turned into
  ``DatabaseUnavailable`` / ``DatabaseError`` (outside this package nobody catches psycopg's)
- ``lanes``: ownership, lane management, claim and mark
- ``monitor``: the backlog snapshot's reads
- ``operations``: failed-event tools, replay, the ledger read
- ``retention``: deleting old sent and discarded events
- ``catalog``: is the schema there and at head (for ``schema`` and ``migrate``)

The write API (``outbox_relay.write``) is the application's door, not the relay's: it writes through
SQLAlchemy in the caller's transaction, with the same configured names (``outbox_relay.models``).
"""
