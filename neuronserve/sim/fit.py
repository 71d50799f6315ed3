"""Fitting a profile's efficiency factors to measured steps (least squares, non-negative, pure
Python: a handful of unknowns)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from neuronserve.sim.stepmodel import ModelCost, Profile, step_time


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            raise ValueError("singular system: the measurements do not separate the terms")
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def nnls(features: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
    k = len(features[0])
    active = list(range(k))
    while True:
        # Scale columns so that the normal equations are well conditioned.
        scale = [max(abs(row[j]) for row in features) or 1.0 for j in active]
        cols = [[row[j] / s for j, s in zip(active, scale)] for row in features]
        ata = [[sum(r[i] * r[j] for r in cols) for j in range(len(active))] for i in range(len(active))]
        atb = [sum(r[i] * t for r, t in zip(cols, targets)) for i in range(len(active))]
        x = [v / s for v, s in zip(_solve(ata, atb), scale)]
        worst = min(range(len(x)), key=lambda i: x[i])
        if x[worst] >= 0 or len(active) == 1:
            out = [0.0] * k
            for j, v in zip(active, x):
                out[j] = max(v, 0.0)
            return out
        active.pop(worst)


def fit_efficiencies(
    profile: Profile, cost: ModelCost, steps: Sequence[tuple[Sequence[tuple[int, int]], float]]
) -> Profile:
    """Fit ``memory_eff`` (weights), ``kv_eff`` and ``compute_eff`` so that the modelled step times
    match measured ones; the profile's overheads are taken as measured. ``steps``: the chunks
    ``(new tokens, computed before)`` of each measured step and its seconds. The profile must add
    compute and memory up (``overlap=False``), which keeps the model linear in 1 / efficiency."""
    if profile.overlap:
        raise ValueError("overlap: the fit needs an additive profile (overlap=False)")
    unit = dataclasses.replace(profile, compute_eff=1.0, memory_eff=1.0, kv_eff=1.0)
    features, targets = [], []
    for chunks, seconds in steps:
        b = step_time(unit, cost, chunks)
        weights_s = b.weight_bytes / unit.mem_bytes_per_s
        kv_s = b.kv_bytes / unit.mem_bytes_per_s
        features.append([weights_s, kv_s, b.compute_s])
        targets.append(seconds - b.overhead_s)
    inv_mem, inv_kv, inv_compute = nnls(features, targets)
    return dataclasses.replace(
        profile,
        # A term the fit found free gets an infinite efficiency (it costs nothing in the model).
        memory_eff=1 / inv_mem if inv_mem > 0 else math.inf,
        kv_eff=1 / inv_kv if inv_kv > 0 else math.inf,
        compute_eff=1 / inv_compute if inv_compute > 0 else math.inf,
    )
