"""The builder's rests (policyd.pacing): only inside a pacing() block, after `work`
seconds of building, for `rest` seconds."""

from __future__ import annotations

from policyd import pacing


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
