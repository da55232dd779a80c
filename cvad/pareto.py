"""Pareto dominance, shared by the sweep's progress report, the dashboard and ``cvad recommend``."""

from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    at_least = all((x >= y) if up else (x <= y) for x, y, up in zip(a, b, maximize))
    strictly = any((x > y) if up else (x < y) for x, y, up in zip(a, b, maximize))
    return at_least and strictly


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points (ties: equal points are all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, maximize) for j, q in enumerate(points) if j != i)]
