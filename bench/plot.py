"""Plot serving results (bench/serve.py JSON) against load, one line per label.

The x axis is the request rate when the runs vary it, else --max-concurrency. Typical use:
runs with and without speculation, labelled `spec` and `no-spec`:

    python bench/plot.py bench/results/serve-*.json -o bench/results/serve.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (  # (title, y label, value getter)
    ("TTFT", "ms", lambda r: r["ttft_ms"]["median"], lambda r: r["ttft_ms"].get("p99")),
    ("TPOT", "ms", lambda r: r["tpot_ms"]["median"], lambda r: r["tpot_ms"].get("p99")),
    ("E2E latency", "ms", lambda r: r["e2e_ms"]["median"], lambda r: r["e2e_ms"].get("p99")),
    ("Output throughput", "tokens/s", lambda r: r["output_throughput"], None),
)


def _rate(result: dict) -> float:
    rate = result.get("request_rate")
    return math.inf if rate in (None, "inf") else float(rate)


def load_axis(results: list[dict]) -> tuple[str, callable]:
    if len({_rate(r) for r in results}) > 1:
        return "request rate (req/s)", _rate
    return "max concurrency", lambda r: r.get("max_concurrency") or math.inf


def plot(results: list[dict], path: str, title: str | None = None) -> None:
    if not results:
        raise ValueError("no results to plot")
    xlabel, x_of = load_axis(results)
    series: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        series[result.get("label", "?")].append(result)
    finite = [x_of(r) for r in results if math.isfinite(x_of(r))]
    inf_x = (max(finite) * 1.5) if finite else 1.0  # where an unbounded load is drawn

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (name, unit, median_of, p99_of) in zip(axes, PANELS):
        for label, runs in sorted(series.items()):
            runs = sorted(runs, key=x_of)
            xs = [x_of(r) if math.isfinite(x_of(r)) else inf_x for r in runs]
            (line,) = ax.plot(xs, [median_of(r) for r in runs], marker="o",
                              label=f"{label}" + (" median" if p99_of else ""))
            if p99_of:
                ax.plot(xs, [p99_of(r) for r in runs], marker="x", linestyle="--",
                        color=line.get_color(), label=f"{label} p99")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if not finite or any(not math.isfinite(x_of(r)) for r in results):
            ticks = sorted(set(finite)) + [inf_x]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf"])
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plot bench/serve.py results against load")
    parser.add_argument("results", nargs="+", help="serve JSON files")
    parser.add_argument("-o", "--output", default="bench/results/serve.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        if data.get("benchmark") != "serve":
            parser.error(f"{path} is not a bench/serve.py result (benchmark="
                         f"{data.get('benchmark')!r})")
        results.append(data)
    plot(results, args.output, args.title)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
