"""Pareto fronts and hypervolumes on points with known answers."""

from __future__ import annotations

import itertools
import random

import pytest

from cvad.pareto import dominates, hypervolume, pareto_front


def test_front_keeps_ties_and_drops_dominated_points():
    points = [(0.5, 10.0), (0.5, 10.0), (0.6, 20.0), (0.4, 20.0), (0.6, 30.0)]
    maximize = [True, False]  # pixel F1 up, MB down
    assert pareto_front(points, maximize) == [0, 1, 2]
    assert dominates((0.6, 20.0), (0.6, 30.0), maximize)
    assert not dominates((0.5, 10.0), (0.5, 10.0), maximize)


def test_hypervolume_of_boxes():
    assert hypervolume([(1, 1)], (3, 3)) == 4
    assert hypervolume([(1, 2), (2, 1)], (3, 3)) == 3  # two 2x1 boxes overlapping in 1x1
    assert hypervolume([(1, 1, 1)], (2, 3, 4)) == 1 * 2 * 3
    assert hypervolume([(5, 0)], (3, 3)) == 0  # outside the reference box


def test_hypervolume_matches_a_monte_carlo_estimate_in_3d():
    rng = random.Random(0)
    points = [(rng.random(), rng.random(), rng.random()) for _ in range(12)]
    samples = [(rng.random(), rng.random(), rng.random()) for _ in range(40000)]
    covered = sum(any(all(p[i] <= s[i] for i in range(3)) for p in points) for s in samples) / len(samples)
    assert hypervolume(points, (1, 1, 1)) == pytest.approx(covered, abs=0.01)


def test_dominated_points_do_not_change_the_hypervolume():
    front = [(0, 2, 1), (1, 0, 2), (2, 1, 0)]
    extra = [(p[0] + 0.5, p[1] + 0.5, p[2] + 0.1) for p in front]
    for combo in itertools.permutations(front + extra):
        assert hypervolume(list(combo), (3, 3, 3)) == pytest.approx(hypervolume(front, (3, 3, 3)))
