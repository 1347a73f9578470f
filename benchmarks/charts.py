"""Side-by-side charts of the benchmarks' JSON results (needs matplotlib: ``pip install '.[bench]'``).

    python -m benchmarks.charts benchmarks/results/*.json     # -> benchmarks/figures/<name>.png

One PNG per JSON file, named after its section: ``bench_table`` (issue 19:
ours vs coturn on every path, one panel per row), ``bench_relay_many_variants``
and ``bench_scale_variants`` (issue 17: e.g. workers-1 / workers-2 / coturn).
Bars are medians, dots the single runs; each panel's title says whether
lower or higher is better, and the bar labels give the ratio to coturn.
The benchmark commands call ``draw`` themselves when matplotlib is
installed.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = os.path.join(HERE, "figures")
#: One colour per server, coturn always grey.
PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
COTURN = "#7f7f7f"


def colours(labels: Sequence[str]) -> List[str]:
    out, k = [], 0
    for label in labels:
        if label.startswith("coturn"):
            out.append(COTURN)
        else:
            out.append(PALETTE[k % len(PALETTE)])
            k += 1
    return out


def _panel(ax: Any, title: str, labels: Sequence[str], medians: Sequence[float], samples: Sequence[Sequence[float]],
           unit: str, better: str, base: Optional[str]) -> None:  # fmt: skip
    xs = list(range(len(labels)))
    bars = ax.bar(xs, medians, color=colours(labels), width=0.6)
    for x, pts in zip(xs, samples):
        if len(pts) > 1:
            ax.plot([x] * len(pts), pts, "k.", markersize=4, alpha=0.6)
    base_value = medians[labels.index(base)] if base in labels else None
    for bar, label, value in zip(bars, labels, medians):
        text = "%.1fk" % (value / 1000) if value >= 10000 else "%.0f" % value if value >= 100 else "%.3g" % value
        if base_value and label != base:
            text += "\n%.2f×" % (value / base_value)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))  # fmt: skip
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("%s (%s is better)" % (unit, better), fontsize=8)
    ax.margins(y=0.25)
    ax.tick_params(axis="y", labelsize=8)


def _table(data: Dict[str, Any], ax_grid: Any) -> None:
    rows = data["rows"]
    labels = data["servers"]
    for ax, row in zip(ax_grid, rows):
        vals = row["values"]
        _panel(ax, row["short"], labels, [vals[lb]["median"] for lb in labels], [vals[lb]["samples"] for lb in labels],
               row["unit"], row["better"], row.get("ratio_to"))  # fmt: skip
    for ax in ax_grid[len(rows):]:
        ax.axis("off")


def _footer(fig: Any, data: Dict[str, Any]) -> float:
    """The command, date and machine under the panels; returns the height (figure fraction) it takes."""
    text = "%s — %s; %s; medians of %s runs (dots: single runs)" % (
        data.get("command", data.get("benchmark", "")), data.get("when", ""), data.get("machine", ""),
        data.get("runs", "?"))  # fmt: skip
    lines = textwrap.wrap(text, int(fig.get_figwidth() * 20))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, ha="left", va="bottom")
    return (0.012 + 0.1 * len(lines)) / fig.get_figheight()


def draw(json_path: str, out_dir: str = FIGURES) -> List[str]:
    """Draw the figure of one results file; returns the PNG paths written."""
    with open(json_path) as f:
        data = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    kind = data.get("benchmark")
    name = data.get("section", kind)
    path = os.path.join(out_dir, "%s.png" % name)
    if kind == "bench_table":
        n = len(data["rows"])
        cols = 4 if n > 4 else n
        nrows = -(-n // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.2 * nrows), squeeze=False)
        _table(data, [ax for line in axes for ax in line])
        fig.suptitle("Issue 19: ours vs coturn on every path (ratio = ours / coturn)", fontsize=11)
    elif kind == "bench_relay":
        rows = data["rows"]
        labels = list(dict.fromkeys(r["server"] for r in rows))
        sizes = list(dict.fromkeys(r["size"] for r in rows))
        base = "coturn" if "coturn" in labels else None
        fig, axes = plt.subplots(len(sizes), 2, figsize=(9, 3.4 * len(sizes)), squeeze=False)
        for line, size in zip(axes, sizes):
            by = {r["server"]: r for r in rows if r["size"] == size}
            shape = "%d allocation%s × %d in flight, %d B" % (
                data.get("allocations", 1), "s" if data.get("allocations", 1) > 1 else "", data.get("inflight", 0), size)
            _panel(line[0], "round trips/s, " + shape, labels, [by[lb]["rt_per_s"] for lb in labels],
                   [by[lb].get("samples", {}).get("rt_per_s", []) for lb in labels], "round trips/s", "higher", base)
            _panel(line[1], "server CPU per round trip, " + shape, labels, [by[lb]["cpu_us_per_rt"] for lb in labels],
                   [by[lb].get("samples", {}).get("cpu_us_per_rt", []) for lb in labels], "µs", "lower", base)  # fmt: skip
        fig.suptitle("bench_relay closed loop: %s" % ", ".join(labels), fontsize=11)
    elif kind == "bench_scale":
        summary = data["summary"]
        labels = list(summary)
        base = "coturn" if "coturn" in labels else None
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), squeeze=False)
        for ax, (key, title, unit, better) in zip(axes[0], [
            ("alloc_rate", "authenticated Allocates/s", "Allocates/s", "higher"),
            ("alloc_server_cpu_us", "server CPU per Allocate", "µs", "lower"),
            ("release_server_cpu_us", "server CPU per Refresh LIFETIME 0", "µs", "lower"),
        ]):  # fmt: skip
            _panel(ax, title, labels, [summary[lb][key] for lb in labels],
                   [summary[lb][key + "_samples"] for lb in labels], unit, better, base)  # fmt: skip
        fig.suptitle("bench_scale, %d allocations: %s" % (data.get("allocations", 0), ", ".join(labels)), fontsize=11)
    else:
        raise ValueError("%s: unknown benchmark %r" % (json_path, kind))
    bottom = _footer(fig, data)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def main(argv: Optional[List[str]] = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        results = os.path.join(HERE, "results")
        paths = sorted(os.path.join(results, n) for n in os.listdir(results) if n.endswith(".json"))
    for p in paths:
        for out in draw(p):
            print("drew", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
