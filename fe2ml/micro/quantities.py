"""Cell- and phase-level quantities of an RVE state: what each biological cell and each phase feels.

The finite-strain RVE integrates packed element quantities (``NQ`` numbers per element: F (9), Green–Lagrange
E (9), J, W, the Kirchhoff-weighted Cauchy stress (9) and the volume); :func:`summaries` turns summed integrals
into volume averages, principal stretches and stress measures, and :class:`CellQuantities` holds them per
cell and per phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NQ", "CellQuantities", "summaries"]

# packed per-element quantities: F (9), E (9), J, W, sigma (9), 1
NQ = 30


@dataclass
class CellQuantities:
    """What each biological cell and each phase feels: volume averages (reference configuration).

    Per cell (arrays indexed by cell id 0..n-1) and per phase (indexed like ``phase_tags``):

    - ``volume``: reference volume; ``phase``: phase tag of each cell;
    - ``F`` (…, 3, 3): average deformation gradient; ``E`` (…, 3, 3): average Green–Lagrange strain;
    - ``stretch`` (…, 3): principal stretches of the average F, descending;
    - ``J``: average volume ratio; ``W``: average strain energy density;
    - ``sigma`` (…, 3, 3): average Cauchy stress; ``von_mises`` and ``sigma_max``: von Mises and
      maximum principal value of that average stress.

    ``peak_E`` and ``peak_von_mises`` (indexed like ``phase_tags``): maximum over the elements of a
    phase of the element-average maximum principal Green–Lagrange strain and von Mises stress
    (e.g. peak matrix strain near cells). Plane strain: 3D tensors with F33 = 1.
    """

    cell_ids: np.ndarray
    cell: dict
    phase_tags: np.ndarray
    phase: dict
    peak_E: np.ndarray
    peak_von_mises: np.ndarray

    def to_dict(self) -> dict:
        """JSON-friendly nested lists."""
        def conv(d):
            return {k: np.asarray(v).tolist() for k, v in d.items()}

        return {"cell_ids": self.cell_ids.tolist(), "cell": conv(self.cell),
                "phase_tags": self.phase_tags.tolist(), "phase": conv(self.phase),
                "peak_E": self.peak_E.tolist(), "peak_von_mises": self.peak_von_mises.tolist()}


def summaries(Q: np.ndarray) -> dict:
    """From summed packed integrals (m, 30) to averaged quantities."""
    vol = Q[:, 29]
    safe = np.where(vol > 0, vol, 1.0)
    F = Q[:, 0:9].reshape(-1, 3, 3) / safe[:, None, None]
    E = Q[:, 9:18].reshape(-1, 3, 3) / safe[:, None, None]
    J = Q[:, 18] / safe
    W = Q[:, 19] / safe
    S = Q[:, 20:29].reshape(-1, 3, 3) / safe[:, None, None]
    S = 0.5 * (S + S.transpose(0, 2, 1))
    C = np.einsum("nki,nkj->nij", F, F)
    stretch = np.sqrt(np.clip(np.linalg.eigvalsh(C), 0, None))[:, ::-1]
    dev = S - np.trace(S, axis1=1, axis2=2)[:, None, None] / 3 * np.eye(3)
    vm = np.sqrt(1.5 * np.einsum("nij,nij->n", dev, dev))
    smax = np.linalg.eigvalsh(S)[:, -1]
    return {"volume": vol, "F": F, "E": E, "stretch": stretch, "J": J, "W": W, "sigma": S, "von_mises": vm,
            "sigma_max": smax}
