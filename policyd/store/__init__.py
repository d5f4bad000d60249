"""The stores policyd reads, behind one small interface, and the native store's admin API.

``open_backend(StoreConfig)`` returns the daemon's backend: blocking methods
``change_token()``, ``load_snapshot()``, ``check()``, ``describe()``, ``close()``, called
from a thread.  ``Store`` is what ``policyctl`` and the demo use to create, migrate and
write the native store: ``with store.write() as session:`` runs one transaction that also
bumps the change generation.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ..config import StoreConfig
from ..errors import BadInput, StoreUnavailable
from . import engine as engine_module
from .native import NativeBackend
from .queries import bump

__all__ = ["open_backend", "NativeBackend", "Store"]


def open_backend(store_config: StoreConfig):
    """The backend named by ``[store] backend`` (``native``; ``mailman3`` once its module
    exists)."""
    if store_config.backend == "native":
        return NativeBackend(store_config.url, store_config.timeouts,
                             store_config.site_header_checks,
                             verify_interval=store_config.verify_interval)
    try:
        module = importlib.import_module(f"{__name__}.{store_config.backend}")
    except ModuleNotFoundError:
        raise StoreUnavailable(f"store backend {store_config.backend!r} is not available "
                               "in this version of policyd") from None
    return module.open_backend(store_config)


class Store:
    """The native store for writers: schema management and transactions."""

    def __init__(self, url: str, timeouts=None) -> None:
        """``timeouts``: a ``config.StoreTimeouts`` (``[store] *_timeout``), else the
        defaults: a write or read against a locked or stuck store fails with
        ``StoreUnavailable`` (exit 5) instead of waiting for ever."""
        self.url = url
        self.engine = engine_module.make_engine(url, timeouts=timeouts,
                                                application_name="policyctl")
        self._writer = self.engine.execution_options(**engine_module.WRITE)

    @classmethod
    def from_config(cls, store_config: StoreConfig) -> "Store":
        return cls(store_config.url, store_config.timeouts)

    def describe(self) -> str:
        return engine_module.safe_url(self.url)

    def upgrade(self) -> tuple[str | None, str]:
        return engine_module.upgrade(self.engine)

    def repair_triggers(self) -> str | None:
        return engine_module.repair_triggers(self.engine)

    def require_schema(self) -> None:
        """``StoreUnavailable`` unless the store exists with the current schema."""
        path = engine_module.sqlite_path(self.engine)
        if path is not None and not path.exists():
            raise StoreUnavailable(f"no store at {path}; run `policyctl init`")
        with self._errors():
            with self.engine.connect() as connection:
                problem = engine_module.schema_problem(connection)
        if problem is not None:
            raise StoreUnavailable(f"store {self.describe()}: {problem}")

    def revision(self) -> str | None:
        with self._errors():
            with self.engine.connect() as connection:
                return engine_module.current_revision(connection)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError as error:
            # A concurrent writer got there first (our own checks run before writing).
            raise BadInput(f"conflicting change: {engine_module.first_line(error)}") from None
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"store {self.describe()}: "
                                   f"{engine_module.first_line(error)}") from None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: bump the generation, yield, commit (or roll back on any
        exception, so nothing is half-written)."""
        self.require_schema()
        with self._errors():
            with Session(self._writer, expire_on_commit=False) as session:
                with session.begin():
                    bump(session)
                    yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        self.require_schema()
        with self._errors():
            with Session(self.engine, expire_on_commit=False) as session:
                with session.begin():
                    yield session

    def close(self) -> None:
        self.engine.dispose()
