"""Dollars per million tokens from an hourly instance price and a measured throughput."""

from __future__ import annotations

import json
from importlib import resources


def instance_prices() -> dict:
    """The price table shipped as package data: ``{"instances": {name: {"on_demand", "reserved_1yr",
    "source", ...}}, "currency", "region", "note"}``."""
    return json.loads(resources.files("neuronserve.bench").joinpath("data/instance_prices.json").read_text())


def price_per_hour(instance: str, plan: str = "on_demand") -> float:
    """The hourly price of ``instance`` under ``plan`` (``on_demand`` or ``reserved_1yr``)."""
    table = instance_prices()["instances"]
    if instance not in table:
        raise ValueError(f"instance: unknown {instance!r}; known: {', '.join(sorted(table))}")
    price = table[instance].get(plan)
    if price is None:
        raise ValueError(f"instance: no {plan} price for {instance} in the table; pass --price-per-hour")
    return float(price)


def cost_per_million(price_per_hour: float, tokens_per_second: float) -> float:
    """$ per 10^6 tokens = price per hour / (3600 s x tokens per second) x 10^6 (inf at 0 tok/s)."""
    if tokens_per_second <= 0:
        return float("inf")
    return price_per_hour / (3600 * tokens_per_second) * 1e6


def add_costs(summary: dict, price: float) -> dict:
    """Add ``cost_per_million_*`` keys to a ``metrics.summarize`` result."""
    out = {"price_per_hour": price}
    out["cost_per_million_output_tokens"] = cost_per_million(price, summary["output_throughput"])
    out["cost_per_million_total_tokens"] = cost_per_million(price, summary["total_token_throughput"])
    if "output_goodput" in summary:
        out["cost_per_million_output_tokens_at_goodput"] = cost_per_million(price, summary["output_goodput"])
    return {**summary, **out}
