"""Engines for the native store, and running its Alembic migrations programmatically.

SQLite gets three things the other databases have by default: real transactions (the
pysqlite driver would otherwise not ``BEGIN`` before a ``SELECT``, so a snapshot built
from several queries could mix two states of the store), foreign keys, and a busy
timeout.  Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that two
concurrent writers queue on the lock instead of failing when one upgrades its read lock.

Bounded waits: every engine, the native store's (daemon and ``policyctl``) and the
Mailman 3 reader's, gets its connect, statement and lock timeouts here
(``connect_args_for`` and ``install_timeouts``, from ``[store] connect_timeout``,
``statement_timeout``, ``lock_timeout``):

* PostgreSQL: libpq ``connect_timeout``; ``statement_timeout`` and ``lock_timeout`` as
  ``options=-c ...`` (options the URL names itself come after ours, so they win); TCP
  keepalives so that a vanished server is noticed.
* MariaDB/MySQL: ``connect_timeout``; ``max_statement_time`` (MySQL:
  ``max_execution_time``), ``innodb_lock_wait_timeout`` and ``lock_wait_timeout`` set on
  each new session; and the driver's client-side ``read_timeout``/``write_timeout``
  (statement timeout plus connect timeout), which also ends a wait on a frozen server.
* SQLite: the busy timeout (``timeout``) is the lock timeout; statements on a local file
  do not wait for anything else.

A timeout is an ``SQLAlchemyError`` like any other store error, which every caller turns
into ``StoreUnavailable`` (``policyctl`` exit 5); ``first_line`` names the key to tune.

Health beyond the schema (``schema_problem``): ``trigger_problem`` names the change
triggers (``expected_triggers``: each migration that creates some lists them in its
``change_triggers(dialect)``) that are missing or, on PostgreSQL, disabled.

A SQLite store file policyd creates (``policyctl init``, the demo, the daemon) is mode
0640 whatever the umask (``create_store_file``, just before SQLite's first connection
would create it), and when root creates it, it belongs to the owner and group of its
directory (``/var/lib/policyd`` is ``policyd:policyd``), so the daemon can use a store an
administrator made with ``sudo policyctl init``.  SQLite gives its ``-wal``, ``-shm`` and
``-journal`` files the database file's mode (and, as root, its owner).  An existing file
is never changed.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from ..config import StoreTimeouts
from ..errors import BadInput, StoreUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")
WRITE = {"policyd_write": True}
STORE_FILE_MODE = 0o640


def parse_url(url: str, what: str = "store URL"):
    """``url`` parsed, with an installed driver chosen; malformed is ``BadInput``."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise BadInput(f"bad {what} {url!r}: {error}") from None
    return with_installed_driver(parsed)


DEFAULT_TIMEOUTS = StoreTimeouts()


def make_engine(url: str, *, create_dirs: bool = False,
                timeouts: StoreTimeouts | None = None, application_name: str = "policyd",
                pooled: bool = True) -> Engine:
    """An engine for ``url``, with ``timeouts`` (``[store] *_timeout``, else the
    defaults).  A malformed URL or a missing driver is ``BadInput``.
    ``application_name``: what PostgreSQL's ``pg_stat_activity`` shows for its
    connections (unless the URL names one).  ``pooled=False``: every connection is
    opened for its use and closed after it (the LISTEN connection)."""
    timeouts = timeouts or DEFAULT_TIMEOUTS
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict = {}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database)
            if create_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
            # No pool: a connection kept open across reads keeps its page cache and the
            # WAL index of the file it opened, so it would never see another store copied
            # over the file (``cp``: same inode).  Opening a file is ~0.1 ms, and the
            # last connection to close checkpoints and removes the WAL, so a file that
            # is replaced between two reads has no stale WAL beside it.
            kwargs["poolclass"] = NullPool
    elif backend in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        kwargs["pool_recycle"] = 3600
        kwargs["pool_pre_ping"] = True
    else:
        kwargs["pool_pre_ping"] = True
    if not pooled:
        kwargs["poolclass"] = NullPool
        kwargs.pop("pool_recycle", None)
    kwargs["connect_args"] = connect_args_for(parsed, timeouts,
                                              application_name=application_name)
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as error:
        raise BadInput(f"store URL {safe_url(url)}: no driver for it ({error})") from None
    if backend == "sqlite":
        _sqlite_hooks(engine)
    install_timeouts(engine, timeouts)
    return engine


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def connect_args_for(parsed, timeouts: StoreTimeouts, *, pg_options: str = "",
                     application_name: str = "") -> dict:
    """The DBAPI ``connect()`` arguments that bound every wait on ``parsed`` (a URL with
    its driver chosen).  ``pg_options`` are more ``-c name=value`` settings for
    PostgreSQL; ``application_name`` names its connections.  What the URL's query string
    sets itself is left to it."""
    backend = parsed.get_backend_name()
    query = parsed.query
    args: dict = {}
    if backend == "sqlite":
        args["timeout"] = timeouts.lock
    elif backend == "postgresql":
        # libpq: whole seconds, and it treats 1 as 2.
        args["connect_timeout"] = max(2, math.ceil(timeouts.connect))
        options = (f"-c statement_timeout={math.ceil(timeouts.statement * 1000)} "
                   f"-c lock_timeout={math.ceil(timeouts.lock * 1000)}")
        if pg_options:
            options = f"{pg_options} {options}"
        own = query.get("options")
        if own:
            options = f"{options} {own if isinstance(own, str) else ' '.join(own)}"
        args["options"] = options
        args.update(keepalives=1, keepalives_idle=30, keepalives_interval=10,
                    keepalives_count=3)
        if application_name:
            args["application_name"] = application_name
    elif backend in ("mysql", "mariadb"):
        args["connect_timeout"] = _whole_seconds(timeouts.connect)
        # Client side: a server that stopped answering (frozen, or gone without a RST)
        # fails the read instead of blocking forever; later than the server's own
        # max_statement_time, which gives the clearer error.
        args["read_timeout"] = args["write_timeout"] = _whole_seconds(
            timeouts.statement + timeouts.connect)
    # The URL's own options are merged above (connect_args would replace them).
    return {key: value for key, value in args.items()
            if key == "options" or key not in query}


def install_timeouts(engine: Engine, timeouts: StoreTimeouts) -> None:
    """Session settings a DBAPI argument cannot carry (MariaDB/MySQL), on every new
    connection of ``engine``."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return
    lock = _whole_seconds(timeouts.lock)

    @event.listens_for(engine, "connect")
    def _timeouts(dbapi_connection, record):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT VERSION()")
            version = str(cursor.fetchone()[0])
            if "mariadb" in version.lower():
                cursor.execute(f"SET SESSION max_statement_time = {timeouts.statement:.3f}")
            else:  # MySQL: milliseconds, SELECTs only
                cursor.execute("SET SESSION max_execution_time = "
                               f"{math.ceil(timeouts.statement * 1000)}")
            cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {lock}, "
                           f"lock_wait_timeout = {lock}")
        finally:
            cursor.close()


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


def create_store_file(path: Path) -> bool:
    """Create the SQLite database ``path`` (empty: SQLite writes the header) mode 0640
    whatever the umask; run as root, give it the owner and group of its directory.
    Returns whether it created the file: an existing one is left exactly as it is, and
    one that cannot be created (no directory, no permission) is left to SQLite's own
    error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     STORE_FILE_MODE)
    except OSError:
        return False
    try:
        os.fchmod(fd, STORE_FILE_MODE)  # the umask may have taken bits away
        if os.geteuid() == 0:
            directory = os.stat(path.parent)
            os.fchown(fd, directory.st_uid, directory.st_gid)
    finally:
        os.close(fd)
    return True


def _sqlite_hooks(engine: Engine) -> None:
    path = sqlite_path(engine)
    if path is not None:
        @event.listens_for(engine, "do_connect")
        def _create(dialect, record, cargs, cparams):
            create_store_file(path)  # then SQLite opens it; None: connect as usual

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


@lru_cache(maxsize=None)
def expected_triggers(dialect: str) -> tuple[tuple[str, str], ...]:
    """(table, trigger name) of every change trigger the schema at head has on
    ``dialect``: the union of ``change_triggers(dialect)`` over the migrations that
    define it (a migration that adds change triggers lists them there)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config(None))  # type: ignore[arg-type]
    found: set[tuple[str, str]] = set()
    for script in scripts.walk_revisions():
        listed = getattr(script.module, "change_triggers", None)
        if listed is not None:
            found.update(listed(dialect))
    return tuple(sorted(found))


# PostgreSQL's ``pg_trigger.tgenabled``: "O" fires in ordinary sessions, "A" always; "D"
# (``DISABLE TRIGGER``) never, "R" only in replica sessions (``ENABLE REPLICA TRIGGER``).
_FIRES = ("O", "A")


def _triggers_present(connection: Connection) -> dict[tuple[str, str], bool]:
    """(table, trigger name) -> whether it fires for an ordinary writer."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        rows = connection.execute(text(
            "SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal AND pg_table_is_visible(c.oid)"))
        return {(table, name): str(enabled) in _FIRES for table, name, enabled in rows}
    if dialect in ("mysql", "mariadb"):
        rows = connection.execute(text(
            "SELECT EVENT_OBJECT_TABLE, TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE()"))
    else:
        rows = connection.execute(text(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'"))
    return {(table, name): True for table, name in rows}


def trigger_problem(connection: Connection) -> str | None:
    """Which of the store's change triggers (``expected_triggers``) are missing or
    disabled, else ``None``.  Without them a write moves no list revision: the
    incremental refresh and the change token miss it."""
    present = _triggers_present(connection)
    if connection.dialect.name in ("mysql", "mariadb") and not any(
            name.startswith("policyd_") for _, name in present):
        # MariaDB shows a table's triggers only to a user with more than SELECT on it:
        # a read-only store user sees none.  Unknown, not missing: the verification
        # build still catches a write that bypassed them.
        return None
    missing, disabled = [], []
    for table, name in expected_triggers(connection.dialect.name):
        fires = present.get((table, name))
        if fires is None:
            missing.append(f"{name} on {table}")
        elif not fires:
            disabled.append(f"{name} on {table}")
    if not (missing or disabled):
        return None
    parts = []
    if missing:
        parts.append(f"missing: {', '.join(missing)}")
    if disabled:
        parts.append(f"disabled: {', '.join(disabled)} (ALTER TABLE ... ENABLE TRIGGER)")
    return ("the store's change triggers do not all fire (" + "; ".join(parts)
            + "): writes that bypass them are only seen by a full build; `policyctl "
            "migrate` makes them again")


def repair_triggers(engine: Engine) -> str | None:
    """On a store at the head revision whose change triggers do not all fire
    (``trigger_problem``): make them again, each migration's ``recreate_triggers`` oldest
    first, in one transaction.  Returns the problem repaired, else ``None``."""
    from alembic.script import ScriptDirectory

    try:
        with engine.begin() as connection:
            if schema_problem(connection) is not None:
                return None
            problem = trigger_problem(connection)
            if problem is None:
                return None
            dialect = connection.dialect.name
            scripts = ScriptDirectory.from_config(_alembic_config(None))  # type: ignore
            for script in reversed(list(scripts.walk_revisions())):
                recreate = getattr(script.module, "recreate_triggers", None)
                for statement in recreate(dialect) if recreate is not None else ():
                    connection.exec_driver_sql(statement)
            left = trigger_problem(connection)
            if left is not None:
                raise StoreUnavailable(f"cannot recreate the change triggers of the store "
                                       f"at {safe_url(engine.url)}: {left}")
    except SQLAlchemyError as error:
        raise StoreUnavailable(f"cannot recreate the change triggers of the store at "
                               f"{safe_url(engine.url)}: {first_line(error)}") from None
    return problem


def ping(connection: Connection) -> None:
    connection.execute(text("SELECT 1"))


# Words of the drivers' timeout errors -> the configuration key that bounds that wait.
_TIMEOUT_WORDS = (
    ("lock timeout", "lock_timeout"),                          # PostgreSQL
    ("statement timeout", "statement_timeout"),                # PostgreSQL
    ("lock wait timeout exceeded", "lock_timeout"),            # MariaDB 1205
    ("max_statement_time exceeded", "statement_timeout"),      # MariaDB 1969
    ("maximum statement execution time", "statement_timeout"),  # MySQL 3024
    ("database is locked", "lock_timeout"),                    # SQLite busy timeout
    ("timeout expired", "connect_timeout"),                    # libpq connect
    ("timed out", "connect_timeout or statement_timeout"),     # socket timeouts
)


def first_line(error: Exception) -> str:
    """The first line of a driver's error, and, for a timeout, which ``[store]`` key
    bounded the wait."""
    message = str(getattr(error, "orig", None) or error)
    line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    lowered = line.lower()
    for words, key in _TIMEOUT_WORDS:
        if words in lowered:
            return f"{line} (the store did not answer within [store] {key})"
    return line
