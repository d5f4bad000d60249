"""What a runtime part that replaces Twisted's code checks at start-up: that the upstream
function it replaces still does what it was written against (its lines, comments and
white space aside)."""

from __future__ import annotations

import inspect

__all__ = ["changed"]


def changed(function, lines: tuple[str, ...], name: str) -> str | None:
    """``None`` when the source of ``function`` has each of ``lines``, else why not
    (``name``: how the message calls it, e.g. ``Twisted's tcp.Port.doRead``)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError) as error:
        return f"cannot read {name} ({error})"
    present = {line.split("#", 1)[0].strip() for line in source.splitlines()}
    missing = [line for line in lines if line not in present]
    if missing:
        return f"{name} changed (no longer: {missing[0]!r})"
    return None
