"""Fixtures: real Mailman 3 databases (built by Mailman's own API through ``mm3_build.py``
in Mailman's virtualenv) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.requirements import require

HERE = Path(__file__).resolve().parent
BUILDER = HERE / "mm3_build.py"
REPO = HERE.parent.parent
PG_HOST, PG_PORT = "127.0.0.1", 5432


def find_mailman_python() -> Path | None:
    configured = os.environ.get("POLICYD_MAILMAN_PYTHON")
    path = Path(configured) if configured else REPO / "build" / "mailman-venv" / "bin" / "python"
    if not path.exists():
        return None
    probe = subprocess.run([str(path), "-c", "import mailman.version"],
                           capture_output=True, timeout=60)
    return path if probe.returncode == 0 else None


@pytest.fixture(scope="session")
def mailman_python() -> Path:
    path = find_mailman_python()
    require(path is not None, "the Mailman 3.3.10 virtualenv (make mailman-venv, or "
                              "POLICYD_MAILMAN_PYTHON)")
    return path


class MailmanBuilder:
    """Applies ``mm3_build.py`` operations to one database through Mailman's API."""

    def __init__(self, python: Path, url: str, var_dir: Path,
                 pythonpath: Path | None = None) -> None:
        self.python = python
        self.url = url
        self.var_dir = var_dir
        self.pythonpath = pythonpath

    def apply(self, *operations: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMAN_")}
        env.pop("PYTHONPATH", None)
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)
        proc = subprocess.run(
            [str(self.python), str(BUILDER), "--url", self.url, "--var-dir", str(self.var_dir)],
            input=json.dumps(list(operations)), capture_output=True, text=True, timeout=300,
            env=env, cwd=str(self.var_dir))
        if proc.returncode != 0:
            raise RuntimeError(f"mm3_build failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            return True
    except OSError:
        return False


def _pg_admin(statement: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user="postgres",
                                  dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture
def pg_database():
    """A new, empty PostgreSQL database; dropped afterwards.  Yields its URL."""
    require(pg_reachable(), f"PostgreSQL on {PG_HOST}:{PG_PORT}")
    name = "policyd_mm3_" + uuid.uuid4().hex[:12]
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MY_HOST, MY_PORT = "127.0.0.1", 3306


def mariadb_reachable() -> bool:
    try:
        with socket.create_connection((MY_HOST, MY_PORT), timeout=2):
            return True
    except OSError:
        return False


def _my_admin(statement: str) -> None:
    import pymysql

    connection = pymysql.connect(host=MY_HOST, port=MY_PORT, user="root", password="")
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
        connection.commit()
    finally:
        connection.close()


@pytest.fixture
def mariadb_database(tmp_path):
    """A new, empty MariaDB database; dropped afterwards.  Yields (URL, a PYTHONPATH
    holding only PyMySQL for Mailman's virtualenv, which does not install it)."""
    require(mariadb_reachable(), f"MariaDB on {MY_HOST}:{MY_PORT}")
    import pymysql

    name = "policyd_mm3_" + uuid.uuid4().hex[:12]
    _my_admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    shim = tmp_path / "pymysql-only"
    shim.mkdir()
    (shim / "pymysql").symlink_to(Path(pymysql.__file__).parent)
    try:
        yield f"mysql+pymysql://root@{MY_HOST}:{MY_PORT}/{name}?charset=utf8mb4", shim
    finally:
        _my_admin(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(params=[
    "sqlite",
    pytest.param("postgresql", marks=[pytest.mark.integration, pytest.mark.postgres]),
    pytest.param("mariadb", marks=[pytest.mark.integration, pytest.mark.mariadb]),
])
def mailman_db(request, mailman_python, tmp_path):
    """A ``MailmanBuilder`` on an empty SQLite file, PostgreSQL or MariaDB database."""
    pythonpath = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'mailman.db'}"
    elif request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
    else:
        url, pythonpath = request.getfixturevalue("mariadb_database")
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    builder = MailmanBuilder(mailman_python, url, var_dir, pythonpath)
    yield builder
    shutil.rmtree(var_dir, ignore_errors=True)
