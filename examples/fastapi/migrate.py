"""A tiny migration tool: ``python migrate.py [--to N]`` brings app.db to schema N (default: the latest).

The schema version is SQLite's ``PRAGMA user_version``; migration N is ``MIGRATIONS[N - 1]``.
Run it between ``sockherd restart --suspended`` and ``sockherd resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3

DATABASE = os.environ.get("APP_DATABASE", "app.db")

MIGRATIONS = [
    "CREATE TABLE greeting (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
    "ALTER TABLE greeting ADD COLUMN lang TEXT NOT NULL DEFAULT 'en'",
]


def schema_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(db: sqlite3.Connection, target: int) -> list[int]:
    """Apply the migrations after the current version up to ``target``; returns those applied."""
    applied = []
    for version in range(schema_version(db) + 1, target + 1):
        # One transaction per migration, version included: DDL is transactional in SQLite.
        db.executescript(f"BEGIN; {MIGRATIONS[version - 1]}; PRAGMA user_version = {version}; COMMIT;")
        applied.append(version)
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", type=int, default=len(MIGRATIONS), metavar="N", help="target schema version")
    args = parser.parse_args()
    if not 0 <= args.to <= len(MIGRATIONS):
        parser.error(f"--to must be between 0 and {len(MIGRATIONS)}")
    with contextlib.closing(sqlite3.connect(DATABASE)) as db:
        applied = migrate(db, args.to)
        print(f"{DATABASE}: applied {applied or 'nothing'}; schema {schema_version(db)}")


if __name__ == "__main__":
    main()
