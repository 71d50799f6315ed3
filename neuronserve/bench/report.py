"""Benchmark reports: JSON, a markdown table, and plots (latency CDFs; throughput and p99 TTFT
against load)."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = [
    ("completed", "done", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("median_ttft_ms", "p50 TTFT ms", "{:.0f}"),
    ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"),
    ("mean_tpot_ms", "mean TPOT ms", "{:.1f}"),
    ("p99_itl_ms", "p99 ITL ms", "{:.1f}"),
    ("output_goodput", "goodput tok/s", "{:.1f}"),
    ("cost_per_million_output_tokens", "$/M out tok", "{:.2f}"),
]


def load_label(run: dict) -> str:
    if run.get("concurrency") is not None and math.isinf(run.get("request_rate", math.inf)):
        return f"{run['concurrency']} concurrent"
    return f"{run['request_rate']:g} req/s"


def markdown_table(runs: list[dict], label_key: str | None = None) -> str:
    """One row per run; columns that no run has are left out."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in runs)]
    first = label_key or "load"
    head = f"| {first} | " + " | ".join(c[1] for c in cols) + " |"
    rule = "|" + "---|" * (len(cols) + 1)
    rows = []
    for r in runs:
        label = r[label_key] if label_key else load_label(r)
        cells = [fmt.format(r[key]) if key in r and _finite(r[key]) else "–" for key, _, fmt in cols]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def write_json(path: str | Path, data: dict) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON has no NaN or infinity
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(data), indent=2) + "\n")


def plot(series: dict[str, list[dict]], path: str | Path, x_key: str = "concurrency") -> None:
    """``series``: target name -> runs (with ``x_key``, ``output_throughput``, ``p99_ttft_ms`` and
    per-request ``ttfts_ms``). Three panels: throughput and p99 TTFT against load, TTFT CDFs at
    the highest load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, runs in series.items():
        xs = [r[x_key] for r in runs]
        ax1.plot(xs, [r["output_throughput"] for r in runs], marker="o", label=name)
        ax2.plot(xs, [r["p99_ttft_ms"] / 1000 for r in runs], marker="o", label=name)
        last = runs[-1].get("ttfts_ms") or []
        if last:
            values = sorted(v / 1000 for v in last)
            ax3.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
    ax1.set(xlabel=x_key, ylabel="output tokens / s", title="throughput")
    ax2.set(xlabel=x_key, ylabel="seconds", title="p99 time to first token")
    ax3.set(xlabel="seconds", ylabel="fraction of requests", title="TTFT CDF at the highest load")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
