"""policyd.runtime: each tuning part does what it says, can be switched off, and the
switches live in one place (``Tuning``)."""

from __future__ import annotations

import gc
import sys

from twisted.internet.task import Clock

from policyd.config import RuntimeConfig, parse
from policyd.runtime import fastio, heap, pacing, threads
from policyd.runtime.tuning import Tuning


def test_no_collection_pauses_the_cyclic_gc_and_restores_it():
    assert gc.isenabled()
    with heap.no_collection():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_heap_switched_off_leaves_the_gc_alone(monkeypatch):
    monkeypatch.setattr(heap, "enabled", False)
    with heap.no_collection():
        assert gc.isenabled()


def test_free_piecewise_empties_and_rests():
    pauses = []
    items, table = list(range(100)), {n: n for n in range(50)}
    heap.free_piecewise(items, table, pause=lambda: pauses.append(1))
    assert items == [] and table == {} and pauses


def test_release_drops_the_snapshot_list_by_list():
    from tests.protocols.fakes import sample_snapshot

    pauses = []
    box = [sample_snapshot()]
    heap.release(box, lambda: pauses.append(1))
    assert box == [] and len(pauses) == 3


def test_switch_interval_is_restored():
    before = sys.getswitchinterval()
    with threads.switch_interval(0.0005):
        assert sys.getswitchinterval() == 0.0005
    assert sys.getswitchinterval() == before


def test_fast_write_checks_the_running_twisted():
    assert fastio.available() is None


def test_fast_write_sends_at_once_on_a_real_socket():
    import socket

    from twisted.internet import reactor
    from twisted.internet.tcp import Connection

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = Connection(a, None, reactor)
        conn.connected = True
        fastio.write_now(conn, b"action=DUNNO\n\n")
        assert b.recv(100) == b"action=DUNNO\n\n"
        assert not conn._tempDataLen  # nothing queued for the reactor's next turn
    finally:
        a.close()
        b.close()


def test_tuning_applies_fast_write_where_answers_stay_open():
    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory
    from policyd.protocols.postfix import PostfixFactory
    from tests.protocols.fakes import sample_snapshot

    config = parse("")
    decider = Decider(FixedSnapshot(sample_snapshot()), config.smtp)
    postfix = PostfixFactory(decider, config.postfix, Clock())
    exim = EximFactory(decider, config.exim, Clock())
    tuning = Tuning(RuntimeConfig())
    for factory in (postfix, exim):
        tuning.apply_to_factory(factory)
    assert postfix.write is fastio.write_now
    assert exim.write is not fastio.write_now  # an answer followed by a close
    off = Tuning(RuntimeConfig(fast_write=False))
    fresh = PostfixFactory(decider, config.postfix, Clock())
    off.apply_to_factory(fresh)
    assert fresh.write is not fastio.write_now


def test_tuning_switches_pacing_heap_and_restores_the_switch_interval(monkeypatch):
    monkeypatch.setattr(pacing, "enabled", True)
    monkeypatch.setattr(heap, "enabled", True)
    before = sys.getswitchinterval()
    tuning = Tuning(RuntimeConfig(pacing=False, heap=False, switch_interval=0.002))
    tuning.daemon_starting()
    try:
        assert pacing.enabled is False and heap.enabled is False
        assert sys.getswitchinterval() == 0.002
        with pacing.pacing() as pacer:
            assert pacer is None  # switched off: no rests
    finally:
        tuning.daemon_stopped()
    assert sys.getswitchinterval() == before


def test_runtime_section_parses_and_refuses_bad_values():
    import pytest

    from policyd.config import ConfigError

    config = parse("[runtime]\nreactor = off\nstore_niceness = 5\n").runtime
    assert config.reactor is False and config.store_niceness == 5
    with pytest.raises(ConfigError, match="store_niceness"):
        parse("[runtime]\nstore_niceness = 42\n")


def test_reactor_collector_runs_the_collector_on_the_reactor(monkeypatch):
    """After the first load the collector runs at fixed times from the reactor (young,
    middle, all), never at an allocation threshold in another thread; stop() gives it
    back."""
    import gc

    from twisted.internet.task import Clock

    from policyd.runtime import heap

    clock = Clock()
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    was = gc.isenabled()
    gc.enable()
    collector = heap.ReactorCollector(clock)
    try:
        collector.start()
        assert not gc.isenabled()
        clock.pump([heap.ReactorCollector.YOUNG] * int(heap.ReactorCollector.FULL /
                                                       heap.ReactorCollector.YOUNG + 1))
        assert collected.count(2) == 1
        assert collected.count(1) == int(heap.ReactorCollector.FULL /
                                         heap.ReactorCollector.MIDDLE)
        assert collected.count(0) >= 290
    finally:
        collector.stop()
        assert gc.isenabled()
        if not was:
            gc.disable()


def test_reactor_collector_waits_while_a_snapshot_is_built(monkeypatch):
    """No collection from the reactor during a build: the young generation then holds
    the builder's rows, and scanning them would stop the reactor; after it, they run
    again."""
    import gc

    from twisted.internet.task import Clock

    from policyd.runtime import heap

    clock = Clock()
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    was = gc.isenabled()
    collector = heap.ReactorCollector(clock)
    try:
        collector.start()
        with heap.no_collection():
            clock.pump([heap.ReactorCollector.YOUNG] * 20)
            assert collected == []
            assert not gc.isenabled()
        clock.pump([heap.ReactorCollector.YOUNG] * 20)
        assert collected.count(0) >= 19 and collected.count(1) >= 1
    finally:
        collector.stop()
        if was:
            gc.enable()
        else:
            gc.disable()
