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

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fe2ml.config import MACRO_NEWTON, NewtonOptions
from fe2ml.errors import ConfigError, Fe2mlError, SolverError
from fe2ml.laws.base import ConstitutiveLaw, FormLaw

__all__ = ["DirichletSpec", "MacroProblem", "PressureSpec", "TractionSpec"]


@dataclass(frozen=True)
class DirichletSpec:
    """Prescribed displacement component(s) on a named boundary.

    Attributes:
        boundary: boundary name.
        components: displacement components (0..d-1).
        value: number or expression of x, y, z, t (safe expression).
    """

    boundary: str
    components: tuple
    value: object = 0.0


@dataclass(frozen=True)
class TractionSpec:
    """Nominal (reference) traction on a named boundary: a vector of numbers or expressions of t."""

    boundary: str
    value: tuple


@dataclass(frozen=True)
class PressureSpec:
    """Pressure on a named boundary (number or expression of t).

    Force per current area against the outward normal; at finite strain it follows the deformation
    (Nanson: t da = -p J F^-T N dA).
    """

    boundary: str
    value: object


@dataclass
class StepRecord:
    """History of one converged load step."""

    t: float
    iterations: int
    residuals: list = field(default_factory=list)
    cuts: int = 0


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
        orientation: 2D, with a law: angle in degrees (number or expression of x, y, z, pi) of the RVE's
            frame at each point; the law sees Qᵀ F̄ Q and returns Q P̄ Qᵀ (and Ā rotated alike).
        newton: :class:`fe2ml.config.NewtonOptions` (default ``MACRO_NEWTON``).
    """

    def __init__(self, comm, mmesh, *, law: ConstitutiveLaw | FormLaw, kinematics: str | None = None, degree=1,
                 quadrature_degree=None, dirichlet=(), tractions=(), pressures=(), orientation=None,
                 newton: NewtonOptions | None = None):
        from petsc4py import PETSc

        import basix
        import basix.ufl
        import dolfinx
        import dolfinx.fem.petsc  # noqa: F401
        import ufl

        from fe2ml.expr import parse_expression

        self.comm = comm
        self.mm = mmesh
        msh = mmesh.mesh
        self.msh = msh
        self.d = d = msh.geometry.dim
        self.law = law
        if kinematics is not None and kinematics != law.kinematics:
            raise ConfigError(f"kinematics {kinematics} does not fit the law ({law.kinematics} strain)")
        kinematics = law.kinematics
        self.kinematics = kinematics
        self.newton = newton or MACRO_NEWTON
        if law.dim != d:
            raise ConfigError(f"the RVE is {law.dim}D but the macro mesh is {d}D")
        form_law = law if isinstance(law, FormLaw) else None
        self.form_law = form_law
        self.degree = degree
        q = quadrature_degree if quadrature_degree is not None else (1 if degree == 1 else 2)
        self.qdeg = q
        self.V = V = dolfinx.fem.functionspace(msh, ("Lagrange", degree, (d,)))
        self.u = dolfinx.fem.Function(V, name="u")
        v, du = ufl.TestFunction(V), ufl.TrialFunction(V)
        md = {"quadrature_degree": q, "quadrature_scheme": "default"}
        tdim = msh.topology.dim
        self.n_owned = msh.topology.index_map(tdim).size_local
        self.cells = np.arange(self.n_owned, dtype=np.int32)
        cellname = msh.basix_cell()
        self.qpoints, self.qweights = basix.make_quadrature(cellname, q)
        self.nqp = len(self.qweights)
        F = ufl.Identity(d) + ufl.grad(self.u)
        self.F_expr = dolfinx.fem.Expression(F, self.qpoints)
        self.x_expr = dolfinx.fem.Expression(ufl.SpatialCoordinate(msh), self.qpoints)

        # boundaries: facet tags with one id per name
        fdim = tdim - 1
        self.bnames = list(mmesh.boundaries)
        if len(self.bnames) > 62:
            raise ConfigError(f"mesh: {len(self.bnames)} named boundaries; at most 62 are supported")
        # a facet may belong to several names (a box face and a named curve of the mesh file): one tag per
        # combination of names, the same on every rank; name k integrates over the tags of its combinations
        imap = msh.topology.index_map(fdim)
        masks = np.zeros(imap.size_local + imap.num_ghosts, dtype=np.int64)
        for k, name in enumerate(self.bnames):
            masks[np.asarray(mmesh.boundaries[name], dtype=np.int32)] |= np.int64(1) << k
        ent = np.flatnonzero(masks).astype(np.int32)
        combos = sorted(set().union(*comm.allgather(set(np.unique(masks[ent]).tolist()))))
        cid = {c: i + 1 for i, c in enumerate(combos)}
        self.ftags = dolfinx.mesh.meshtags(msh, fdim, ent, np.array([cid[int(m)] for m in masks[ent]],
                                                                    dtype=np.int32))
        ds = ufl.Measure("ds", domain=msh, subdomain_data=self.ftags)
        self._bids = {name: tuple(cid[c] for c in combos if c >> k & 1) for k, name in enumerate(self.bnames)}
        self._bsize = {}
        for name in self.bnames:
            ids = self._bids[name]
            self._bsize[name] = comm.allreduce(dolfinx.fem.assemble_scalar(dolfinx.fem.form(
                dolfinx.fem.Constant(msh, 1.0) * ds(ids)))) if ids else 0.0

        def bid(name, where):
            if name not in self.bnames:
                raise ConfigError(f"{where}: unknown boundary {name!r}; available: {', '.join(self.bnames)}")
            if self._bsize[name] <= 0:
                raise ConfigError(f"{where}: boundary {name!r} is empty on this mesh")
            return self._bids[name]

        # Dirichlet conditions
        self.bcs, self._bc_updates = [], []
        self.reaction_dofs: dict[str, list] = {}
        names = {"x", "y", "z", "t"}
        for k, spec in enumerate(dirichlet):
            where = f"bcs[{k}]"
            bid(spec.boundary, where)
            facets = mmesh.boundaries[spec.boundary]
            tree = parse_expression(spec.value, names, where=f"{where}.value")
            for c in spec.components:
                if not isinstance(c, int) or not 0 <= c < d:
                    raise ConfigError(f"{where}.components: component {c!r} does not exist in {d}D "
                                      f"(allowed 0..{d - 1})")
                Vc, _ = V.sub(c).collapse()
                dofs = dolfinx.fem.locate_dofs_topological((V.sub(c), Vc), fdim, facets)
                g = dolfinx.fem.Function(Vc)
                self.bcs.append(dolfinx.fem.dirichletbc(g, dofs, V.sub(c)))
                self._bc_updates.append((g, tree))
            self.reaction_dofs.setdefault(spec.boundary, [])
        bs = V.dofmap.index_map_bs
        nown = V.dofmap.index_map.size_local * bs
        for name in list(self.reaction_dofs):
            per_c = []
            for c in range(d):
                Vc, _ = V.sub(c).collapse()
                dofs = dolfinx.fem.locate_dofs_topological((V.sub(c), Vc), fdim, mmesh.boundaries[name])[0]
                per_c.append(dofs[dofs < nown])
            self.reaction_dofs[name] = per_c
        # tractions
        self._tractions = []
        Lext = 0
        for k, spec in enumerate(tractions):
            where = f"tractions[{k}]"
            i = bid(spec.boundary, where)
            if len(spec.value) != d:
                raise ConfigError(f"{where}.value: expected {d} components, got {len(spec.value)}")
            trees = [parse_expression(vv, {"t"}, where=f"{where}.value") for vv in spec.value]
            T = dolfinx.fem.Constant(msh, np.zeros(d))
            self._tractions.append((T, trees))
            Lext = Lext + ufl.inner(T, v) * ds(i)
        # pressures: follower loads at finite strain (their derivative enters the Jacobian)
        self._pressures = []
        Lp = 0
        Nref = ufl.FacetNormal(msh)
        for k, spec in enumerate(pressures):
            where = f"pressures[{k}]"
            i = bid(spec.boundary, where)
            tree = parse_expression(spec.value, {"t"}, where=f"{where}.value")
            pc = dolfinx.fem.Constant(msh, 0.0)
            self._pressures.append((pc, tree))
            if kinematics == "finite":  # Nanson: -p J F^-T N on the reference boundary
                Lp = Lp - pc * ufl.det(F) * ufl.inner(ufl.dot(ufl.inv(F).T, Nref), v) * ds(i)
            else:
                Lp = Lp - pc * ufl.inner(Nref, v) * ds(i)
        Lext = Lext + Lp
        self.report_boundaries = list(dict.fromkeys([s.boundary for s in dirichlet] + [s.boundary for s in tractions]
                                                    + [s.boundary for s in pressures]))
        self._umean_forms = {name: [dolfinx.fem.form(self.u[c] * ds(self._bids[name])) for c in range(d)]
                             for name in self.report_boundaries}

        # constitutive path
        dxq = ufl.dx(domain=msh, metadata=md)
        if form_law is None:
            QP = basix.ufl.quadrature_element(cellname, value_shape=(d, d), degree=q)
            QA = basix.ufl.quadrature_element(cellname, value_shape=(d, d, d, d), degree=q)
            self.Pq = dolfinx.fem.Function(dolfinx.fem.functionspace(msh, QP))
            self.Aq = dolfinx.fem.Function(dolfinx.fem.functionspace(msh, QA))
            self._qdofs_P = self.Pq.function_space.dofmap.list[: self.n_owned]
            self._qdofs_A = self.Aq.function_space.dofmap.list[: self.n_owned]
            i, j, k_, l_ = ufl.indices(4)
            Rint = ufl.inner(self.Pq, ufl.grad(v)) * dxq
            Jac = ufl.inner(ufl.as_tensor(self.Aq[i, j, k_, l_] * ufl.grad(du)[k_, l_], (i, j)), ufl.grad(v)) * dxq
            self.P_expr = None
        else:
            tags = mmesh.cell_tags
            keys = list(form_law.phases)
            if keys != [0]:
                if tags is None:
                    raise ConfigError(f"analytic materials for phases {keys} need a macro mesh with phase tags")
                have = sorted(set().union(*comm.allgather(set(np.unique(tags.values).tolist()))))
                miss = [t for t in have if t not in keys]
                if miss:
                    raise ConfigError(f"macro mesh phase tag(s) {miss} have no analytic material")
            dxp = ufl.Measure("dx", domain=msh, subdomain_data=tags, metadata=md)
            Pi = 0
            Rint = 0
            Fv = ufl.variable(F)
            Pexprs = {}
            for t in keys:
                meas = dxq if t == 0 else dxp(t)
                Pt = form_law.stress_form(Fv, t)
                if kinematics == "finite":
                    Pi = Pi + form_law.energy_form(Fv, t) * meas
                else:
                    Rint = Rint + ufl.inner(Pt, ufl.grad(v)) * meas
                Pexprs[t] = Pt
            if kinematics == "finite":
                Rint = ufl.derivative(Pi, self.u, v)
            Jac = ufl.derivative(Rint, self.u, du)
            # for output: P at quadrature points (per-phase expressions selected by tag per cell)
            self.P_exprs = {t: dolfinx.fem.Expression(e, self.qpoints) for t, e in Pexprs.items()}
            self.cell_phase = (np.zeros(self.n_owned, dtype=np.int32) if keys == [0] else
                               _cell_values(tags, self.n_owned))
        self.Rint_form = dolfinx.fem.form(Rint)
        self.R_form = dolfinx.fem.form(Rint - Lext) if self._tractions or self._pressures else self.Rint_form
        if self._pressures and kinematics == "finite":
            Jac = Jac - ufl.derivative(Lp, self.u, du)
        self.J_form = dolfinx.fem.form(Jac)
        self.A = dolfinx.fem.petsc.create_matrix(self.J_form)
        self.b = dolfinx.fem.petsc.create_vector(V)
        self.du = dolfinx.fem.Function(V)
        self.ksp = PETSc.KSP().create(comm)
        self.ksp.setOptionsPrefix("fe2ml_macro_")
        self.ksp.setType("preonly")
        self.ksp.getPC().setType("lu")
        self.ksp.getPC().setFactorSolverType("mumps")
        self.ksp.setFromOptions()
        self.timers = {"constitutive_s": 0.0, "assembly_s": 0.0, "solve_s": 0.0, "output_s": 0.0}
        self.history: list[StepRecord] = []
        self.t = 0.0
        self.stop_requested = None  # callable -> bool (e.g. SIGTERM seen); checked collectively per iteration
        self.n_qp_local = self.n_owned * self.nqp
        self.n_qp_global = comm.allreduce(self.n_qp_local)
        # material frames: the RVE's x axis at angle theta(x) (2D)
        self.Q = None
        if orientation is not None:
            from fe2ml.expr import evaluate, numpy_funcs

            if form_law is not None or d != 2:
                raise ConfigError("material.orientation: needs an RVE, surrogate or hybrid law in 2D")
            tree = parse_expression(orientation, {"x", "y", "z", "pi"}, where="material.orientation")
            X = self.quadrature_points()
            env = {"x": X[:, 0], "y": X[:, 1], "z": X[:, 2] if X.shape[1] > 2 else np.zeros(len(X)), "pi": np.pi}
            th = np.radians(np.broadcast_to(np.asarray(evaluate(tree, env, numpy_funcs()), dtype=float), len(X)))
            c, s_ = np.cos(th), np.sin(th)
            self.Q = np.stack([np.stack([c, -s_], -1), np.stack([s_, c], -1)], -2)  # columns: RVE axes

    # ------------------------------------------------------------------------------------------
    def quadrature_points(self) -> np.ndarray:
        """Physical coordinates of this rank's quadrature points, (n_local, d)."""
        return self.x_expr.eval(self.msh, self.cells).reshape(-1, self.d)

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

    def _update_constitutive(self) -> str | None:
        """Evaluate the law at every owned quadrature point; returns an error message or None (collective)."""
        if self.form_law is not None:
            return None
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
            if self.Q is None:
                P, A = self.law.evaluate(F)
            else:  # the law in its own frame: W(F) = W_rve(Qᵀ F Q)
                Q = self.Q
                P, A = self.law.evaluate(self.rve_frame(F))
                P = np.einsum("nia,nab,njb->nij", Q, P, Q, optimize=True)
                A = np.einsum("nia,njb,nkc,nld,nabcd->nijkl", Q, Q, Q, Q, A, optimize=True)
            self.Pq.x.array.reshape(-1, d * d)[self._qdofs_P.ravel()] = P.reshape(-1, d * d)
            self.Aq.x.array.reshape(-1, d**4)[self._qdofs_A.ravel()] = A.reshape(-1, d**4)
            self.Pq.x.scatter_forward()
            self.Aq.x.scatter_forward()
        except Fe2mlError as e:
            k = getattr(e, "index", None)
            where = ""
            if k is not None:
                x = self.quadrature_points()[k]
                where = f"macro point at x = {np.round(x[:d], 6).tolist()} (rank {self.comm.rank}): "
            msg = where + str(e)
        self.timers["constitutive_s"] += time.perf_counter() - t0
        msgs = self.comm.allgather(msg)
        return next((m for m in msgs if m is not None), None)

    def _set_loads(self, t: float) -> None:

        from fe2ml.expr import evaluate, numpy_funcs

        fn = numpy_funcs()
        for g, tree in self._bc_updates:
            def f(x, tree=tree):
                val = evaluate(tree, {"x": x[0], "y": x[1], "z": x[2], "t": t}, fn)
                return np.broadcast_to(np.asarray(val, dtype=float), x.shape[1:]).copy()

            g.interpolate(f)
        for T, trees in self._tractions:
            T.value[:] = [float(evaluate(tr, {"t": t}, fn)) for tr in trees]
        for pc, tree in self._pressures:
            pc.value = float(evaluate(tree, {"t": t}, fn))

    def _residual(self) -> float:
        from petsc4py import PETSc

        import dolfinx.fem.petsc

        t0 = time.perf_counter()
        with self.b.localForm() as loc:
            loc.set(0.0)
        dolfinx.fem.petsc.assemble_vector(self.b, self.R_form)
        # lifting of the prescribed increment g − u: the first Newton step spreads the boundary motion
        # through the domain instead of distorting the boundary layer of elements
        dolfinx.fem.petsc.apply_lifting(self.b, [self.J_form], bcs=[self.bcs], x0=[self.u.x.petsc_vec], alpha=-1.0)
        self.b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(self.b, self.bcs, self.u.x.petsc_vec, -1.0)
        self.timers["assembly_s"] += time.perf_counter() - t0
        return self.b.norm()

    def _solve_increment(self) -> bool:
        from petsc4py import PETSc

        import dolfinx.fem.petsc

        t0 = time.perf_counter()
        self.A.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(self.A, self.J_form, bcs=self.bcs)
        self.A.assemble()
        t1 = time.perf_counter()
        self.ksp.setOperators(self.A)
        self.b.scale(-1.0)  # J du = −b; on Dirichlet rows du = g − u
        ok = True
        try:
            self.ksp.solve(self.b, self.du.x.petsc_vec)
            ok = self.ksp.getConvergedReason() > 0
        except PETSc.Error:
            ok = False
        self.du.x.scatter_forward()
        ok = ok and bool(np.all(np.isfinite(self.du.x.array)))
        ok = self.comm.allreduce(ok, op=_land())
        if ok:
            self.u.x.array[:] += self.du.x.array
        self.timers["assembly_s"] += t1 - t0
        self.timers["solve_s"] += time.perf_counter() - t1
        return ok

    def _newton(self, t) -> tuple[bool, list, str | None]:
        opts = self.newton
        self._set_loads(t)
        res = []
        r0 = None
        for _ in range(opts.max_it + 1):
            if self.stop_requested is not None and self.comm.allreduce(bool(self.stop_requested()), op=_lor()):
                raise RunInterrupted("SIGTERM received")
            msg = self._update_constitutive()
            if msg is not None:
                return False, res, msg
            r = self._residual()
            res.append(r)
            if not np.isfinite(r):
                return False, res, "non-finite macro residual"
            if r0 is None:
                r0 = r
                self._rref = max(getattr(self, "_rref", 0.0), r0)
            if r <= max(opts.rtol * max(r0, self._rref), opts.atol):
                return True, res, None
            if len(res) > opts.max_it:
                break
            if not self._solve_increment():
                return False, res, "macro linear solve failed"
        return False, res, f"macro Newton did not converge in {opts.max_it} iterations (|r| = {res[-1]:.3e})"

    def save_checkpoint(self, folder: Path) -> None:
        """Atomic per-rank checkpoint of the converged state (collective): u, time, history, law states.

        ``folder/rank{r}.npz`` for every rank, then ``folder/meta.json`` on rank 0 once all are written.
        """
        folder = Path(folder)
        r = self.comm.rank
        if r == 0:
            folder.mkdir(parents=True, exist_ok=True)
        self.comm.barrier()
        imap = self.V.dofmap.index_map
        bs = self.V.dofmap.index_map_bs
        X = self.V.tabulate_dof_coordinates()[: imap.size_local]
        data = {"u": self.u.x.array[: imap.size_local * bs].copy(), "t": self.t,
                "global_range": np.array(imap.local_range), "dof_coords": X}
        for k, v in self.law.state_arrays().items():
                data[f"law_{k}"] = v
        tmp = folder / f"rank{r}.tmp.npz"
        np.savez(tmp, **data)
        os.replace(tmp, folder / f"rank{r}.npz")
        self.comm.barrier()
        if r == 0:
            meta = {"t": self.t, "steps": len(self.history), "ranks": self.comm.size,
                    "history": [{"t": h.t, "iterations": h.iterations, "cuts": h.cuts, "residuals": h.residuals}
                                for h in self.history], "rref": getattr(self, "_rref", 0.0)}
            tmpm = folder / "meta.json.tmp"
            tmpm.write_text(json.dumps(meta))
            os.replace(tmpm, folder / "meta.json")
        self.comm.barrier()

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore a checkpoint written by :meth:`save_checkpoint` (same mesh, same number of ranks).

        Raises:
            ConfigError: missing/incomplete checkpoint, other rank count, or a different dof layout.
        """
        folder = Path(folder)
        meta_p = folder / "meta.json"
        if not meta_p.is_file():
            raise ConfigError(f"{folder}: no checkpoint (meta.json missing): the run has no converged step")
        meta = json.loads(meta_p.read_text())
        if meta["ranks"] != self.comm.size:
            raise ConfigError(f"{folder}: checkpoint written by {meta['ranks']} rank(s); restart with "
                              f"mpiexec -n {meta['ranks']}")
        d = np.load(folder / f"rank{self.comm.rank}.npz")
        imap = self.V.dofmap.index_map
        bs = self.V.dofmap.index_map_bs
        X = self.V.tabulate_dof_coordinates()[: imap.size_local]
        ok = d["u"].shape[0] == imap.size_local * bs and np.allclose(d["dof_coords"], X, atol=1e-12)
        if not self.comm.allreduce(ok, op=_land()):
            raise ConfigError(f"{folder}: the macro mesh or its partition differs from the checkpoint's")
        self.u.x.array[: imap.size_local * bs] = d["u"]
        self.u.x.scatter_forward()
        self.t = float(d["t"])
        self.law.load_state_arrays({k[4:]: d[k] for k in d.files if k.startswith("law_")})
        self.history = [StepRecord(t=h["t"], iterations=h["iterations"], residuals=h["residuals"], cuts=h["cuts"])
                        for h in meta["history"]]
        self._rref = meta.get("rref", 0.0)
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
        last_msg = None
        while t < t_new - 1e-14:
            target = min(t + dt, t_new)
            u_save = self.u.x.array.copy()
            ok, res, msg = self._newton(target)
            if ok:
                self.law.commit()
                residuals.append(res)
                its_total += len(res) - 1
                t = target
                continue
            last_msg = msg
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
        rec = StepRecord(t=t_new, iterations=its_total, residuals=residuals, cuts=cuts)
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------
    def reactions(self) -> dict:
        """Reaction force per Dirichlet boundary, {name: (d,)} (collective).

        The sum over the boundary's dofs of internal minus external nodal forces: what the support carries,
        including loads applied directly at constrained dofs (e.g. a pressure next to a symmetry plane).
        """
        from petsc4py import PETSc

        import dolfinx.fem.petsc

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
        import dolfinx

        return {name: np.array([self.comm.allreduce(dolfinx.fem.assemble_scalar(f)) for f in forms])
                / self._bsize[name] for name, forms in self._umean_forms.items()}

    def cell_averages(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell averages (quadrature-weighted) of F̄ and P̄ over owned cells, each (n_owned, d, d)."""
        d = self.d
        w = self.qweights / self.qweights.sum()
        F = self._F_qp().reshape(self.n_owned, self.nqp, d, d)
        if self.form_law is None:
            P = self.Pq.x.array.reshape(-1, d * d)[self._qdofs_P.ravel()].reshape(self.n_owned, self.nqp, d, d)
        else:
            P = np.zeros((self.n_owned, self.nqp, d, d))
            for t, ex in self.P_exprs.items():
                sel = np.where(self.cell_phase == t)[0].astype(np.int32) if t != 0 else self.cells
                if len(sel):
                    P[sel] = ex.eval(self.msh, sel).reshape(len(sel), self.nqp, d, d)
        return np.einsum("q,cqij->cij", w, F), np.einsum("q,cqij->cij", w, P)

    def close(self):
        """Free PETSc objects."""
        for name in ("ksp", "A", "b"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()
                setattr(self, name, None)


def _cell_values(tags, n_owned):
    vals = np.zeros(n_owned, dtype=np.int32)
    idx = tags.indices
    keep = idx < n_owned
    vals[idx[keep]] = tags.values[keep]
    return vals


def _land():
    from mpi4py import MPI

    return MPI.LAND


def _lor():
    from mpi4py import MPI

    return MPI.LOR


class RunInterrupted(Fe2mlError):
    """The run was asked to stop (SIGTERM); the last converged step is checkpointed."""


class RunWriter:
    """Writes a run's outputs after every converged step (rank 0 writes text files).

    Files in ``out``: ``fields.xdmf`` (u, F̄ and P̄ cell averages per step), ``reactions.csv``,
    ``summary.json`` (rewritten after every step, so a crash leaves the last converged step),
    ``reactions.png`` at the end.
    """

    def __init__(self, problem: MacroProblem, out: Path, *, config_path: str = "", restart_step: int = 0):
        import dolfinx

        self.p = problem
        self.out = Path(out)
        self.comm = problem.comm
        self.rank0 = self.comm.rank == 0
        d = problem.d
        msh = problem.msh
        name = "fields.xdmf" if restart_step == 0 else f"fields_from_step{restart_step + 1}.xdmf"
        self.xdmf = dolfinx.io.XDMFFile(self.comm, str(self.out / name), "w")
        self.xdmf.write_mesh(msh)
        self.V1 = dolfinx.fem.functionspace(msh, ("Lagrange", 1, (d,)))
        self.u1 = dolfinx.fem.Function(self.V1, name="u")
        T = dolfinx.fem.functionspace(msh, ("DG", 0, (d, d)))
        self.Fc = dolfinx.fem.Function(T, name="F")
        self.Pc = dolfinx.fem.Function(T, name="P")
        self._tdofs = T.dofmap.list[: problem.n_owned, 0]
        self.rows: list = []
        self.config_path = config_path
        self.t_start = time.perf_counter()
        self.csv_header = ["t"]
        for name in problem.report_boundaries:
            if name in problem.reaction_dofs:
                self.csv_header += [f"{name}_R{c + 1}" for c in range(d)]
            self.csv_header += [f"{name}_u{c + 1}_mean" for c in range(d)]
        if self.rank0 and restart_step == 0:
            with open(self.out / "reactions.csv", "w", newline="") as f:
                csv.writer(f).writerow(self.csv_header)
            (self.out / "quadrature.h5").unlink(missing_ok=True)
        elif self.rank0:  # keep the rows and quadrature data of the checkpointed steps only
            with open(self.out / "reactions.csv", newline="") as f:
                rows = list(csv.reader(f))
            self.rows = [[float(v) for v in r] for r in rows[1:restart_step + 1]]
            with open(self.out / "reactions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.csv_header)
                for r in rows[1:restart_step + 1]:
                    w.writerow(r)
            import h5py

            if (self.out / "quadrature.h5").exists():
                with h5py.File(self.out / "quadrature.h5", "a") as f:
                    for g in [g for g in f if int(g.split("_")[1]) > restart_step]:
                        del f[g]
                    f.attrs["steps"] = restart_step

    def write_step(self, status="running", message=""):
        """Append the current (converged) state to all outputs (collective)."""
        t0 = time.perf_counter()
        p = self.p
        d = p.d
        self.u1.interpolate(p.u)
        Fc, Pc = p.cell_averages()
        self.Fc.x.array.reshape(-1, d * d)[self._tdofs] = Fc.reshape(-1, d * d)
        self.Pc.x.array.reshape(-1, d * d)[self._tdofs] = Pc.reshape(-1, d * d)
        self.Fc.x.scatter_forward()
        self.Pc.x.scatter_forward()
        for f in (self.u1, self.Fc, self.Pc):
            self.xdmf.write_function(f, p.t)
        self._write_quadrature()
        R = p.reactions()
        U = p.mean_displacements()
        row = [p.t]
        for name in p.report_boundaries:
            if name in p.reaction_dofs:
                row += R[name].tolist()
            row += U[name].tolist()
        self.rows.append(row)
        if self.rank0:
            with open(self.out / "reactions.csv", "a", newline="") as f:
                csv.writer(f).writerow([f"{v:.12e}" for v in row])
        p.timers["output_s"] += time.perf_counter() - t0
        self.write_summary(status, message)

    def _write_quadrature(self):
        """Append F̄ (and cell quantities, when the law computes them) of this step to ``quadrature.h5``.

        Gathered to rank 0, ordered by coordinates (rank independent): the input of ``fe2ml localize``.
        """
        p = self.p
        ids, x = p.quadrature_point_ids()
        F = p._F_qp()
        Frve = p.rve_frame(F) if p.Q is not None else None
        cells = p.law.cell_quantities() if p.form_law is None else None
        cq = None
        if cells:
            keys = ("stretch", "J", "E", "sigma", "von_mises", "volume")
            cq = {k: np.array([c.cell[k] for c in cells]) for k in keys}
            cq["phase_F"] = np.array([c.phase["F"] for c in cells])
            cq["phase_volume"] = np.array([c.phase["volume"] for c in cells])
        parts = self.comm.gather((ids, x, F, cq, Frve), root=0)
        if not self.rank0:
            return
        import h5py

        ids = np.concatenate([q[0] for q in parts])
        order = np.lexsort(np.concatenate([q[1] for q in parts]).T[::-1])  # by coordinates: rank-independent
        k = len(p.history)
        with h5py.File(self.out / "quadrature.h5", "a") as f:
            g = f.create_group(f"step_{k}")
            g.attrs["t"] = p.t
            g["x"] = np.concatenate([q[1] for q in parts])[order]
            g["F"] = np.concatenate([q[2] for q in parts])[order]
            g["point_id"] = ids[order]
            if parts[0][4] is not None:  # the F̄ the RVEs saw (material.orientation)
                g["F_rve"] = np.concatenate([q[4] for q in parts])[order]
            if all(q[3] is not None for q in parts):
                for key in parts[0][3]:
                    g[f"cells/{key}"] = np.concatenate([q[3][key] for q in parts])[order]
            f.attrs["steps"] = k

    def write_summary(self, status, message=""):
        """Rewrite summary.json (collective: gathers law timings)."""
        p = self.p
        stats = dict(p.law.stats)
        all_stats = self.comm.gather(stats, root=0)
        timers = self.comm.gather(dict(p.timers), root=0)
        if not self.rank0:
            return
        cons = [t["constitutive_s"] for t in timers]
        summary = {
            "status": status,
            "message": message,
            "config": self.config_path,
            "t": p.t,
            "ranks": self.comm.size,
            "quadrature_points": p.n_qp_global,
            "dofs": p.V.dofmap.index_map.size_global * p.V.dofmap.index_map_bs,
            "wall_s": time.perf_counter() - self.t_start,
            "time_split_s": {
                "rve_or_constitutive": float(np.max(cons)),
                "macro_assembly": float(np.max([t["assembly_s"] for t in timers])),
                "macro_solve": float(np.max([t["solve_s"] for t in timers])),
                "output": float(np.max([t["output_s"] for t in timers])),
            },
            "constitutive_time_per_rank_s": cons,
            "law_s": float(max(st.get("time_s", 0.0) for st in all_stats)) if all_stats else 0.0,
            "load_balance_max_over_mean": float(np.max(cons) / np.mean(cons)) if np.mean(cons) > 0 else 1.0,
            "rve_solves": int(sum(s.get("rve_solves", 0) for s in all_stats)),
            "surrogate_s": float(max(s.get("surrogate_s", 0.0) for s in all_stats)) if all_stats else 0.0,
            "fallbacks": int(sum(s.get("fallbacks", 0) for s in all_stats)),
            "fallbacks_per_step": [int(sum(v)) for v in zip(*[s.get("fallbacks_per_step", []) for s in all_stats],
                                                             strict=False)],
            "rve_newton_iterations": int(sum(s.get("newton_its", 0) for s in all_stats)),
            "steps": [{"t": h.t, "newton_iterations": h.iterations, "cuts": h.cuts, "residuals": h.residuals}
                      for h in p.history],
        }
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, self.out / "summary.json")

    def close(self):
        """Close the XDMF file and draw the reaction curve (collective)."""
        self.xdmf.close()
        if self.rank0 and self.rows:
            from fe2ml.plotting import plot_reactions

            plot_reactions(self.csv_header, np.array(self.rows), self.out / "reactions.png")


def progress_line(k, n, t, rec, comm, width=24):
    """Progress bar on rank 0."""
    if comm.rank != 0:
        return
    done = int(width * k / n)
    r = rec.residuals[-1][-1] if rec.residuals and rec.residuals[-1] else float("nan")
    cut = f", {rec.cuts} cut(s)" if rec.cuts else ""
    print(f"  [{'#' * done}{'.' * (width - done)}] step {k}/{n} t={t:.3f} Newton its {rec.iterations} "
          f"|r|={r:.2e}{cut}", file=sys.stdout, flush=True)
