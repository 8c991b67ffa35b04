"""Pareto fronts and the 2-D hypervolume on hand-computed points."""
import math

import pytest

from forgetless.platform.analysis.pareto import MAX, MIN, hypervolume_2d, pareto_front, pareto_mask

OBJ = [("target", MAX), ("forgetting", MIN)]


def test_front_keeps_the_non_dominated_points():
    pts = [{"target": 0.9, "forgetting": 0.30},   # best learner
           {"target": 0.8, "forgetting": 0.05},   # best keeper
           {"target": 0.7, "forgetting": 0.10},   # dominated by the second
           {"target": 0.85, "forgetting": 0.20},  # on the front, between
           {"target": 0.9, "forgetting": 0.35}]   # dominated by the first (same target, more forgetting)
    assert pareto_mask(pts, OBJ) == [True, True, False, True, False]
    assert pareto_front(pts, OBJ) == [0, 3, 1]


def test_equal_points_are_all_on_the_front_and_missing_values_never_are():
    pts = [{"target": 0.5, "forgetting": 0.1}, {"target": 0.5, "forgetting": 0.1},
           {"target": math.nan, "forgetting": 0.0}, {"target": 0.99}]
    assert pareto_mask(pts, OBJ) == [True, True, False, False]


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        pareto_mask([{"a": 1.0}], [("a", "up")])


def test_hypervolume_of_a_staircase():
    # oriented (target, -forgetting) against reference (0, -1): (0.9, -0.3) and (0.8, -0.05)
    # strips: 0.9 x (1 - 0.3) = 0.63, then 0.8 x (0.3 - 0.05) = 0.2; a dominated point adds nothing
    pts = [{"target": 0.9, "forgetting": 0.3}, {"target": 0.8, "forgetting": 0.05},
           {"target": 0.7, "forgetting": 0.1}]
    assert hypervolume_2d(pts, OBJ, {"target": 0.0, "forgetting": 1.0}) == pytest.approx(0.83)
    assert hypervolume_2d(pts[:1], OBJ, {"target": 0.0, "forgetting": 1.0}) == pytest.approx(0.63)
    assert hypervolume_2d([{"target": -1.0, "forgetting": 0.0}], OBJ, {"target": 0.0, "forgetting": 1.0}) == 0.0
