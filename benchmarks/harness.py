"""The benchmark method, shared by every stage.

* Throughput: ``measure`` runs a function ``warmup`` times unmeasured, then ``repeats``
  times, and reports the median rate with the min and max, never a single run.
* Latency: ``latency_summary`` gives p50/p95/p99 (``percentile``, NumPy's default
  "linear" definition) of per-call or per-event samples.
* Load: ``open_loop`` sends at fixed intervals whatever the system under test does, and
  measures each event from its *scheduled* send time, so a stall delays and counts every
  event behind it (no coordinated omission).
* Records: every ``Result`` carries the machine it ran on (``machine``), its parameters,
  its rows, comparisons measured side by side in the same run (as ratios), and a reason
  for every column it could not measure. ``save`` writes ``<stage>-<UTC time>.json``, a
  stable ``<stage>-latest.json``, a markdown table and PNG plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

# No project imports here: the GPU script runs this module on a machine that has only
# torch, numpy and onnxruntime.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
SCHEMA_VERSION = 1

# Distribution names whose versions every result records (absent ones are recorded as None).
LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "onnxruntime",
    "nvidia-dali-cuda120",
    "nvidia-dali-cuda130",
    "redis",
    "kafka-python",
    "confluent-kafka",
    "tritonclient",
    "nvidia-pytriton",
    "pillow",
    "pydicom",
)

# Table columns, in display order, with their headers; a row shows the ones it has.
COLUMNS = {
    "case": "case",
    "variant": "variant",
    "batch": "batch",
    "offered_per_s": "offered/s",
    "items_per_s": "items/s (median)",
    "items_per_s_min": "min",
    "items_per_s_max": "max",
    "achieved_per_s": "achieved/s",
    "p50_ms": "p50 ms",
    "p95_ms": "p95 ms",
    "p99_ms": "p99 ms",
    "cpu_cores": "CPU used (cores)",
    "wake_ups_per_event": "wake-ups/event",
    "reasons_p50_ms": "reasons p50 ms",
    "reasons_p99_ms": "reasons p99 ms",
    "max_abs_diff_vs_fp32_eager": "max abs diff vs fp32",
    "note": "note",
}


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks, the
    definition NumPy uses by default (Hyndman and Fan type 7)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict:
    """p50/p95/p99 and mean in milliseconds, and the sample count."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
        "samples": len(ms),
    }


def measure(
    fn: Callable[[], object],
    items: int,
    *,
    warmup: int = 1,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Throughput of ``fn`` (which handles ``items`` items per call): median, min, max."""

    def timed() -> float:
        started = clock()
        fn()
        return clock() - started

    return measure_seconds(timed, items, warmup=warmup, repeats=repeats)


def measure_seconds(
    timed_fn: Callable[[], float], items: int, *, warmup: int = 1, repeats: int = 5
) -> dict:
    """Like ``measure``, for a function that times its own measured part (leaving out its
    setup, e.g. a consumer joining) and returns the seconds."""
    for _ in range(warmup):
        timed_fn()
    seconds = [timed_fn() for _ in range(repeats)]
    rates = [items / max(s, 1e-12) for s in seconds]
    return {
        "items_per_s": percentile(rates, 50),
        "items_per_s_min": min(rates),
        "items_per_s_max": max(rates),
        "seconds_median": percentile(seconds, 50),
        "items": items,
        "repeats": repeats,
        "warmup": warmup,
    }


def time_calls(
    fn: Callable[[], object],
    calls: int,
    *,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds taken by each of ``calls`` back-to-back calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        started = clock()
        fn()
        out.append(clock() - started)
    return out


def ratio(what: str, numerator: str, denominator: str, a: float, b: float) -> dict:
    """A side-by-side comparison from one run: ``a / b`` (e.g. confluent over kafka-python)."""
    return {
        "what": what,
        "numerator": numerator,
        "denominator": denominator,
        "ratio": a / b if b else None,
    }


# --- open-loop load -------------------------------------------------------------------------------


@dataclass
class LoadRun:
    """One open-loop run. Times are seconds on ``clock``; ``done`` is NaN until completed."""

    offered_per_s: float
    start: float  # clock value at which event 0 was scheduled
    scheduled: np.ndarray  # offsets from start: i / rate
    done: np.ndarray  # completion offsets from start (set by open_loop, or by the caller)

    @property
    def latencies_s(self) -> np.ndarray:
        finished = ~np.isnan(self.done)
        return self.done[finished] - self.scheduled[finished]

    @property
    def completed(self) -> int:
        return int((~np.isnan(self.done)).sum())

    @property
    def achieved_per_s(self) -> float:
        if not self.completed:
            return 0.0
        span = float(np.nanmax(self.done))
        return self.completed / span if span > 0 else float("inf")

    def complete(self, index: int, when: float) -> None:
        """Record that event ``index`` finished at clock value ``when`` (asynchronous sinks)."""
        self.done[index] = when - self.start

    def summary(self) -> dict:
        latencies = self.latencies_s
        out = {
            "offered_per_s": self.offered_per_s,
            "achieved_per_s": self.achieved_per_s,
            "sent": len(self.scheduled),
            "completed": self.completed,
        }
        if len(latencies):
            out.update(latency_summary(latencies.tolist()))
        return out


def schedule(rate: float, duration: float) -> LoadRun:
    """A run of ``rate * duration`` events, event i due ``i / rate`` seconds after the start."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    n = max(1, int(rate * duration))
    return LoadRun(rate, 0.0, np.arange(n) / rate, np.full(n, np.nan))


# Each wake-up costs the load generator tens of microseconds of a core, taken from the system
# under test: events due closer together than this go together.
MIN_SLEEP_S = 0.0005


def drive(
    run: LoadRun,
    send_fn: Callable[[int], object],
    *,
    synchronous: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> LoadRun:
    """Send the run's events on schedule (see ``open_loop``); sets ``run.start``. No event
    goes before its time; one whose wait is shorter than ``MIN_SLEEP_S`` waits that long and
    goes with those due meanwhile, each late by at most that (and its latency counts it)."""
    run.start = clock()
    for i, due in enumerate(run.scheduled):
        wait = run.start + due - clock()
        if wait > 0:
            sleep(max(wait, MIN_SLEEP_S))
        send_fn(i)
        if synchronous:
            run.done[i] = clock() - run.start
    return run


def open_loop(
    rate: float,
    duration: float,
    send_fn: Callable[[int], object],
    *,
    synchronous: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> LoadRun:
    """Send ``rate * duration`` events at fixed intervals: event i is due at ``i / rate``.

    The sender never waits for the system to catch up before scheduling the next event:
    an event that is late because an earlier send was slow is sent at once, and its latency
    still counts from its scheduled time. ``synchronous``: an event is complete when
    ``send_fn(i)`` returns. Otherwise build the run with ``schedule``, hand it to whatever
    sees events finish (e.g. a consumer thread calling ``run.complete``), then ``drive`` it.
    """
    return drive(
        schedule(rate, duration), send_fn, synchronous=synchronous, clock=clock, sleep=sleep
    )


# --- the machine ----------------------------------------------------------------------------------


class PinnedProcess:
    """``python -m MODULE serve CORE``: a server measured alone, in a process of its own
    pinned to ``core``, given the settings as JSON on its stdin; ``first_line`` is what it
    prints once it serves, ``output`` what it prints after its stdin is closed (it stops)."""

    def __init__(self, module: str, settings, core: int):
        self.module, self.settings, self.core = module, settings, core
        self.first_line, self.output = "", ""

    def __enter__(self):
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve", str(self.core)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
            text=True,
        )
        self._process.stdin.write(self.settings.model_dump_json() + "\n")
        self._process.stdin.flush()
        self.first_line = self._process.stdout.readline().strip()
        if not self.first_line:
            self._process.kill()
            raise RuntimeError(f"{self.module} did not start (see its stderr above)")
        return self

    def cpu(self) -> float:
        """CPU seconds the process (every thread) used so far."""
        return CpuMeter({"server": [self._process.pid]}).sample()["server"]

    def __exit__(self, *exc) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(60)
            self.output = self._process.stdout.read()
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class CpuMeter:
    """CPU time of named process trees (a process and its descendants; Linux /proc), to
    show where the cores went while a load ran: ``cores(before, after, seconds)``. A
    process's time includes that of its children that ended and were reaped, so a tree's
    total does not fall when a process in it ends (a model reloaded in Triton, say).

    ``wake_ups()`` counts the times the trees' live threads went to sleep and were woken
    (voluntary context switches): on a VM each costs a thread tens of microseconds of CPU
    (``wake_up_cost_us``), and an event at a ward's rate causes dozens (benchmarks/README.md).
    """

    def __init__(self, roots: dict[str, list[int]]):
        self.roots = roots

    def _trees(self) -> tuple[dict[str, list[int]], dict[int, float]]:
        """The live processes of each name's tree, and each process's CPU seconds."""
        children: dict[int, list[int]] = {}
        used: dict[int, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = (
                        f.read().rsplit(")", 1)[1].split()
                    )  # after the command name, which may hold spaces
            except OSError:  # exited meanwhile
                continue
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            # utime + stime, and cutime + cstime: its reaped children's
            used[pid] = sum(int(v) for v in fields[11:15]) / tick
        claimed = {pid for roots in self.roots.values() for pid in roots}
        trees = {}
        for name, roots in self.roots.items():
            tree, todo = [], [pid for pid in roots if pid in used]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += [
                    child for child in children.get(pid, []) if child not in claimed
                ]  # another name's tree
            trees[name] = tree
        return trees, used

    def sample(self) -> dict[str, float]:
        """CPU seconds (user + system) per name, over the trees' live processes."""
        trees, used = self._trees()
        return {name: sum(used[pid] for pid in tree) for name, tree in trees.items()}

    def wake_ups(self) -> dict[str, int]:
        """Voluntary context switches per name, over the trees' live threads."""
        trees, _ = self._trees()
        return {name: sum(_voluntary_switches(pid) for pid in tree) for name, tree in trees.items()}

    @staticmethod
    def cores(
        before: dict[str, float], after: dict[str, float], seconds: float
    ) -> dict[str, float]:
        return {name: round((after[name] - before[name]) / seconds, 3) for name in after}


def wake_up_cost_us(naps: int = 100, nap_s: float = 0.002) -> float:
    """CPU microseconds this machine charges a thread for going to sleep and being woken:
    the mean over ``naps`` sleeps of ``nap_s``, which do nothing else. A few on bare metal;
    tens on a VM, where each wake-up goes through the hypervisor."""
    began = time.thread_time()
    for _ in range(naps):
        time.sleep(nap_s)
    return (time.thread_time() - began) / naps * 1e6


def _voluntary_switches(pid: int) -> int:
    """A process's voluntary context switches, over its threads (0 if it is gone)."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
        except OSError:  # the thread ended meanwhile
            continue
    return total


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """What ran the benchmark: CPU, memory, what a wake-up costs a thread, GPU, Python and
    library versions, commit, date."""
    status = _git("status", "--porcelain")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        # An event at a ward's rate causes dozens of wake-ups (bench e2e's rows).
        "cpu_us_per_wake_up": round(wake_up_cost_us(), 1),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- results --------------------------------------------------------------------------------------


@dataclass
class Result:
    """One stage's run. ``rows`` use the keys of ``COLUMNS`` (plus any extra detail)."""

    stage: str
    params: dict
    rows: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # column or case -> why not measured
    breakdown_ms: dict[str, float] = field(default_factory=dict)  # one event's path, by stage
    machine: dict = field(default_factory=machine)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        return cls(**data)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table_columns(rows: list[dict]) -> list[str]:
    return [c for c in COLUMNS if any(c in row for row in rows)]


def row_groups(rows: list[dict]) -> list[list[dict]]:
    """Rows with the same displayed columns, one group per table (throughput rows apart
    from latency-under-load rows), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(c for c in COLUMNS if c in row and c != "note"), []).append(row)
    return list(groups.values())


def markdown(result: Result) -> str:
    """The summary: rows, ratios, what is missing and where it ran."""
    m = result.machine
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    lines = [
        f"### {result.stage}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}"
        + (f", {m['cpu_us_per_wake_up']:g} µs CPU a wake-up" if "cpu_us_per_wake_up" in m else "")
        + f"; Python {m['python']}; "
        f"commit {(m.get('git_commit') or '?')[:10]}{' (dirty)' if m.get('git_dirty') else ''}; "
        f"{m['date']}",
        "",
    ]
    for rows in row_groups(result.rows):
        columns = table_columns(rows)
        lines += [
            "| " + " | ".join(COLUMNS[c] for c in columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
        ]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
        lines += [""]
    if result.comparisons:
        lines += [""] + [
            f"- {c['what']}: {c['numerator']} / {c['denominator']} = {_cell(c['ratio'])}x"
            for c in result.comparisons
        ]
    if result.missing:
        lines += [""] + [f"- not measured, {name}: {why}" for name, why in result.missing.items()]
    if result.breakdown_ms:
        lines += [
            "",
            "One event's path (ms): "
            + ", ".join(f"{k} {_cell(v)}" for k, v in result.breakdown_ms.items()),
        ]
    return "\n".join(lines) + "\n"


def rich_tables(result: Result) -> list:
    from rich.table import Table

    tables = []
    for rows in row_groups(result.rows):
        columns = table_columns(rows)
        table = Table(*(COLUMNS[c] for c in columns), title=f"m3t bench {result.stage}")
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in columns))
        tables.append(table)
    return tables


def save(result: Result, out_dir: Path = RESULTS_DIR) -> dict[str, Path]:
    """Write the JSON (timestamped and latest), the markdown summary and the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(result.started).strftime("%Y%m%dT%H%M%SZ")
    paths = {"json": out_dir / f"{result.stage}-{stamp}.json"}
    text = dumps(result.to_dict())
    paths["json"].write_text(text)
    paths["latest"] = out_dir / f"{result.stage}-latest.json"
    paths["latest"].write_text(text)
    paths["markdown"] = out_dir / f"{result.stage}-latest.md"
    paths["markdown"].write_text(markdown(result))
    try:
        from benchmarks.plots import plot
    except ImportError:  # matplotlib is absent on the lent GPU machine: plot from the JSON later
        return paths
    paths.update(plot(result, out_dir))
    return paths


def dumps(data) -> str:
    """JSON text of results (NumPy numbers and paths included)."""
    return json.dumps(data, indent=2, default=_jsonable)


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load(path: Path) -> Result:
    return Result.from_dict(json.loads(Path(path).read_text()))


# --- Triton -------------------------------------------------------------------------------------


@contextlib.contextmanager
def triton_batching(settings, overrides: dict, names: Sequence[str]):
    """The loaded models of ``names`` with ``overrides`` in their dynamic batching (a config
    override of Triton's load request), reloaded as published on the way out."""
    if not overrides:
        yield
        return
    from m3t.clients import triton_admin_headers, triton_client

    client = triton_client(settings)
    headers = triton_admin_headers(settings)
    published = {
        name: client.get_model_config(name, as_json=True)["config"]
        for name in names
        if client.is_model_ready(name)
    }
    try:
        for name, config in published.items():
            batching = {**config.get("dynamic_batching", {}), **overrides}
            changed = {**config, "dynamic_batching": batching}
            client.load_model(name, config=json.dumps(changed), headers=headers)
        yield
    finally:
        # As published: a load without a config is a no-op while the repository is unchanged.
        for name, config in published.items():
            client.load_model(name, config=json.dumps(config), headers=headers)
        client.close()
