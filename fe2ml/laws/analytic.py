"""Single-scale laws written in UFL: one material per macro phase, integrated exactly by the macro problem.

:class:`AnalyticLaw` is a :class:`~fe2ml.laws.base.FormLaw` (the macro problem builds its residual from the UFL
energy or stress of each phase, so single-scale and direct numerical simulation runs stay exact) and, for one
material, also a pointwise :class:`~fe2ml.laws.base.ConstitutiveLaw`: :meth:`AnalyticLaw.evaluate` compiles P and
A = ∂P/∂F from the same UFL once and evaluates them point by point (for tests and comparisons, not for macro runs).

Plane strain embeds the 2D gradient in 3D with F33 = 1, so invariants and energies count the out-of-plane part.
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

import dolfinx
import numpy as np
import ufl

from fe2ml.errors import ConfigError
from fe2ml.laws.base import ConstitutiveLaw, FormLaw
from fe2ml.materials import HyperelasticMaterial, LinearMaterial, plane_strain_3d

__all__ = ["AnalyticLaw"]


class AnalyticLaw(FormLaw, ConstitutiveLaw):
    """One material per macro phase tag (``{0: material}``: one material everywhere).

    Args:
        materials: phase tag -> hyperelastic material (finite strain) or linear material (small strain).
        dim: 2 or 3.

    Raises:
        ConfigError: no material, or a mix of hyperelastic and linear materials.
    """

    def __init__(self, materials: dict[int, HyperelasticMaterial | LinearMaterial], *, dim: int):
        if not materials:
            raise ConfigError("analytic law: no material given")
        hyper = [isinstance(m, HyperelasticMaterial) for m in materials.values()]
        if any(hyper) and not all(hyper):
            raise ConfigError("analytic law: mix of hyperelastic and linear materials")
        ConstitutiveLaw.__init__(self, dim, "finite" if all(hyper) else "small")
        self.materials = dict(materials)
        self.phases = tuple(sorted(self.materials))
        self._kernels: tuple | None = None

    # ---- the form law ----------------------------------------------------------------------------------------
    def energy_form(self, F: Any, tag: int) -> Any:
        """W(F) of phase ``tag`` as UFL (finite strain)."""
        mat = self.materials[tag]
        if not isinstance(mat, HyperelasticMaterial):
            raise ConfigError(f"analytic law: phase {tag} is a linear material and has no strain energy of F")
        return mat.energy(plane_strain_3d(F))

    def stress_form(self, F: Any, tag: int) -> Any:
        """P(F) of phase ``tag`` as UFL: ∂W/∂F at finite strain, C : sym(F − I) at small strain."""
        if self.kinematics == "finite":
            Fv = ufl.variable(F)
            return ufl.diff(self.energy_form(Fv, tag), Fv)
        mat = self.materials[tag]
        if isinstance(mat, HyperelasticMaterial):
            raise ConfigError(f"analytic law: phase {tag} is hyperelastic; small strain needs a linear material")
        C = ufl.as_tensor(np.asarray(mat.stiffness(self.dim), dtype=np.float64).tolist())
        eps = ufl.sym(F - ufl.Identity(self.dim))
        i, j, k, l_ = ufl.indices(4)
        return ufl.as_tensor(C[i, j, k, l_] * eps[k, l_], (i, j))

    # ---- the pointwise contract (one material) ---------------------------------------------------------------
    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P (n, d, d) and A (n, d, d, d, d) of the law's one material, from its UFL energy or stiffness.

        Raises:
            ConfigError: the law has several phases (pointwise evaluation needs one material).
        """
        if len(self.phases) != 1:
            raise ConfigError(f"analytic law: pointwise evaluation needs one material; this law has phases "
                              f"{list(self.phases)}")
        F = np.asarray(F, dtype=np.float64)
        n, d = len(F), self.dim
        mat = self.materials[self.phases[0]]
        self.stats["evaluations"] += n
        if self.kinematics == "small" and not isinstance(mat, HyperelasticMaterial):
            C = np.asarray(mat.stiffness(d), dtype=np.float64)
            H = F - np.eye(d)
            P = np.einsum("ijkl,nkl->nij", C, 0.5 * (H + H.transpose(0, 2, 1)))
            return P, np.broadcast_to(C, (n,) + C.shape).copy()
        Fc, P_expr, A_expr, msh = self._compile()
        cell = np.zeros(1, dtype=np.int32)
        P = np.zeros((n, d, d))
        A = np.zeros((n, d, d, d, d))
        for k in range(n):
            Fc.value[:] = F[k]
            P[k] = P_expr.eval(msh, cell).reshape(d, d)
            A[k] = A_expr.eval(msh, cell).reshape(d, d, d, d)
        return P, A

    def _compile(self) -> tuple:
        if self._kernels is None:
            d = self.dim
            if d == 2:
                msh = dolfinx.mesh.create_unit_square(MPI.COMM_SELF, 1, 1)
            else:
                msh = dolfinx.mesh.create_unit_cube(MPI.COMM_SELF, 1, 1, 1)
            Fc = dolfinx.fem.Constant(msh, np.eye(d))
            Fv = ufl.variable(Fc)
            Pu = ufl.diff(self.energy_form(Fv, self.phases[0]), Fv)
            Au = ufl.diff(Pu, Fv)
            x0 = np.full((1, d), 1.0 / (d + 1))
            self._kernels = (Fc, dolfinx.fem.Expression(Pu, x0), dolfinx.fem.Expression(Au, x0), msh)
        return self._kernels
