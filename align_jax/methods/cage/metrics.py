"""Pareto metrics of a CAGE weight sweep: exact hypervolume and dominance counts.

Points are objective-score vectors ``[J]`` (larger is better), one per (method, weight).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["hypervolume", "dominance_counts"]


def hypervolume(points, reference) -> float:
    """Exact hypervolume dominated by ``points [n, J]`` above ``reference [J]`` (maximisation).

    Coordinate compression: the union of boxes ``[reference, p]`` is measured cell by
    cell on the grid of the points' coordinates (``O(n^(J+1))``, for small n).
    """
    pts = np.asarray(points, np.float64).reshape(-1, np.shape(reference)[0])
    ref = np.asarray(reference, np.float64)
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([[ref[j]], pts[:, j]])) for j in range(len(ref))]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        upper = np.asarray([axes[j][i + 1] for j, i in enumerate(cell)])
        if np.any(np.all(pts >= upper, axis=1)):
            total += float(np.prod([axes[j][i + 1] - axes[j][i] for j, i in enumerate(cell)]))
    return total


def dominance_counts(points_by_method: dict) -> dict:
    """For every method: how many of its points some other method's point dominates
    (``dominated``) and how many other methods' points it dominates (``dominates``)."""
    def dom(a, b):
        return bool(np.all(a >= b) and np.any(a > b))

    out = {}
    for m, pts in points_by_method.items():
        others = [np.asarray(p) for o, ps in points_by_method.items() if o != m for p in ps]
        mine = [np.asarray(p) for p in pts]
        out[m] = {
            "dominated": sum(any(dom(o, p) for o in others) for p in mine),
            "dominates": sum(any(dom(p, o) for p in mine) for o in others),
            "points": len(mine),
        }
    return out
