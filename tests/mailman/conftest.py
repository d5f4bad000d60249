"""Fixtures for the agreement suite against the real Mailman 3 core.

Mailman lives in its own virtualenv (``make mailman-venv``); its interpreter comes from
``$POLICYD_MAILMAN_PYTHON`` (set by ``make test``), else ``build/mailman-venv/bin/python``.
Without it these tests skip on a developer machine and fail in CI (tests/requirements.py).
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.mailman.harness import mailman_python
from tests.requirements import require

POSTGRES = dict(host="127.0.0.1", port=5432, user="postgres")


@pytest.fixture(scope="session")
def mm_python():
    """The Mailman virtualenv's python (skip/fail when missing)."""
    python = mailman_python()
    require(python is not None,
            "the Mailman 3 virtualenv (make mailman-venv, or set POLICYD_MAILMAN_PYTHON)")
    return python


def _postgres_reachable() -> bool:
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=3, **POSTGRES).close()
    except psycopg2.Error:
        return False
    return True


@pytest.fixture
def postgres_database(mm_python):
    """A new, empty, uniquely named PostgreSQL database for Mailman; dropped afterwards.
    Yields its SQLAlchemy URL."""
    require(_postgres_reachable(), "PostgreSQL on 127.0.0.1:5432 (user postgres)")
    probe = subprocess.run([str(mm_python), "-c", "import psycopg2"], capture_output=True)
    require(probe.returncode == 0, "psycopg2 in the Mailman virtualenv (make mailman-venv)")
    import psycopg2

    name = f"policyd_mm_oracle_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(dbname="postgres", **POSTGRES)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield ("postgresql+psycopg2://{user}@{host}:{port}/".format(**POSTGRES) + name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
