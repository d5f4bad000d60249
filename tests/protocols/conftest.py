import pytest

from .fakes import captured_events


@pytest.fixture
def events():
    """The ``twisted.logger`` events emitted during the test."""
    with captured_events() as observer:
        yield observer
