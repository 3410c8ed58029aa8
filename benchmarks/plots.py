"""PNG plots of a result (matplotlib, Agg: no display needed).

* ``<stage>-throughput.png``: items/s against batch size, one line per case and variant,
  with the min..max of the repeats as error bars;
* ``<stage>-latency.png``: p50/p95/p99 against offered load;
* ``<stage>-breakdown.png``: one event's path, milliseconds per stage.

Each is drawn only when the result has the rows it needs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows, x: str, y: str) -> dict[str, list[dict]]:
    lines = defaultdict(list)
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            label = " / ".join(str(row[k]) for k in ("case", "variant") if row.get(k))
            lines[label].append(row)
    return {label: sorted(points, key=lambda r: r[x]) for label, points in lines.items()}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_batch(result, path: Path) -> Path | None:
    lines = _series(result.rows, "batch", "items_per_s")
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        xs = [p["batch"] for p in points]
        ys = [p["items_per_s"] for p in points]
        low = [y - p.get("items_per_s_min", y) for p, y in zip(points, ys)]
        high = [p.get("items_per_s_max", y) - y for p, y in zip(points, ys)]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="items/s (median, min..max)",
        title=f"{result.stage}: throughput against batch size",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def latency_vs_load(result, path: Path) -> Path | None:
    lines = _series(result.rows, "offered_per_s", "p99_ms")
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (label, points) in enumerate(lines.items()):
        xs = [p["offered_per_s"] for p in points]
        for q, style in (
            ("p50_ms", "-o"),
            ("p95_ms", "--s"),
            ("p99_ms", ":^"),
        ):  # one colour per series
            ax.plot(xs, [p[q] for p in points], style, color=f"C{k}", label=f"{label} {q[:3]}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="offered load (events/s)",
        ylabel="latency from scheduled send (ms)",
        title=f"{result.stage}: latency against offered load (open loop)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def breakdown(result, path: Path) -> Path | None:
    if not result.breakdown_ms:
        return None
    names, values = list(result.breakdown_ms), list(result.breakdown_ms.values())
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    # Totals (end to end) are drawn apart from the stages they contain.
    colors = ["tab:orange" if n.startswith("end to end") else "tab:blue" for n in names]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.annotate(
            f"{v:.2f} ms",
            (v, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set(
        xlabel="milliseconds (p50 at batch 1)", title=f"{result.stage}: one event's path by stage"
    )
    return _save(fig, path)


def plot(result, out_dir: Path) -> dict[str, Path]:
    """Draw what the result supports; returns {kind: path}."""
    out = {}
    for kind, draw in (
        ("throughput", throughput_vs_batch),
        ("latency", latency_vs_load),
        ("breakdown", breakdown),
    ):
        path = draw(result, Path(out_dir) / f"{result.stage}-{kind}.png")
        if path is not None:
            out[kind] = path
    return out
