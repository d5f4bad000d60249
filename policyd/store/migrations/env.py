"""Alembic environment for the native store.

policyd runs migrations programmatically (``policyd.store.engine.upgrade``) and hands
this script an open connection in ``config.attributes["connection"]``.  For developers,
``alembic -c policyd/store/migrations/alembic.ini -x url=sqlite:////tmp/x.sqlite
revision --autogenerate -m "..."`` works too.
"""

from alembic import context
from sqlalchemy import create_engine

from policyd.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("policyd's migrations run online only")
run_migrations_online()
