"""Where the time goes, and how much of each process a given event rate needs, from an e2e
result (``bench_e2e``): ``python -m benchmarks.scaling RESULT.json`` prints markdown.

The scaling model divides each level's achieved events/s by the cores each process used
while it ran: events/s per core, by process. A hospital network's rate over that, at a
target utilisation per process, gives the cores each needs, hence the workers, partitions,
Redis shards and Triton instances. Its assumptions are ``ASSUMPTIONS``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Per process: the share of one core it is planned to use (headroom for bursts and stalls).
# A worker is one Python process (its loop and scoring thread share one GIL); Redis serves
# commands on one thread; Triton's CPU instance runs one model execution at a time.
TARGET = {"workers": 0.6, "redis": 0.5, "kafka": 0.5, "triton": 0.7}
ASSUMPTIONS = [
    "events/s per core is the achieved rate over the cores a process used at the chosen "
    "level (below saturation, so every process had slack), on the benchmark's 2-core VM",
    "load scales linearly with the event rate (measured over 50 to 2,000 events/s)",
    "a worker plans for 0.6 of one core, a Redis shard for 0.5 (one command thread), a "
    "Kafka broker for 0.5, a Triton CPU instance for 0.7",
    "partitions: twice the workers, at least 4, so workers can be added without "
    "repartitioning; brokers: at least 3 for replication factor 3",
    "the census workload (results for open admissions, folded per poll); every new "
    "admission costs a model pass of its own, so a stream of admissions needs more Triton",
]
RATES = (50, 200, 1_000, 5_000, 20_000, 100_000)
PROCESSES = ("workers", "kafka", "redis", "triton")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def stage_table(result: dict) -> str:
    """Each level's p50/p99 with the workers' time by stage and each process's cores."""
    head = [
        "case",
        "variant",
        "offered/s",
        "p50 ms",
        "p99 ms",
        "produce->consume ms",
        "feature write ms/poll",
        "read ms/batch",
        "model ms/batch",
        "score write ms/batch",
        "admissions/batch",
        "cores: workers / kafka / redis / triton / load gen",
        "cores, all",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if "p50_ms" not in row:
            continue
        st, cores = row.get("stages") or {}, row.get("cpu_cores_by_process", {})
        cells = [
            row["case"],
            row["variant"],
            f"{row['offered_per_s']:,.0f}",
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
            *(
                _num(st.get(k))
                for k in (
                    "produce -> consume ms/event",
                    "feature write ms/poll",
                    "read ms/batch",
                    "model ms/batch",
                    "score write ms/batch",
                    "admissions/batch",
                )
            ),
            " / ".join(_num(cores.get(p)) for p in (*PROCESSES, "load generator + observer")),
            _num(row.get("cpu_cores")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_core(result: dict, case: str, rate: float, variant: str | None = None) -> dict:
    """Events/s per core of each process at the level of ``case`` offered ``rate``."""
    for row in result["rows"]:
        if row["case"] == case and row.get("offered_per_s") == rate:
            if variant is None or row["variant"] == variant:
                cores = row["cpu_cores_by_process"]
                return {
                    p: row["achieved_per_s"] / cores[p] if cores.get(p) else math.inf
                    for p in PROCESSES
                }
    raise LookupError(f"no level {case!r} at {rate}/s{f' ({variant})' if variant else ''}")


def sizing(rates_per_core: dict, rates=RATES) -> list[dict]:
    """Workers, partitions, Redis shards, brokers and Triton instances for each rate."""
    out = []
    for rate in rates:
        need = {p: rate / rates_per_core[p] / TARGET[p] for p in PROCESSES}
        workers = max(1, math.ceil(need["workers"]))
        out.append(
            {
                "events_per_s": rate,
                "workers": workers,
                "partitions": max(4, 2 * workers),
                "redis_shards": max(1, math.ceil(need["redis"])),
                "kafka_brokers": max(3, math.ceil(need["kafka"])),
                "triton_instances": max(1, math.ceil(need["triton"])),
            }
        )
    return out


def sizing_table(rates_per_core: dict, rates=RATES) -> str:
    lines = [
        "| events/s | " + " | ".join(f"{p} events/s per core" for p in PROCESSES) + " |",
        "|" + "---|" * (len(PROCESSES) + 1),
        "| measured | " + " | ".join(f"{rates_per_core[p]:,.0f}" for p in PROCESSES) + " |",
        "",
        "| hospital network, events/s | workers | partitions | Redis shards | Kafka brokers "
        "| Triton instances (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sizing(rates_per_core, rates):
        lines.append(
            f"| {s['events_per_s']:,} | {s['workers']} | {s['partitions']} | "
            f"{s['redis_shards']} | {s['kafka_brokers']} | {s['triton_instances']} |"
        )
    lines += ["", "Assumptions:", *(f"- {a}" for a in ASSUMPTIONS)]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (1, 4):
        print("usage: python -m benchmarks.scaling E2E.json [CASE RATE VARIANT]", file=sys.stderr)
        return 2
    result = load(args[0])
    print(stage_table(result))
    case, rate, variant = (
        (args[1], float(args[2]), args[3])
        if len(args) == 4
        else ("event -> score, census 1,000", 2000.0, None)
    )
    print(sizing_table(per_core(result, case, rate, variant)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
