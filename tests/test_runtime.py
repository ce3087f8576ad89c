"""The thread policy (capsnet.runtime): its decisions, driven by fake readings and fake
step times (nothing here is timed)."""

from __future__ import annotations

import random

import pytest

from capsnet import runtime as R


def _reading(cores: int, others: float | None) -> R.LoadReading:
    return R.LoadReading(cores, others)


@pytest.mark.parametrize(
    "ceiling, cores, others, expected",
    [
        (2, 2, 0.0, 2),  # idle: torch's default
        (2, 2, 1.0, 1),  # one competitor on two cores: one thread
        (2, 2, 0.4, 2),  # a short-lived blip rounds away
        (2, 2, 4.0, 1),  # overloaded: never below one
        (16, 16, 3.0, 13),
        (4, 16, 0.0, 4),  # never above what torch was set up for
    ],
)
def test_decide_threads(ceiling, cores, others, expected):
    threads, reason = R.decide_threads(ceiling, _reading(cores, others))
    assert threads == expected
    assert f"{cores} cores" in reason


def test_decide_threads_without_a_reading_keeps_the_ceiling():
    assert R.decide_threads(3, _reading(8, None))[0] == 3


def test_read_load_subtracts_own_threads_and_takes_the_median():
    totals = iter([3, 3, 9, 3, 2])
    reading = R.read_load(
        5, procs_running=lambda: next(totals), own_running=lambda: 2, sleep=lambda s: None
    )
    assert reading.others == 1.0
    assert reading.samples == (1.0, 1.0, 7.0, 1.0, 0.0)
    unknown = R.read_load(3, procs_running=lambda: None, own_running=lambda: 1)
    assert unknown.others is None


def test_read_load_runs_on_this_machine():
    reading = R.read_load(2, 0.0)
    assert reading.cores >= 1
    assert reading.others is None or reading.others >= 0


@pytest.mark.parametrize(
    "kwargs, policy, why",
    [
        ({"num_threads": 3}, "fixed", "num_threads=3"),
        ({"env": {"OMP_NUM_THREADS": "1"}}, "fixed", "OMP_NUM_THREADS"),
        ({"distributed": True}, "fixed", "distributed"),
        ({"device": "cuda"}, "fixed", "device cuda"),
        ({}, "adaptive", "cores"),
    ],
)
def test_choose_threads_opt_outs(kwargs, policy, why):
    kwargs = {"env": {}, **kwargs}
    threads, got, reason = R.choose_threads(**kwargs, ceiling=2, reader=lambda: _reading(2, 1.0))
    assert got == policy and why in reason
    assert threads == (kwargs.get("num_threads") or (1 if policy == "adaptive" else 2))


def _drive(adaptive: R.AdaptiveThreads, step_time, steps: int) -> list[int]:
    """Run ``steps`` fake steps; ``step_time(threads, k)`` is step k's time at that count."""
    used = []
    threads = adaptive.threads
    for k in range(steps):
        used.append(threads)
        threads = adaptive.observe(step_time(threads, k))
    return used


def test_adaptive_moves_to_fewer_threads_under_contention():
    # the numbers: 3.7 s at 2 threads under load, 0.63 s at 1
    a = R.AdaptiveThreads(2, 2, interval=10, probe_steps=3, warmup=1)
    used = _drive(a, lambda n, k: {1: 0.63, 2: 3.7}[n], 7)
    assert used == [2, 2, 2, 2, 1, 1, 1]  # warm-up, baseline, probe
    assert a.threads == 1 and a.last_timings == {"2": 3.7, "1": 0.63}
    assert not a.checking and a.decisions == 1
    used = _drive(a, lambda n, k: {1: 0.63, 2: 3.7}[n], 26)  # hold, check, hold
    assert a.threads == 1 and used.count(2) == 3  # one probe of 2 threads per interval


def test_adaptive_keeps_the_count_when_the_neighbour_is_not_faster():
    a = R.AdaptiveThreads(2, 2, interval=5, probe_steps=2, warmup=0)
    used = _drive(a, lambda n, k: {1: 0.60, 2: 0.45}[n], 30)
    assert a.threads == 2
    assert set(used) == {1, 2}
    assert used.count(1) < used.count(2) / 3  # probing is a small share of the steps


def test_adaptive_tries_more_threads_when_fewer_do_not_pay_and_hill_climbs():
    a = R.AdaptiveThreads(2, 8, interval=100, probe_steps=1, warmup=0)
    _drive(a, lambda n, k: 1.0 / n, 12)  # more is always faster
    assert a.threads == 8
    b = R.AdaptiveThreads(8, 8, interval=100, probe_steps=1, warmup=0)
    _drive(b, lambda n, k: float(n), 12)  # fewer is always faster
    assert b.threads == 1


def test_adaptive_corrects_when_a_competitor_leaves():
    a = R.AdaptiveThreads(2, 2, interval=5, probe_steps=2, warmup=0)

    def step_time(n, k):
        loaded = k < 15
        return {1: 0.6, 2: 3.7 if loaded else 0.45}[n]

    _drive(a, step_time, 15)
    assert a.threads == 1
    _drive(a, lambda n, k: step_time(n, k + 15), 20)
    assert a.threads == 2


IDLE = {1: 1.37, 2: 0.73}  # seconds per step, measured in the 2026-12-07 viewpoint run
LOADED = {1: 1.66, 2: 3.7}  # the same run with the CI suite beside it


def _settled(**kwargs) -> R.AdaptiveThreads:
    """A policy at 2 threads after its first check on an idle machine."""
    a = R.AdaptiveThreads(2, 2, interval=200, probe_steps=3, warmup=0, **kwargs)
    _drive(a, lambda n, k: IDLE[n], 10)
    assert a.threads == 2 and not a.checking and a.decisions == 1
    return a


def test_a_jump_in_step_time_starts_a_check_at_once():
    a = _settled()
    used = _drive(a, lambda n, k: LOADED[n], 30)  # a competitor starts after the check
    # 3 slow steps move the median of the last 5, 3 more time 2 threads again (the probe
    # of 1 thread decides), then 1 thread for good
    assert used[:6] == [2] * 6 and set(used[6:]) == {1}
    assert a.threads == 1 and a.decisions == 2
    assert a.triggered.startswith("step time x5.07")
    b = _settled(jump=None)  # without it: the bad count until the next interval
    used = _drive(b, lambda n, k: LOADED[n], 30)
    assert used == [2] * 30 and b.decisions == 1


def test_a_drop_in_step_time_starts_a_check_too():
    a = R.AdaptiveThreads(2, 2, interval=200, probe_steps=3, warmup=0)
    heavy = {1: 3.0, 2: 9.0}  # 1 thread better while loaded
    _drive(a, lambda n, k: heavy[n], 10)
    assert a.threads == 1
    used = _drive(a, lambda n, k: {1: 1.2, 2: 0.5}[n], 20)  # the load goes: 2.5x faster
    assert a.triggered.startswith("step time x0.40") and a.threads == 2
    assert used.count(1) == 3 + 3  # seen in 3 steps, timed in 3, then 2 threads


def test_noise_and_lone_slow_steps_do_not_start_checks():
    a = _settled()
    rng = random.Random(0)
    # +-15 % noise cannot move a median ratio past 1.15 / 0.85 = 1.35 < 1.5, and a step
    # that also writes a snapshot (10x) is one of 5 in the median
    _drive(a, lambda n, k: IDLE[n] * (10.0 if k % 50 == 7 else rng.uniform(0.85, 1.15)), 195)
    assert a.decisions == 1 and a.threads == 2 and not a.checking
    _drive(a, lambda n, k: IDLE[n], 1)  # hold step 200 (4 were in _settled): the interval's check
    assert a.checking and a.triggered == "every 200 steps"


def test_adaptive_checks_its_arguments():
    with pytest.raises(ValueError, match="threads must be in 1..ceiling=2"):
        R.AdaptiveThreads(3, 2)
    with pytest.raises(ValueError, match="interval"):
        R.AdaptiveThreads(1, 2, interval=0)
    with pytest.raises(ValueError, match="jump must be > 1"):
        R.AdaptiveThreads(1, 2, jump=1.0)
    with pytest.raises(ValueError, match="jump_steps >= 1"):
        R.AdaptiveThreads(1, 2, jump_steps=0)


class _FakeTorch:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.calls: list[int] = []

    def set(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n

    def policy(self, **kwargs) -> R.ThreadPolicy:
        """An adaptive policy on an idle 2-core machine that sets this fake's count."""
        return R.ThreadPolicy(
            env={}, warmup=0, reader=lambda: _reading(2, 0.0), set_threads=self.set,
            get_threads=lambda: self.threads, **kwargs,
        )  # fmt: skip


def test_thread_policy_applies_and_logs_its_decisions():
    fake = _FakeTorch(2)
    policy = fake.policy(interval=4, probe_steps=2)
    start = policy.start()
    assert (start.before, start.after, start.policy) == (2, 2, "adaptive")
    assert start.record()["kind"] == "threads" and start.record()["threads"] == 2
    events = []
    for _ in range(6):  # loaded: 1 thread is faster
        event = policy.after_step({1: 0.6, 2: 3.7}[fake.threads])
        if event:
            events.append(event)
    assert fake.threads == 1 and fake.calls == [1]
    (event,) = events
    assert (event.before, event.after, event.step) == (2, 1, 4)
    assert event.timings == {"2": 3.7, "1": 0.6}
    assert "2 -> 1" in event.reason
    policy.restore()
    assert fake.threads == 2 and policy.after_step(1.0) is None


def test_thread_policy_says_when_a_jump_started_the_check():
    fake = _FakeTorch(2)
    policy = fake.policy(interval=200, probe_steps=3)
    policy.start()
    events = [policy.after_step(IDLE[fake.threads]) for _ in range(10)]
    events += [policy.after_step(LOADED[fake.threads]) for _ in range(20)]
    first, second = [e for e in events if e is not None]
    assert first.before == first.after == 2 and "kept" in first.reason
    assert not first.reason.startswith("step time")
    assert (second.before, second.after, second.step) == (2, 1, 10 + 3 + 3 + 3)
    assert second.reason.startswith("step time x5.07 of the last check's; timed 3 steps")
    assert "2 -> 1" in second.reason and fake.threads == 1


def test_thread_policy_fixed_never_changes_threads():
    fake = _FakeTorch(2)
    policy = R.ThreadPolicy(
        3, reader=lambda: _reading(2, 1.0), set_threads=fake.set, get_threads=lambda: fake.threads
    )
    assert policy.start().after == 3 and policy.policy == "fixed"
    assert all(policy.after_step(1.0) is None for _ in range(50))
    policy.restore()
    assert fake.calls == [3]
