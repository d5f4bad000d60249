"""Restricted unpicklers for the two kinds of pickles policyd reads from Mailman.

A pickle is a program: ``GLOBAL``/``STACK_GLOBAL`` name any importable callable and
``REDUCE`` calls it, so ``pickle.loads`` on data someone else wrote runs their code.  Both
unpicklers here override ``find_class`` (the only way a pickle reaches a callable) and
admit an explicit list of names; everything else raises ``UnsafePickleError`` naming the
global, *before* anything is imported or called.  Nothing in this module imports a module
named by a pickle.

``loads_mailman3_list``
    Mailman 3's ``*_these_nonmembers`` columns (``MutableList.as_mutable(PickleType)``).
    Mailman 3.3.10 with SQLAlchemy 2 writes protocol 5 (``pickle.HIGHEST_PROTOCOL``):
    ``sqlalchemy.ext.mutable.MutableList`` rebuilt by ``REDUCE`` from a plain ``list`` of
    ``str`` (``MutableList.__reduce_ex__``).  Older databases may hold a plain pickled
    ``list``.  Admitted: ``MutableList`` (mapped to a function that returns a plain list,
    SQLAlchemy is never imported) and, for ``REDUCE`` on protocol-2 ``set`` pickles,
    nothing else.  The result must be a list of strings (bytes are decoded as UTF-8).

``loads_mailman2``
    Mailman 2.1's ``lists/NAME/config.pck``: Python 2 ``cPickle.dump(dict, fp, 1)``
    (protocol 1; some tools rewrite them with protocol 2).  Read with
    ``encoding="latin-1"`` so Python 2 byte strings come back as ``str`` holding the same
    bytes (decode them yourself when you know the charset).  Admitted globals:

    * ``__builtin__``/``builtins`` ``set``, ``frozenset``, ``object``;
    * ``copy_reg._reconstructor`` (protocol 0/1 new-style instances) -> a safe
      re-implementation that only builds placeholders or sets;
    * ``sets.Set``/``sets.ImmutableSet`` (Python 2's ``sets`` module) -> ``set``;
    * any ``Mailman.*`` class (``Mailman.Bouncer._BounceInfo`` in ``bounce_info``, and
      whatever else an old list carries) -> an inert ``MailmanPlaceholder`` subclass that
      only records its constructor arguments and state.  ``Mailman`` is never imported.

    The result must be a ``dict``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

__all__ = [
    "UnsafePickleError",
    "MailmanPlaceholder",
    "loads_mailman3_list",
    "loads_mailman2",
    "load_mailman2_file",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global outside the allow-list, or is not the expected shape,
    or is not a pickle at all.  The message says which."""


# --- Mailman 3 -----------------------------------------------------------------------------


def _mutable_list(items=()) -> list:
    """Stands in for ``sqlalchemy.ext.mutable.MutableList`` when ``REDUCE`` calls it."""
    return list(items)


_MAILMAN3_GLOBALS = {
    ("sqlalchemy.ext.mutable", "MutableList"): _mutable_list,
}


class _Mailman3Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _MAILMAN3_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} (a Mailman 3 "
                "*_these_nonmembers pickle may only hold a list of strings)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a Mailman 3 pickle")


def loads_mailman3_list(data: bytes | memoryview | None) -> list[str]:
    """Unpickle one ``*_these_nonmembers`` value; ``None`` (SQL NULL) is an empty list."""
    if data is None:
        return []
    try:
        value = _Mailman3Unpickler(io.BytesIO(bytes(data))).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # truncated or not a pickle at all
        raise UnsafePickleError(f"not a readable pickle: {type(error).__name__}: "
                                f"{error}") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise UnsafePickleError(f"expected a list, found {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if not isinstance(item, str):
            raise UnsafePickleError(
                f"expected a list of strings, found an item of type {type(item).__name__}"
            )
        out.append(item)
    return out


# --- Mailman 2.1 ---------------------------------------------------------------------------


class MailmanPlaceholder:
    """An inert stand-in for an instance of a Mailman 2 class found in a pickle.

    Subclasses are made per class name (``_BounceInfo`` and so on) so that
    ``type(x).__name__`` and ``x.mailman_class`` tell what it was.  It only stores what
    the pickle gives it: constructor arguments (``args``) and state (``state``, and the
    state's dict items as attributes for convenience).  It has no behaviour.
    """

    mailman_class = "Mailman.?"
    args: tuple = ()
    state: Any = None

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = state[0]  # (dict, slots dict)
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(key, str) and key.isidentifier() and key not in (
                        "args", "state", "mailman_class"):
                    object.__setattr__(self, key, value)

    def __reduce__(self):
        raise TypeError("a Mailman placeholder is not picklable")

    def __repr__(self) -> str:
        return f"<placeholder for {self.mailman_class}>"


_placeholder_classes: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    cls = _placeholder_classes.get(key)
    if cls is None:
        safe_name = name if name.isidentifier() else "MailmanObject"
        cls = type(safe_name, (MailmanPlaceholder,),
                   {"mailman_class": f"{module}.{name}", "__module__": __name__})
        _placeholder_classes[key] = cls
    return cls


class _Py2Set(set):
    """Python 2 ``sets.Set``/``ImmutableSet``: its pickle state is ``(data_dict,)``."""

    def __init__(self, *args):
        super().__init__(*args)

    def __setstate__(self, state):
        data = state[0] if isinstance(state, tuple) and state else state
        if isinstance(data, dict):
            self.update(data)


def _reconstructor(cls, base, state):
    """A safe ``copy_reg._reconstructor``: only for classes this module hands out."""
    if isinstance(cls, type) and issubclass(cls, (MailmanPlaceholder, _Py2Set)):
        return cls()
    raise UnsafePickleError(f"refusing copy_reg._reconstructor for {cls!r}")


_MAILMAN2_GLOBALS = {
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("sets", "Set"): _Py2Set,
    ("sets", "ImmutableSet"): _Py2Set,
}


class _Mailman2Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _MAILMAN2_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "Mailman" or module.startswith("Mailman."):
            return _placeholder(module, name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name} (a Mailman 2.1 config.pck may only "
            "hold plain data and Mailman's own classes, which are never imported)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a Mailman 2.1 pickle")


def loads_mailman2(data: bytes, encoding: str = "latin-1") -> dict[str, Any]:
    """Unpickle a Mailman 2.1 ``config.pck``.  Python 2 byte strings come back as
    ``str`` holding the same bytes as Latin-1 code points (``encoding="latin-1"``), or as
    ``bytes`` with ``encoding="bytes"`` (then dict keys that were byte strings are bytes
    too); Python 2 ``unicode`` always comes back as ``str``."""
    if encoding not in ("latin-1", "bytes"):
        raise ValueError("encoding must be 'latin-1' or 'bytes'")
    try:
        value = _Mailman2Unpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError:
        raise
    except Exception as error:
        raise UnsafePickleError(f"not a readable pickle: {type(error).__name__}: "
                                f"{error}") from None
    if not isinstance(value, dict):
        raise UnsafePickleError(f"expected a dict, found {type(value).__name__}")
    return value


def load_mailman2_file(path, encoding: str = "latin-1") -> dict[str, Any]:
    with open(path, "rb") as fp:
        data = fp.read()
    try:
        return loads_mailman2(data, encoding)
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
