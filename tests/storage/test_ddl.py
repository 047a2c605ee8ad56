"""A migration that has shipped never changes: the statements each backend runs for it are
pinned here by hash (engine/storage/ddl.py builds part of migration 1 for both backends)."""

from __future__ import annotations

import hashlib

import pytest

from engine.storage.postgres import schema as postgres_schema
from engine.storage.sqlite import schema as sqlite_schema

SHIPPED = {
    ("sqlite", 1): "4c4bb038c429770ff8947f38dd9c538714c62a18cd147ca396e7769e66f40ba8",
    ("sqlite", 2): "7f9777452f543c95203ea5495aed43787fdf4474a1f69aafb0c2ffb3570040f9",
    ("sqlite", 3): "4ac64894afdbb121b40b364589d9cf86f9904ab8434fcd81b7e62d87c4c29500",
    ("sqlite", 4): "76401bd878a6b614bb3978fa4dc0db846649e497719a233682e4af432be5fd5f",
    ("sqlite", 5): "0b6417f287f25cef5720731261debbc5f066fee61eefc9e1a08746aad38d77cf",
    ("sqlite", 6): "7ed615151574b8a5d2a136c16b26f9be482e575e36ea78935acdb3be09d78d6a",
    ("sqlite", 7): "6e69d8bf2ef75e15442bbc023186df87290ad6cd0d0949a3392ab4cce3ebf556",
    ("sqlite", 8): "8b27c2d43ac37e0ce158631d270ec34fabd151a321b09826b4ac52172327338d",
    ("sqlite", 9): "df2bd4dffb9457d014d576027ad170a4777effdce3ce23848ac907e9ee6401bf",
    ("postgresql", 1): "43929706cca8c92f670596aa0c3b4ffdb140e8c463cd8ce803ef9454608e3a49",
    ("postgresql", 2): "bc7fe498f198eb1e2989ea84b3279cd8dc2775b1bcdb9ad48118b8ef1e91bada",
    ("postgresql", 3): "a8e3e3f3692f8da75d225335cde7619042998be6b7ab1ea987110c0bc06d8389",
    ("postgresql", 4): "07a0834a94ef304cf0cf0ea93ae9d781281ea045ebe164341614c9e8a6f3da79",
    ("postgresql", 5): "11f397635de0dfce7107de90f3c91af998a5eba1fbfe3dc933013887684f17dd",
    ("postgresql", 6): "6e69d8bf2ef75e15442bbc023186df87290ad6cd0d0949a3392ab4cce3ebf556",
    ("postgresql", 7): "7a27d9ae76b24daf12ff4a9362db9678b1f5794330464643d5b4966d0fecb767",
    ("postgresql", 8): "baa6616a1eb72d2c61c9820e1896025be18c3062eb20fcff30ae838a86ad8254",
}
MIGRATIONS = {"sqlite": dict(sqlite_schema.MIGRATIONS),
              "postgresql": dict(postgres_schema.MIGRATIONS)}


@pytest.mark.parametrize(("backend", "number"), sorted(SHIPPED))
def test_a_shipped_migration_runs_the_statements_it_shipped_with(backend: str,
                                                                  number: int) -> None:
    statements = MIGRATIONS[backend][number]
    digest = hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()
    assert digest == SHIPPED[(backend, number)], (
        f"{backend} migration {number} changed: append a new migration instead")


def test_both_backends_declare_the_shared_tables() -> None:
    for migrations in MIGRATIONS.values():
        created = " ".join(migrations[1])
        for table in ("action_outcomes", "identity_map", "deal_keys"):
            assert f"CREATE TABLE {table} (" in created
