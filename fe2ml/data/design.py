"""Designs of macro deformations for sampling campaigns: space-filling samples and named load paths.

Design spaces (d = dimension):

- ``gradient``: every component of F̄ − I in ``bounds`` ([lo, hi] for all, or a d×d list of
  [lo, hi]); with ``symmetric: true`` only the symmetric part (F̄ = U, a pure stretch tensor).
- ``stretch``: principal stretches in ``stretch: [lo, hi]``, principal directions of random
  orientation, plus an optional rigid rotation angle in ``rotation: [lo, hi]`` degrees
  (about z in 2D, about a random axis in 3D). With ``volume: [lo, hi]`` the last principal stretch is
  set so that det F̄ is uniform in [lo, hi]: near-isochoric states of nearly incompressible tissue.

Methods: ``sobol`` (scrambled, scipy.stats.qmc), ``lhs`` (Latin hypercube), or ``none`` (paths only).
Named paths: ``{type: uniaxial | biaxial | shear | pure_shear, max: s, steps: n}``.
"""

from __future__ import annotations

import warnings

import numpy as np

from fe2ml.micro.config import load_path

__all__ = ["design_points"]


def _rot2(t):
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _rot3(axis, t):
    a = axis / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def design_points(design: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Macro deformation gradients of a design.

    Args:
        design: validated design mapping.
        dim: 2 or 3.

    Returns:
        (F (n, d, d), path index per point (n,), -1 for the space-filling part).
    """
    d = dim
    Fs, tags = [], []
    n = design["n"]
    if design["method"] != "none" and n > 0:
        space = design["space"]
        if space == "gradient":
            comps = [(i, j) for i in range(d) for j in range(d) if not design["symmetric"] or i <= j]
        else:
            comps = list(range(d + {2: 1, 3: 3}[d] + 1))  # stretches, orientation angles, rotation
        k = len(comps)
        from scipy.stats import qmc  # lazily: scipy.stats costs about 1 s to import

        eng = (qmc.Sobol(k, scramble=True, seed=design["seed"]) if design["method"] == "sobol"
               else qmc.LatinHypercube(k, seed=design["seed"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sobol balance warning for n not a power of 2
            U = eng.random(n)
        if space == "gradient":
            b = np.asarray(design["bounds"], dtype=float)
            for u in U:
                H = np.zeros((d, d))
                for c, (i, j) in enumerate(comps):
                    lo, hi = (b if b.ndim == 1 else b[i, j])
                    H[i, j] = lo + (hi - lo) * u[c]
                    if design["symmetric"]:
                        H[j, i] = H[i, j]
                Fs.append(np.eye(d) + H)
        else:
            lo, hi = design["stretch"]
            rlo, rhi = np.radians(design["rotation"])
            vol = design.get("volume")
            for u in U:
                lam = lo + (hi - lo) * u[:d]
                if vol is not None:  # the last principal stretch makes det U = J, J uniform in the volume range
                    lam[-1] = (vol[0] + (vol[1] - vol[0]) * u[d - 1]) / np.prod(lam[:-1])
                if d == 2:
                    Q = _rot2(np.pi * u[2])
                    R = _rot2(rlo + (rhi - rlo) * u[3])
                else:
                    # orientation from 3 uniform numbers (unit quaternion, Shoemake)
                    a, b_, c = u[3:6]
                    q = np.array([np.sqrt(1 - a) * np.sin(2 * np.pi * b_), np.sqrt(1 - a) * np.cos(2 * np.pi * b_),
                                  np.sqrt(a) * np.sin(2 * np.pi * c), np.sqrt(a) * np.cos(2 * np.pi * c)])
                    x, y, z, w = q
                    Q = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
                    R = _rot3(Q[:, 0] + Q[:, 1] * 0.5 + 1e-3, rlo + (rhi - rlo) * u[6])
                Fs.append(R @ Q @ np.diag(lam) @ Q.T)
        tags += [-1] * n
    for k, p in enumerate(design["paths"]):
        pts = load_path(p["type"], p["max"], p["steps"], d)
        Fs += pts
        tags += [k] * len(pts)
    return np.array(Fs).reshape(-1, d, d), np.array(tags, dtype=np.int32)
