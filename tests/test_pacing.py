"""The builder's rests (policyd.runtime.pacing): only inside a pacing() block, after `work`
seconds of building, for `rest` seconds."""

from __future__ import annotations

import pytest

from policyd.runtime import pacing


def test_pace_does_nothing_outside_a_pacing_block(monkeypatch):
    def sleep(seconds):
        raise AssertionError("rested outside a pacing() block")
    monkeypatch.setattr(pacing.time, "sleep", sleep)
    for _ in range(10000):
        pacing.pace()
    assert pacing._pacer is None


def test_rests_after_each_stretch_of_work(monkeypatch):
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
    monkeypatch.setattr(pacing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(pacing.time, "sleep", sleep)
    with pacing.pacing(work=0.002, rest=0.001) as pacer:
        for _ in range(10):  # 10 stretches of 0.5 ms of "work" between pace points
            now[0] += 0.0005
            pacing.pace()
    assert sleeps == [0.001, 0.001]  # after the 4th and the 8th stretch
    assert pacer.rested == 0.002
    assert pacing._pacer is None


def test_blocks_nest_and_restore():
    with pacing.pacing(work=1.0, rest=0.0) as outer:
        with pacing.pacing(work=2.0, rest=0.0) as inner:
            assert pacing._pacer is inner
        assert pacing._pacer is outer
    assert pacing._pacer is None


def _fake_time(monkeypatch, on_sleep=None):
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
        if on_sleep is not None:
            on_sleep(now[0])
    monkeypatch.setattr(pacing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(pacing.time, "sleep", sleep)
    return now, sleeps


def test_with_the_daemons_reactor_an_idle_reactor_costs_no_rest(monkeypatch):
    monkeypatch.setattr(pacing, "turns", pacing.ReactorTurns())
    pacing.turns.active, pacing.turns.waiting = True, True
    now, sleeps = _fake_time(monkeypatch)
    with pacing.pacing(work=0.002, rest=0.001):
        for _ in range(10):
            now[0] += 0.0005
            pacing.pace()
    assert sleeps == []


def test_a_busy_reactor_gets_rests_until_it_waits_for_events_again(monkeypatch):
    turns = pacing.ReactorTurns()
    monkeypatch.setattr(pacing, "turns", turns)
    turns.active, turns.waiting, turns.waited_at = True, False, 0.0

    def reactor_catches_up(now):
        if now >= 0.0045:  # the reactor is back in epoll_wait after 2.5 ms
            turns.waiting, turns.waited_at = True, now
    now, sleeps = _fake_time(monkeypatch, reactor_catches_up)
    with pacing.pacing(work=0.002, rest=0.0005, longest=0.05):
        for _ in range(4):
            now[0] += 0.0005
            pacing.pace()
    assert sleeps == [0.0005] * 5  # 2.0 -> 4.5 ms: rested until the reactor waited


def test_a_saturated_reactor_still_lets_the_build_go_on(monkeypatch):
    turns = pacing.ReactorTurns()
    monkeypatch.setattr(pacing, "turns", turns)
    turns.active, turns.waiting, turns.waited_at = True, False, 0.0
    now, sleeps = _fake_time(monkeypatch)
    with pacing.pacing(work=0.002, rest=0.001, longest=0.01) as pacer:
        for _ in range(4):
            now[0] += 0.0005
            pacing.pace()
    assert len(sleeps) == 10 and pacer.rested == pytest.approx(0.01)
