"""Hospital feeds: HL7 v2 messages/s through the MLLP listener into Kafka, and ACK latency.

The listener (``ingest.mllp``) runs in a process of its own pinned to one core (its
librdkafka threads too: the affinity is set before they start); the senders run in this
process on the other cores. Senders are asyncio connections that frame as MLLP does
(0x0B, message, 0x1C 0x0D) and wait for each ACK before sending on, as an interface
engine's connection does; every ACK must be ``AA``, which the listener sends only once
Kafka acknowledged (``acks=all``) every event of the message.

* ``listener step``: what one message costs the listener's core, step by step, without
  Kafka (parse and map with python-hl7 and the event contract, encode, ACK).
* ``saturation``: ``connections`` senders back to back; messages/s (median of
  ``repeats``), ACK latency p50/p99 over every message sent.
* ``offered load``: an open loop at each of ``rates`` messages/s for ``rate_seconds``:
  message i is due at i / rate and its latency counts from then (``harness.open_loop``'s
  method), sent on whichever connection is free.
* FHIR R4 Bundles/s through ``POST /fhir`` (``benchmarks.bench_fhir``): the mapping alone,
  then through the API pinned to one core into Kafka, with its answer latency.

The messages are a day's feed in miniature: per admission an ``ADT^A01``, results
(``ORU^R01`` with 1 to 4 numeric OBX of the LOINC table) and an ``ADT^A03``; control ids
are unique to the run.

Run: ``m3t bench feeds [--quick]`` or ``python -m benchmarks.bench_feeds``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections import Counter

from benchmarks import harness as h
from benchmarks.bench_kafka import delete_topics
from ingest import hl7 as hl7_map
from ingest import itemids, loinc
from ingest.events import encode, key
from ingest.mllp import END_BLOCK, START_BLOCK, MllpListener, acknowledgement
from m3t import kafka, services
from m3t.settings import Settings

RESULTS_PER_ADMISSION = 6
MSH = "MSH|^~\\&|LAB|HOSP|M3T|M3T|{now}||{type}|{control}|P|2.5"
PID = "PID|1||{subject}^^^HOSP^MR||Doe^Jane||19600215|{sex}"


def run(
    settings: Settings,
    *,
    messages: int = 20_000,
    connections: int = 32,
    rates: tuple[int, ...] = (100, 500),
    rate_seconds: float = 5.0,
    repeats: int = 3,
    warmup: int = 1,
    fhir_bundles: int = 2000,
) -> h.Result:
    services.up(settings, ["kafka"])
    own_affinity = os.sched_getaffinity(0)
    core = max(own_affinity)
    result = h.Result(
        "feeds",
        {
            "messages": messages,
            "connections": connections,
            "rates": list(rates),
            "rate_seconds": rate_seconds,
            "repeats": repeats,
            "warmup": warmup,
            "listener_core": core,
            "senders_cores": sorted(own_affinity - {core}) or [core],
            "acks": "all",
            "kafka_security": settings.kafka.security_protocol,
        },
    )
    started = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    sample = hl7_messages(2000, seed=0, tag=f"{tag}s")
    result.rows += listener_steps(sample)
    cfg = kafka.own_topics(settings, "bench-")
    try:
        if len(own_affinity) > 1:
            os.sched_setaffinity(0, own_affinity - {core})  # the senders leave its core alone
        with PinnedListener(cfg, core) as listener:
            rounds = [
                hl7_messages(messages, seed=n, tag=f"{tag}r{n}") for n in range(warmup + repeats)
            ]
            for batch in rounds[:warmup]:
                asyncio.run(closed_loop(listener.address, batch, connections))
            cpu_before = listener.cpu()
            sweeps = [
                asyncio.run(closed_loop(listener.address, batch, connections))
                for batch in rounds[warmup:]
            ]
            cores = (listener.cpu() - cpu_before) / sum(s["seconds"] for s in sweeps)
            result.rows.append(_saturation_row(sweeps, connections, cores))
            for rate in rates:
                batch = hl7_messages(int(rate * rate_seconds), seed=rate, tag=f"{tag}o{rate}")
                load = asyncio.run(
                    open_loop(listener.address, batch, rate, rate_seconds, connections)
                )
                result.rows.append(
                    {
                        "case": "offered load",
                        "variant": f"{connections} connections",
                        **load.summary(),
                        "note": "messages/s offered, ACK latency from the scheduled send",
                    }
                )
            at_500 = [r["p50_ms"] for r in result.rows if r.get("offered_per_s") == 500]
            if at_500:  # one message's way from the sender to Kafka and back, at a steady rate
                result.breakdown_ms["mllp ack (500/s p50)"] = at_500[0]
        result.params["listener_counts"] = listener.counts
    finally:
        os.sched_setaffinity(0, own_affinity)
        delete_topics(cfg)
    # FHIR R4 Bundles/s through POST /fhir, beside HL7's messages/s.
    from benchmarks.bench_fhir import fhir_rows

    result.rows += fhir_rows(settings, bundles=fhir_bundles, connections=8, repeats=repeats)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- messages


def hl7_messages(n: int, *, seed: int, tag: str) -> list[bytes]:
    """``n`` messages, admission by admission (admit, results, discharge), control ids
    ``<tag>-<i>``: a sender's feed with ids no earlier run used."""
    rng = random.Random(seed)
    codes = [c for c in loinc.CODES if _same_unit(c)]
    out: list[bytes] = []
    hadm = 20_000_000 + seed * 100_000
    while len(out) < n:
        hadm += 1
        subject, sex = hadm + 10_000_000, rng.choice("MF")
        pid = PID.format(subject=subject, sex=sex)
        pv1 = "PV1|1|I||E|" + "|" * 14 + f"{hadm}|" + "|" * 24 + "20240301080000|{disch}"
        bodies = [("ADT^A01", [pid, pv1.format(disch="")])]
        for r in range(RESULTS_PER_ADMISSION):
            hour = 9 + r
            obx = []
            for k in range(1, rng.randint(1, 4) + 1):
                code = rng.choice(codes)
                item = itemids.ITEMS[code.itemid]
                value = round(item.low + (item.high - item.low) * rng.uniform(0.1, 0.3), 2)
                obx.append(
                    f"OBX|{k}|NM|{code.loinc}^^LN||{value}|{_same_unit(code)}|||||F|||"
                    f"20240301{hour:02d}0000"
                )
            obr = "OBR|1|||24323-8^Panel^LN|||" + f"20240301{hour:02d}0000"
            bodies.append(("ORU^R01", [pid, pv1.format(disch=""), obr, *obx]))
        bodies.append(("ADT^A03", [pid, pv1.format(disch="20240305200000")]))
        for kind, segments in bodies:
            msh = MSH.format(now="20240301120000", type=kind, control=f"{tag}-{len(out)}")
            out.append(("\r".join([msh, *segments]) + "\r").encode())
    return out[:n]


def _same_unit(code: loinc.Code) -> str:
    """A unit the code takes unconverted (so the generated value is the item's)."""
    return next((u for u, c in code.units.items() if c is loinc.SAME), "")


# --------------------------------------------------------------------------- the listener's core


def listener_steps(sample: list[bytes], repeats: int = 3) -> list[dict]:
    """Messages/s of each step the listener runs per message, in this process, no Kafka."""
    mapped = [hl7_map.to_events(m) for m in sample]
    records = [e for m in mapped for e in m.events]
    steps = {
        "parse (python-hl7)": (hl7_map.parse, sample),
        "parse + map + validate": (hl7_map.to_events, sample),
        "encode events": (lambda e: (key(e), encode(e)), records),
        "ACK": (lambda m: acknowledgement(m.header, "AA"), mapped),
    }
    per_message = len(records) / len(sample)
    return [
        {
            "case": "listener step",
            "variant": name,
            **h.measure(lambda: _each(step, inputs), len(sample), warmup=1, repeats=repeats),
            "note": f"messages/s on one core; {per_message:.1f} events/message",
        }
        for name, (step, inputs) in steps.items()
    ]


def _each(step, inputs) -> None:
    for item in inputs:  # results dropped at once, as the listener drops them
        step(item)


class PinnedListener(h.PinnedProcess):
    """``ingest.mllp``'s listener pinned to ``core`` (``serve_pinned``); its counts once
    stopped."""

    def __init__(self, settings: Settings, core: int):
        super().__init__("benchmarks.bench_feeds", settings, core)
        self.counts: dict = {}

    def __enter__(self) -> PinnedListener:
        super().__enter__()
        host, port = self.first_line.split()
        self.address = (host, int(port))
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.counts = json.loads(self.output or "{}")


def serve_pinned(core: int) -> None:
    """The listener's side of ``PinnedListener``."""
    os.sched_setaffinity(0, {core})  # before the producer's threads exist: they inherit it
    settings = Settings.model_validate_json(sys.stdin.readline())
    asyncio.run(_serve_until_stdin_closes(settings))


async def _serve_until_stdin_closes(settings: Settings) -> None:
    listener = MllpListener(settings)
    host, port = await listener.start("127.0.0.1", 0)
    print(host, port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await listener.close()
    print(json.dumps(dict(listener.counts)), flush=True)


# --------------------------------------------------------------------------- senders


class Sender:
    """One MLLP connection: send a message, wait for its ACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address) -> Sender:
        return cls(*await asyncio.open_connection(*address, limit=1 << 20))

    async def send(self, message: bytes) -> bool:
        """True when the ACK is ``AA``."""
        self.writer.write(START_BLOCK + message + END_BLOCK)
        ack = await self.reader.readuntil(END_BLOCK)
        return b"\rMSA|AA|" in ack

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def closed_loop(address, messages: list[bytes], connections: int) -> dict:
    """Every connection sends its share back to back; seconds, ACK latencies, AA count."""
    senders = [await Sender.connect(address) for _ in range(connections)]
    latencies: list[float] = []
    outcomes: Counter[bool] = Counter()

    async def share(sender: Sender, batch: list[bytes]) -> None:
        for message in batch:
            sent = time.perf_counter()
            outcomes[await sender.send(message)] += 1
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(share(s, messages[i::connections]) for i, s in enumerate(senders)))
    seconds = time.perf_counter() - started
    for sender in senders:
        await sender.close()
    _all_acked(outcomes, len(messages))
    return {"seconds": seconds, "latencies": latencies, "messages": len(messages)}


async def open_loop(
    address, messages: list[bytes], rate: float, seconds: float, connections: int
) -> h.LoadRun:
    """Message i due at i / rate, sent on the first free connection; latency from then."""
    run = h.schedule(rate, seconds)
    senders = [await Sender.connect(address) for _ in range(connections)]
    due: asyncio.Queue[int | None] = asyncio.Queue()
    outcomes: Counter[bool] = Counter()

    async def serve(sender: Sender) -> None:
        while (i := await due.get()) is not None:
            outcomes[await sender.send(messages[i])] += 1
            run.complete(i, time.perf_counter())

    workers = [asyncio.create_task(serve(s)) for s in senders]
    run.start = time.perf_counter()
    for i, offset in enumerate(run.scheduled):
        wait = run.start + offset - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        due.put_nowait(i)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    for sender in senders:
        await sender.close()
    _all_acked(outcomes, len(run.scheduled))
    return run


def _all_acked(outcomes: Counter, sent: int) -> None:
    if outcomes[True] != sent:
        raise RuntimeError(f"{outcomes[False]} of {sent} messages were not acknowledged AA")


def _saturation_row(sweeps: list[dict], connections: int, cores: float) -> dict:
    rates = [s["messages"] / s["seconds"] for s in sweeps]
    latencies = [x for s in sweeps for x in s["latencies"]]
    return {
        "case": "saturation",
        "variant": f"{connections} connections",
        "items_per_s": h.percentile(rates, 50),
        "items_per_s_min": min(rates),
        "items_per_s_max": max(rates),
        **{k: v for k, v in h.latency_summary(latencies).items() if k != "mean_ms"},
        "cpu_cores": round(cores, 3),
        "note": "HL7 messages/s into Kafka, each ACKed AA; ACK latency from the send",
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_pinned(int(sys.argv[2]))
        sys.exit(0)
    outcome = run(Settings())
    saved = h.save(outcome)
    print(h.markdown(outcome))
    print({name: str(path) for name, path in saved.items()})
