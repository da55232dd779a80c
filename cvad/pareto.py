"""Pareto dominance, shared by the sweep's progress report, the dashboard and ``cvad recommend``."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    at_least = all((x >= y) if up else (x <= y) for x, y, up in zip(a, b, maximize))
    strictly = any((x > y) if up else (x < y) for x, y, up in zip(a, b, maximize))
    return at_least and strictly


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points (ties: equal points are all kept), in input order."""
    return [
        i for i, p in enumerate(points) if not any(dominates(q, p, maximize) for j, q in enumerate(points) if j != i)
    ]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` (all objectives minimised) and bounded by ``reference``.

    Exact, by slicing along the first objective: O(n^d) at worst, meant for fronts of tens
    of points in 2-3 dimensions. Points not strictly better than the reference in every
    objective add nothing.
    """
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference))]
    if not inside:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in inside)
    volume = 0.0
    cuts = sorted({p[0] for p in inside}) + [reference[0]]
    for low, high in zip(cuts, cuts[1:]):
        slab = [p[1:] for p in inside if p[0] <= low]
        volume += (high - low) * hypervolume(slab, reference[1:])
    return volume
