"""Finding the items that make a step fail, so one bad event or admission stops nothing else.

A step over a group that fails for a reason that is not an outage is run again on each half
of the group, down to single items; the items that still fail alone are the culprits. The
step must be idempotent (the stores are): a half that succeeded before its sibling failed
changes nothing when it runs again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def isolate(
    items: Sequence[T],
    step: Callable[[Sequence[T]], None],
    outage: Callable[[BaseException], bool],
) -> list[tuple[T, Exception]]:
    """Run ``step(items)``; returns the items that fail alone, each with its error. An
    outage is raised as it comes: it says nothing about the items."""
    failed: list[tuple[T, Exception]] = []
    groups = [items] if items else []
    while groups:
        group = groups.pop()
        try:
            step(group)
        except Exception as exc:
            if outage(exc):
                raise
            if len(group) == 1:
                failed.append((group[0], exc))
            else:
                middle = len(group) // 2
                groups += [group[middle:], group[:middle]]  # the first half runs first
    return failed
