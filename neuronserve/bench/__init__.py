"""Benchmarking: workloads, clients, metrics and cost (see the benchmark harness issue)."""
