"""Globally consistent tile positions from pairwise offsets.

Internal to :mod:`qc.stitching`. Unknowns are the tiles' displacements from
their nominal positions, ``u_i = P_i - N_i``; each accepted pair ``(i, j)``
says ``u_j - u_i = d_ij`` (its measured offset minus its nominal offset),
weighted by its quality. Each connected component is solved by weighted
least squares with one tile anchored, then re-anchored so the component's
median displacement is zero (a single misplaced tile does not drag the rest).
Outliers are rejected one at a time, largest residual first, until every
remaining pair agrees with the solution within ``reject_px``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["Solution", "solve_displacements"]


@dataclass(frozen=True)
class Solution:
    """Displacements ``u`` (n, 2) in px (NaN for tiles no accepted pair
    reaches), per-edge ``accepted`` flags and ``residual`` in px (NaN for
    edges never used)."""

    u: np.ndarray
    accepted: np.ndarray
    residual: np.ndarray


def _components(n: int, edges: np.ndarray, active: np.ndarray) -> np.ndarray:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (i, j), on in zip(edges, active, strict=False):
        if on:
            ri, rj = find(int(i)), find(int(j))
            if ri != rj:
                parent[ri] = rj
    label = np.full(n, -1, int)
    touched = np.zeros(n, bool)
    for (i, j), on in zip(edges, active, strict=False):
        if on:
            touched[int(i)] = touched[int(j)] = True
    roots: dict[int, int] = {}
    for k in range(n):
        if touched[k]:
            label[k] = roots.setdefault(find(k), len(roots))
    return label


def _solve(
    n: int, edges: np.ndarray, d: np.ndarray, w: np.ndarray, active: np.ndarray, label: np.ndarray
) -> np.ndarray:
    u = np.full((n, 2), np.nan)
    for comp in range(int(label.max()) + 1 if label.size else 0):
        nodes = np.flatnonzero(label == comp)
        pos = {int(v): k for k, v in enumerate(nodes)}
        sel = np.flatnonzero(active & (label[edges[:, 0]] == comp))
        m = len(nodes)
        rows = np.repeat(np.arange(len(sel)), 2)
        cols = np.array([[pos[int(edges[e, 0])], pos[int(edges[e, 1])]] for e in sel]).ravel()
        vals = np.tile([-1.0, 1.0], len(sel))
        a = sp.csr_matrix((vals, (rows, cols)), shape=(len(sel), m))
        wd = sp.diags(w[sel])
        lap = (a.T @ wd @ a).tocsc()[1:, 1:]  # anchor the component's first tile
        rhs = (a.T @ (w[sel][:, None] * d[sel]))[1:]
        sol = np.zeros((m, 2))
        if m > 1:
            x = spla.spsolve(lap, rhs)
            sol[1:] = np.asarray(x).reshape(m - 1, 2)
        sol -= np.median(sol, axis=0)
        u[nodes] = sol
    return u


def solve_displacements(
    n: int,
    edges: Sequence[tuple[int, int]],
    deviations: np.ndarray,
    weights: np.ndarray,
    *,
    reject_px: float,
) -> Solution:
    """Least-squares displacements with iterative outlier rejection.

    Parameters
    ----------
    n : int
        Number of tiles.
    edges : sequence of (int, int)
        Pairs ``(i, j)`` with a measurement.
    deviations : ndarray, shape (len(edges), 2)
        Measured minus nominal offset of j from i, ``(dx, dy)`` px.
    weights : ndarray, shape (len(edges),)
        Positive weights (pair quality).
    reject_px : float
        Largest residual, px, a pair may keep after the solve.
    """
    e = np.asarray(edges, int).reshape(-1, 2)
    d = np.asarray(deviations, float).reshape(-1, 2)
    w = np.maximum(np.asarray(weights, float), 1e-3)
    active = np.ones(len(e), bool)
    while True:
        label = _components(n, e, active)
        u = _solve(n, e, d, w, active, label)
        resid = np.full(len(e), np.nan)
        if len(e):
            pred = u[e[:, 1]] - u[e[:, 0]]
            resid = np.linalg.norm(d - pred, axis=1)
        act_res = np.where(active, resid, -np.inf)
        if not active.any() or not np.nanmax(act_res) > reject_px:
            return Solution(u=u, accepted=active.copy(), residual=resid)
        active[int(np.nanargmax(act_res))] = False
