"""Pareto fronts: which points are not dominated on several objectives (learning vs forgetting is a trade-off, so a
comparison shows its front, not one ranking). One computation serves compare, tune and the reports.

A point dominates another when it is at least as good on every objective and strictly better on one. Objectives are
given as (name, direction) pairs, direction "max" or "min". A point with a missing (None or NaN) objective value is
never on the front and dominates nothing. Pure functions of numbers, no torch, Ray or MLflow.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MAX, MIN = "max", "min"


def _oriented(point: Mapping[str, float | None], objectives: Sequence[tuple[str, str]]) -> tuple[float, ...] | None:
    """The point's objective values, each turned so that larger is better; None when one is missing."""
    values = []
    for name, direction in objectives:
        if direction not in (MAX, MIN):
            raise ValueError(f"objective {name!r}: direction must be 'max' or 'min', not {direction!r}")
        v = point.get(name)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        values.append(float(v) if direction == MAX else -float(v))
    return tuple(values)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether oriented values `a` (larger is better on every axis) dominate `b`."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_mask(points: Sequence[Mapping[str, float | None]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """For each point, whether it is on the Pareto front (not dominated by any other point). Equal points are all on
    the front. O(n²), which is fine for the tens to hundreds of runs or trials a comparison holds."""
    oriented = [_oriented(p, objectives) for p in points]
    mask = []
    for i, a in enumerate(oriented):
        mask.append(a is not None and not any(b is not None and dominates(b, a)
                                              for j, b in enumerate(oriented) if j != i))
    return mask


def pareto_front(points: Sequence[Mapping[str, float | None]], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """The indices of the non-dominated points, sorted along the first objective (best first)."""
    mask = pareto_mask(points, objectives)
    front = [i for i, on in enumerate(mask) if on]
    name, direction = objectives[0]
    return sorted(front, key=lambda i: -float(points[i][name]) if direction == MAX else float(points[i][name]))


def hypervolume_2d(points: Sequence[Mapping[str, float | None]], objectives: Sequence[tuple[str, str]],
                   reference: Mapping[str, float]) -> float:
    """The area dominated by the points' front and bounded by `reference` (a point worse than every point of
    interest on both objectives), for two objectives: the usual measure of how good a front is (larger is better).
    Points that do not dominate the reference add nothing."""
    if len(objectives) != 2:
        raise ValueError("hypervolume_2d takes exactly two objectives")
    ref = _oriented(reference, objectives)
    if ref is None:
        raise ValueError("the reference point needs a value for both objectives")
    pts = [o for o in (_oriented(p, objectives) for p in points) if o is not None and o[0] > ref[0] and o[1] > ref[1]]
    area, best_y = 0.0, ref[1]
    for x, y in sorted(pts, reverse=True):  # from the best first objective down; each step adds a new strip
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area
