"""Finite-strain RVE: hyperelastic phases, Newton with substepping, P̄ and consistent tangent Ā.

Kinematics: u = (F̄ − I)·y + w on the box Y (y measured from the box centre), F = I + ∇u. The
boundary conditions on w are those of :mod:`fe2ml.micro.reduction` (periodic master/slave reduction,
affine w = 0 on ∂Y, minimal kinematic ∫∇w = 0 with d² multipliers). Plane strain (d = 2) embeds F
in 3D with F33 = 1; energies, stresses and cell quantities are 3D.

Formulations:

- ``displacement``: Lagrange displacement of degree 1 or 2, potential Π = Σ_phase ∫ W(F).
- ``mixed`` (nearly incompressible phases, K/mu of 100–1000): P2 displacement with a
  piecewise-constant pressure p (the inf-sup stable P2–P0 pair), perturbed Lagrangian
  Π = ∫ W_dev(F) + p (J − 1) − p²/(2K), W_dev = W − K/2 (J − 1)². Eliminating p element by element is
  the mean-dilatation method: no volumetric locking. Needs materials with a bulk modulus ``K``
  (neo-Hookean, HGO).

Homogenized quantities from the converged state, with U the dof vectors of the d² affine fields
u = (e_i⊗e_j)·y (exact in the FE space) and T the reduction:

    P̄_ij = (1/|Y|) U_(ij) · R(u)        (R = ∂Π/∂u: the volume average of the first Piola stress)
    |Y| Ā = UᵀKU − (TᵀKU)ᵀ (TᵀKT)⁻¹ (TᵀKU)   (static condensation, d² right-hand sides)

with K the Jacobian at the converged state and one factorisation reused for all d² solves.
Forms are compiled once per RVE; :meth:`HyperelasticRVE.evaluate` loops over a batch of F̄ without
rebuilding anything.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

import basix.ufl
import dolfinx
import dolfinx.fem.petsc
import numpy as np
import scipy.sparse as sp
import ufl

from fe2ml.config import NewtonOptions
from fe2ml.errors import ConfigError, MaterialError, SolverError
from fe2ml.materials import plane_strain_3d
from fe2ml.micro.mesh import RVEMesh
from fe2ml.micro.quantities import NQ, CellQuantities, summaries
from fe2ml.micro.reduction import (
    BCS,
    RVEBox,
    SolverOptions,
    augmented_block,
    build_reduction,
    check_materials,
    configure_solver,
    destroy_petsc,
    mat_from_scipy,
    mean_gradient_constraints,
    mixed_fieldsplit,
    near_nullspace,
    rigid_modes,
    to_dolfinx,
)

__all__ = ["CellQuantities", "EvalResult", "HyperelasticRVE", "NewtonOptions", "RVEState", "resolve_formulation"]


def resolve_formulation(tags, materials: dict, formulation: str) -> str:
    """``auto`` resolved: ``mixed`` when a phase's small-strain K/μ is 50 or more, else ``displacement``."""
    if formulation != "auto":
        return formulation
    ratios = []
    for t in tags:
        mm = materials[t].small_strain_moduli()
        if mm is not None:
            ratios.append(mm[1] / mm[0])
    return "mixed" if ratios and max(ratios) >= 50 else "displacement"


def _material_values(mat) -> dict[str, np.ndarray]:
    """The numbers of a material that a family of RVEs may vary.

    Its numeric fields, ``fibres.i`` (the i-th unit direction) and ``params.NAME`` (an energy expression's parameters).
    """
    out: dict[str, np.ndarray] = {}
    if not dataclasses.is_dataclass(mat):
        return out
    for f in dataclasses.fields(mat):
        v = getattr(mat, f.name)
        if f.name == "fibres":
            out.update({f"fibres.{i}": np.asarray(a, dtype=np.float64) for i, a in enumerate(v)})
        elif f.name == "params" and isinstance(v, dict):
            out.update({f"params.{k}": np.asarray(float(x)) for k, x in v.items()})
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f.name] = np.asarray(float(v))
    return out


def _with_constants(mat, msh) -> tuple[Any, dict]:
    """A copy of a material whose numbers (:func:`_material_values`) are dolfinx Constants on ``msh``, and them."""
    consts = {k: dolfinx.fem.Constant(msh, np.asarray(v, dtype=dolfinx.default_scalar_type))
              for k, v in _material_values(mat).items()}
    out = copy.copy(mat)  # frozen dataclasses: the fields are set past __setattr__ (no validation of Constants)
    for k, c in consts.items():
        if "." not in k:
            object.__setattr__(out, k, c)
    if any(k.startswith("fibres.") for k in consts):
        object.__setattr__(out, "fibres", tuple(consts[f"fibres.{i}"] for i in range(len(mat.fibres))))
    if any(k.startswith("params.") for k in consts):
        object.__setattr__(out, "params", {k: consts[f"params.{k}"] for k in mat.params})
    return out, consts


@dataclass
class RVEState:
    """A converged RVE state, usable as a warm start: macro gradient and reduced unknowns.

    Attributes:
        F: macro deformation gradient (d, d).
        z: reduced unknowns (fluctuation dofs and pressures).
        lam: Lagrange multipliers (traction BCs), else empty.
    """

    F: np.ndarray
    z: np.ndarray
    lam: np.ndarray


@dataclass
class EvalResult:
    """Result of :meth:`HyperelasticRVE.evaluate` for n points.

    Attributes:
        P: homogenized first Piola stress, (n, d, d).
        A: consistent tangent ∂P̄/∂F̄, (n, d, d, d, d).
        iterations: Newton iterations per point (all substeps), (n,).
        substeps: number of (sub)steps per point, (n,).
        cells: per point :class:`CellQuantities` (or None when not requested).
        states: per point converged :class:`RVEState` (warm start for the next evaluation).
        time_s: wall time per point, (n,).
    """

    P: np.ndarray
    A: np.ndarray
    iterations: np.ndarray
    substeps: np.ndarray
    cells: list
    states: list
    time_s: np.ndarray


class HyperelasticRVE(RVEBox):
    """A finite-strain RVE on ``MPI.COMM_SELF``: build once, evaluate batches of F̄.

    Args:
        mesh: the RVE mesh.
        materials: phase tag -> hyperelastic material (``energy(F3)``).
        bc: ``periodic`` (default), ``affine`` or ``traction``.
        formulation: ``displacement``, ``mixed`` or ``auto`` (mixed when a phase has K/mu >= 50).
        degree: displacement degree for ``displacement`` (1 or 2; mixed uses 2).
        tol: relative periodic node-matching tolerance.
        newton: :class:`NewtonOptions`.
        solver: :class:`~fe2ml.micro.reduction.SolverOptions` of the reduced linear systems (default ``auto``).
        variable: the phases' numbers (moduli, fibre directions, energy parameters) enter the forms as dolfinx
            ``Constant`` objects, so that :meth:`set_materials` gives the RVE other values without compiling anything
            (the RVEs of a parametric family on one mesh).

    Raises:
        MeshError: phase without material, non-periodic mesh with periodic BCs.
        ConfigError: unknown BC/formulation/degree.
        MaterialError: mixed formulation with a material without bulk modulus, energy not compilable.
    """

    _count = 0

    def __init__(self, mesh: RVEMesh, materials: dict, *, bc: str = "periodic", formulation: str = "auto",
                 degree: int = 1, tol: float = 1e-8, newton: NewtonOptions | None = None,
                 solver: SolverOptions | None = None, variable: bool = False):
        if bc not in BCS:
            raise ConfigError(f"bc: unknown boundary condition {bc!r}; allowed: {', '.join(BCS)}")
        if formulation not in ("auto", "displacement", "mixed"):
            raise ConfigError(f"formulation: expected auto, displacement or mixed, got {formulation!r}")
        if degree not in (1, 2):
            raise ConfigError(f"degree: expected 1 or 2, got {degree!r}")
        check_materials(mesh, materials)
        formulation = resolve_formulation(mesh.tags, materials, formulation)
        if formulation == "mixed":
            degree = 2
            bad = [t for t in mesh.tags if not hasattr(materials[t], "K")]
            if bad:
                raise MaterialError(f"formulation mixed needs a bulk modulus K for every phase; phase(s) {bad} "
                                    "have none (use neo_hookean/hgo or formulation: displacement)")
        self.formulation = formulation
        self.newton = newton or NewtonOptions()
        self._set_box(mesh, materials, bc=bc, degree=degree, tol=tol)
        d = self.d
        lo, hi = mesh.box
        self.msh, self.phase_tags, self.cell_ids = to_dolfinx(MPI.COMM_SELF, mesh)
        msh = self.msh
        cellname = msh.basix_cell()
        Pu = basix.ufl.element("Lagrange", cellname, degree, shape=(d,))
        if formulation == "mixed":
            Pp = basix.ufl.element("DG", cellname, 0)
            self.Z = dolfinx.fem.functionspace(msh, basix.ufl.mixed_element([Pu, Pp]))
            Vu, mu_ = self.Z.sub(0).collapse()
            _, mp_ = self.Z.sub(1).collapse()
            umap = np.asarray(mu_).reshape(-1)
            pmap = np.asarray(mp_).reshape(-1)
        else:
            self.Z = dolfinx.fem.functionspace(msh, Pu)
            Vu = self.Z
            umap = np.arange(self.Z.dofmap.index_map.size_local * d)
            pmap = np.zeros(0, dtype=np.int64)
        self.Vu = Vu
        self.umap, self.pmap = umap, pmap
        n = self.Z.dofmap.index_map.size_local * self.Z.dofmap.index_map_bs
        self.n = n
        X = Vu.tabulate_dof_coordinates()[:, :d]
        nb = X.shape[0]
        self.ndofs = n
        Y = X - self.centre
        # affine fields of the d² unit gradients e_i⊗e_j: u_i = y_j
        self.U = np.zeros((n, d * d))
        for i in range(d):
            for j in range(d):
                self.U[umap[np.arange(nb) * d + i], i * d + j] = Y[:, j]

        # reduction T: displacement blocks by BC, pressures kept
        self.T_sp, self.n_w, _ = build_reduction(X, lo, hi, bc, tol=tol, source=mesh.source, n=n, umap=umap,
                                                 pmap=pmap)
        self.n_reduced = self.T_sp.shape[1]
        self.T = mat_from_scipy(self.T_sp, bsize=d if formulation == "displacement" else 1)
        self._X_blocks, self._umap, self._nns = X, umap, None
        self._X_sens: np.ndarray | None = None  # the last tangent's fluctuation sensitivities (Krylov warm start)

        # forms
        self.z = dolfinx.fem.Function(self.Z, name="state")
        if formulation == "mixed":
            u, p = ufl.split(self.z)
        else:
            u, p = self.z, None
        F3 = ufl.variable(plane_strain_3d(ufl.Identity(d) + ufl.grad(u)))
        J = ufl.det(F3)
        # P1 on simplices: F is constant in an element and the phases' parameters are constants, so one point
        # integrates every form exactly; otherwise a rule exact for the polynomial part of the integrands.
        simplex = msh.topology.cell_type in (dolfinx.mesh.CellType.triangle, dolfinx.mesh.CellType.tetrahedron)
        qdeg = 1 if simplex and degree == 1 else 2 * degree + (2 if degree == 1 else 0)
        dx = ufl.Measure("dx", domain=msh, subdomain_data=self.phase_tags, metadata={"quadrature_degree": qdeg})
        Pi = 0
        Qexpr = {}
        self._constants: dict | None = None  # phase tag -> {key: Constant} (variable=True)
        if variable:
            self._constants = {}
        for tag in mesh.tags:
            mat = materials[tag]
            if self._constants is not None:
                mat, self._constants[tag] = _with_constants(mat, msh)
            try:
                W_ = mat.energy(F3)
                if getattr(W_, "ufl_shape", None) != ():
                    raise MaterialError(f"phase {tag}: energy must be a scalar UFL expression of F, got shape "
                                        f"{getattr(W_, 'ufl_shape', type(W_).__name__)}")
                if formulation == "mixed":
                    W_ = W_ - mat.K / 2 * (J - 1) ** 2
                    Pi_t = W_ + p * (J - 1) - p**2 / (2 * mat.K)
                    Wphys = W_ + mat.K / 2 * (J - 1) ** 2
                    P3 = ufl.diff(W_, F3) + p * J * ufl.inv(F3).T
                else:
                    Pi_t = W_
                    Wphys = W_
                    P3 = ufl.diff(W_, F3)
                Pi = Pi + Pi_t * dx(tag)
            except MaterialError:
                raise
            except Exception as e:  # UFL errors for malformed user energies
                raise MaterialError(f"phase {tag}: energy could not be built in UFL "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            sig = P3 * F3.T / J
            Egl = 0.5 * (F3.T * F3 - ufl.Identity(3))
            Qexpr[tag] = ufl.as_vector([F3[i, j] for i in range(3) for j in range(3)]
                                       + [Egl[i, j] for i in range(3) for j in range(3)]
                                       + [J, Wphys] + [sig[i, j] for i in range(3) for j in range(3)] + [1.0])
        v = ufl.TestFunction(self.Z)
        dz = ufl.TrialFunction(self.Z)
        R = ufl.derivative(Pi, self.z, v)
        Kf = ufl.derivative(R, self.z, dz)
        try:
            self.R_form = dolfinx.fem.form(R)
            self.Kt_form = dolfinx.fem.form(Kf)
        except Exception as e:
            raise MaterialError(f"energy failed to compile ({str(e).splitlines()[0] if str(e) else e!r})") from None
        self.Vq = dolfinx.fem.functionspace(msh, ("DG", 0, (NQ,)))
        q = ufl.TestFunction(self.Vq)
        self.Q_form = dolfinx.fem.form(sum(ufl.inner(q, Qexpr[t]) * dx(t) for t in mesh.tags))
        self._qdofs = self.Vq.dofmap.list[:, 0]
        self.elem_phase = np.asarray(self.phase_tags.values)

        if bc == "traction":
            vu = ufl.split(v)[0] if formulation == "mixed" else v
            self.G_r = sp.csr_matrix(self.T_sp.T @ mean_gradient_constraints(self.Z, vu, d))
        else:
            self.G_r = None
        self.nlam = d * d if bc == "traction" else 0

        self.Kt = dolfinx.fem.petsc.assemble_matrix(self.Kt_form)
        self.Kt.assemble()
        self.Rvec = dolfinx.fem.petsc.assemble_vector(self.R_form)
        self._Kr_base: Any = None
        self._Kr: Any = None
        HyperelasticRVE._count += 1
        self.ksp: Any = PETSc.KSP().create(PETSc.COMM_SELF)
        self.ksp.setOptionsPrefix(f"fe2ml_hrve{HyperelasticRVE._count}_")
        # direct: MUMPS LDLᵀ (symmetric, indefinite allowed); iterative: CG + GAMG (SolverOptions)
        self.solver = configure_solver(self.ksp, solver or SolverOptions(), ndofs=self.n_w, saddle=bc == "traction",
                                       mixed=formulation == "mixed")
        self._split: Any = None
        self._Pmat: Any = None
        self._elem_of_p = None
        if formulation == "mixed":  # the element of each pressure dof (the field split's scaling: K_e/μ_e there)
            Vp, _ = self.Z.sub(1).collapse()
            self._elem_of_p = np.empty(Vp.dofmap.index_map.size_local, dtype=np.int64)
            self._elem_of_p[Vp.dofmap.list[:, 0]] = np.arange(Vp.dofmap.list.shape[0])
        self.ksp.setFromOptions()
        self._material_scales()
        self.stats = {"assemble_s": 0.0, "factor_s": 0.0, "solve_s": 0.0, "factorizations": 0, "krylov_its": 0}

    def _material_scales(self) -> None:
        """What the phases' values set besides the forms: the field split's K/μ per pressure dof, the residual scale."""
        mats, d = self.materials, self.d
        if self._elem_of_p is not None:
            ratio = {}
            for t in self.rve_mesh.tags:
                mm = mats[t].small_strain_moduli()
                ratio[t] = mats[t].K / mm[0] if mm is not None else 1.0
            self._ratio = np.array([ratio[t] for t in np.asarray(self.phase_tags.values)[self._elem_of_p]])
        # residual scale: internal force of a unit affine strain at F = I
        self._set_state(np.zeros((d, d)), np.zeros(self.n_reduced))
        self._factor()
        E = np.zeros((d, d))
        E[0, 0] = 1.0
        u0 = self.Kt.createVecRight()
        u0.array[:] = self.U @ E.ravel()
        out = self.Kt.createVecLeft()
        self.Kt.mult(u0, out)
        KU = out.array.copy()
        u0.destroy()
        out.destroy()
        # (unreduced: the reduced one vanishes for homogeneous periodic cells)
        self.r_scale = float(np.linalg.norm(KU)) or 1.0
        self._X_sens = None

    def set_materials(self, materials: dict) -> None:
        """Give the phases of an RVE built with ``variable=True`` new values; nothing is compiled again.

        ``materials``: phase tag -> material of the same kind as the one the RVE was built with (the same law, energy
        expression and number of fibre families): the RVE then answers as one built with these materials.

        Raises:
            ConfigError: an RVE built without ``variable``, or a phase whose law differs.
        """
        if self._constants is None:
            raise ConfigError("set_materials: this RVE compiled its materials' values (build it with variable=True)")
        for t in self.rve_mesh.tags:
            old, new = self.materials[t], materials.get(t)
            vals = _material_values(new) if new is not None else {}
            if (type(new) is not type(old) or vals.keys() != self._constants[t].keys()
                    or getattr(new, "expr", None) != getattr(old, "expr", None)):
                raise ConfigError(f"phase {t}: {type(new).__name__} {getattr(new, 'name', '')} cannot replace "
                                  f"{type(old).__name__} {getattr(old, 'name', '')} in a compiled RVE (only the "
                                  "values of the same law may change)")
        for t in self.rve_mesh.tags:
            for k, v in _material_values(materials[t]).items():
                self._constants[t][k].value = v
        self.materials = dict(materials)
        self._material_scales()

    # ---------------------------------------------------------------------------------------
    def _set_state(self, H: np.ndarray, z: np.ndarray):
        self.z.x.array[:] = self.U @ H.ravel() + self.T_sp @ z

    def _residual(self, lam) -> np.ndarray:
        t0 = time.perf_counter()
        with self.Rvec.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(self.Rvec, self.R_form)
        R = self.Rvec.array.copy()
        self.stats["assemble_s"] += time.perf_counter() - t0
        return R

    def _factor(self):
        t0 = time.perf_counter()
        self.Kt.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(self.Kt, self.Kt_form)
        self.Kt.assemble()
        t1 = time.perf_counter()
        if self._Kr_base is None:
            self._Kr_base = self.Kt.PtAP(self.T)
        else:
            self.Kt.PtAP(self.T, result=self._Kr_base)
        if self.bc == "traction":
            ia, ja, va = self._Kr_base.getValuesCSR()
            nr = self.n_reduced
            Ks = sp.csr_matrix((va, ja, ia), shape=(nr, nr))
            Aug = sp.bmat([[Ks, self.G_r], [self.G_r.T, None]], format="csr")
            if self._Kr is not None:
                self._Kr.destroy()
            self._Kr = mat_from_scipy(Aug)
        else:
            self._Kr = self._Kr_base
        self._Kr.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        if self.solver == "iterative":
            if self._nns is None:  # rigid-body modes of the reduced space: GAMG's coarse grids represent them
                modes = rigid_modes(self.T_sp, self._X_blocks, self.n_w, self._umap)
                self._nns = near_nullspace(modes[:, : self.n_w])
        if self.solver == "iterative" and self.formulation == "mixed":
            P, dpp = augmented_block(self._Kr, self.n_w, self._ratio)
            if self._split is None:
                self._split = mixed_fieldsplit(self.ksp, self.n_w, self.n_reduced, self._nns, dpp * (1 + self._ratio),
                                               self.ksp.getOptionsPrefix())
            self.ksp.setOperators(self._Kr, P)
            if self._Pmat is not None:
                self._Pmat.destroy()
            self._Pmat = P
        else:
            if self.solver == "iterative":
                self._Kr.setOption(PETSc.Mat.Option.SPD, True)
                self._Kr.setNearNullSpace(self._nns)
            self.ksp.setOperators(self._Kr)
        try:
            self.ksp.setUp()
        except PETSc.Error:
            return False
        finally:
            if hasattr(self, "stats"):
                self.stats["assemble_s"] += t1 - t0
                self.stats["factor_s"] += time.perf_counter() - t1
                self.stats["factorizations"] += 1
        return True

    def _solve(self, rhs: np.ndarray, guess: np.ndarray | None = None) -> np.ndarray | None:
        """Solve K_r x = rhs; ``guess`` is the iterative solver's initial guess (a Krylov warm start)."""
        t0 = time.perf_counter()
        b = self._Kr.createVecLeft()
        x = self._Kr.createVecRight()
        b.array[:] = rhs
        warm = guess is not None and self.solver == "iterative"
        if warm:
            x.array[:] = guess
        self.ksp.setInitialGuessNonzero(warm)
        self.ksp.solve(b, x)
        ok = self.ksp.getConvergedReason() > 0
        self.stats["krylov_its"] += self.ksp.getIterationNumber()
        out = x.array.copy()
        b.destroy()
        x.destroy()
        self.stats["solve_s"] += time.perf_counter() - t0
        return out if ok and np.all(np.isfinite(out)) else None

    def _newton(self, H, z, lam, dH=None):
        """Newton at fixed macro gradient H = F̄ − I from (z, lam). Returns (z, lam, its, R) or None.

        ``dH`` is the jump of H from the gradient at which (z, lam) converged: with the last tangent's
        fluctuation sensitivities X, the first increment is predicted as −X dH, the iterative solver's initial
        guess (the Newton iterates do not depend on it).
        """
        opts = self.newton
        z = z.copy()
        lam = lam.copy()
        r0 = None
        for it in range(opts.max_it + 1):
            self._set_state(H, z)
            R = self._residual(lam)
            r = self.T_sp.T @ R
            if self.nlam:
                r = np.concatenate([r + self.G_r @ lam, self.G_r.T @ z])
            nr = float(np.linalg.norm(r))
            if not np.isfinite(nr):
                return None
            if r0 is None:
                r0 = nr
            if nr <= max(opts.rtol * r0, opts.atol * self.r_scale):
                return z, lam, it, R
            if nr > opts.divergence * max(r0, opts.atol * self.r_scale) or it == opts.max_it:
                return None
            if not self._factor():
                return None
            guess = None
            if it == 0 and dH is not None and self._X_sens is not None:
                guess = -(self._X_sens @ dH.ravel())
            dx_ = self._solve(-r, guess)
            if dx_ is None:
                return None
            z += dx_[: self.n_reduced]
            if self.nlam:
                lam += dx_[self.n_reduced:]
        return None

    def _check_F(self, F, k):
        F = np.asarray(F, dtype=np.float64)
        if F.shape != (self.d, self.d):
            raise ConfigError(f"point {k}: F̄ must have shape ({self.d}, {self.d}), got {F.shape}")
        if not np.all(np.isfinite(F)):
            raise ConfigError(f"point {k}: F̄ has non-finite entries")
        if np.linalg.det(F) <= 0:
            raise ConfigError(f"point {k}: det F̄ = {np.linalg.det(F):.4g} <= 0 (F̄ must preserve orientation)")
        return F

    def solve(self, F, state: RVEState | None = None, *, point: int = 0):
        """Converge the RVE at macro gradient F̄, substepping from ``state`` (or F̄ = I) on failure.

        Args:
            F: macro deformation gradient (d, d).
            state: converged state to start from (warm start); None starts from F̄ = I.
            point: point index for messages.

        Returns:
            Tuple ``(state, iterations, substeps, R)`` with R the full residual at convergence.

        Raises:
            SolverError: when even ``max_cuts`` halvings of the step do not converge.
        """
        F = self._check_F(F, point)
        d = self.d
        if state is None:
            state = RVEState(F=np.eye(d), z=np.zeros(self.n_reduced), lam=np.zeros(self.nlam))
        F0, z, lam = state.F, state.z, state.lam
        t, dt, cuts, its, steps = 0.0, 1.0, 0, 0, 0
        R = None
        while t < 1.0 - 1e-14:
            dt = min(dt, 1.0 - t)
            Ft = F0 + (t + dt) * (F - F0)
            Fz = F0 + t * (F - F0)  # where z converged
            out = self._newton(Ft - np.eye(d), z, lam, Ft - Fz) if np.linalg.det(Ft) > 0 else None
            if out is None:
                cuts += 1
                if cuts > self.newton.max_cuts:
                    raise SolverError(f"point {point}: RVE Newton did not converge at F̄ = {np.round(F, 6).tolist()} "
                                      f"after {self.newton.max_cuts} step halvings (reached t = {t:.4g} of the "
                                      "step from the start state)")
                dt *= 0.5
                continue
            z, lam, k, R = out
            its += k
            steps += 1
            t += dt
            dt = min(2 * dt, 1.0)
        if R is None:  # F == F0: just re-evaluate
            out = self._newton(F - np.eye(d), z, lam)
            if out is None:
                raise SolverError(f"point {point}: RVE did not converge at its own start state")
            z, lam, k, R = out
            its += k
        return RVEState(F=F.copy(), z=z, lam=lam), its, steps, R

    def homogenized(self, R: np.ndarray):
        """P̄ and Ā at the current (converged) state.

        Args:
            R: full residual vector at the state.

        Returns:
            (P̄ (d, d), Ā (d, d, d, d)).
        """
        d = self.d
        Pbar = (self.U.T @ R).reshape(d, d) / self.volume
        if not self._factor():
            raise SolverError("factorisation of the converged RVE Jacobian failed")
        KU = np.zeros((self.n, d * d))
        u = self.Kt.createVecRight()
        out = self.Kt.createVecLeft()
        for a in range(d * d):
            u.array[:] = self.U[:, a]
            self.Kt.mult(u, out)
            KU[:, a] = out.array
        B = self.T_sp.T @ KU
        if self.nlam:
            B = np.vstack([B, np.zeros((self.nlam, d * d))])
        X = np.zeros_like(B)
        for a in range(d * d):
            x = self._solve(B[:, a], None if self._X_sens is None else self._X_sens[:, a])
            if x is None:
                raise SolverError("solve with the converged RVE Jacobian failed")
            X[:, a] = x
        self._X_sens = X
        # |Y| Ā = WᵀKW with W = U − T X_u, the fields of the unit gradients with their fluctuations. It equals
        # UᵀKU − BᵀX at the exact X and its error is quadratic in X's (stationarity of the condensed energy),
        # so the iterative solver's tolerance enters Ā squared.
        W = self.U - self.T_sp @ X[: self.n_reduced]
        KW = np.zeros_like(W)
        for a in range(d * d):
            u.array[:] = W[:, a]
            self.Kt.mult(u, out)
            KW[:, a] = out.array
        u.destroy()
        out.destroy()
        A = W.T @ KW / self.volume
        return Pbar, A.reshape(d, d, d, d)

    def cell_quantities(self) -> CellQuantities:
        """Cell- and phase-level quantities at the current state (see :class:`CellQuantities`)."""
        vec = dolfinx.fem.petsc.assemble_vector(self.Q_form)
        Qe = vec.array.reshape(-1, NQ)[self._qdofs]
        vec.destroy()
        ids = self.cell_ids
        nc = int(ids.max() + 1) if len(ids) and ids.max() >= 0 else 0
        Qc = np.zeros((nc, NQ))
        sel = ids >= 0
        np.add.at(Qc, ids[sel], Qe[sel])
        tags = np.array(self.rve_mesh.tags)
        Qp = np.zeros((len(tags), NQ))
        for k, t in enumerate(tags):
            Qp[k] = Qe[self.elem_phase == t].sum(axis=0)
        cell = summaries(Qc)
        cphase = np.zeros(nc, dtype=np.int64)
        cphase[ids[sel]] = self.elem_phase[sel]
        cell["phase"] = cphase
        elem = summaries(Qe)
        Emax = np.linalg.eigvalsh(elem["E"])[:, -1]
        peak_E = np.array([Emax[self.elem_phase == t].max() for t in tags])
        peak_vm = np.array([elem["von_mises"][self.elem_phase == t].max() for t in tags])
        return CellQuantities(cell_ids=np.arange(nc), cell=cell, phase_tags=tags, phase=summaries(Qp),
                              peak_E=peak_E, peak_von_mises=peak_vm)

    def evaluate(self, F, *, states: list | None = None, cells: bool = True, warm_start: bool = False,
                 progress=None) -> EvalResult:
        """Batched constitutive evaluation F̄ (n, d, d) -> P̄ (n, d, d), Ā (n, d, d, d, d).

        Args:
            F: macro deformation gradients, shape (n, d, d) (or (d, d) for one point).
            states: optional warm-start states, one per point (None entries start from F̄ = I).
            cells: also compute cell-level quantities.
            warm_start: without ``states``, start each point from the previous point's solution
                (good for load paths; falls back to substepping from that state).
            progress: optional callable ``progress(k, n)`` called after each point.

        Returns:
            :class:`EvalResult`.

        Raises:
            ConfigError: wrong shape or det F̄ <= 0 (naming the point).
            SolverError: a point did not converge after all substeps (naming the point and F̄).
        """
        F = np.asarray(F, dtype=np.float64)
        if F.ndim == 2:
            F = F[None]
        d = self.d
        if F.ndim != 3 or F.shape[1:] != (d, d):
            raise ConfigError(f"F̄ must have shape (n, {d}, {d}), got {F.shape}")
        for k in range(len(F)):
            self._check_F(F[k], k)
        n = len(F)
        P = np.zeros((n, d, d))
        A = np.zeros((n, d, d, d, d))
        its = np.zeros(n, dtype=np.int64)
        steps = np.zeros(n, dtype=np.int64)
        tt = np.zeros(n)
        out_cells: list[CellQuantities | None] = []
        out_states: list[RVEState] = []
        for k in range(n):
            t0 = time.perf_counter()
            st = states[k] if states is not None else (out_states[-1] if warm_start and out_states else None)
            state, its[k], steps[k], R = self.solve(F[k], st, point=k)
            P[k], A[k] = self.homogenized(R)
            out_cells.append(self.cell_quantities() if cells else None)
            out_states.append(state)
            tt[k] = time.perf_counter() - t0
            if progress is not None:
                progress(k + 1, n)
        return EvalResult(P=P, A=A, iterations=its, substeps=steps, cells=out_cells, states=out_states, time_s=tt)

    def write_fields(self, path, state: RVEState, *, time_value: float = 0.0) -> None:
        """Write the micro fields of a state to XDMF for ParaView.

        Fields: displacement u (degree-1 interpolation), fluctuation w, element averages of the
        Green–Lagrange strain E, Cauchy stress sigma (3x3), J, von Mises stress, phase and cell id.

        Args:
            path: ``.xdmf`` file (the ``.h5`` is written beside it).
            state: converged state (from :meth:`solve` or :attr:`EvalResult.states`).
            time_value: time stamp.
        """
        H = state.F - np.eye(self.d)
        self._set_state(H, state.z)
        vec = dolfinx.fem.petsc.assemble_vector(self.Q_form)
        Qe = vec.array.reshape(-1, NQ)[self._qdofs]
        vec.destroy()
        s = summaries(Qe)
        msh = self.msh
        V1 = dolfinx.fem.functionspace(msh, ("Lagrange", 1, (self.d,)))
        uf = dolfinx.fem.Function(self.Vu)
        wf = dolfinx.fem.Function(self.Vu)
        uf.x.array[:] = self.z.x.array[self.umap]
        wf.x.array[:] = (self.T_sp @ state.z)[self.umap]
        u1 = dolfinx.fem.Function(V1, name="u")
        w1 = dolfinx.fem.Function(V1, name="w")
        u1.interpolate(uf)
        w1.interpolate(wf)
        T = dolfinx.fem.functionspace(msh, ("DG", 0, (3, 3)))
        S = dolfinx.fem.functionspace(msh, ("DG", 0))
        tdofs = T.dofmap.list[:, 0]
        sdofs = S.dofmap.list[:, 0]
        fields = [u1, w1]
        for name, val in (("E", s["E"]), ("sigma", s["sigma"])):
            f = dolfinx.fem.Function(T, name=name)
            f.x.array.reshape(-1, 9)[tdofs] = val.reshape(-1, 9)
            fields.append(f)
        for name, val in (("J", s["J"]), ("von_mises", s["von_mises"]), ("phase", self.elem_phase),
                          ("cell_id", self.cell_ids)):
            f = dolfinx.fem.Function(S, name=name)
            f.x.array[sdofs] = val
            fields.append(f)
        with dolfinx.io.XDMFFile(MPI.COMM_SELF, str(path), "w") as xf:
            xf.write_mesh(msh)
            for f in fields:
                xf.write_function(f, time_value)

    def close(self) -> None:
        """Free PETSc objects."""
        destroy_petsc(self, ("ksp", "Kt", "T", "Rvec", "_Pmat"))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

