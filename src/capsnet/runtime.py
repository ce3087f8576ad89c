"""How many CPU threads torch should use, chosen where the run happens: the thread policy.

Chunked EM routing runs many small parallel regions; each one waits for its slowest
thread, so when another process takes one of the cores a thread is descheduled inside
nearly every region and a step can become many times slower (benchmarks/RESULTS.md,
"A busy machine"). Fewer threads than cores is then faster. Two parts, both opt-out
(``num_threads`` given = that many threads, fixed):

* **At start** (:func:`choose_threads`): the cores this process may use
  (``os.sched_getaffinity``) minus the other processes' runnable threads, sampled a few
  times from ``/proc/stat`` (``procs_running``, minus this process's own running
  threads from ``/proc/self/task``), rounded; never more than torch's thread count at start
  (its default, ``OMP_NUM_THREADS`` or what the caller set) and never fewer than 1.
* **While running** (:class:`AdaptiveThreads`): every ``interval`` steps it times
  ``probe_steps`` steps at the current count and at one fewer (then one more) thread,
  and keeps a neighbour only when its median step is at least ``margin`` faster; it keeps
  going in the direction that paid. Between checks it watches the step time: when the
  median of the last ``jump_steps`` steps moves by a factor ``jump`` (default 1.5, slower
  or faster) from what the last check measured at the count in force, a check starts at
  once. So a competitor that starts or stops after a check is corrected within a few steps,
  not up to an interval later (measured: a CI suite starting beside a viewpoint run cost
  about 200 steps at 2.2x the step time of the better count, docs/results.md); one that
  changes the step time less than ``jump`` is corrected within one interval.

:class:`ThreadPolicy` joins the two for a training loop: ``start()`` applies the start
decision, ``after_step(seconds)`` feeds the adaptive part and applies its changes; each
returns a :class:`ThreadEvent` (or None) for the run's log. The decision functions are
pure (readings in, a number out) so tests drive them with fakes.

Note:
    A thread count that changes during a run changes the order of floating-point
    reductions, so two runs can differ in the last bits. Set ``num_threads`` for
    bit-for-bit repeatable runs (the tests do).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ThreadEvent",
    "LoadReading",
    "AdaptiveThreads",
    "ThreadPolicy",
    "available_cores",
    "read_load",
    "decide_threads",
    "choose_threads",
    "POLICIES",
]

POLICIES = ("fixed", "start", "adaptive")
"""``fixed``: keep the given count; ``start``: decide once; ``adaptive``: decide, then re-check."""


@dataclass(frozen=True)
class ThreadEvent:
    """One decision of the policy, as written to ``metrics.jsonl`` (``kind: "threads"``).

    ``before`` / ``after``: thread counts; ``reason``: what decided, in words; ``step``: the
    training step (0 at start); ``timings``: median step seconds per thread count measured
    (adaptive decisions only).
    """

    before: int
    after: int
    reason: str
    policy: str
    step: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The log record: ``{"kind": "threads", "threads": after, ...}``."""
        out = {"kind": "threads", "step": self.step, "threads": self.after}
        out.update({k: v for k, v in asdict(self).items() if k not in ("step",)})
        return out


@dataclass(frozen=True)
class LoadReading:
    """What :func:`read_load` saw: usable ``cores`` and the other processes' runnable
    threads (``others``, median of the samples; None where the OS does not say)."""

    cores: int
    others: float | None
    samples: tuple[float, ...] = ()


# --------------------------------------------------------------------------- readings


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _procs_running(stat: Path = Path("/proc/stat")) -> int | None:
    """Runnable threads on the whole machine, now (Linux ``procs_running``)."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_running(task_dir: Path = Path("/proc/self/task")) -> int:
    """This process's threads in state R (running or runnable), now; at least 1 (this one)."""
    running = 0
    try:
        for task in task_dir.iterdir():
            try:
                text = (task / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces)
            if text[text.rfind(")") + 2 : text.rfind(")") + 3] == "R":
                running += 1
    except OSError:
        return 1
    return max(1, running)


def read_load(
    samples: int = 10,
    interval_s: float = 0.005,
    *,
    procs_running: Callable[[], int | None] = _procs_running,
    own_running: Callable[[], int] = _own_running,
    sleep: Callable[[float], None] = time.sleep,
) -> LoadReading:
    """Sample the other processes' runnable threads ``samples`` times, ``interval_s`` apart.

    ``procs_running`` counts this process's running threads too; they are subtracted.
    Returns the median, so one sample that caught a short-lived process does not decide.
    """
    values: list[float] = []
    for k in range(samples):
        total = procs_running()
        if total is None:
            return LoadReading(available_cores(), None)
        values.append(float(max(0, total - own_running())))
        if k + 1 < samples:
            sleep(interval_s)
    return LoadReading(available_cores(), statistics.median(values), tuple(values))


# --------------------------------------------------------------------------- decisions


def decide_threads(ceiling: int, reading: LoadReading) -> tuple[int, str]:
    """Threads for the free cores: ``round(cores - others)`` clamped to ``1..ceiling``.

    ``ceiling``: torch's thread count at start (the most the process was set up for).
    Returns ``(threads, reason)``.
    """
    ceiling = max(1, ceiling)
    if reading.others is None:
        return ceiling, f"no load reading on this OS: torch's {ceiling}"
    free = reading.cores - reading.others
    threads = max(1, min(ceiling, math.floor(free + 0.5)))
    return threads, (
        f"{reading.cores} cores, {reading.others:g} other runnable threads -> {free:g} free; "
        f"at most {ceiling}"
    )


def choose_threads(
    num_threads: int | None = None,
    *,
    device: torch.device | str = "cpu",
    distributed: bool = False,
    env: Mapping[str, str] | None = None,
    ceiling: int | None = None,
    reader: Callable[[], LoadReading] = read_load,
) -> tuple[int, str, str]:
    """The start decision: ``(threads, policy, reason)`` with ``policy`` in :data:`POLICIES`.

    Fixed (``policy="fixed"``, the count kept as it is) when ``num_threads`` is given, when
    ``OMP_NUM_THREADS`` is set in ``env`` (default ``os.environ``; torchrun sets it), under
    DistributedDataParallel (the ranks share the cores; their step times include waiting
    for each other), and on a non-CPU ``device`` (the threads only feed it). Otherwise the
    load decides (:func:`decide_threads`) and ``policy="adaptive"``.
    """
    omp = (os.environ if env is None else env).get("OMP_NUM_THREADS")
    current = torch.get_num_threads() if ceiling is None else ceiling
    if num_threads is not None:
        return num_threads, "fixed", f"num_threads={num_threads} given"
    if omp:
        return current, "fixed", f"OMP_NUM_THREADS={omp} set"
    if distributed:
        return current, "fixed", "distributed run: torch's default per rank"
    if torch.device(device).type != "cpu":
        return current, "fixed", f"device {torch.device(device).type}: torch's default"
    threads, reason = decide_threads(current, reader())
    return threads, "adaptive", reason


class AdaptiveThreads:
    """Re-checks the thread count every ``interval`` steps from the steps' own times.

    Feed every step's wall time to :meth:`observe`; it returns the count for the next step.
    A check: ``probe_steps`` steps at the current count (the baseline), then as many at a
    neighbour (one fewer first, where possible); the neighbour is kept when its median is
    below ``(1 - margin)`` of the baseline's, and the search goes on in that direction;
    otherwise the other direction is tried once (when nothing moved yet). The first
    ``warmup`` steps are ignored (allocation, caches). Between checks, a median of the last
    ``jump_steps`` steps at least ``jump`` times the check's median at the kept count (or at
    most 1 / ``jump`` of it) starts the next check early (``triggered`` says why it started).

    Args:
        threads: the count to start from.
        ceiling: the most threads tried (1 <= threads <= ceiling).
        interval: steps between checks.
        probe_steps: steps timed per count in a check (their median is compared).
        margin: relative improvement a neighbour must show to be kept.
        warmup: steps ignored at the start.
        jump: step-time ratio that starts a check early (> 1), or None to check only every
            ``interval`` steps.
        jump_steps: steps whose median is compared with the last check's (a lone slow step,
            a snapshot or an evaluation, does not move it).
    """

    def __init__(
        self,
        threads: int,
        ceiling: int,
        *,
        interval: int = 200,
        probe_steps: int = 3,
        margin: float = 0.05,
        warmup: int = 2,
        jump: float | None = 1.5,
        jump_steps: int = 5,
    ) -> None:
        if not 1 <= threads <= ceiling:
            raise ValueError(f"threads must be in 1..ceiling={ceiling}, got {threads}")
        if interval < 1 or probe_steps < 1 or warmup < 0:
            raise ValueError(
                f"interval and probe_steps must be >= 1 and warmup >= 0, got interval="
                f"{interval}, probe_steps={probe_steps}, warmup={warmup}"
            )
        if (jump is not None and not jump > 1.0) or jump_steps < 1:
            raise ValueError(
                f"jump must be > 1 (or None) and jump_steps >= 1, got jump={jump}, "
                f"jump_steps={jump_steps}"
            )
        self.threads, self.ceiling = threads, ceiling
        self.interval, self.probe_steps, self.margin = interval, probe_steps, margin
        self.jump, self.jump_steps = jump, jump_steps
        self._recent: deque[float] = deque(maxlen=jump_steps)
        self.triggered = "start"  # why the current (or last) check started
        self._skip = warmup
        self._phase = "baseline"  # baseline -> probe -> hold -> baseline ...
        self._held = 0
        self._times: list[float] = []
        self._baseline: float | None = None
        self.home = threads  # the count in force when the current check started
        self._direction = -1 if threads > 1 else 1
        self._moved = False
        self._tried: set[int] = set()
        self.last_timings: dict[str, float] = {}
        self.decisions = 0

    def _candidate(self) -> int | None:
        c = self.threads + self._direction
        if 1 <= c <= self.ceiling and c not in self._tried:
            return c
        return None

    def _start_probe(self) -> int:
        """Choose the next neighbour to time, or end the check (hold)."""
        c = self._candidate()
        if c is None and not self._moved:
            self._direction = -self._direction
            c = self._candidate()
        if c is None:
            self._end_check()
            return self.threads
        self._tried.add(c)
        self._phase, self._times = "probe", []
        return c

    def _end_check(self) -> None:
        self._phase, self._held, self._times = "hold", 0, []
        self._recent.clear()
        self.decisions += 1

    def _jumped(self) -> float | None:
        """The ratio of the recent median to the last check's, when it is a jump."""
        if self.jump is None or self._baseline is None or len(self._recent) < self.jump_steps:
            return None
        ratio = statistics.median(self._recent) / max(self._baseline, 1e-12)
        return ratio if ratio >= self.jump or ratio <= 1.0 / self.jump else None

    def _begin_check(self, why: str) -> None:
        self._phase, self._times, self.triggered = "baseline", [], why
        self.home, self._moved, self._tried = self.threads, False, {self.threads}
        self._direction = -1 if self.threads > 1 else 1
        self.last_timings = {}

    def observe(self, seconds: float) -> int:
        """Record the wall time of the step just run; returns the count for the next one."""
        if self._skip > 0:
            self._skip -= 1
            return self.threads
        if self._phase == "hold":
            self._held += 1
            self._recent.append(seconds)
            ratio = self._jumped()
            if ratio is not None:
                self._begin_check(f"step time x{ratio:.2f} of the last check's")
            elif self._held >= self.interval:
                self._begin_check(f"every {self.interval} steps")
            return self.threads
        self._times.append(seconds)
        if len(self._times) < self.probe_steps:
            return self.threads if self._phase == "baseline" else self._probing()
        median = statistics.median(self._times)
        if self._phase == "baseline":
            self._baseline = median
            self._tried = {self.threads}
            self.last_timings = {str(self.threads): median}
            return self._start_probe()
        probed = self._probing()
        self.last_timings[str(probed)] = median
        baseline = self._baseline if self._baseline is not None else math.inf
        if median < (1.0 - self.margin) * baseline:
            self.threads, self._baseline, self._moved = probed, median, True
        return self._start_probe()

    def _probing(self) -> int:
        """The count being probed (the last one added to ``_tried`` in this check)."""
        return self.threads + self._direction

    @property
    def checking(self) -> bool:
        """True while a check is timing steps (the counts may move)."""
        return self._phase != "hold"


class ThreadPolicy:
    """The thread policy of one run: :func:`choose_threads` at start, then
    :class:`AdaptiveThreads` (policy ``adaptive``) applying its changes with ``set_threads``.

    Args:
        num_threads: a fixed count (opt-out), or None for the policy.
        device / distributed / env: as in :func:`choose_threads`.
        interval, probe_steps, margin, warmup, jump, jump_steps: as in
            :class:`AdaptiveThreads`.
        reader: the load reading (:func:`read_load`); tests pass a fake.
        set_threads / get_threads: apply / read the count (``torch.set_num_threads`` /
            ``torch.get_num_threads``); tests pass fakes.
    """

    def __init__(
        self,
        num_threads: int | None = None,
        *,
        device: torch.device | str = "cpu",
        distributed: bool = False,
        env: Mapping[str, str] | None = None,
        interval: int = 200,
        probe_steps: int = 3,
        margin: float = 0.05,
        warmup: int = 2,
        jump: float | None = 1.5,
        jump_steps: int = 5,
        reader: Callable[[], LoadReading] = read_load,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        get_threads: Callable[[], int] = torch.get_num_threads,
    ) -> None:
        self.num_threads, self.device, self.distributed, self.env = (
            num_threads, device, distributed, env,
        )  # fmt: skip
        self.interval, self.probe_steps, self.margin, self.warmup = (
            interval, probe_steps, margin, warmup,
        )  # fmt: skip
        self.jump, self.jump_steps = jump, jump_steps
        self.reader, self.set_threads, self.get_threads = reader, set_threads, get_threads
        self.adaptive: AdaptiveThreads | None = None
        self.policy = "fixed"
        self.step = 0
        self._before: int | None = None

    def start(self) -> ThreadEvent:
        """Decide and apply the count for the first step."""
        before = self._before = self.get_threads()
        threads, self.policy, reason = choose_threads(
            self.num_threads, device=self.device, distributed=self.distributed, env=self.env,
            ceiling=before, reader=self.reader,
        )  # fmt: skip
        if threads != before:
            self.set_threads(threads)
        ceiling = max(before, threads)
        if self.policy == "adaptive" and ceiling > 1:
            self.adaptive = AdaptiveThreads(
                threads, ceiling, interval=self.interval, probe_steps=self.probe_steps,
                margin=self.margin, warmup=self.warmup, jump=self.jump,
                jump_steps=self.jump_steps,
            )  # fmt: skip
        return ThreadEvent(before, threads, reason, self.policy, 0)

    def restore(self) -> None:
        """Give the process back the thread count it had before :meth:`start` (the policy's
        choices are the run's, not the caller's); a fixed count stays, as before."""
        if self.policy != "fixed" and self._before is not None:
            if self.get_threads() != self._before:
                self.set_threads(self._before)
            self.adaptive = None

    def after_step(self, seconds: float) -> ThreadEvent | None:
        """Feed one step's wall time; an event when a check ends with a (new) decision."""
        self.step += 1
        if self.adaptive is None:
            return None
        before_decisions = self.adaptive.decisions
        current = self.get_threads()
        nxt = self.adaptive.observe(seconds)
        if nxt != current:
            self.set_threads(nxt)
        if self.adaptive.decisions == before_decisions:
            return None
        home = self.adaptive.home
        after = self.adaptive.threads
        timings = {k: round(v, 6) for k, v in self.adaptive.last_timings.items()}
        trigger = self.adaptive.triggered
        reason = (
            ("" if trigger == "start" else f"{trigger}; ")
            + f"timed {self.adaptive.probe_steps} steps per count: "
            + ", ".join(f"{k} threads {v * 1e3:.1f} ms" for k, v in timings.items())
            + ("; kept" if after == home else f"; {home} -> {after}")
        )
        return ThreadEvent(home, after, reason, self.policy, self.step, timings)
