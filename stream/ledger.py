"""Which consumed offsets the worker may commit.

An offset may be committed once every event before it is in a written score (or a dead
letter) and Kafka has acknowledged every record sent for them. Each poll gets a number;
the caller says which polls are fully scored (the *floor*: every poll up to it), and the
ledger turns that into *commit points*: the consumed positions of the floor's poll, with
the sink's mark at that moment. A point is ready to commit once no record numbered below
its mark is unacknowledged. Nothing here talks to Kafka: positions are
``(topic, partition) -> next offset`` dicts.
"""

from __future__ import annotations

from collections import deque

Positions = dict[tuple[str, int], int]


class CommitLedger:
    def __init__(self):
        self.poll = 0  # polls that returned records
        self._consumed: Positions = {}  # next offset per partition, after the latest poll
        self._positions: deque[tuple[int, Positions]] = (
            deque()
        )  # (poll, consumed positions), no point yet
        # (positions, sink mark): taken, not yet committed; each newer than the one before.
        self.points: deque[tuple[Positions, int]] = deque()
        self._last_async: Positions | None = None

    @property
    def consumed(self) -> Positions:
        return self._consumed

    def polled(self, ends: Positions) -> int:
        """Record a poll's records (each partition's next offset after them); returns the
        poll's number."""
        self.poll += 1
        for partition, end in ends.items():
            self._consumed[partition] = max(self._consumed.get(partition, 0), end)
        self._positions.append((self.poll, dict(self._consumed)))
        return self.poll

    def take_point(self, floor: int, mark: int) -> bool:
        """Polls up to ``floor`` are fully scored and every record they caused numbers below
        ``mark``: note the newest such position, if it moved. Whether a point was taken."""
        positions = None
        while self._positions and self._positions[0][0] <= floor:
            _, positions = self._positions.popleft()
        if positions is None:
            return False
        self.points.append((positions, mark))
        return True

    def ready(self, oldest_unacknowledged: int | None) -> Positions | None:
        """The newest point whose records are all acknowledged, dropping it and those before
        it; None if none is."""
        positions = None
        while self.points and (
            oldest_unacknowledged is None or self.points[0][1] <= oldest_unacknowledged
        ):
            positions, _ = self.points.popleft()
        return positions

    def committed(self, positions: Positions, *, asynchronous: bool) -> None:
        """The caller committed ``positions``."""
        self._last_async = positions if asynchronous else None

    def final(self) -> Positions | None:
        """At shutdown, once every record is acknowledged: what to commit synchronously. With
        no newer point, the last asynchronous commit again, since closing the consumer does
        not promise to wait for it."""
        positions = self.points[-1][0] if self.points else self._last_async
        self.points.clear()
        return positions

    def forget(self, partitions) -> None:
        """Revoked partitions are no longer this member's to commit: were it to get one
        back, its stale position would move the group's offset backwards."""
        gone = set(partitions)
        for positions in [
            self._consumed,
            *(p for _, p in self._positions),
            *(p for p, _ in self.points),
            *([self._last_async] if self._last_async else []),
        ]:
            for partition in gone:
                positions.pop(partition, None)
