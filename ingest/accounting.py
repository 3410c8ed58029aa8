"""Where every input row went: emitted, dead-lettered (with a reason) or skipped (counted).

A dead letter names the reason, the source table and the row's position in it, and a
short detail (a column or a rule): never the offending value, which may be patient data.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    source: str  # e.g. "hosp/labevents"
    position: str  # "row 12" (1-based data row as read) or "line 7" (a line the parser rejected)
    detail: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


DeadLetterSink = Callable[[DeadLetter], None]


@dataclass
class TableStats:
    read: int = 0
    used: int = 0
    dead: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    # Rows kept with a substitute value, by what was missing (e.g. an empty storetime,
    # timed by charttime instead): a note on a row, not one more outcome in the balance.
    fallbacks: Counter = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        return self.read == self.used + sum(self.dead.values()) + sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "used": self.used,
            "dead_letters": dict(sorted(self.dead.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "fallbacks": dict(sorted(self.fallbacks.items())),
        }


@dataclass
class IngestStats:
    """Rows per source table and events per type; complete once the events are consumed."""

    tables: dict[str, TableStats] = field(default_factory=dict)
    events: Counter = field(default_factory=Counter)

    def table(self, name: str) -> TableStats:
        return self.tables.setdefault(name, TableStats())

    @property
    def dead_letters(self) -> Counter:
        total = Counter()
        for table in self.tables.values():
            total.update(table.dead)
        return total

    @property
    def balanced(self) -> bool:
        return all(table.balanced for table in self.tables.values())

    def as_dict(self) -> dict:
        return {
            "tables": {name: t.as_dict() for name, t in sorted(self.tables.items())},
            "events": dict(sorted(self.events.items())),
            "events_total": sum(self.events.values()),
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "balanced": self.balanced,
        }


class JsonLinesDeadLetters:
    """A dead-letter file for dry runs: one JSON object per line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("wb")

    def __call__(self, letter: DeadLetter) -> None:
        self._file.write(letter.to_json() + b"\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
