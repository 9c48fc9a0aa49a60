"""The macroscale problem: Newton with the homogenized tangent, load stepping, run outputs.

The displacement lives on the caller's communicator; load steps are cut collectively.

Constitutive paths:

- a quadrature-point law (the contract of :mod:`fe2ml.laws.base`: RVE/FE², surrogate, hybrid):
  F̄ = I + ∇u is evaluated at the quadrature points of the cells each rank owns, the law returns P̄
  and Ā, which fill quadrature functions; the residual is ∫ P̄ : ∇v dx − ∫ T·v ds and the Jacobian
  ∫ (Ā : ∇du) : ∇v dx, both with the same quadrature rule;
- a form law (:class:`fe2ml.laws.base.FormLaw`, e.g. :class:`fe2ml.laws.analytic.AnalyticLaw`): hyperelastic or
  linear materials written directly in UFL (per macro phase tag), integrated exactly, for single-scale and direct
  numerical simulation runs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI
from petsc4py import PETSc

import basix
import basix.ufl
import dolfinx
import dolfinx.fem.petsc
import dolfinx.geometry
import numpy as np
import ufl

from fe2ml.config import MACRO_NEWTON, NewtonOptions
from fe2ml.errors import ConfigError, Fe2mlError, SolverError
from fe2ml.files import atomic_target, atomic_write
from fe2ml.laws.base import ConstitutiveLaw, FormLaw
from fe2ml.macro.config import MACRO_AUTO_ITERATIVE_DOFS, MacroSolverOptions
from fe2ml.macro.loads import DirichletSpec, PressureSpec, TractionSpec, build_loads, mark_boundaries
from fe2ml.parallel import collective, fault_point

__all__ = ["DirichletSpec", "MacroProblem", "PointProbe", "PressureSpec", "RunInterrupted", "StepRecord",
           "TractionSpec"]


@dataclass
class StepRecord:
    """History of one converged load step."""

    t: float
    iterations: int
    residuals: list = field(default_factory=list)
    cuts: int = 0
    cut_reasons: list = field(default_factory=list)  # why each cut was made (the failed attempt's message)


class PointProbe:
    """Values of a vector function of the macro space at fixed points (collective).

    Each point is evaluated by one rank: the lowest that owns a cell containing it (a point on a cell or rank
    interface is counted once). ``missing``: indices of points that lie in no cell of the mesh; ``rows``: {name: index}
    of the points' names, when given.
    """

    def __init__(self, msh, comm, X, names=None):
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        n, gd = X.shape
        self.comm, self.n = comm, n
        self.rows = {q: i for i, q in enumerate(names)} if names is not None else {}
        self.X = np.zeros((n, 3))
        self.X[:, :gd] = X
        tdim = msh.topology.dim
        owned = np.arange(msh.topology.index_map(tdim).size_local, dtype=np.int32)
        tree = dolfinx.geometry.bb_tree(msh, tdim, entities=owned)
        hits = dolfinx.geometry.compute_colliding_cells(msh, dolfinx.geometry.compute_collisions_points(tree, self.X),
                                                        self.X)
        self.cells = np.array([hits.links(i)[0] if len(hits.links(i)) else -1 for i in range(n)], dtype=np.int32)
        rank = np.where(self.cells >= 0, comm.rank, comm.size).astype(np.int64)
        owner = np.empty_like(rank)
        comm.Allreduce(rank, owner, op=MPI.MIN)
        self.mine = np.flatnonzero(owner == comm.rank)
        self.missing = np.flatnonzero(owner == comm.size)

    def __call__(self, u) -> np.ndarray:
        """The values of ``u`` at the points, (n, value size), on every rank."""
        vs = int(np.prod(u.function_space.value_shape)) if u.function_space.value_shape else 1
        vals = np.zeros((self.n, vs))
        if len(self.mine):
            vals[self.mine] = np.asarray(u.eval(self.X[self.mine], self.cells[self.mine])).reshape(len(self.mine), vs)
        self.comm.Allreduce(MPI.IN_PLACE, vals, op=MPI.SUM)
        return vals


class MacroProblem:
    """Macro boundary value problem.

    Args:
        comm: communicator of the macro mesh.
        mmesh: :class:`fe2ml.macro.mesh.MacroMesh`.
        law: the constitutive law: a quadrature-point :class:`~fe2ml.laws.base.ConstitutiveLaw` or a
            :class:`~fe2ml.laws.base.FormLaw` (integrated in UFL).
        kinematics: ``finite`` or ``small``; must be the law's (default: the law's).
        degree: Lagrange degree of the displacement (1 or 2).
        quadrature_degree: quadrature degree (default 1 for P1, 2 for P2).
        dirichlet: list of :class:`DirichletSpec`.
        tractions: list of :class:`TractionSpec`.
        pressures: list of :class:`PressureSpec`.
        orientation: with a quadrature-point law, ``frames(X)`` -> Q (n, d, d): at each point the columns of Q are
            the RVE's axes in macro coordinates (:func:`fe2ml.macro.loads.frames_from_angle` in 2D,
            :func:`~fe2ml.macro.loads.frames_from_axes` in 3D); the law sees Qᵀ F̄ Q and returns Q P̄ Qᵀ (and Ā
            rotated alike).
        newton: :class:`fe2ml.config.NewtonOptions` (default ``MACRO_NEWTON``).
        solver: the linear solver of the Newton steps (:class:`~fe2ml.macro.config.MacroSolverOptions`; default
            ``auto``: MUMPS below ``MACRO_AUTO_ITERATIVE_DOFS`` dofs, Krylov + GAMG from there on).
    """

    def __init__(self, comm, mmesh, *, law: ConstitutiveLaw | FormLaw, kinematics: str | None = None,
                 degree: int = 1, quadrature_degree: int | None = None, dirichlet: Sequence[DirichletSpec] = (),
                 tractions: Sequence[TractionSpec] = (), pressures: Sequence[PressureSpec] = (),
                 orientation: Callable[[np.ndarray], np.ndarray] | None = None,
                 newton: NewtonOptions | None = None, solver: MacroSolverOptions | None = None):
        self.comm = comm
        self.mm = mmesh
        msh = mmesh.mesh
        self.msh = msh
        self.d = d = msh.geometry.dim
        self.law = law
        if kinematics is not None and kinematics != law.kinematics:
            raise ConfigError(f"kinematics {kinematics} does not fit the law ({law.kinematics} strain)")
        self.kinematics = kinematics = law.kinematics
        self.newton = newton or MACRO_NEWTON
        if law.dim != d:
            raise ConfigError(f"the RVE is {law.dim}D but the macro mesh is {d}D")
        self.form_law = law if isinstance(law, FormLaw) else None
        self._tangent_due = False  # a stress-only evaluation waits for its tangent (see _update_constitutive)
        if orientation is not None and self.form_law is not None:
            raise ConfigError("orientation: needs an RVE, surrogate or hybrid law")
        self.degree = degree
        q = quadrature_degree if quadrature_degree is not None else (1 if degree == 1 else 2)
        self.qdeg = q
        self.V = V = dolfinx.fem.functionspace(msh, ("Lagrange", degree, (d,)))
        self.u = dolfinx.fem.Function(V, name="u")
        v = ufl.TestFunction(V)
        self.md = {"quadrature_degree": q, "quadrature_scheme": "default"}
        self.n_owned = msh.topology.index_map(msh.topology.dim).size_local
        self.cells = np.arange(self.n_owned, dtype=np.int32)
        self.qpoints, self.qweights = basix.make_quadrature(msh.basix_cell(), q)
        self.nqp = len(self.qweights)
        F = ufl.Identity(d) + ufl.grad(self.u)
        self.F_expr = dolfinx.fem.Expression(F, self.qpoints)
        self.x_expr = dolfinx.fem.Expression(ufl.SpatialCoordinate(msh), self.qpoints)
        self._X: np.ndarray | None = None

        # boundaries and loads (:mod:`fe2ml.macro.loads`)
        self.bnd = mark_boundaries(comm, msh, mmesh.boundaries)
        self.loads = build_loads(V, v, F, self.bnd, dirichlet=dirichlet, tractions=tractions, pressures=pressures,
                                 finite=kinematics == "finite")
        self.bcs = self.loads.bcs
        self.reaction_dofs = self.loads.reaction_dofs
        self.report_boundaries = list(dict.fromkeys([s.boundary for s in dirichlet] + [s.boundary for s in tractions]
                                                    + [s.boundary for s in pressures]))
        ds = self.bnd.ds
        self._umean_forms = {name: [dolfinx.fem.form(self.u[c] * ds(self.bnd.ids[name])) for c in range(d)]
                             for name in self.report_boundaries}

        # constitutive terms, the residual and the Jacobian
        du = ufl.TrialFunction(V)
        Rint, Jac = self._law_terms(v, du) if self.form_law is None else self._form_law_terms(F, v, du)
        self.Rint_form = dolfinx.fem.form(Rint)
        ext = self.loads.external
        self.R_form = dolfinx.fem.form(Rint - ext) if ext is not None else self.Rint_form
        if self.loads.follower is not None and kinematics == "finite":
            Jac = Jac - ufl.derivative(self.loads.follower, self.u, du)
        self.J_form = dolfinx.fem.form(Jac)
        self.A = dolfinx.fem.petsc.create_matrix(self.J_form)
        self.b = dolfinx.fem.petsc.create_vector(V)
        self.du = dolfinx.fem.Function(V)
        self.solver = solver or MacroSolverOptions()
        self.solver_kind = self._make_solver(symmetric=not (self.loads.follower is not None
                                                            and kinematics == "finite"))
        self.krylov_iterations = 0
        self.reused_answers = 0  # load steps whose first iterate kept the law's last answer (_newton)
        self._matrix_current = False  # self.A is the Jacobian of the tangent in Aq (no follower load)
        # (u, key) where the last Newton converged, key the law's answer_key() ("form" for a form law); None: no
        # answer to keep
        self._converged: tuple[np.ndarray, object] | None = None
        self._predictor = False  # the next solve lifts a step's increment with the last matrix
        self._gap = np.zeros_like(self.u.x.array)  # g − u on the Dirichlet dofs (_prescribed_increment)
        self.matrix_assemblies = 0
        self._last_increment: tuple[np.ndarray, float] | None = None  # (Δu, Δt) of the last converged (sub)step
        self.timers = {"constitutive_s": 0.0, "assembly_s": 0.0, "solve_s": 0.0, "output_s": 0.0}
        self.history: list[StepRecord] = []
        self.t = 0.0
        self._rref = 0.0
        self.stop_requested: Callable[[], bool] | None = None  # e.g. SIGTERM seen; checked collectively
        self.n_qp_local = self.n_owned * self.nqp
        self.n_qp_global = comm.allreduce(self.n_qp_local)
        # material frames: Q (n, d, d) per point, its columns the RVE's axes in macro coordinates
        self.Q = None
        if orientation is not None:
            X = self.quadrature_points()
            Q = np.asarray(orientation(X), dtype=float)
            if Q.shape != (len(X), d, d) or not np.allclose(np.einsum("nki,nkj->nij", Q, Q), np.eye(d), atol=1e-10):
                raise ConfigError(f"orientation: expected orthonormal frames of shape (n, {d}, {d}) at the "
                                  "quadrature points")
            self.Q = Q

    def _make_solver(self, *, symmetric: bool) -> str:
        """The KSP of the Newton steps; returns ``direct`` or ``iterative``.

        Direct: MUMPS LU. Iterative: conjugate gradients (GMRES where a follower pressure makes the tangent
        unsymmetric) preconditioned by PETSc's smoothed-aggregation GAMG, which is given the nodal block size and
        the rigid-body modes of the displacement space as its near-nullspace (what an elasticity operator's coarse
        grids must represent). Dirichlet rows are identity rows with the columns zeroed, so the operator stays
        symmetric. The Krylov tolerance of each step is tied to the Newton residual (:meth:`_solve_increment`).
        """
        opts = self.solver
        ndofs = self.V.dofmap.index_map.size_global * self.V.dofmap.index_map_bs
        kind = opts.type if opts.type != "auto" else ("iterative" if ndofs >= MACRO_AUTO_ITERATIVE_DOFS else "direct")
        self.ksp = ksp = PETSc.KSP().create(self.comm)
        ksp.setOptionsPrefix("fe2ml_macro_")
        if kind == "direct":
            ksp.setType("preonly")
            ksp.getPC().setType("lu")
            ksp.getPC().setFactorSolverType("mumps")
        else:
            ksp.setType("cg" if symmetric else "gmres")
            ksp.getPC().setType("gamg")
            ksp.setTolerances(rtol=opts.rtol, atol=0.0, max_it=opts.max_it)
            ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
            ksp.setInitialGuessNonzero(True)  # the first increment of a step starts from its prediction
            # the aggregates and prolongations of the first Newton step are kept (the mesh and the sparsity do not
            # change; the tangent's values do): later setups only recompute the Galerkin coarse operators
            db = PETSc.Options()
            if not db.hasName("fe2ml_macro_pc_gamg_reuse_interpolation"):  # PETSC_OPTIONS may say otherwise
                db.setValue("fe2ml_macro_pc_gamg_reuse_interpolation", "true")
            self.A.setBlockSize(self.d)
            self.A.setNearNullSpace(self._rigid_modes())
        ksp.setFromOptions()
        return kind

    def _rigid_modes(self):
        """Translations and rotations of the displacement space, orthonormalised: GAMG's near-nullspace."""
        d = self.d
        imap = self.V.dofmap.index_map
        X = self.V.tabulate_dof_coordinates()[: imap.size_local, :d]
        X = X - self.comm.allreduce(X.sum(axis=0)) / max(self.comm.allreduce(len(X)), 1)
        modes = []
        for i in range(d):
            m = np.zeros((len(X), d))
            m[:, i] = 1.0
            modes.append(m)
        for a, b in [(0, 1)] if d == 2 else [(0, 1), (1, 2), (2, 0)]:
            m = np.zeros((len(X), d))
            m[:, a], m[:, b] = -X[:, b], X[:, a]
            modes.append(m)
        vecs = []
        for m in modes:  # Gram–Schmidt in the global inner product
            v = self.A.createVecRight()
            v.array[:] = m.ravel()
            for w in vecs:
                v.axpy(-v.dot(w), w)
            v.scale(1.0 / v.norm())
            vecs.append(v)
        self._modes = vecs  # kept alive with the matrix
        return PETSc.NullSpace().create(vectors=vecs, comm=self.comm)

    def _law_terms(self, v, du):
        """Residual ∫ P̄ : ∇v dx and Jacobian ∫ (Ā : ∇du) : ∇v dx of a quadrature-point law.

        P̄ and Ā live in quadrature functions that the law fills before each assembly.
        """
        d, q = self.d, self.qdeg
        cellname = self.msh.basix_cell()
        QP = basix.ufl.quadrature_element(cellname, value_shape=(d, d), degree=q)
        QA = basix.ufl.quadrature_element(cellname, value_shape=(d, d, d, d), degree=q)
        self.Pq = dolfinx.fem.Function(dolfinx.fem.functionspace(self.msh, QP))
        self.Aq = dolfinx.fem.Function(dolfinx.fem.functionspace(self.msh, QA))
        # the quadrature dofs of the owned points: a slice where they are numbered point by point (the usual
        # case: an assignment without an index array)
        self._qdofs_P = _as_slice(self.Pq.function_space.dofmap.list[: self.n_owned].ravel())
        self._qdofs_A = _as_slice(self.Aq.function_space.dofmap.list[: self.n_owned].ravel())
        dxq = ufl.dx(domain=self.msh, metadata=self.md)
        i, j, k, l_ = ufl.indices(4)
        Jac = ufl.inner(ufl.as_tensor(self.Aq[i, j, k, l_] * ufl.grad(du)[k, l_], (i, j)), ufl.grad(v)) * dxq
        return ufl.inner(self.Pq, ufl.grad(v)) * dxq, Jac

    def _form_law_terms(self, F, v, du):
        """Residual and Jacobian of a form law, exact in UFL.

        The residual is δΠ for energies (finite strain) or ∫ P : ∇v dx (small strain); the Jacobian its derivative.
        """
        law, msh, comm = self.form_law, self.msh, self.comm
        tags = self.mm.cell_tags
        keys = list(law.phases)
        if keys != [0]:
            if tags is None:
                raise ConfigError(f"analytic materials for phases {keys} need a macro mesh with phase tags")
            have = sorted(set().union(*comm.allgather(set(np.unique(tags.values).tolist()))))
            miss = [t for t in have if t not in keys]
            if miss:
                raise ConfigError(f"macro mesh phase tag(s) {miss} have no analytic material")
        dxq = ufl.dx(domain=msh, metadata=self.md)
        dxp = ufl.Measure("dx", domain=msh, subdomain_data=tags, metadata=self.md)
        Fv = ufl.variable(F)
        Pi, Rint, Pexprs = 0, 0, {}
        for t in keys:
            meas = dxq if t == 0 else dxp(t)
            Pexprs[t] = law.stress_form(Fv, t)
            if self.kinematics == "finite":
                Pi = Pi + law.energy_form(Fv, t) * meas
            else:
                Rint = Rint + ufl.inner(Pexprs[t], ufl.grad(v)) * meas
        # for output: P at quadrature points (per-phase expressions selected by tag per cell)
        self.P_exprs = {t: dolfinx.fem.Expression(e, self.qpoints) for t, e in Pexprs.items()}
        self.cell_phase = (np.zeros(self.n_owned, dtype=np.int32) if keys == [0] else
                           _cell_values(tags, self.n_owned))
        Rint = ufl.derivative(Pi, self.u, v) if self.kinematics == "finite" else Rint
        return Rint, ufl.derivative(Rint, self.u, du)

    # ------------------------------------------------------------------------------------------
    def quadrature_points(self) -> np.ndarray:
        """Physical (reference) coordinates of this rank's quadrature points, (n_local, d); evaluated once."""
        if self._X is None:
            self._X = self.x_expr.eval(self.msh, self.cells).reshape(-1, self.d)
        return self._X

    def quadrature_point_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Global ids (global cell index x points per cell + q) and coordinates of this rank's points."""
        start = self.msh.topology.index_map(self.msh.topology.dim).local_range[0]
        ids = ((start + self.cells)[:, None] * self.nqp + np.arange(self.nqp)[None, :]).ravel()
        return ids.astype(np.int64), self.quadrature_points()

    def rve_frame(self, F: np.ndarray) -> np.ndarray:
        """F̄ at this rank's points in the RVE's frame, Qᵀ F̄ Q (F̄ itself without ``orientation``)."""
        return F if self.Q is None else np.einsum("nki,nkl,nlj->nij", self.Q, F, self.Q, optimize=True)

    def _F_qp(self) -> np.ndarray:
        return self.F_expr.eval(self.msh, self.cells).reshape(-1, self.d, self.d)

    def _update_constitutive(self, tangent: bool = True) -> str | None:
        """Evaluate the law at every owned quadrature point; returns an error message or None (collective).

        ``tangent=False``: the stress only; :meth:`_update_tangent` then sets Ā at the same points (a converged
        Newton iteration needs none).
        """
        if self.form_law is not None:
            return None
        self._tangent_due = not tangent
        d = self.d
        t0 = time.perf_counter()
        msg = None
        F = self._F_qp()
        J = np.linalg.det(F)
        if len(J) and np.any(J <= 0):  # check on every rank first: no rank runs RVEs for a doomed iterate
            k = int(np.argmin(J))
            x = self.quadrature_points()[k]
            msg = (f"inverted macro element: det F̄ = {J[k]:.3g} at x = {np.round(x[:d], 6).tolist()} "
                   f"(rank {self.comm.rank})")
        msgs = self.comm.allgather(msg)
        if any(m is not None for m in msgs):
            self.timers["constitutive_s"] += time.perf_counter() - t0
            return next(m for m in msgs if m is not None)
        try:
            P = self.law.stress(self.rve_frame(F), with_tangent=tangent)
            if self.Q is not None:  # the law in its own frame: W(F) = W_rve(Qᵀ F Q)
                P = np.einsum("nia,nab,njb->nij", self.Q, P, self.Q, optimize=True)
            self.Pq.x.array.reshape(-1, d * d)[self._qdofs_P] = P.reshape(-1, d * d)
            self.Pq.x.scatter_forward()
            if tangent:
                self._set_tangent(self.law.tangent())
        except Fe2mlError as e:
            msg = self._point_message(e)
        self.timers["constitutive_s"] += time.perf_counter() - t0
        msgs = self.comm.allgather(msg)
        return next((m for m in msgs if m is not None), None)

    def _answer_key(self) -> object | None:
        """What keeps the law's answer valid (:meth:`ConstitutiveLaw.answer_key`; a form law: always)."""
        return "form" if self.form_law is not None else self.law.answer_key()

    def _kept(self) -> bool:
        """Whether u is where the last Newton converged and the law's answer there still holds (collective).

        Consumed: a failed Newton's later matrices and answers are not the converged state's.
        """
        c, self._converged = self._converged, None
        same = c is not None and c[1] == self._answer_key() and np.array_equal(c[0], self.u.x.array)
        return bool(self.comm.allreduce(same, op=MPI.LAND))

    def _update_tangent(self) -> str | None:
        """Ā at the points of the last stress-only :meth:`_update_constitutive` (collective); an error or None."""
        if not self._tangent_due:
            return None
        t0 = time.perf_counter()
        msg = None
        try:
            self._set_tangent(self.law.tangent())
        except Fe2mlError as e:
            msg = self._point_message(e)
        self._tangent_due = False
        self.timers["constitutive_s"] += time.perf_counter() - t0
        msgs = self.comm.allgather(msg)
        return next((m for m in msgs if m is not None), None)

    def _set_tangent(self, A: np.ndarray) -> None:
        d = self.d
        self._matrix_current = False
        if self.Q is not None:
            Q = self.Q
            A = np.einsum("nia,njb,nkc,nld,nabcd->nijkl", Q, Q, Q, Q, A, optimize=True)
        self.Aq.x.array.reshape(-1, d**4)[self._qdofs_A] = A.reshape(-1, d**4)
        self.Aq.x.scatter_forward()

    def _point_message(self, e: Fe2mlError) -> str:
        """A law's error at a point, with where the point is."""
        k = getattr(e, "index", None)
        where = ""
        if k is not None:
            x = self.quadrature_points()[k]
            where = f"macro point at x = {np.round(x[:self.d], 6).tolist()} (rank {self.comm.rank}): "
        return where + str(e)

    def _set_loads(self, t: float) -> None:
        """The loads at time t; a load expression that fails on one rank's points (not finite there) fails on all."""
        collective(self.comm, lambda: self.loads.set(t))

    def _prescribed_increment(self) -> bool:
        """Whether a Dirichlet value differs from u at a constrained dof of this rank (ghosts included)."""
        w = self._gap
        for bc in self.bcs:
            dofs = bc.dof_indices()[0]
            w[dofs] = 0.0
            bc.set(w, self.u.x.array, 1.0)  # w = g − u there
            if np.any(w[dofs] != 0.0):
                return True
        return False

    def _residual(self) -> float:

        t0 = time.perf_counter()
        with self.b.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(self.b, self.R_form)
        # lifting of the prescribed increment g − u: the first Newton step spreads the boundary motion
        # through the domain instead of distorting the boundary layer of elements; where u already has the
        # prescribed values (every later iterate) it adds exactly nothing, and the Jacobian's coefficients are
        # not packed for it
        x0 = self.u.x.petsc_vec  # (collective where its wrapper is made: not inside a rank's own branch)
        if self._prescribed_increment():
            dolfinx.fem.petsc.apply_lifting(self.b, [self.J_form], bcs=[self.bcs], x0=[x0], alpha=-1.0)
        self.b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(self.b, self.bcs, self.u.x.petsc_vec, -1.0)
        self.timers["assembly_s"] += time.perf_counter() - t0
        return self.b.norm()

    def _solve_increment(self, forcing: float = 1.0, guess: np.ndarray | None = None) -> str | None:
        """One Newton step J du = −R; returns None, or why it failed (collective).

        Args:
            forcing: |R| / |R of the step's first iteration|. An iterative solve stops at the relative tolerance
                min(solver.rtol, 0.01 · forcing): the Krylov error falls with the Newton residual, so the Newton
                iterations keep converging quadratically.
            guess: the Krylov initial guess of du (this rank's owned entries; iterative solver), e.g. the last
                step's increment scaled to this one; zero without.
        """
        t0 = time.perf_counter()
        if not (self._matrix_current or self._predictor):  # else the last matrix, and its preconditioner, serve again
            self.A.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(self.A, self.J_form, bcs=self.bcs)
            self.A.assemble()
            self.matrix_assemblies += 1
            # a form law's Jacobian moves with u; a follower load's with u and t
            self._matrix_current = self.form_law is None and self.loads.follower is None
        self._predictor = False
        t1 = time.perf_counter()
        self.ksp.setOperators(self.A)
        if self.solver_kind == "iterative":
            self.ksp.setTolerances(rtol=max(min(self.solver.rtol, 0.01 * forcing), 1e-14))
        self.b.scale(-1.0)  # J du = −b; on Dirichlet rows du = g − u
        if self.solver_kind == "iterative":
            owned = self.du.x.petsc_vec.getLocalSize()
            self.du.x.petsc_vec.array[:] = 0.0 if guess is None else guess[:owned]
        why = None
        try:
            self.ksp.solve(self.b, self.du.x.petsc_vec)
            reason = self.ksp.getConvergedReason()
            its = self.ksp.getIterationNumber()
            self.krylov_iterations += its
            if reason <= 0:
                why = (f"macro Krylov solve did not converge ({_ksp_reason(reason)} after {its} iterations, rtol "
                       f"{self.ksp.getTolerances()[0]:.1e}, max_it {self.solver.max_it})"
                       if self.solver_kind == "iterative" else f"macro direct solve failed ({_ksp_reason(reason)})")
        except PETSc.Error as e:
            why = f"macro linear solve failed (PETSc error {e.ierr})"
        self.du.x.scatter_forward()
        if why is None and not np.all(np.isfinite(self.du.x.array)):
            why = "macro linear solve gave a non-finite increment"
        whys = self.comm.allgather(why)
        why = next((w for w in whys if w is not None), None)
        if why is None:
            self.u.x.array[:] += self.du.x.array
            for bc in self.bcs:  # the prescribed values exactly (u + (g − u) may round off g): the later
                bc.set(self.u.x.array)  # iterates of the step need no lifting
        self.timers["assembly_s"] += t1 - t0
        self.timers["solve_s"] += time.perf_counter() - t1
        return why

    def _newton(self, t, guess: np.ndarray | None = None) -> tuple[bool, list, str | None]:
        """Newton iterations at load parameter t; ``guess``: the Krylov initial guess of the first increment."""
        opts = self.newton
        self._set_loads(t)
        res: list[float] = []
        r0 = None
        tol = 0.0
        for _ in range(opts.max_it + 1):
            if self.stop_requested is not None and self.comm.allreduce(bool(self.stop_requested()), op=MPI.LOR):
                raise RunInterrupted("SIGTERM received")
            # a converged iterate needs no tangent: where convergence of order 1.5 from the last two residuals,
            # r_k+1 ≈ r_k^2.5 / r_k−1^1.5 (between the linear and the quadratic rate an inexact Newton shows), comes
            # within 10x of the tolerance, the stress comes first and the tangent only if Newton goes on; the first
            # two iterates always take it (the first lifts the load increment with it)
            lazy = len(res) >= 2 and res[-1] ** 2.5 <= 10.0 * tol * res[-2] ** 1.5
            if not res and self._kept():
                # a step's first iterate is the last step's converged state: a law without history keeps its
                # stress there, and the increment is lifted with the last tangent and matrix computed, one Newton
                # iterate before that state (a predictor: Newton's quadratic rate is that of the later iterates);
                # not with the last matrix where a follower load's Jacobian moves with t
                if self.form_law is None:
                    self._tangent_due = False
                    self.reused_answers += 1
                self._predictor = self.loads.follower is None
            else:
                msg = self._update_constitutive(tangent=not lazy)
                if msg is not None:
                    return False, res, msg
            r = self._residual()
            res.append(r)
            if not np.isfinite(r):
                return False, res, "non-finite macro residual"
            if r0 is None:
                r0 = r
                self._rref = max(self._rref, r0)
                tol = max(opts.rtol * max(r0, self._rref), opts.atol)
            if r <= tol:
                key = self._answer_key()
                self._converged = None if key is None else (self.u.x.array.copy(), key)
                return True, res, None
            if len(res) > opts.max_it:
                break
            msg = self._update_tangent()
            if msg is not None:
                return False, res, msg
            why = self._solve_increment(r / r0 if r0 > 0 else 1.0, guess if len(res) == 1 else None)
            if why is not None:
                return False, res, why
        return False, res, f"macro Newton did not converge in {opts.max_it} iterations (|r| = {res[-1]:.3e})"

    def save_checkpoint(self, folder: Path, *, meta_extra: dict | None = None,
                        arrays_extra: dict[str, np.ndarray] | None = None) -> None:
        """Step-versioned checkpoint of the converged state (collective): u, time, history, law states.

        Every rank writes ``folder/step-K/rank{r}.npz`` (with K and t), rank 0 writes ``step-K/meta.json``; after a
        barrier rank 0 switches the pointer ``folder/latest`` to ``step-K`` in one atomic rename and removes all but
        the last two steps. A kill at any moment leaves ``latest`` at a complete step.

        Args:
            folder: the checkpoint folder.
            meta_extra: more entries of meta.json (rank 0), e.g. the record counts of the run's logs.
            arrays_extra: arrays of rank 0 kept with the step (``rank0.npz``), returned by :meth:`load_checkpoint`
                to every rank as ``meta["arrays"]`` (e.g. the records of in-run learning).
        """
        folder = Path(folder)
        r = self.comm.rank
        k = len(self.history)
        step_dir = folder / f"step-{k}"
        if r == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
        self.comm.barrier()
        imap = self.V.dofmap.index_map
        bs = self.V.dofmap.index_map_bs
        X = self.V.tabulate_dof_coordinates()[: imap.size_local]
        data = {"u": self.u.x.array[: imap.size_local * bs].copy(), "t": self.t, "step": k,
                "global_range": np.array(imap.local_range), "dof_coords": X}
        for key, v in self.law.state_arrays().items():
            data[f"law_{key}"] = v
        if r == 0:
            for key, v in (arrays_extra or {}).items():
                data[f"extra_{key}"] = v
        with atomic_target(step_dir / f"rank{r}.npz") as tmp:
            np.savez(tmp, **data)
        if r == 0:
            meta = {"t": self.t, "steps": k, "ranks": self.comm.size,
                    "history": [{"t": h.t, "iterations": h.iterations, "cuts": h.cuts, "residuals": h.residuals}
                                for h in self.history], "rref": self._rref, **(meta_extra or {})}
            atomic_write(step_dir / "meta.json", json.dumps(meta))
        self.comm.barrier()  # every rank's file of step k is complete
        fault_point(f"{r}:{k}:checkpoint")
        if r == 0:
            atomic_write(folder / "latest", f"step-{k}\n")
            for old in folder.glob("step-*"):
                if old.is_dir() and old.name.split("-")[-1].isdigit() and int(old.name.split("-")[-1]) < k - 1:
                    shutil.rmtree(old, ignore_errors=True)
        self.comm.barrier()

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore the checkpoint ``folder/latest`` points to (same mesh, same number of ranks).

        Every rank checks that its file belongs to the step and time of ``meta.json``; the ranks agree before any
        state is touched.

        Raises:
            ConfigError: missing/incomplete checkpoint, other rank count, files of different steps, or a different
                dof layout.
        """
        folder = Path(folder)
        pointer = folder / "latest"
        if pointer.is_file():
            step_dir = folder / pointer.read_text().strip()
        elif (folder / "meta.json").is_file():  # the layout of earlier versions: one unversioned step
            step_dir = folder
        else:
            raise ConfigError(f"{folder}: no checkpoint (latest missing): the run has no converged step")
        meta_p = step_dir / "meta.json"
        if not meta_p.is_file():
            raise ConfigError(f"{step_dir}: incomplete checkpoint (meta.json missing)")
        meta = json.loads(meta_p.read_text())
        if meta["ranks"] != self.comm.size:
            raise ConfigError(f"{folder}: checkpoint written by {meta['ranks']} rank(s); restart with "
                              f"mpiexec -n {meta['ranks']}")
        rank_file = step_dir / f"rank{self.comm.rank}.npz"
        d = np.load(rank_file) if rank_file.is_file() else None
        mine = None if d is None else (int(d["step"]) if "step" in d.files else meta["steps"], float(d["t"]))
        every = self.comm.allgather(mine)
        if any(m is None or m[0] != meta["steps"] or m[1] != meta["t"] for m in every):
            raise ConfigError(f"{step_dir}: torn checkpoint (rank files of steps/times {every}, meta.json step "
                              f"{meta['steps']} t = {meta['t']}); remove {pointer} to start over")
        imap = self.V.dofmap.index_map
        bs = self.V.dofmap.index_map_bs
        X = self.V.tabulate_dof_coordinates()[: imap.size_local]
        ok = d["u"].shape[0] == imap.size_local * bs and np.allclose(d["dof_coords"], X, atol=1e-12)
        if not self.comm.allreduce(ok, op=MPI.LAND):
            raise ConfigError(f"{folder}: the macro mesh or its partition differs from the checkpoint's")
        self.u.x.array[: imap.size_local * bs] = d["u"]
        self.u.x.scatter_forward()
        self.t = float(d["t"])
        self.law.load_state_arrays({k[4:]: d[k] for k in d.files if k.startswith("law_")})
        self.history = [StepRecord(t=h["t"], iterations=h["iterations"], residuals=h["residuals"], cuts=h["cuts"])
                        for h in meta["history"]]
        self._rref = meta.get("rref", 0.0)
        self._converged = None
        extra = {k[6:]: d[k] for k in d.files if k.startswith("extra_")} if self.comm.rank == 0 else None
        meta["arrays"] = self.comm.bcast(extra, root=0)
        return meta

    def step(self, t_new: float) -> StepRecord:
        """Advance from the current converged state to load parameter ``t_new``, cutting the step on failure.

        Raises:
            SolverError: when ``max_cuts`` halvings do not converge (the last converged state is kept).
        """
        t_old = self.t
        u_old = self.u.x.array.copy()
        dt = t_new - t_old
        t = t_old
        cuts = 0
        its_total = 0
        residuals: list = []
        reasons: list[str] = []
        last_msg = None
        while t < t_new - 1e-14:
            target = min(t + dt, t_new)
            u_save = self.u.x.array.copy()
            guess = None
            if self._last_increment is not None and self._last_increment[1] > 0:  # linear prediction
                guess = self._last_increment[0] * ((target - t) / self._last_increment[1])
            ok, res, msg = self._newton(target, guess)
            if ok:
                self.law.commit()
                residuals.append(res)
                its_total += len(res) - 1
                self._last_increment = (self.u.x.array - u_save, target - t)
                t = target
                continue
            last_msg = msg
            reasons.append(f"t = {target:.6g}: {msg}")
            self.u.x.array[:] = u_save
            self.u.x.scatter_forward()
            self.law.rollback()
            cuts += 1
            if cuts > self.newton.max_cuts:
                self.u.x.array[:] = u_old if t == t_old else self.u.x.array
                self.u.x.scatter_forward()
                self.t = t
                raise SolverError(f"load step to t = {t_new:.6g} failed after {self.newton.max_cuts} step cuts "
                                  f"(last converged t = {t:.6g}): {last_msg}")
            dt *= 0.5
        self.t = t_new
        self.law.finish_step()
        rec = StepRecord(t=t_new, iterations=its_total, residuals=residuals, cuts=cuts, cut_reasons=reasons)
        self.history.append(rec)
        return rec

    def reset(self) -> None:
        """Back to the undeformed state at t = 0 (a new load history on the same mesh and law; collective-free)."""
        self.u.x.array[:] = 0.0
        self.u.x.scatter_forward()
        self.t, self._last_increment, self._rref = 0.0, None, 0.0
        self._converged = None
        self.history.clear()

    def point_probe(self, X, names=None) -> PointProbe:
        """A :class:`PointProbe` of this mesh at the points X (n, d), optionally named (collective)."""
        return PointProbe(self.msh, self.comm, X, names)

    def parameter_sensitivities(self, probe: PointProbe | None = None) -> dict:
        """Forward sensitivities of the converged state to the law's parameters p (collective).

        At equilibrium R(u(p); p) = 0, so K w_j = −∂R/∂p_j with ∂R/∂p_j = ∫ ∂P̄/∂p_j : ∇v and w_j = 0 on Dirichlet
        boundaries (their values do not depend on p). The reactions change by the residual of the linearised stress
        Ā : ∇w_j + ∂P̄/∂p_j on the boundary dofs, the mean displacements by the boundary means of w_j. One tangent
        assembly and k solves with it: far cheaper than a run per parameter.

        Returns:
            {"reactions": {name: (k, d)}, "mean_displacements": {name: (k, d)}}: d(quantity)/dp_j in row j; with a
            ``probe``, also "points": (k, n, d), the displacement at the probe's points.

        Raises:
            SolverError: the law has no parameter derivative, or a solve failed.
        """
        if self.form_law is not None or not hasattr(self.law, "parameter_derivative"):
            raise SolverError("parameter sensitivities need a parametric surrogate law")
        if self.loads.follower is not None and self.kinematics == "finite":
            raise SolverError("parameter sensitivities with follower pressures are not implemented")
        d = self.d
        F = self._F_qp()
        self._update_constitutive()  # P̄ and Ā at the converged state
        if self.Q is None:
            G = self.law.parameter_derivative(F)
        else:
            Q = self.Q
            G = np.einsum("nia,nabm,njb->nijm", Q, self.law.parameter_derivative(self.rve_frame(F)), Q, optimize=True)
        k = self.comm.allreduce(G.shape[-1] if len(G) else 0, op=MPI.MAX)  # a rank may own no points
        P0 = self.Pq.x.array.copy()
        A = self.Aq.x.array.reshape(-1, d**4)[self._qdofs_A].reshape(-1, d, d, d, d)
        self.A.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(self.A, self.J_form, bcs=self.bcs)
        self.A.assemble()
        self.ksp.setOperators(self.A)
        if getattr(self, "_sens_forms", None) is None:  # compiled once
            w = dolfinx.fem.Function(self.V)
            self._sens_forms = (w, dolfinx.fem.Expression(ufl.grad(w), self.qpoints),
                                {name: [dolfinx.fem.form(w[c] * self.bnd.ds(self.bnd.ids[name])) for c in range(d)]
                                 for name in self.report_boundaries})
        w, grad_w, umean = self._sens_forms
        bc_dofs = [bc.dof_indices()[0][: bc.dof_indices()[1]] for bc in self.bcs]
        out: dict = {"reactions": {n: np.zeros((k, d)) for n in self.reaction_dofs},
                     "mean_displacements": {n: np.zeros((k, d)) for n in self.report_boundaries}}
        if probe is not None:
            out["points"] = np.zeros((k, probe.n, d))

        def residual_of(S):
            self.Pq.x.array.reshape(-1, d * d)[self._qdofs_P] = S.reshape(-1, d * d)
            self.Pq.x.scatter_forward()
            f = dolfinx.fem.petsc.assemble_vector(self.Rint_form)
            f.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            return f

        try:
            for j in range(k):
                Gj = G[..., j] if len(G) else np.zeros((0, d, d))
                b = residual_of(Gj)
                b.scale(-1.0)
                for idx in bc_dofs:
                    b.array[idx] = 0.0
                w.x.petsc_vec.set(0.0)
                self.ksp.solve(b, w.x.petsc_vec)
                reason = self.ksp.getConvergedReason()
                b.destroy()
                if self.comm.allreduce(reason <= 0, op=MPI.LOR):
                    raise SolverError(f"parameter sensitivity solve failed ({_ksp_reason(reason)})")
                w.x.scatter_forward()
                if probe is not None:
                    out["points"][j] = probe(w)
                Gw = grad_w.eval(self.msh, self.cells).reshape(-1, d, d)
                f = residual_of(np.einsum("nijkl,nkl->nij", A, Gw) + Gj)
                arr = f.array
                for name, per_c in self.reaction_dofs.items():
                    out["reactions"][name][j] = self.comm.allreduce(np.array([arr[dofs].sum() for dofs in per_c]))
                f.destroy()
                for name, forms in umean.items():
                    out["mean_displacements"][name][j] = np.array(
                        [self.comm.allreduce(dolfinx.fem.assemble_scalar(fm)) for fm in forms]) / self.bnd.size[name]
        finally:
            self.Pq.x.array[:] = P0
            self.Pq.x.scatter_forward()
        return out

    # ------------------------------------------------------------------------------------------
    def reactions(self) -> dict:
        """Reaction force per Dirichlet boundary, {name: (d,)} (collective).

        The sum over the boundary's dofs of internal minus external nodal forces: what the support carries,
        including loads applied directly at constrained dofs (e.g. a pressure next to a symmetry plane).
        """
        f = dolfinx.fem.petsc.assemble_vector(self.R_form)
        f.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        out = {}
        arr = f.array
        for name, per_c in self.reaction_dofs.items():
            loc = np.array([arr[dofs].sum() for dofs in per_c])
            out[name] = self.comm.allreduce(loc)
        f.destroy()
        return out

    def mean_displacements(self) -> dict:
        """Mean displacement over each reported boundary, {name: (d,)} (collective)."""
        return {name: np.array([self.comm.allreduce(dolfinx.fem.assemble_scalar(f)) for f in forms])
                / self.bnd.size[name] for name, forms in self._umean_forms.items()}

    def stress_qp(self) -> np.ndarray:
        """P̄ at this rank's quadrature points (macro frame), (n_local, d, d), ordered as :meth:`quadrature_points`."""
        d = self.d
        if self.form_law is None:
            return self.Pq.x.array.reshape(-1, d * d)[self._qdofs_P].reshape(-1, d, d).copy()
        P = np.zeros((self.n_owned, self.nqp, d, d))
        for t, ex in self.P_exprs.items():
            sel = np.where(self.cell_phase == t)[0].astype(np.int32) if t != 0 else self.cells
            if len(sel):
                P[sel] = ex.eval(self.msh, sel).reshape(len(sel), self.nqp, d, d)
        return P.reshape(-1, d, d)

    def cell_averages(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell averages (quadrature-weighted) of F̄ and P̄ over owned cells, each (n_owned, d, d)."""
        d = self.d
        w = self.qweights / self.qweights.sum()
        F = self._F_qp().reshape(self.n_owned, self.nqp, d, d)
        P = self.stress_qp().reshape(self.n_owned, self.nqp, d, d)
        return np.einsum("q,cqij->cij", w, F), np.einsum("q,cqij->cij", w, P)

    def close(self):
        """Free PETSc objects."""
        for v in getattr(self, "_modes", []):
            v.destroy()
        self._modes = []
        for name in ("ksp", "A", "b"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()
                setattr(self, name, None)


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """``idx`` as a slice where it is 0, 1, ..., n − 1, else itself."""
    return slice(0, len(idx)) if np.array_equal(idx, np.arange(len(idx))) else idx


def _ksp_reason(code: int) -> str:
    """PETSc's name of a KSP converged/diverged reason."""
    names = {v: k for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}
    return names.get(code, str(code))


def _cell_values(tags, n_owned):
    vals = np.zeros(n_owned, dtype=np.int32)
    idx = tags.indices
    keep = idx < n_owned
    vals[idx[keep]] = tags.values[keep]
    return vals


class RunInterrupted(Fe2mlError):
    """The run was asked to stop (SIGTERM); the last converged step is checkpointed."""


