"""Engines for the native store, and running its Alembic migrations programmatically.

SQLite gets three things the other databases have by default: real transactions (the
pysqlite driver would otherwise not ``BEGIN`` before a ``SELECT``, so a snapshot built
from several queries could mix two states of the store), foreign keys, and a busy
timeout.  Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that two
concurrent writers queue on the lock instead of failing when one upgrades its read lock.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from ..errors import BadInput, StoreUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")
WRITE = {"policyd_write": True}


def parse_url(url: str, what: str = "store URL"):
    """``url`` parsed, with an installed driver chosen; malformed is ``BadInput``."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise BadInput(f"bad {what} {url!r}: {error}") from None
    return with_installed_driver(parsed)


def make_engine(url: str, *, create_dirs: bool = False) -> Engine:
    """An engine for ``url``.  A malformed URL or a missing driver is ``BadInput``."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict = {}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database)
            if create_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    elif backend in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        kwargs["pool_recycle"] = 3600
        kwargs["pool_pre_ping"] = True
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as error:
        raise BadInput(f"store URL {safe_url(url)}: no driver for it ({error})") from None
    if backend == "sqlite":
        _sqlite_hooks(engine)
    return engine


_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql", "mysqldb"),
            "mariadb": ("pymysql", "mysqldb")}
_MODULES = {"psycopg2": "psycopg2", "psycopg": "psycopg", "pymysql": "pymysql",
            "mysqldb": "MySQLdb"}


def with_installed_driver(parsed):
    """Mailman's documentation writes ``postgres://`` and ``mysql://`` URLs; SQLAlchemy
    wants ``postgresql`` and picks a default driver that may not be installed.  Choose the
    first installed driver when the URL names none."""
    import importlib.util

    name = parsed.drivername
    if name == "postgres" or name.startswith("postgres+"):
        name = "postgresql" + name[len("postgres"):]
    if "+" not in name and name in _DRIVERS:
        for driver in _DRIVERS[name]:
            if importlib.util.find_spec(_MODULES[driver]) is not None:
                name = f"{name}+{driver}"
                break
    return parsed.set(drivername=name)


def _sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection):
        if conn.get_execution_options().get("policyd_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def safe_url(url) -> str:
    """The URL without its password, for logs and ``describe()``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<malformed URL>"


def sqlite_path(engine: Engine) -> Path | None:
    """The database file of a file-based SQLite engine, else ``None``."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _alembic_config(connection: Connection):
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The schema revision recorded in the store, ``None`` if it has no schema."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Create or migrate the schema; returns (revision before, revision after)."""
    from alembic import command

    path = sqlite_path(engine)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with engine.begin() as connection:
            before = current_revision(connection)
            command.upgrade(_alembic_config(connection), target)
            after = current_revision(connection)
        if path is not None:
            # WAL lets the daemon read while policyctl writes; it is a property of the file.
            raw = engine.raw_connection()
            try:
                cursor = raw.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.close()
            finally:
                raw.close()
    except SQLAlchemyError as error:
        raise StoreUnavailable(f"cannot migrate the store at {safe_url(engine.url)}: "
                               f"{first_line(error)}") from None
    return before, after


def schema_problem(connection: Connection) -> str | None:
    """Why the store cannot be used as it is (no schema, old schema), else ``None``."""
    revision = current_revision(connection)
    if revision is None:
        if not inspect(connection).has_table("lists"):
            return "the store has no schema; run `policyctl init`"
        return "the store has no schema revision; run `policyctl migrate`"
    head = head_revision()
    if revision != head:
        return (f"the store's schema is at revision {revision}, this policyd needs {head}; "
                "run `policyctl migrate`")
    return None


def ping(connection: Connection) -> None:
    connection.execute(text("SELECT 1"))


def first_line(error: Exception) -> str:
    message = str(getattr(error, "orig", None) or error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
