"""RVE homogenization on ``MPI.COMM_SELF`` (small strain, linear elastic phases).

Kinematics: u = (F̄ - I)·y + w, y = x - x_c (box centre); in the small-strain setting the macro
strain is ε̄ = sym(F̄ - I). Boundary conditions on the fluctuation w:

- ``periodic``: w periodic, one node fixed. Master/slave reduction: w = T w_r with a prolongation
  matrix P that maps every node to its periodic representative (upper faces -> lower faces,
  corners -> one corner) and drops the fixed node (:mod:`fe2ml.micro.reduction`).
- ``affine``: w = 0 on the whole boundary (P selects interior dofs).
- ``traction`` (minimal kinematic): ∫_Y ∇w dx = 0 enforced by d² Lagrange multipliers, one node
  fixed (translation).

The affine part is an exact member of the displacement space (degree >= 1), so with the assembled
stiffness K and the dof vectors U of the affine fields of the unit strains E_a, the effective
stiffness of the reduced problem is the Schur complement

    |Y| Ĉ_ab = U_a·K U_b - (Tᵀ K U_a)·K_r⁻¹ (Tᵀ K U_b),   K_r = Tᵀ K T,

with one factorisation (MUMPS Cholesky, LU for the saddle-point traction system) and one solve
per unit strain (3 in 2D, 6 in 3D). Forms are compiled once per RVE; nothing is rebuilt per
macro strain. |Y| is the box volume (pores, if any, carry no stress).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

import dolfinx
import dolfinx.fem.petsc
import numpy as np
import scipy.sparse as sp
import ufl

from fe2ml.errors import ConfigError, SolverError
from fe2ml.materials import VOIGT_ORDER, LinearMaterial, to_voigt
from fe2ml.micro.mesh import RVEMesh
from fe2ml.micro.reduction import (
    BCS,
    RVEBox,
    SolverOptions,
    build_reduction,
    check_materials,
    configure_solver,
    destroy_petsc,
    mat_from_scipy,
    mean_gradient_constraints,
    near_nullspace,
    rigid_modes,
    to_dolfinx,
)

__all__ = ["HomogenizationResult", "LinearRVE", "sym_basis"]


def sym_basis(d: int) -> np.ndarray:
    """Unit symmetric strains E_a in ``VOIGT_ORDER[d]`` order, shape (m, d, d).

    E_a = (e_i⊗e_j + e_j⊗e_i)/2 for the pair (i, j) of index a.
    """
    out = []
    for i, j in VOIGT_ORDER[d]:
        E = np.zeros((d, d))
        E[i, j] += 0.5
        E[j, i] += 0.5
        out.append(E)
    return np.array(out)


@dataclass(frozen=True)
class HomogenizationResult:
    """Effective stiffness of an RVE.

    Attributes:
        C: effective stiffness, shape (d, d, d, d), C[i,j,k,l] = ∂σ̄_ij/∂ε̄_kl.
        volume: box volume |Y|.
        mesh_volume: volume of the meshed material (< |Y| for porous RVEs).
        ndofs: number of displacement dofs (before reduction).
        time_s: wall time of this homogenization (assembly, factorisation, solves, averaging).
    """

    C: np.ndarray
    volume: float
    mesh_volume: float
    ndofs: int
    time_s: float

    @property
    def voigt(self) -> np.ndarray:
        """Voigt matrix, ordering ``VOIGT_ORDER[d]``."""
        return to_voigt(self.C)


class LinearRVE(RVEBox):
    """A linear elastic RVE on ``MPI.COMM_SELF``: build once, homogenize many times.

    Args:
        mesh: the RVE mesh (from a file or a generator).
        materials: phase tag -> material with ``stiffness(d)``.
        bc: ``periodic`` (default), ``affine`` or ``traction``.
        degree: polynomial degree of the displacement (1 or 2).
        tol: relative tolerance for periodic node matching.
        petsc_options: extra PETSc options for the reduced solve (prefix handled internally).
        solver: :class:`~fe2ml.micro.reduction.SolverOptions` of the reduced system (default ``auto``).

    Raises:
        MeshError: mesh not periodic with periodic BCs; phase without material.
        ConfigError: unknown BC or degree.
    """

    _count = 0

    def __init__(self, mesh: RVEMesh, materials: dict[int, LinearMaterial], *, bc: str = "periodic",
                 degree: int = 1, tol: float = 1e-8, petsc_options: dict | None = None,
                 solver: SolverOptions | None = None):
        if bc not in BCS:
            raise ConfigError(f"bc: unknown boundary condition {bc!r}; allowed: {', '.join(BCS)}")
        if degree not in (1, 2):
            raise ConfigError(f"degree: expected 1 or 2, got {degree!r}")
        check_materials(mesh, materials)
        self._set_box(mesh, materials, bc=bc, degree=degree, tol=tol)
        d = self.d
        lo, hi = mesh.box

        comm = MPI.COMM_SELF
        self.msh, self.phase_tags, self.cell_ids = to_dolfinx(comm, mesh)
        msh = self.msh
        self.V = V = dolfinx.fem.functionspace(msh, ("Lagrange", degree, (d,)))
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        dx = ufl.Measure("dx", domain=msh, subdomain_data=self.phase_tags)
        eps = lambda w: ufl.sym(ufl.grad(w))  # noqa: E731
        self._Cconst = {}
        a = None
        for tag in mesh.tags:
            C = dolfinx.fem.Constant(msh, np.asarray(materials[tag].stiffness(d), dtype=np.float64))
            self._Cconst[tag] = C
            i, j, k, l = ufl.indices(4)
            term = ufl.as_tensor(C[i, j, k, l] * eps(u)[k, l], (i, j))
            a_t = ufl.inner(term, eps(v)) * dx(tag)
            a = a_t if a is None else a + a_t
        self.a_form = dolfinx.fem.form(a)
        one = dolfinx.fem.Constant(msh, 1.0)
        self.mesh_volume = float(dolfinx.fem.assemble_scalar(dolfinx.fem.form(one * ufl.dx(domain=msh))))

        # dof coordinates (per block) relative to the box centre, affine-field vectors U
        X = V.tabulate_dof_coordinates()[:, :d]
        nb = X.shape[0]
        self.ndofs = nb * d
        Y = X - self.centre
        self._Y = Y
        self.E_basis = sym_basis(d)
        m = len(self.E_basis)
        self.U = np.zeros((self.ndofs, m))
        for a_idx, E in enumerate(self.E_basis):
            self.U[:, a_idx] = (Y @ E.T).ravel()  # u_i = E_ij y_j at block b -> dof b*d+i

        # prolongation P (n x n_r) and, for traction, the constraint matrix G (n_r x d²)
        self.T_sp, self.n_reduced, self._fixed_block = build_reduction(X, lo, hi, bc, tol=tol, source=mesh.source,
                                                                       n=self.ndofs)
        self.T = mat_from_scipy(self.T_sp, bsize=d)
        self._X_blocks = X
        if bc == "traction":
            self.G_r = np.asarray(self.T_sp.T @ mean_gradient_constraints(V, v, d))
        # matrices and solver, created once
        self.Kt = dolfinx.fem.petsc.assemble_matrix(self.a_form)
        self.Kt.assemble()
        self._Kr: Any = None
        self._Kr_base: Any = None
        LinearRVE._count += 1
        self._prefix = f"fe2ml_rve{LinearRVE._count}_"
        self.ksp: Any = PETSc.KSP().create(PETSc.COMM_SELF)
        self.ksp.setOptionsPrefix(self._prefix)
        self.solver = configure_solver(self.ksp, solver or SolverOptions(), ndofs=self.ndofs,
                                       saddle=bc == "traction", factor="lu" if bc == "traction" else "cholesky")
        opts: Any = PETSc.Options()
        for k_, v_ in (petsc_options or {}).items():
            opts[self._prefix + k_] = v_
        self.ksp.setFromOptions()
        self._result: HomogenizationResult | None = None
        self._w = None
        self._X: np.ndarray | None = None  # the unit strains' solutions (fluctuations, multipliers) of the last call
        self._nns = None

    # -- core -------------------------------------------------------------------------------
    def _reduced_operator(self):
        """Assemble K, form K_r = Pᵀ K P (+ traction constraints) and factorise."""
        self.Kt.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(self.Kt, self.a_form)
        self.Kt.assemble()
        if self._Kr_base is None:
            self._Kr_base = self.Kt.PtAP(self.T)
        else:
            self.Kt.PtAP(self.T, result=self._Kr_base)
        Kr = self._Kr_base
        if self.bc == "traction":
            ia, ja, va = Kr.getValuesCSR()
            n = self.n_reduced
            Ks = sp.csr_matrix((va, ja, ia), shape=(n, n))
            Gs = sp.csr_matrix(self.G_r)
            Aug = sp.bmat([[Ks, Gs], [Gs.T, None]], format="csr")
            if self._Kr is not None:
                self._Kr.destroy()
            self._Kr = mat_from_scipy(Aug)
        else:
            self._Kr = Kr
            Kr.setOption(PETSc.Mat.Option.SYMMETRIC, True)
            Kr.setOption(PETSc.Mat.Option.SPD, True)
            if self.solver == "iterative":  # rigid-body modes of the reduced space: GAMG's coarse grids keep them
                if self._nns is None:
                    self._nns = near_nullspace(rigid_modes(self.T_sp, self._X_blocks, self.n_reduced))
                Kr.setNearNullSpace(self._nns)
        self.ksp.setOperators(self._Kr)
        try:
            self.ksp.setUp()
        except PETSc.Error as e:
            raise SolverError(f"{self.rve_mesh.source}: factorisation of the RVE system failed "
                              f"(PETSc error {e.ierr}); is a phase missing stiffness?") from None

    def homogenize(self) -> HomogenizationResult:
        """Effective stiffness from the m = d(d+1)/2 unit strains with one factorisation.

        Returns:
            The :class:`HomogenizationResult` (also cached on the object).

        Raises:
            SolverError: if the factorisation or a solve fails.
        """
        t0 = time.perf_counter()
        self._reduced_operator()
        m = self.U.shape[1]
        nr = self._Kr.getSize()[0]
        K, T = self.Kt, self.T
        u = K.createVecRight()
        Ku = K.createVecLeft()
        r = self._Kr.createVecLeft()
        x = self._Kr.createVecRight()
        X = np.zeros((nr, m))
        rtmp = T.createVecRight()
        for a in range(m):
            u.array[:] = self.U[:, a]
            K.mult(u, Ku)
            T.multTranspose(Ku, rtmp)
            r.array[: self.n_reduced] = -rtmp.array
            if nr > self.n_reduced:
                r.array[self.n_reduced:] = 0.0
            guess = self._X if self.solver == "iterative" else None
            if guess is not None:  # Krylov warm start from the last homogenization's fluctuations
                x.array[:] = guess[:, a]
            self.ksp.setInitialGuessNonzero(guess is not None)
            self.ksp.solve(r, x)
            reason = self.ksp.getConvergedReason()
            if reason < 0:
                raise SolverError(f"{self.rve_mesh.source}: RVE solve failed (KSP reason {reason})")
            X[:, a] = x.array
        # |Y| Ĉ = WᵀKW with W = U + T X the unit strains' fields with their fluctuations. At the exact X this is
        # UᵀKU − RᵀX (R = −TᵀKU, X = K_r⁻¹R); its error is quadratic in X's (the energy is stationary there), so
        # the iterative solver's tolerance enters Ĉ squared.
        W = self.U + self.T_sp @ X[: self.n_reduced]
        KW = np.zeros_like(W)
        for a in range(m):
            u.array[:] = W[:, a]
            K.mult(u, Ku)
            KW[:, a] = Ku.array
        for obj in (u, Ku, r, x, rtmp):
            obj.destroy()
        Chat = W.T @ KW / self.volume
        self._X = X
        d = self.d
        C = np.zeros((d, d, d, d))
        for a_, (i, j) in enumerate(VOIGT_ORDER[d]):
            for b_, (k, l) in enumerate(VOIGT_ORDER[d]):
                for ii, jj in {(i, j), (j, i)}:
                    for kk, ll in {(k, l), (l, k)}:
                        C[ii, jj, kk, ll] = Chat[a_, b_]
        res = HomogenizationResult(C=C, volume=self.volume, mesh_volume=self.mesh_volume, ndofs=self.ndofs,
                                   time_s=time.perf_counter() - t0)
        self._result = res
        return res

    def _strain(self, H) -> np.ndarray:
        H = np.asarray(H, dtype=np.float64)
        if H.shape != (self.d, self.d) or not np.all(np.isfinite(H)):
            raise ConfigError(f"macro strain must be a finite {self.d}x{self.d} array, got shape {H.shape}")
        return 0.5 * (H + H.T)

    def stress(self, H) -> np.ndarray:
        """Macro stress σ̄ = C̄ : sym(H) for a displacement gradient H = F̄ - I, shape (d, d)."""
        eps = self._strain(H)
        res = self._result if self._result is not None else self.homogenize()
        return np.einsum("ijkl,kl->ij", res.C, eps)

    def fluctuation(self, H):
        """Fluctuation field w (dolfinx Function) and total u for the macro strain sym(H).

        Args:
            H: macro displacement gradient, shape (d, d).

        Returns:
            Tuple ``(w, u)`` of dolfinx Functions on the RVE displacement space.
        """
        eps = self._strain(H)
        if self._result is None:
            self.homogenize()
        coef = np.array([eps[i, j] * (1 if i == j else 2) for i, j in VOIGT_ORDER[self.d]])
        w = dolfinx.fem.Function(self.V, name="w")
        w.x.array[:] = self.T_sp @ (self._X[: self.n_reduced] @ coef)
        u = dolfinx.fem.Function(self.V, name="u")
        u.x.array[:] = w.x.array + self.U @ coef
        return w, u

    def close(self) -> None:
        """Free the PETSc objects (also done when the object is garbage collected)."""
        destroy_petsc(self, ("ksp", "Kt", "T"))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
