"""Alembic environment for radgate's schema.

`db.session.migrate` passes an open connection (inside a transaction) through
``config.attributes["connection"]``; without one, an engine is made from the
``sqlalchemy.url`` option with the same SQLite settings the gateway uses.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.models import Base
from db.session import make_engine

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: later migrations copy and move tables.
        render_as_batch=True,
        compare_type=True,
        # SQLite runs DDL inside a transaction once BEGIN is ours (db.session).
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("radgate migrations run online only (db.session.migrate)")

connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migrations")
    engine = make_engine(url)
    try:
        with engine.begin() as new_connection:
            run(new_connection)
    finally:
        engine.dispose()
