"""A busy machine: training steps timed idle and next to CPU-bound competitor processes.

``python benchmarks/run.py --contention`` (issue 15, "Fast where users run it"). For each
case, in a fresh worker process (torch's default thread count):

1. **idle**: steps alternating torch's default thread count (*default*) and the thread
   policy (:class:`capsnet.runtime.ThreadPolicy`, what ``capsnet train`` does without
   ``num_threads``), after warm-up; the reference too where the case says so.
2. **loaded**: ``competitors`` processes each spinning a core (a plain Python busy loop,
   pinned to no core; each exits by itself when its parent goes or after a deadline) are
   started, a new policy decides under that load and settles (its warm-up and first
   check, untimed), then the same alternation is timed. The competitors are killed after;
   the CPU time they got is reported (a competitor that got no core measures nothing).
3. **late**: what a long training run sees when the competitor arrives after the policy's
   check: a policy settles idle (its first check, then ``jump_steps`` idle steps), the
   competitors start, and ``late_steps`` consecutive steps run under the policy (threads
   and time of each). Reported: steps run at the idle count before the policy moved, and
   the mean step over those steps against the idle step. Without the policy's jump
   detection (``jump=None``) every one of them would run at the idle count until the next
   interval (200 steps), i.e. at the ``loaded`` default step.

Ratios are loaded / idle, both at the default thread count's idle step (the user's
reference point). The policy's decisions are kept in the results.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import cases as C
from capsnet.runtime import ThreadPolicy, read_load

COMPETITOR = (
    "import os, sys, time\n"
    "parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end and os.getppid() == parent:\n"
    "    for _ in range(200000):\n"
    "        pass\n"
)
"""A CPU-bound competitor: spins until ``argv[1]`` seconds pass or its parent exits."""

TARGETS = {"capsnet": 2.2, "matrix_small": 1.5}
"""Issue 15's targets: loaded / idle step, by model (``matrix_small``: the small preset)."""


class Competitors:
    """``with Competitors(n, lifetime_s) as c:`` runs ``n`` busy-loop processes; on exit they
    are killed and reaped, ``c.cpu_s`` holding the CPU seconds each got and ``c.wall_s`` the
    time they ran."""

    def __init__(self, n: int = 1, lifetime_s: float = 900.0) -> None:
        self.n, self.lifetime_s = n, lifetime_s
        self.procs: list[subprocess.Popen] = []
        self.cpu_s: list[float] = []
        self.wall_s = 0.0

    def __enter__(self) -> Competitors:
        self._t0 = time.perf_counter()
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", COMPETITOR, str(self.lifetime_s)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                _, _, usage = os.wait4(proc.pid, 0)
                self.cpu_s.append(usage.ru_utime + usage.ru_stime)
            except ChildProcessError:  # already reaped
                proc.wait()
                self.cpu_s.append(float("nan"))

    @property
    def core_share(self) -> list[float | None]:
        """The share of a core each competitor got while it ran."""
        return [c / self.wall_s if self.wall_s else None for c in self.cpu_s]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _alternate(
    steps: dict[str, Callable[[], object]],
    threads: dict[str, Callable[[], int]],
    repeats: int,
    timeit: Callable[[Callable[[], object]], float],
    after: dict[str, Callable[[float], object]],
) -> dict[str, list[float]]:
    """Time ``repeats`` rounds of every step, each at its own thread count."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            torch.set_num_threads(threads[name]())
            t = timeit(step)
            times[name].append(t)
            if name in after:
                after[name](t)
    return times


def _policy(default: int) -> tuple[ThreadPolicy, dict]:
    """A thread policy keeping its count in a cell (the steps alternate thread counts)."""
    cell = {"threads": default, "events": []}

    def set_threads(n: int) -> None:
        cell["threads"] = n

    policy = ThreadPolicy(
        None, probe_steps=2, warmup=1, set_threads=set_threads, get_threads=lambda: cell["threads"]
    )
    return policy, cell


def _feed(policy: ThreadPolicy, cell: dict, seconds: float) -> None:
    """Give the policy one step's time; keep its decision, if any, in the cell."""
    event = policy.after_step(seconds)
    if event is not None:
        cell["events"].append(event.record())


def _policy_step(policy: ThreadPolicy, cell: dict, step, timeit) -> tuple[int, float]:
    """One step at the policy's count, fed back to it: (threads, seconds)."""
    threads = cell["threads"]
    torch.set_num_threads(threads)
    seconds = timeit(step)
    _feed(policy, cell, seconds)
    return threads, seconds


def _run_policy(policy: ThreadPolicy, cell: dict, step, timeit, n: int) -> tuple[list, list]:
    """``n`` consecutive steps under the policy, as in training: (threads, seconds) of each."""
    pairs = [_policy_step(policy, cell, step, timeit) for _ in range(n)]
    return [t for t, _ in pairs], [s for _, s in pairs]


def late_phase(
    step: Callable[[], object], timeit, default: int, competitors: int, n: int, settle_s: float
) -> dict:
    """Phase 3 of the module docstring: a competitor that arrives after the policy's check."""
    policy, cell = _policy(default)
    cell["events"].append(policy.start().record())
    _settle(policy, cell, step, timeit)
    settled = cell["threads"]
    _run_policy(policy, cell, step, timeit, policy.jump_steps)  # the hold's window, idle
    with Competitors(competitors) as comp:
        time.sleep(settle_s)
        threads, times = _run_policy(policy, cell, step, timeit, n)
    torch.set_num_threads(default)
    moved = next((i for i, t in enumerate(threads) if t != settled), None)
    return {
        "settled_threads": settled,
        "threads": threads,
        "times_s": times,
        "steps_before_move": moved,
        "mean_s": statistics.fmean(times),
        "policy_events": cell["events"],
        "core_share": comp.core_share,
    }


def _settle(policy: ThreadPolicy, cell: dict, step: Callable[[], object], timeit) -> int:
    """Run the policy's warm-up and first check (untimed for the table); the steps it took."""
    adaptive = policy.adaptive
    taken = 0
    while adaptive is not None and adaptive.checking and taken < 20:
        _policy_step(policy, cell, step, timeit)
        taken += 1
    return taken


def run_case(
    case: dict,
    *,
    timeit: Callable[[Callable[[], object]], float],
    competitors: int = 1,
    budget_s: float = 120.0,
    settle_s: float = 0.5,
    late_steps: int | None = None,
) -> dict:
    """Idle and loaded step times of one case (see the module docstring)."""
    default = torch.get_num_threads()
    impls = ["capsnet"] + (["reference"] if case.get("reference") else [])
    built = {impl: C.build_step(case, impl)[0] for impl in impls}
    first: dict[str, float] = {}
    for impl, step in built.items():
        t0 = time.perf_counter()
        step()
        first[impl] = time.perf_counter() - t0
        for _ in range(case["warmup"] - 1):
            step()
    # Fewer repeats when steps are slow: about 4 timed rounds (2 idle, 2 loaded, the loaded
    # ones slower) of every step must fit the budget.
    per_round = 2 * first["capsnet"] + first.get("reference", 0.0)
    repeats = max(1, min(case["repeats"], int(budget_s / max(1e-9, 6 * per_round))))
    result: dict = {"case": case["name"], "default_threads": default, "repeats": repeats}

    def phase(label: str) -> dict:
        reading = read_load()
        policy, cell = _policy(default)
        start = policy.start()
        cell["events"].append(start.record())
        settled = _settle(policy, cell, built["capsnet"], timeit)
        steps = {"capsnet_default": built["capsnet"], "capsnet_policy": built["capsnet"]}
        threads = {"capsnet_default": lambda: default, "capsnet_policy": lambda: cell["threads"]}
        if "reference" in built:
            steps["reference_default"] = built["reference"]
            threads["reference_default"] = lambda: default

        times = _alternate(
            steps, threads, repeats, timeit, {"capsnet_policy": lambda t: _feed(policy, cell, t)}
        )
        torch.set_num_threads(default)
        out = {
            "load_reading": {"cores": reading.cores, "others": reading.others},
            "load_avg": os.getloadavg(),
            "policy_threads": cell["threads"],
            "policy_events": cell["events"],
            "policy_settle_steps": settled,
            "times_s": times,
            "median_s": {k: _median(v) for k, v in times.items()},
        }
        print(f"[contention] {case['name']} {label}: {_brief(out)}", flush=True)
        return out

    result["idle"] = phase("idle")
    with Competitors(competitors) as comp:
        time.sleep(settle_s)
        result["loaded"] = phase(f"{competitors} competitor(s)")
    result["competitors"] = {
        "n": competitors,
        "wall_s": comp.wall_s,
        "cpu_s": comp.cpu_s,
        "core_share": comp.core_share,
        "pids": comp.pids,
    }
    # Phase 3: about 3 idle steps' worth of budget per late step (most run at the better
    # count once the policy has moved), 10 to 40 steps.
    if late_steps is None:
        late_steps = max(10, min(40, int(budget_s / max(1e-9, 3 * first["capsnet"]))))
    result["late"] = late_phase(
        built["capsnet"], timeit, default, competitors, late_steps, settle_s
    )
    late = result["late"]
    print(
        f"[contention] {case['name']} late competitor: moved after {late['steps_before_move']}"
        f" of {late_steps} steps, mean {_ms(late['mean_s'])}",
        flush=True,
    )
    return result


def _brief(phase: dict) -> str:
    med = phase["median_s"]
    return ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items() if v is not None) + (
        f" (policy: {phase['policy_threads']} threads)"
    )


def target_for(case: dict) -> float | None:
    """Issue 15's target for a case's loaded / idle ratio, or None."""
    if case.get("model") == "capsnet":
        return TARGETS["capsnet"]
    if case.get("model") == "matrix_capsnet" and case["model_kwargs"].get("preset") == "small":
        return TARGETS["matrix_small"]
    return None


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def table(results: list[dict]) -> list[str]:
    """The Markdown table of ``--contention`` results (lines)."""
    out = [
        "### A busy machine: training step idle and next to a CPU-bound competitor",
        "",
        "`idle` / `loaded`: median step at torch's default thread count (`N`); `policy`: the "
        "same step under the thread policy (`capsnet.runtime`, what `capsnet train` does "
        "without `num_threads`), its thread count in brackets. Ratios: loaded / idle step at "
        "the default thread count. `competitor`: share of a core the competitor process got "
        "while the loaded steps ran.",
        "",
        "| case | N | idle | loaded | ratio | idle, policy | loaded, policy | ratio | target "
        "| reference idle | reference loaded | ratio | competitor | reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if "error" in res:
            out.append(f"| {res.get('case', '?')} | {res['error']} |" + " |" * 12)
            continue
        idle, loaded = res["idle"]["median_s"], res["loaded"]["median_s"]
        base = idle.get("capsnet_default")
        target = target_for(res["case_spec"])
        share = res["competitors"]["core_share"]
        shares = ", ".join(f"{100 * s:.0f} %" for s in share if s is not None) or "n/a"
        out.append(
            f"| {res['case_spec']['name']} | {res['default_threads']} | {_ms(base)} | "
            f"{_ms(loaded.get('capsnet_default'))} | "
            f"{_ratio(loaded.get('capsnet_default'), base)} | "
            f"{_ms(idle.get('capsnet_policy'))} ({res['idle']['policy_threads']}) | "
            f"{_ms(loaded.get('capsnet_policy'))} ({res['loaded']['policy_threads']}) | "
            f"{_ratio(loaded.get('capsnet_policy'), base)} | "
            f"{f'<= {target:g}x' if target else '-'} | "
            f"{_ms(idle.get('reference_default'))} | {_ms(loaded.get('reference_default'))} | "
            f"{_ratio(loaded.get('reference_default'), idle.get('reference_default'))} | "
            f"{shares} | {res['repeats']} |"
        )
    out += [
        "",
        "Competitor starting mid-run (`late`): the policy settled idle, then the competitor "
        "started; `moved after`: steps run at the settled count before the policy changed it "
        "(its jump detection, `capsnet.runtime.AdaptiveThreads`); `mean`: the mean of all "
        "`steps` after the competitor started, against the idle step at the default count.",
        "",
        "| case | settled threads | moved after | steps | mean | ratio | target | competitor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        late = res.get("late")
        if not late:
            continue
        base = res["idle"]["median_s"].get("capsnet_default")
        target = target_for(res["case_spec"])
        shares = ", ".join(f"{100 * s:.0f} %" for s in late["core_share"] if s is not None)
        moved = late["steps_before_move"]
        out.append(
            f"| {res['case_spec']['name']} | {late['settled_threads']} | "
            f"{'never' if moved is None else moved} | {len(late['times_s'])} | "
            f"{_ms(late['mean_s'])} | {_ratio(late['mean_s'], base)} | "
            f"{f'<= {target:g}x' if target else '-'} | {shares or 'n/a'} |"
        )
    out.append("")
    return out
