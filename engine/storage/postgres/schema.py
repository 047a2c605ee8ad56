"""The PostgreSQL schema as numbered migrations, applied under an advisory lock."""

from __future__ import annotations

from engine.errors import StorageError
from engine.storage.checks import Migrations, migrations_to_apply
from engine.storage.ddl import outcome_tables
from engine.storage.postgres.rows import Conn
from engine.storage.postgres.touches_ddl import TOUCHES
from engine.storage.records import DEDUPE_PREFIX_CHARACTERS

# Append new versions; never edit one that has shipped. Tables and columns match the SQLite
# schema (engine/storage/sqlite/schema.py) except where PostgreSQL has a better type: identity
# columns, timestamptz, bytea, json. `ordering_recorded` lets a worker on another machine tell
# "this earlier event touches other identities" from "its keys are not known yet".
MIGRATIONS: Migrations = (
    (1, (
        """CREATE TABLE inbox (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dedupe_key TEXT NOT NULL CONSTRAINT inbox_dedupe_key UNIQUE,
            source TEXT NOT NULL,
            event_type TEXT NOT NULL,
            event_timestamp TEXT NOT NULL,
            received_at TIMESTAMPTZ NOT NULL,
            headers JSON NOT NULL,
            body BYTEA,
            status TEXT NOT NULL DEFAULT 'received'
                CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires_at TIMESTAMPTZ,
            next_attempt_at TIMESTAMPTZ,
            last_error TEXT,
            ordering_recorded BOOLEAN NOT NULL DEFAULT false,
            updated_at TIMESTAMPTZ NOT NULL
        )""",
        "CREATE INDEX inbox_pending ON inbox (id) WHERE status IN ('received', 'failed')",
        "CREATE INDEX inbox_unplanned ON inbox (id)"
        " WHERE status IN ('received', 'failed') AND NOT ordering_recorded",
        "CREATE INDEX inbox_status ON inbox (status, id)",
        "CREATE INDEX inbox_received_at ON inbox (received_at)",
        """CREATE TABLE inbox_ordering_keys (
            event_id BIGINT NOT NULL REFERENCES inbox (id),
            ordering_key TEXT NOT NULL,
            PRIMARY KEY (event_id, ordering_key)
        )""",
        "CREATE INDEX inbox_ordering_keys_key ON inbox_ordering_keys (ordering_key, event_id)",
        *outcome_tables(
            id_column="id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", integer="BIGINT",
            json="JSON", timestamp="TIMESTAMPTZ",
            unique="CONSTRAINT action_outcomes_key UNIQUE (target, idempotency_key)"),
        """CREATE TABLE rate_buckets (
            bucket TEXT PRIMARY KEY,
            tokens DOUBLE PRECISION NOT NULL,
            granted BOOLEAN NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE local_contacts (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            fields JSON NOT NULL,
            stage TEXT,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE local_contact_identities (
            field TEXT NOT NULL,
            value TEXT NOT NULL,
            contact_id BIGINT NOT NULL REFERENCES local_contacts (id),
            attached BIGINT GENERATED ALWAYS AS IDENTITY,
            PRIMARY KEY (field, value)
        )""",
        "CREATE INDEX local_contact_identities_contact"
        " ON local_contact_identities (contact_id, attached)",
        """CREATE TABLE local_stage_history (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            contact_id BIGINT NOT NULL REFERENCES local_contacts (id),
            from_stage TEXT,
            to_stage TEXT NOT NULL,
            changed_at TIMESTAMPTZ NOT NULL,
            event_id BIGINT
        )""",
        "CREATE INDEX local_stage_history_contact ON local_stage_history (contact_id, id)",
        """CREATE TABLE local_deals (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            deal_key TEXT NOT NULL CONSTRAINT local_deals_key UNIQUE,
            title TEXT NOT NULL,
            stage TEXT,
            amount DOUBLE PRECISION,
            contact_id BIGINT REFERENCES local_contacts (id),
            fields JSON NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        )""",
    )),
    # /metrics and /readyz in constant time: the inbox depth by status is kept by triggers in
    # the same transaction as every insert, status change and delete (a scrape reads at most
    # 5 x 16 rows, not the inbox). Each connection counts into its own shard (by backend pid)
    # so concurrent writers do not queue on one row lock. Creating the triggers locks the inbox
    # against writes until this migration commits, so the counts taken after them are exact.
    # `write_probe` takes the test write /readyz makes after a failed commit.
    (2, (
        """CREATE TABLE inbox_counts (
            status TEXT NOT NULL,
            shard INTEGER NOT NULL,
            n BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (status, shard)
        )""",
        "INSERT INTO inbox_counts (status, shard)"
        " SELECT s, g FROM unnest(ARRAY['received', 'processed', 'ignored', 'failed', 'dead'])"
        " AS s, generate_series(0, 15) AS g",
        """CREATE FUNCTION inbox_counts_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            UPDATE inbox_counts AS c SET n = c.n + d.n
            FROM (SELECT status, COUNT(*) AS n FROM inserted GROUP BY status) AS d
            WHERE c.status = d.status AND c.shard = pg_backend_pid() % 16;
            RETURN NULL;
        END $$""",
        # A status change moves one count with one statement, so two writers always lock
        # their two rows in the same (primary key) order and never deadlock on them.
        """CREATE FUNCTION inbox_counts_changed() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                UPDATE inbox_counts SET n = n - 1
                WHERE status = OLD.status AND shard = pg_backend_pid() % 16;
            ELSE
                UPDATE inbox_counts
                SET n = n + CASE WHEN status = NEW.status THEN 1 ELSE -1 END
                WHERE status IN (OLD.status, NEW.status) AND shard = pg_backend_pid() % 16;
            END IF;
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER inbox_counts_insert AFTER INSERT ON inbox"
        " REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT"
        " EXECUTE FUNCTION inbox_counts_inserted()",
        "CREATE TRIGGER inbox_counts_update AFTER UPDATE OF status ON inbox FOR EACH ROW"
        " WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION inbox_counts_changed()",
        "CREATE TRIGGER inbox_counts_delete AFTER DELETE ON inbox FOR EACH ROW"
        " EXECUTE FUNCTION inbox_counts_changed()",
        "UPDATE inbox_counts AS c SET n = d.n"
        " FROM (SELECT status, COUNT(*) AS n FROM inbox GROUP BY status) AS d"
        " WHERE c.status = d.status AND c.shard = 0",
        """CREATE TABLE write_probe (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            payload BYTEA NOT NULL
        )""",
    )),
    # Claims in due order (a new event is due when it was received, a rescheduled one at its
    # next attempt), read from an index rather than sorted from every pending row.
    (3, (
        "CREATE INDEX inbox_due"
        " ON inbox ((COALESCE(next_attempt_at, received_at)), id)"
        " WHERE status IN ('received', 'failed')",
    )),
    # Published rule sets (`linkcrm rules publish`): their files by name, and a status of
    # which exactly one row is `active` once any is published (the partial unique index);
    # each action outcome names the rule version that planned it.
    (4, (
        """CREATE TABLE rule_versions (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            version TEXT NOT NULL UNIQUE,
            label TEXT,
            files JSONB NOT NULL,
            published_by TEXT NOT NULL,
            published_at TIMESTAMPTZ NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'shadow', 'retired')),
            activated_at TIMESTAMPTZ
        )""",
        "CREATE UNIQUE INDEX rule_versions_one_active ON rule_versions (status)"
        " WHERE status = 'active'",
        "ALTER TABLE action_outcomes ADD COLUMN rules_version TEXT",
    )),
    # Shadow mode (`linkcrm rules publish --shadow`): how each live event planned under the
    # shadow version next to the active one, one row per (version, event) so a retried event
    # counts once; the version `replay --rules-version` pins a requeued event to; and at most
    # one shadow version (a newer one retires it; the newest of any already there stays).
    (5, (
        """CREATE TABLE shadow_results (
            shadow_version TEXT NOT NULL,
            event_id BIGINT NOT NULL REFERENCES inbox (id),
            active_version TEXT,
            event_type TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('same', 'changed', 'uncompared')),
            changes JSON NOT NULL,
            error TEXT,
            observed_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (shadow_version, event_id)
        )""",
        "CREATE INDEX shadow_results_outcome ON shadow_results (shadow_version, outcome, event_id)",
        "ALTER TABLE inbox ADD COLUMN rules_version TEXT",
        "UPDATE rule_versions SET status = 'retired' WHERE status = 'shadow'"
        " AND seq < (SELECT MAX(seq) FROM rule_versions WHERE status = 'shadow')",
        "CREATE UNIQUE INDEX rule_versions_one_shadow ON rule_versions (status)"
        " WHERE status = 'shadow'",
    )),
    # The delivery log page filters events by type, newest first, in pages: without this
    # index a rare type is a scan of the inbox; with it, one index range per page.
    (6, (
        "CREATE INDEX inbox_event_type ON inbox (event_type, id)",
    )),
    # Touches and attribution at identify (engine.storage.touchrecords). Numbered after the
    # migrations merged before it; renumbering is changing this number (the text is pinned).
    (7, TOUCHES),
    # Deliveries' dedupe keys stored by arrival rather than at random in their unique index:
    # led by a prefix the deduplicated bytes fix (`NewEvent.dedupe_prefix`, a webhook's signed
    # timestamp), the keys of one moment share leaves, so a batch dirties (and, after each
    # checkpoint, logs whole) a few index pages instead of one per key. Stored events get the
    # prefix the receiver gives; (prefix, key) is unique exactly where the key is.
    (8, (
        "ALTER TABLE inbox ADD COLUMN dedupe_prefix TEXT NOT NULL DEFAULT ''",
        "UPDATE inbox SET dedupe_prefix = substr(event_timestamp, 1, "
        f"{DEDUPE_PREFIX_CHARACTERS}) WHERE source = 'tolinku'",
        "ALTER TABLE inbox ADD CONSTRAINT inbox_dedupe UNIQUE (dedupe_prefix, dedupe_key)",
        "ALTER TABLE inbox DROP CONSTRAINT inbox_dedupe_key",
    )),
)

LATEST = MIGRATIONS[-1][0]

# Advisory lock classes (the first key of the two-key form), so linkcrm's locks never collide
# with another application's on the same database.
MIGRATION_LOCK = 0x6C6B0001
IDENTITY_LOCK = 0x6C6B0002
RULE_VERSIONS_LOCK = 0x6C6B0003
TOUCHES_LOCK = 0x6C6B0004


async def current_version(connection: Conn) -> int:
    """0 for a schema without linkcrm's tables."""
    cursor = await connection.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    exists = await cursor.fetchone()
    if not exists or not exists[0]:
        return 0
    cursor = await connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(connection: Conn) -> int:
    """Apply the missing migrations in one transaction. The advisory lock, keyed by the schema,
    makes a second process that starts at the same moment wait at the first statement, then
    find nothing left to do; DDL is transactional, so a failed migration leaves no half."""
    async with connection.transaction():
        await connection.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(COALESCE(current_schema(), '')))",
            (MIGRATION_LOCK,),
        )
        schema = await (await connection.execute("SELECT current_schema()")).fetchone()
        if schema is None or schema[0] is None:
            raise StorageError(
                "migrate: no schema to create tables in (the search_path names none that "
                "exists); create it (CREATE SCHEMA ...) or fix `options=-csearch_path=...`"
            )
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        version = await current_version(connection)
        for number, statements in migrations_to_apply(MIGRATIONS, version):
            for statement in statements:
                await connection.execute(statement)
            await connection.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (number,)
            )
    return LATEST
