"""The inbox's indexes and count triggers, in the text they shipped with: migrations 1, 3, 4
and 7 created them, and migration 9 (dedupe_ddl.py) creates them again on the rebuilt inbox.
The text is pinned (tests/storage/test_ddl.py): never edit it."""

from __future__ import annotations

PENDING_INDEX = "CREATE INDEX inbox_pending ON inbox (id) WHERE status IN ('received', 'failed')"
STATUS_INDEX = "CREATE INDEX inbox_status ON inbox (status, id)"
UNPLANNED_INDEX = ("CREATE INDEX inbox_unplanned ON inbox (id)"
                   " WHERE status IN ('received', 'failed') AND ordering_recorded = 0")
DUE_INDEX = ("CREATE INDEX inbox_due ON inbox (COALESCE(next_attempt_at, received_at), id)"
             " WHERE status IN ('received', 'failed')")
EVENT_TYPE_INDEX = "CREATE INDEX inbox_event_type ON inbox (event_type, id)"

# The inbox depth by status, kept in the same transaction as every insert, change and delete.
COUNT_TRIGGERS = (
    """CREATE TRIGGER inbox_counts_insert AFTER INSERT ON inbox BEGIN
            UPDATE inbox_counts SET n = n + 1 WHERE status = NEW.status;
        END""",
    """CREATE TRIGGER inbox_counts_update AFTER UPDATE OF status ON inbox
        WHEN OLD.status <> NEW.status BEGIN
            UPDATE inbox_counts SET n = n - 1 WHERE status = OLD.status;
            UPDATE inbox_counts SET n = n + 1 WHERE status = NEW.status;
        END""",
    """CREATE TRIGGER inbox_counts_delete AFTER DELETE ON inbox BEGIN
            UPDATE inbox_counts SET n = n - 1 WHERE status = OLD.status;
        END""",
)
