"""The incremental-equals-full state machine (``tests/store/test_refresh_property.py``)
on real PostgreSQL and MariaDB servers: the triggers of every dialect, the cascades
MariaDB runs without firing triggers.  Examples: ``POLICYD_PROPERTY_SERVER_EXAMPLES``
(default 60) per database; outside CI a server that is not running skips."""

from __future__ import annotations

import os

import pytest

from tests.store.test_refresh_property import run_on_server

from .test_store_databases import mariadb_databases, postgres_databases  # noqa: F401

EXAMPLES = int(os.environ.get("POLICYD_PROPERTY_SERVER_EXAMPLES", "60"))


@pytest.mark.integration
@pytest.mark.postgres
def test_incremental_equals_full_on_postgresql(postgres_databases):  # noqa: F811
    """Any sequence of changes: incremental == full build, on PostgreSQL."""
    run_on_server(postgres_databases(), EXAMPLES)


@pytest.mark.integration
@pytest.mark.mariadb
def test_incremental_equals_full_on_mariadb(mariadb_databases):  # noqa: F811
    """Any sequence of changes: incremental == full build, on MariaDB."""
    run_on_server(mariadb_databases(), EXAMPLES)
