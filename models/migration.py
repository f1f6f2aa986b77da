"""Schema changes of the outbox, as functions any Alembic history can call.

``outbox-relay migrate`` runs them from the project's own history (``alembic/``). A team that
already has an Alembic history adds one revision of its own instead::

    from outbox_relay.models.migration import create_outbox_v1, drop_outbox_v1

    def upgrade() -> None:
        create_outbox_v1(lanes=4)
        add_scale_out_v2()
        add_commit_notify_v3()
        add_discarded_index_v4()
        add_lane_index_v5()
        add_outbox_identity_v6()
        add_instance_sessions_v7()
        add_claim_indexes_v8()
        add_unsent_table_v9()
        add_autovacuum_settings_v10()
        add_idle_lanes_v11()
        add_lane_kafka_names_v12()

    def downgrade() -> None:
        drop_lane_kafka_names_v12()
        drop_idle_lanes_v11()
        drop_autovacuum_settings_v10()
        drop_unsent_table_v9()
        drop_claim_indexes_v8()
        drop_instance_sessions_v7()
        drop_outbox_identity_v6()
        drop_lane_index_v5()
        drop_discarded_index_v4()
        drop_commit_notify_v3()
        drop_scale_out_v2()
        drop_outbox_v1()

Each function is frozen once released: later schema changes get new functions. Each can run again
after an interrupted run: one revision that calls them all commits part-way (a step that builds an
index CONCURRENTLY commits what came before it) and has no version stamp until its end, so the next run
starts from ``create_outbox_v1`` again; every step skips what is already there.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from outbox_relay.models.names import (
    EVENTS_TABLE,
    INSTANCES_TABLE,
    LANE_INDEX_PREFIX,
    LANE_KEY_SQL,
    LANES_TABLE,
    NOTIFY_CHANNEL,
    SCHEMA,
    SETTINGS_TABLE,
    TOPIC_PATTERN,
)


def create_outbox_v1(lanes: int = 4) -> None:
    """Create the outbox schema, the events table and the relay's state tables."""
    if not 1 <= lanes <= 1024:
        raise ValueError(f"lanes must be between 1 and 1024, got {lanes}")
    if _has_table(EVENTS_TABLE):  # committed by an earlier run that stopped later on
        return
    op.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
    op.create_table(
        EVENTS_TABLE,
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False,
                  server_default=sa.text("gen_random_uuid()")),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=True),
        sa.Column("header_names", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("header_values", postgresql.ARRAY(sa.LargeBinary), nullable=False,
                  server_default=sa.text("'{}'")),
        sa.Column("partition", sa.Integer, nullable=True),
        sa.Column("lane_key", sa.Integer, sa.Computed(LANE_KEY_SQL, persisted=True), nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{EVENTS_TABLE}"),
        sa.UniqueConstraint("event_id", name=f"uq_{EVENTS_TABLE}_event_id"),
        sa.CheckConstraint(f"topic ~ '{TOPIC_PATTERN}' AND topic NOT IN ('.', '..')",
                           name=op.f(f"ck_{EVENTS_TABLE}_topic_name")),
        sa.CheckConstraint("partition >= 0", name=op.f(f"ck_{EVENTS_TABLE}_partition_non_negative")),
        sa.CheckConstraint("state IN ('pending', 'sent', 'failed', 'discarded')",
                           name=op.f(f"ck_{EVENTS_TABLE}_state_known")),
        sa.CheckConstraint("cardinality(header_names) = cardinality(header_values)",
                           name=op.f(f"ck_{EVENTS_TABLE}_headers_paired")),
        sa.CheckConstraint("(state = 'sent') = (sent_at IS NOT NULL)",
                           name=op.f(f"ck_{EVENTS_TABLE}_sent_at_iff_sent")),
        sa.CheckConstraint("attempts >= 0", name=op.f(f"ck_{EVENTS_TABLE}_attempts_non_negative")),
        schema=SCHEMA,
    )
    op.create_index(f"ix_{EVENTS_TABLE}_pending", EVENTS_TABLE, ["id"], schema=SCHEMA,
                    postgresql_where=sa.text("state = 'pending'"))
    op.create_index(f"ix_{EVENTS_TABLE}_failed_key", EVENTS_TABLE, ["key", "id"], schema=SCHEMA,
                    postgresql_where=sa.text("state = 'failed'"))
    op.create_index(f"ix_{EVENTS_TABLE}_sent_at", EVENTS_TABLE, ["sent_at"], schema=SCHEMA,
                    postgresql_where=sa.text("state = 'sent'"))
    op.create_table(
        LANES_TABLE,
        sa.Column("lane", sa.SmallInteger, autoincrement=False, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("lane", name=f"pk_{LANES_TABLE}"),
        schema=SCHEMA,
    )
    op.create_table(
        SETTINGS_TABLE,
        sa.Column("id", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
        sa.Column("lane_count", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
        sa.PrimaryKeyConstraint("id", name=f"pk_{SETTINGS_TABLE}"),
        sa.CheckConstraint("id = 1", name=op.f(f"ck_{SETTINGS_TABLE}_single_row")),
        sa.CheckConstraint("lane_count BETWEEN 1 AND 1024", name=op.f(f"ck_{SETTINGS_TABLE}_lane_count_range")),
        schema=SCHEMA,
    )
    op.execute(sa.text(f'INSERT INTO "{SCHEMA}"."{SETTINGS_TABLE}" (id, lane_count) VALUES (1, {int(lanes)})'))


def drop_outbox_v1() -> None:
    """Drop what ``create_outbox_v1`` created (the schema stays: it may hold other things)."""
    op.drop_table(SETTINGS_TABLE, schema=SCHEMA)
    op.drop_table(LANES_TABLE, schema=SCHEMA)
    op.drop_table(EVENTS_TABLE, schema=SCHEMA)


def add_scale_out_v2() -> None:
    """Relay instances register themselves (to share lanes); lane-count changes are announced."""
    if _has_table(INSTANCES_TABLE):
        return
    op.create_table(
        INSTANCES_TABLE,
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("name", name=f"pk_{INSTANCES_TABLE}"),
        schema=SCHEMA,
    )
    op.add_column(SETTINGS_TABLE, sa.Column("resize_to", sa.SmallInteger, nullable=True), schema=SCHEMA)


def drop_scale_out_v2() -> None:
    op.drop_column(SETTINGS_TABLE, "resize_to", schema=SCHEMA)
    op.drop_table(INSTANCES_TABLE, schema=SCHEMA)


_NOTIFY_FUNCTION = f"{EVENTS_TABLE}_notify"


def add_commit_notify_v3() -> None:
    """Wake relays when events commit: a statement-level trigger notifies with a constant payload.

    Postgres folds identical notifications of one transaction into one, delivered at commit, so
    a transaction costs one notification however many events it writes.
    """
    if _has_trigger(_NOTIFY_FUNCTION):
        return
    op.execute(sa.text(
        f'''CREATE FUNCTION "{SCHEMA}"."{_NOTIFY_FUNCTION}"() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
            RETURN NULL;
        END $$'''
    ))
    op.execute(sa.text(
        f'''CREATE TRIGGER "{_NOTIFY_FUNCTION}" AFTER INSERT ON "{SCHEMA}"."{EVENTS_TABLE}"
        FOR EACH STATEMENT EXECUTE FUNCTION "{SCHEMA}"."{_NOTIFY_FUNCTION}"()'''
    ))


def drop_commit_notify_v3() -> None:
    op.execute(sa.text(f'DROP TRIGGER "{_NOTIFY_FUNCTION}" ON "{SCHEMA}"."{EVENTS_TABLE}"'))
    op.execute(sa.text(f'DROP FUNCTION "{SCHEMA}"."{_NOTIFY_FUNCTION}"()'))


def add_discarded_index_v4() -> None:
    """Lets retention find old discarded events without walking the table.

    Built CONCURRENTLY (outside the migration's transaction): the events table may be large and busy,
    and a plain CREATE INDEX would block every writer until it finished.
    """
    if _state_moved():
        return
    with op.get_context().autocommit_block():
        op.create_index(f"ix_{EVENTS_TABLE}_discarded", EVENTS_TABLE, ["created_at"], schema=SCHEMA,
                        postgresql_where=sa.text("state = 'discarded'"), postgresql_concurrently=True,
                        if_not_exists=True)


def drop_discarded_index_v4() -> None:
    op.drop_index(f"ix_{EVENTS_TABLE}_discarded", EVENTS_TABLE, schema=SCHEMA)


def add_lane_index_v5() -> None:
    """Each lane's claim walks its own slice of the pending rows: ((lane_key % N), id) for the
    current lane count N. `outbox-relay lanes set` builds the next one before switching.

    Built CONCURRENTLY, as add_discarded_index_v4 is: writers go on while it is built.
    """
    if _state_moved():
        return
    if op.get_context().as_sql:  # offline (--sql): the count is only known to the database
        op.execute(sa.text(
            f"""DO $$ DECLARE n integer; BEGIN
            SELECT lane_count INTO n FROM "{SCHEMA}"."{SETTINGS_TABLE}";
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON "{SCHEMA}"."{EVENTS_TABLE}" ((lane_key %% %s), id)'
                           || ' WHERE state = ''pending''', '{LANE_INDEX_PREFIX}' || n, n);
        END $$"""
        ))
        return
    count = op.get_bind().execute(sa.text(f'SELECT lane_count FROM "{SCHEMA}"."{SETTINGS_TABLE}"')).scalar_one()
    lanes = int(count)
    with op.get_context().autocommit_block():
        op.execute(sa.text(
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{LANE_INDEX_PREFIX}{lanes}" ON "{SCHEMA}"."{EVENTS_TABLE}"'
            f" ((lane_key % {lanes}), id) WHERE state = 'pending'"
        ))


def drop_lane_index_v5() -> None:
    op.execute(sa.text(
        f"""DO $$ DECLARE name text; BEGIN
            FOR name IN SELECT indexname FROM pg_indexes WHERE schemaname = '{SCHEMA}'
                        AND indexname LIKE '{LANE_INDEX_PREFIX}%' LOOP
                EXECUTE format('DROP INDEX "{SCHEMA}".%I', name);
            END LOOP;
        END $$"""
    ))


def add_outbox_identity_v6() -> None:
    """Give the outbox a durable identity, made here once and kept by copies of the database.

    It is part of the default transactional.id prefix and progress topic and of every progress
    record: two outboxes whose databases share a name never fence or "recover" each other.
    """
    if _has_column(SETTINGS_TABLE, "outbox_id"):  # an identity, once made, is kept
        return
    op.add_column(SETTINGS_TABLE, sa.Column("outbox_id", postgresql.UUID(as_uuid=True), nullable=False,
                                            server_default=sa.text("gen_random_uuid()")), schema=SCHEMA)


def drop_outbox_identity_v6() -> None:
    op.drop_column(SETTINGS_TABLE, "outbox_id", schema=SCHEMA)


def add_instance_sessions_v7() -> None:
    """Instances record their control session: a dead instance stops counting as soon as it is gone."""
    if _has_column(INSTANCES_TABLE, "backend_pid"):
        return
    op.add_column(INSTANCES_TABLE, sa.Column("backend_pid", sa.Integer, nullable=True), schema=SCHEMA)


def drop_instance_sessions_v7() -> None:
    op.drop_column(INSTANCES_TABLE, "backend_pid", schema=SCHEMA)


def add_claim_indexes_v8() -> None:
    """Claims stop walking delayed events that are not due yet.

    The lane index of v5 holds every pending row, so a claim read past each delayed event waiting
    in its lane. It is replaced by a ready index (the same, without delayed events: those whose
    available_at is later than their created_at) and one index of delayed events by due time, from
    which a claim reads only the due ones. Built CONCURRENTLY (writers go on); the v5 index of the
    current lane count is dropped CONCURRENTLY once its successor exists.
    """
    ready = "available_at <= created_at"  # frozen here: READY_PREDICATE in the models must stay equal
    delayed = (f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "ix_{EVENTS_TABLE}_delayed" ON "{SCHEMA}"."{EVENTS_TABLE}"'
               f" (available_at, id) WHERE state = 'pending' AND NOT ({ready})")
    if _state_moved():
        return
    if op.get_context().as_sql:  # offline (--sql): the count is only known to the database
        op.execute(sa.text(delayed.replace(" CONCURRENTLY", "")))
        op.execute(sa.text(
            f"""DO $$ DECLARE n integer; BEGIN
            SELECT lane_count INTO n FROM "{SCHEMA}"."{SETTINGS_TABLE}";
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON "{SCHEMA}"."{EVENTS_TABLE}" ((lane_key %% %s), id)'
                           || ' WHERE state = ''pending'' AND ({ready})', 'ix_{EVENTS_TABLE}_ready_lane_' || n, n);
            EXECUTE format('DROP INDEX IF EXISTS "{SCHEMA}".%I', '{LANE_INDEX_PREFIX}' || n);
        END $$"""
        ))
        return
    lanes = int(op.get_bind().execute(sa.text(f'SELECT lane_count FROM "{SCHEMA}"."{SETTINGS_TABLE}"')).scalar_one())
    with op.get_context().autocommit_block():
        op.execute(sa.text(delayed))
        op.execute(sa.text(
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "ix_{EVENTS_TABLE}_ready_lane_{lanes}"'
            f' ON "{SCHEMA}"."{EVENTS_TABLE}" ((lane_key % {lanes}), id) WHERE state = \'pending\' AND ({ready})'
        ))
        op.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{SCHEMA}"."{LANE_INDEX_PREFIX}{lanes}"'))


def drop_claim_indexes_v8() -> None:
    """Back to v5's lane index of the current lane count; drop the ready and delayed indexes."""
    lanes = int(op.get_bind().execute(sa.text(f'SELECT lane_count FROM "{SCHEMA}"."{SETTINGS_TABLE}"')).scalar_one())
    op.execute(sa.text(
        f'CREATE INDEX IF NOT EXISTS "{LANE_INDEX_PREFIX}{lanes}" ON "{SCHEMA}"."{EVENTS_TABLE}"'
        f" ((lane_key % {lanes}), id) WHERE state = 'pending'"
    ))
    op.execute(sa.text(
        f"""DO $$ DECLARE name text; BEGIN
            FOR name IN SELECT indexname FROM pg_indexes WHERE schemaname = '{SCHEMA}'
                        AND indexname LIKE 'ix\\_{EVENTS_TABLE}\\_ready\\_lane\\_%' LOOP
                EXECUTE format('DROP INDEX "{SCHEMA}".%I', name);
            END LOOP;
        END $$"""
    ))
    op.drop_index(f"ix_{EVENTS_TABLE}_delayed", EVENTS_TABLE, schema=SCHEMA)


def add_unsent_table_v9() -> None:
    """Marking events sent stops rewriting them: the events table becomes insert-only.

    What is still to do moves to a narrow table, ``<events>_unsent`` (id, lane_key, due_at, state,
    attempts, last_error), one row per event not sent, written by a statement-level trigger on
    insert, so raw SQL inserts are covered too. What was sent moves to ``<events>_sent``, one row per
    marked batch (sent_at and the batch's ids). Marking a batch deletes its narrow rows and writes one
    batch row; the old mark rewrote each ~600-byte event row and three index entries. The claim
    walks the narrow table's ready lane index. Existing rows are moved in the migration's
    transaction, with writers locked out meanwhile; the old columns, their indexes and constraints
    are dropped (dropping a column is a catalog change: no table rewrite).
    """
    events, unsent, sent = _v9_tables()
    trigger = f"{EVENTS_TABLE}_enqueue"
    if _state_moved():
        return  # done (the DROP below would lose every pending event)
    # The first part commits before the lock (the sent history is copied with writers going on): a run
    # stopped after it (a lock timeout, ^C while a writer's transaction was open) left these two
    # tables behind, still at 0008. Start over rather than fail with "already exists" for ever.
    op.execute(sa.text(f"DROP TABLE IF EXISTS {sent}, {unsent}"))
    op.execute(sa.text(
        f"""CREATE TABLE {unsent} (
            id bigint NOT NULL, lane_key integer NOT NULL, due_at timestamptz,
            state text NOT NULL DEFAULT 'pending', attempts integer NOT NULL DEFAULT 0, last_error text,
            CONSTRAINT "pk_{EVENTS_TABLE}_unsent" PRIMARY KEY (id),
            CONSTRAINT "ck_{EVENTS_TABLE}_unsent_state_known" CHECK (state IN ('pending', 'failed', 'discarded')),
            CONSTRAINT "ck_{EVENTS_TABLE}_unsent_attempts_non_negative" CHECK (attempts >= 0))"""
    ))
    op.execute(sa.text(
        f"""CREATE TABLE {sent} (
            id bigint GENERATED ALWAYS AS IDENTITY, sent_at timestamptz NOT NULL DEFAULT now(),
            first_id bigint NOT NULL, last_id bigint NOT NULL, ids bigint[] NOT NULL,
            CONSTRAINT "pk_{EVENTS_TABLE}_sent" PRIMARY KEY (id))"""
    ))
    op.execute(sa.text(f'CREATE INDEX "ix_{EVENTS_TABLE}_sent_id_range" ON {sent}'
                       f" USING gist (int8range(first_id, last_id, '[]'))"))
    # The sent history (the bulk of a large table) is copied first, with writers and relays going on:
    # sent rows never change, except that retention deletes some (their batches then name ids that
    # are gone, which harms nothing).
    if not op.get_context().as_sql:
        with op.get_context().autocommit_block():
            op.execute(sa.text(
                f"INSERT INTO {sent} (sent_at, first_id, last_id, ids) SELECT sent_at, min(id), max(id),"
                f" array_agg(id ORDER BY id) FROM {events} WHERE state = 'sent' GROUP BY sent_at, id / 1000 ORDER BY 2"
            ))
    op.execute(sa.text(f"LOCK TABLE {events} IN SHARE ROW EXCLUSIVE MODE"))  # no insert lands mid-move
    op.execute(sa.text(
        f"INSERT INTO {unsent} (id, lane_key, due_at, state, attempts, last_error)"
        f" SELECT id, lane_key, CASE WHEN available_at > created_at THEN available_at END, state, attempts,"
        f" last_error FROM {events} WHERE state <> 'sent'"
    ))
    # Then, writers locked out, whatever was marked since the copy began (marks are single statements
    # bounded by statement_timeout: an hour's margin is plenty) and is not in a batch yet.
    op.execute(sa.text(
        f"INSERT INTO {sent} (sent_at, first_id, last_id, ids) SELECT sent_at, min(id), max(id),"
        f" array_agg(id ORDER BY id) FROM {events} e WHERE state = 'sent'"
        f" AND sent_at >= (SELECT coalesce(max(sent_at), '-infinity') FROM {sent}) - interval '1 hour'"
        f" AND NOT EXISTS (SELECT 1 FROM {sent} b WHERE int8range(b.first_id, b.last_id, '[]') @> e.id"
        f" AND e.id = ANY(b.ids)) GROUP BY sent_at, id / 1000 ORDER BY 2"
    ))
    op.execute(sa.text(
        # SECURITY DEFINER: a writer role that may only insert events needs no grant on the unsent table.
        f'''CREATE FUNCTION "{SCHEMA}"."{trigger}"() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            INSERT INTO {unsent} (id, lane_key, due_at)
            SELECT id, lane_key, CASE WHEN available_at > created_at THEN available_at END FROM written;
            RETURN NULL;
        END $$'''
    ))
    op.execute(sa.text(
        f'''CREATE TRIGGER "{trigger}" AFTER INSERT ON {events} REFERENCING NEW TABLE AS written
        FOR EACH STATEMENT EXECUTE FUNCTION "{SCHEMA}"."{trigger}"()'''
    ))
    for name, columns, where in (("delayed", "due_at, id", "state = 'pending' AND NOT (due_at IS NULL)"),
                                 ("failed", "lane_key, id", "state = 'failed'"),
                                 ("discarded", "id", "state = 'discarded'")):
        op.execute(sa.text(f'CREATE INDEX "ix_{EVENTS_TABLE}_unsent_{name}" ON {unsent} ({columns}) WHERE {where}'))
    op.execute(sa.text(f'CREATE INDEX "ix_{EVENTS_TABLE}_sent_sent_at" ON {sent} (sent_at)'))
    # The ready lane index of the current lane count (a DO block: offline SQL does not know the count).
    _v9_ready_lane_index(unsent, f"ix_{EVENTS_TABLE}_unsent_ready_lane_", "state = ''pending'' AND due_at IS NULL")
    op.execute(sa.text(
        f"""CREATE VIEW "{SCHEMA}"."{EVENTS_TABLE}_state" AS
        SELECT e.id, e.event_id, e.topic, e.key, e.value, e.header_names, e.header_values, e.partition, e.lane_key,
            e.created_at, coalesce(u.due_at, e.available_at) AS available_at, coalesce(u.state, 'sent') AS state,
            u.attempts, u.last_error,
            (SELECT b.sent_at FROM {sent} b WHERE u.id IS NULL AND int8range(b.first_id, b.last_id, '[]') @> e.id
             AND e.id = ANY(b.ids) LIMIT 1) AS sent_at
        FROM {events} e LEFT JOIN {unsent} u ON u.id = e.id"""
    ))
    # Drops with them the indexes and checks that use them (pending, failed_key, sent_at, delayed,
    # discarded, the ready lane indexes; state_known, sent_at_iff_sent, attempts_non_negative).
    op.execute(sa.text(f"ALTER TABLE {events} DROP COLUMN state, DROP COLUMN sent_at, DROP COLUMN attempts,"
                       f" DROP COLUMN last_error"))


def drop_unsent_table_v9() -> None:
    """Back to state kept in the events table (v8): every event row is rewritten once."""
    events, unsent, sent = _v9_tables()
    op.execute(sa.text(f"LOCK TABLE {events} IN SHARE ROW EXCLUSIVE MODE"))
    op.execute(sa.text(f'DROP VIEW "{SCHEMA}"."{EVENTS_TABLE}_state"'))
    op.execute(sa.text(f"ALTER TABLE {events} ADD COLUMN state text NOT NULL DEFAULT 'sent',"
                       f" ADD COLUMN sent_at timestamptz, ADD COLUMN attempts integer NOT NULL DEFAULT 0,"
                       f" ADD COLUMN last_error text"))
    op.execute(sa.text(
        f"UPDATE {events} e SET state = u.state, attempts = u.attempts, last_error = u.last_error,"
        f" available_at = coalesce(u.due_at, e.available_at) FROM {unsent} u WHERE u.id = e.id"
    ))
    op.execute(sa.text(
        f"UPDATE {events} e SET sent_at = b.sent_at FROM (SELECT unnest(ids) AS id, sent_at FROM {sent}) b"
        f" WHERE e.id = b.id AND e.state = 'sent'"
    ))
    op.execute(sa.text(f"UPDATE {events} SET sent_at = created_at WHERE state = 'sent' AND sent_at IS NULL"))
    op.execute(sa.text(
        f"ALTER TABLE {events} ALTER COLUMN state SET DEFAULT 'pending',"
        f" ADD CONSTRAINT \"ck_{EVENTS_TABLE}_state_known\""
        f" CHECK (state IN ('pending', 'sent', 'failed', 'discarded')),"
        f" ADD CONSTRAINT \"ck_{EVENTS_TABLE}_sent_at_iff_sent\" CHECK ((state = 'sent') = (sent_at IS NOT NULL)),"
        f" ADD CONSTRAINT \"ck_{EVENTS_TABLE}_attempts_non_negative\" CHECK (attempts >= 0)"
    ))
    for name, columns, where in (("pending", "id", "state = 'pending'"), ("failed_key", "key, id", "state = 'failed'"),
                                 ("sent_at", "sent_at", "state = 'sent'"),
                                 ("discarded", "created_at", "state = 'discarded'"),
                                 ("delayed", "available_at, id",
                                  "state = 'pending' AND NOT (available_at <= created_at)")):
        op.execute(sa.text(f'CREATE INDEX "ix_{EVENTS_TABLE}_{name}" ON {events} ({columns}) WHERE {where}'))
    _v9_ready_lane_index(events, f"ix_{EVENTS_TABLE}_ready_lane_",
                         "state = ''pending'' AND (available_at <= created_at)")
    op.execute(sa.text(f'DROP TRIGGER "{EVENTS_TABLE}_enqueue" ON {events}'))
    op.execute(sa.text(f'DROP FUNCTION "{SCHEMA}"."{EVENTS_TABLE}_enqueue"()'))
    op.execute(sa.text(f"DROP TABLE {sent}"))
    op.execute(sa.text(f"DROP TABLE {unsent}"))


# Vacuum a retained table once 1% of it is dead (PostgreSQL's default: 20%).
_V10_OPTIONS = ("autovacuum_vacuum_scale_factor", "toast.autovacuum_vacuum_scale_factor")
_V10_SCALE = "0.01"


def add_autovacuum_settings_v10() -> None:
    """Autovacuum follows retention, so the space it frees is written again within hours, not days.

    Retention deletes a day's events each day, a seventh of a table that keeps a week. By default
    PostgreSQL vacuums a table once a fifth of it is dead, so the events and sent tables grew by about
    a day and a half of events before any of that space was reused. At 1% they stay within a few hours
    of events of their retained size; each vacuum is cheap, as the events table is insert-only and a
    vacuum skips the pages the visibility map knows to be all visible. A setting already on a table
    (the operator's) is kept.
    """
    events, _, sent = _v9_tables()
    for table in (events, sent):
        for option in _V10_OPTIONS:
            op.execute(sa.text(
                f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_options_to_table({_v10_reloptions(table, option)})
                               WHERE option_name = '{option.removeprefix("toast.")}') THEN
                    ALTER TABLE {table} SET ({option} = {_V10_SCALE});
                END IF;
                END $$"""
            ))


def drop_autovacuum_settings_v10() -> None:
    """PostgreSQL's default again, where the setting is still v10's own."""
    events, _, sent = _v9_tables()
    for table in (events, sent):
        for option in _V10_OPTIONS:
            op.execute(sa.text(
                f"""DO $$ BEGIN
                IF '{option.removeprefix("toast.")}={_V10_SCALE}' = ANY(coalesce({_v10_reloptions(table, option)},
                                                                        '{{}}')) THEN
                    ALTER TABLE {table} RESET ({option});
                END IF;
                END $$"""
            ))


def _v10_reloptions(table: str, option: str) -> str:
    """SQL for the storage parameters ``option`` is among: the table's own, or (toast.*) its TOAST table's."""
    if option.startswith("toast."):
        return (f"(SELECT t.reloptions FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid"
                f" WHERE c.oid = '{table}'::regclass)")
    return f"(SELECT reloptions FROM pg_class WHERE oid = '{table}'::regclass)"


def add_idle_lanes_v11() -> None:
    """Commits notify only while a lane sleeps: the wake-up stops costing writers when relays keep up.

    A transaction that notifies holds a lock on the whole PostgreSQL instance from its commit until
    the commit is durable, so notifying writers cannot share a WAL flush (16 connections at once:
    2,374 commits/s against 3,363 without it). A lane that finds nothing to claim for a moment
    writes its number into the idle lanes table and wakes on the next notification; a lane that is
    publishing has no row, and while no lane has one, commits do not notify. SECURITY DEFINER: a
    writer role that may only insert events needs no grant on the idle lanes table.
    """
    idle = f'"{SCHEMA}"."{EVENTS_TABLE}_idle_lanes"'
    if _has_table(f"{EVENTS_TABLE}_idle_lanes"):
        return
    op.execute(sa.text(
        f'CREATE TABLE {idle} (lane smallint NOT NULL, since timestamptz NOT NULL DEFAULT now(),'
        f' CONSTRAINT "pk_{EVENTS_TABLE}_idle_lanes" PRIMARY KEY (lane))'
    ))
    op.execute(sa.text(
        f'''CREATE OR REPLACE FUNCTION "{SCHEMA}"."{_NOTIFY_FUNCTION}"() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM {idle}) THEN
                PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
            END IF;
            RETURN NULL;
        END $$'''
    ))


def drop_idle_lanes_v11() -> None:
    """Every commit notifies again (v3's function)."""
    op.execute(sa.text(
        f'''CREATE OR REPLACE FUNCTION "{SCHEMA}"."{_NOTIFY_FUNCTION}"() RETURNS trigger LANGUAGE plpgsql
        SECURITY INVOKER AS $$
        BEGIN
            PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
            RETURN NULL;
        END $$'''
    ))
    op.execute(sa.text(f'DROP TABLE "{SCHEMA}"."{EVENTS_TABLE}_idle_lanes"'))


def add_lane_kafka_names_v12() -> None:
    """Each lane records the transactional.id and progress topic its owner publishes under.

    Relays of one outbox must share them: a relay under other names neither fences the last owner nor
    reads its progress records, and would publish again what that owner committed in Kafka but never
    marked. The next owner reads these and settles that owner's work under its names first.
    """
    if _has_column(LANES_TABLE, "transactional_id"):
        return
    op.add_column(LANES_TABLE, sa.Column("transactional_id", sa.Text, nullable=True), schema=SCHEMA)
    op.add_column(LANES_TABLE, sa.Column("progress_topic", sa.Text, nullable=True), schema=SCHEMA)


def drop_lane_kafka_names_v12() -> None:
    op.drop_column(LANES_TABLE, "progress_topic", schema=SCHEMA)
    op.drop_column(LANES_TABLE, "transactional_id", schema=SCHEMA)


def _v9_tables() -> tuple[str, str, str]:
    """The quoted, qualified names of the events table and of v9's unsent and sent tables."""
    events, unsent, sent = (f'"{SCHEMA}"."{name}"' for name in (EVENTS_TABLE, f"{EVENTS_TABLE}_unsent",
                                                                 f"{EVENTS_TABLE}_sent"))
    return events, unsent, sent


def _v9_ready_lane_index(table: str, prefix: str, where: str) -> None:
    """((lane_key % N), id) WHERE ``where`` (quotes doubled) on ``table``, for the current lane count N."""
    op.execute(sa.text(
        f"""DO $$ DECLARE n integer; BEGIN
        SELECT lane_count INTO n FROM "{SCHEMA}"."{SETTINGS_TABLE}";
        EXECUTE format('CREATE INDEX %I ON {table} ((lane_key %% %s), id) WHERE {where}', '{prefix}' || n, n);
        END $$"""
    ))


# Whether a step is already in the database. Offline (--sql) there is no database to ask: every step is
# written out, as for an empty one.

def _state_moved() -> bool:
    """v9 is done: the events table has no state column. v4, v5 and v8 indexed it; v9 dropped those indexes."""
    return _has_table(EVENTS_TABLE) and not _has_column(EVENTS_TABLE, "state")


def _has_table(name: str) -> bool:
    return _ask("SELECT to_regclass(:name) IS NOT NULL", name=f'"{SCHEMA}"."{name}"')


def _has_column(table: str, column: str) -> bool:
    return _ask("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(:table)"
                " AND attname = :column AND attnum > 0 AND NOT attisdropped)",
                table=f'"{SCHEMA}"."{table}"', column=column)


def _has_trigger(name: str) -> bool:
    return _ask("SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:table) AND tgname = :name)",
                table=f'"{SCHEMA}"."{EVENTS_TABLE}"', name=name)


def _ask(query: str, **params: str) -> bool:
    if op.get_context().as_sql:
        return False
    return bool(op.get_bind().execute(sa.text(query), params).scalar_one())
