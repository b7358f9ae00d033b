"""Engines, sessions and migrations.

SQLite (the default) is set up for a gateway that acknowledges C-STOREs only once
they are durable and may run several workers on one file:

- WAL journal, so readers (the audit view) never block the receiver;
- ``synchronous=FULL``: a committed transaction survives power loss, not only a crash
  of the process, because an acknowledged C-STORE must not be lost;
- ``busy_timeout``: a writer waits that long for the lock, then fails with
  ``OperationalError`` ("database is locked") instead of hanging;
- ``foreign_keys=ON``, which SQLite leaves off by default;
- SQLAlchemy, not the sqlite3 module, emits BEGIN, and writers use BEGIN IMMEDIATE:
  the write lock is taken when the transaction starts, so two workers reading the
  same "ready" study cannot both go on to claim it, and a reader-turned-writer
  never fails half-way with SQLITE_BUSY_SNAPSHOT.

Any other SQLAlchemy URL (PostgreSQL) is used as given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option naming how a transaction begins on SQLite (see `session_factory`).
SQLITE_BEGIN_OPTION = "radgate_sqlite_begin"
SqliteBegin = Literal["IMMEDIATE", "DEFERRED", "EXCLUSIVE"]


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, or None (in-memory, URI form or another database)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if (
        not database
        or database == ":memory:"
        or parsed.query.get("uri")
        or database.startswith("file:")
    ):
        return None
    return Path(database)


def make_engine(url: str, busy_timeout_ms: int = 5000) -> Engine:
    """An engine for `url`; for SQLite with the durability and locking settings above."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.get_driver_name() != "pysqlite":
        raise ValueError(f"SQLite driver {parsed.get_driver_name()!r} not supported; use sqlite://")
    database_file = sqlite_file(parsed)
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed,
        # The sqlite3 module's own wait, in seconds; the PRAGMA below sets the same.
        connect_args={"timeout": busy_timeout_ms / 1000},
    )
    _configure_sqlite(engine, busy_timeout_ms, wal=database_file is not None)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, *, wal: bool) -> None:
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop the sqlite3 module from issuing (or skipping) BEGIN itself; on_begin does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if wal:
                (mode,) = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() != "wal":
                    log.warning("SQLite refused WAL journal mode (got %s)", mode)
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        if mode not in ("IMMEDIATE", "DEFERRED", "EXCLUSIVE"):
            raise ValueError(f"{SQLITE_BEGIN_OPTION} must be IMMEDIATE, DEFERRED or EXCLUSIVE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)


def session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on `engine`. Objects stay readable after commit (no expiry on commit).

    `read_only=True` begins SQLite transactions DEFERRED, so a reader such as the audit
    view does not take the write lock; a read-only session that writes may fail with
    "database is locked" under contention, so use it only for reading.
    """
    bind = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"}) if read_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def alembic_config(url: str | None = None) -> AlembicConfig:
    """Alembic configuration for the migrations shipped in this package (no alembic.ini)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest) in one transaction.

    Safe to call from every process at start-up: on SQLite the migration holds the
    write lock from its first statement, so a second process waits and then finds
    nothing left to do.
    """
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
