"""What every RVE solver shares: the dolfinx mesh, the fluctuation's reduction, the mean-gradient constraints.

The mesh of an RVE, the reduction of the fluctuation for a boundary condition, the mean-gradient constraints of
minimal kinematic BCs, and PETSc bookkeeping.

The fluctuation w of u = (F̄ − I)·y + w is reduced to independent unknowns by a matrix T (n x n_r), w = T w_r:

- ``periodic``: every node maps to its periodic representative (upper faces -> lower faces, corners -> one
  corner); the node nearest the lower corner is fixed;
- ``affine``: boundary nodes are removed (w = 0 on ∂Y);
- ``traction`` (minimal kinematic): one node is fixed; ∫_Y ∇w dx = 0 is added by the solver with d² multipliers.

The reduced operator is ``K.PtAP(T)`` (T is called the reduction, not P, which is the Piola stress).
"""

from __future__ import annotations

from petsc4py import PETSc

import basix.ufl
import dolfinx
import dolfinx.fem.petsc
import numpy as np
import scipy.sparse as sp
import ufl

from fe2ml.errors import ConfigError, MeshError
from fe2ml.micro.mesh import CELL_TYPES, RVEMesh, periodic_node_map
from fe2ml.micro.options import AUTO_ITERATIVE_DOFS, BCS, SolverOptions  # re-exported

__all__ = ["AUTO_ITERATIVE_DOFS", "BCS", "RVEBox", "SolverOptions", "augmented_block", "build_reduction",
           "check_materials", "configure_solver", "destroy_petsc", "mat_from_scipy", "mean_gradient_constraints",
           "mixed_fieldsplit", "near_nullspace", "rigid_modes", "to_dolfinx"]


def to_dolfinx(comm, rm: RVEMesh):
    """Create a dolfinx mesh and phase/cell-id meshtags from an :class:`RVEMesh`.

    Args:
        comm: communicator (``MPI.COMM_SELF`` for RVEs).
        rm: the RVE mesh.

    Returns:
        Tuple ``(mesh, phase_tags, cell_ids)``: dolfinx mesh, MeshTags of phases, and an array of
        biological-cell ids indexed by local dolfinx cell.
    """
    d, name, perm = CELL_TYPES[rm.cell_type]
    cells = rm.cells if perm is None else rm.cells[:, perm]
    el = basix.ufl.element("Lagrange", name, 1, shape=(rm.dim,))
    msh = dolfinx.mesh.create_mesh(comm, np.ascontiguousarray(cells, dtype=np.int64), ufl.Mesh(el),
                                   np.ascontiguousarray(rm.points))
    tdim = msh.topology.dim
    nloc = msh.topology.index_map(tdim).size_local
    orig = np.asarray(msh.topology.original_cell_index)[:nloc]
    ph = rm.phases[orig].astype(np.int32)
    tags = dolfinx.mesh.meshtags(msh, tdim, np.arange(nloc, dtype=np.int32), ph)
    return msh, tags, rm.cell_ids[orig]


def mat_from_scipy(S, bsize: int = 1):
    """A sequential PETSc AIJ matrix from a scipy sparse matrix (``bsize``: its row and column block size).

    The reduction T of a displacement space has the nodal blocks of d dofs on both sides; with ``bsize = d`` the
    reduced operator TᵀKT inherits them, and GAMG aggregates nodes instead of single dofs (half the set-up).
    """
    S = S.tocsr()
    S.sort_indices()
    M = PETSc.Mat().createAIJ(size=S.shape, bsize=bsize, csr=(S.indptr.astype(PETSc.IntType),
                                                              S.indices.astype(PETSc.IntType), S.data),
                              comm=PETSc.COMM_SELF)
    M.assemble()
    return M


def check_materials(mesh: RVEMesh, materials: dict) -> None:
    """Every phase tag of the mesh needs a material."""
    missing = [t for t in mesh.tags if t not in materials]
    if missing:
        raise MeshError(f"{mesh.source}: phase tag(s) {missing} have no material "
                        f"(materials given for {sorted(materials)})")


def configure_solver(ksp, options: SolverOptions, *, ndofs: int, saddle: bool, factor: str = "cholesky",
                     mixed: bool = False) -> str:
    """Set up the KSP of an RVE for the chosen solver; returns ``direct`` or ``iterative``.

    The displacement formulation with periodic or affine BCs gives a symmetric positive definite reduced system:
    CG + GAMG. The mixed (u–p) formulation gives a symmetric saddle-point system: MINRES with a block-diagonal
    field-split preconditioner (:func:`mixed_fieldsplit`, set up per operator by the RVE). Minimal kinematic
    (traction) BCs give a saddle-point system in the mean-gradient multipliers, for which ``iterative`` is
    refused and ``auto`` stays direct.

    Args:
        ksp: the PETSc KSP of the reduced system.
        options: the solver options.
        ndofs: displacement dofs of the RVE (for ``auto``).
        saddle: the reduced system has the traction BCs' multipliers.
        factor: the direct factorization (``cholesky``: MUMPS LDLᵀ, indefinite allowed; or ``lu``).
        mixed: the reduced system is the mixed formulation's (displacements, then pressures).

    Raises:
        ConfigError: ``iterative`` with traction BCs.
    """
    kind = options.type
    if kind == "auto":
        kind = "iterative" if ndofs >= AUTO_ITERATIVE_DOFS and not saddle else "direct"
    if kind == "iterative" and saddle:
        raise ConfigError("solver.type iterative needs periodic or affine BCs (traction BCs add mean-gradient "
                          "multipliers, a saddle-point system: use direct)")
    if kind == "direct":
        ksp.setType("preonly")
        ksp.getPC().setType(factor)
        ksp.getPC().setFactorSolverType("mumps")
        return kind
    ksp.setTolerances(rtol=options.rtol, atol=1e-300, max_it=options.max_it)
    if mixed:
        ksp.setType("minres")
        return kind
    ksp.setType("cg")
    ksp.getPC().setType("gamg")
    # plain (unsmoothed) aggregation: a third of the set-up of smoothed aggregation for a few more CG
    # iterations. The set-up is repeated at every Newton iteration, so this is the faster choice for finite
    # strain at every size, and for a linear homogenization (d(d+1)/2 solves) up to ~100k dofs.
    ksp.getPC().setGAMGSmooths(0)
    return kind


def augmented_block(Kr, n_u: int, ratio: np.ndarray):
    """The preconditioning matrix of the mixed formulation's displacement block, with the pressure block as is.

    The reduced mixed system is [[A, B], [Bᵀ, −D]] with D = diag(|e|/K_e) (piecewise-constant pressures). A is
    the deviatoric stiffness only, with nearly free volume changes, which algebraic multigrid approximates
    poorly. The displacement block is preconditioned with the augmented A + B diag(μ_e/|e|) Bᵀ instead: the
    volume changes get back a stiffness of the shear modulus' size, so that block is an elasticity operator of
    moderate compressibility for any K/μ (an augmented-Lagrangian block with parameter μ).

    Args:
        Kr: the reduced PETSc operator (displacements first, n_u of them, then the pressures).
        n_u: number of reduced displacement dofs.
        ratio: K_e/μ_e of the element of each pressure dof.

    Returns:
        (PETSc matrix [[A + B W Bᵀ, B], [Bᵀ, −D]] with W = diag(μ_e/|e|), the diagonal −D).
    """
    ia, ja, va = Kr.getValuesCSR()
    n = Kr.getSize()[0]
    K = sp.csr_matrix((va, ja, ia), shape=(n, n))
    B = K[:n_u, n_u:]
    dpp = K[n_u:, n_u:].diagonal()  # −|e|/K_e
    W = sp.diags(-1.0 / (dpp * ratio))  # μ_e/|e|
    P = sp.bmat([[K[:n_u, :n_u] + B @ W @ B.T, B], [B.T, sp.diags(dpp)]], format="csr")
    return mat_from_scipy(P), dpp


def mixed_fieldsplit(ksp, n_u: int, n: int, nns, schur_diag: np.ndarray, prefix: str):
    """Block-diagonal (Schur ``diag``) field split of the mixed formulation on a KSP with operators set.

    Displacement block: one V-cycle of GAMG (plain aggregation, rigid-body near-nullspace ``nns``) on the
    augmented block of :func:`augmented_block`. Pressure block: the diagonal ``schur_diag`` =
    −|e| (1/K_e + 1/μ_e), spectrally equivalent to the Schur complement −D − Bᵀ A⁻¹ B for an inf-sup stable
    pair (P2–P0) uniformly in K/μ. PETSc flips its sign so the preconditioner is positive definite, as MINRES
    needs.
    """
    pc = ksp.getPC()
    pc.setType("fieldsplit")
    isu = PETSc.IS().createStride(n_u, 0, 1, comm=PETSc.COMM_SELF)
    isu.compose("nearnullspace", nns)
    isp = PETSc.IS().createStride(n - n_u, n_u, 1, comm=PETSc.COMM_SELF)
    pc.setFieldSplitIS(("u", isu), ("p", isp))
    pc.setFieldSplitType(PETSc.PC.CompositeType.SCHUR)
    pc.setFieldSplitSchurFactType(PETSc.PC.FieldSplitSchurFactType.DIAG)
    S = PETSc.Mat().createAIJ(size=(n - n_u, n - n_u), nnz=1, comm=PETSc.COMM_SELF)
    S.setDiagonal(PETSc.Vec().createWithArray(np.ascontiguousarray(schur_diag, dtype=np.float64),
                                              comm=PETSc.COMM_SELF))
    S.assemble()
    pc.setFieldSplitSchurPreType(PETSc.PC.FieldSplitSchurPreType.USER, S)
    opts = PETSc.Options()
    for key, val in (("fieldsplit_u_ksp_type", "preonly"), ("fieldsplit_u_pc_type", "gamg"),
                     ("fieldsplit_u_pc_gamg_agg_nsmooths", 0), ("fieldsplit_p_ksp_type", "preonly"),
                     ("fieldsplit_p_pc_type", "jacobi")):
        if not opts.hasName(prefix + key):
            opts[prefix + key] = val
    ksp.setFromOptions()
    return isu, isp, S


def rigid_modes(T_sp, X: np.ndarray, n_u: int, umap=None) -> np.ndarray:
    """Rigid-body modes (translations, rotations) on the reduced displacement dofs, orthonormal, (k, n_r).

    The reduced displacement dofs are node-blocked (column j d + i: block j, component i, see
    :func:`build_reduction`). Each block gets the coordinates of one full dof it maps to. On a periodic space the
    rotations are not exact null vectors, nor are the translations once a block is fixed, but they are the smooth,
    low-energy modes that algebraic multigrid must represent on its coarse grids (its near-nullspace).

    Args:
        T_sp: the reduction (scipy CSR, n x n_r).
        X: coordinates of the displacement dof blocks (nb, d).
        n_u: number of reduced displacement dofs (the pressures, if any, follow them).
        umap: full-vector index of displacement dof (block b, component i) at b d + i (default identity).
    """
    nb, d = X.shape
    umap = np.arange(nb * d) if umap is None else np.asarray(umap)
    blocked = np.empty(int(umap.max()) + 1, dtype=np.int64)
    blocked[umap] = np.arange(nb * d)
    Tc = T_sp[:, :n_u].tocsc()
    first = Tc.indices[Tc.indptr[:-1]]  # one full dof per reduced column
    Y = X[blocked[first[0::d]] // d]
    Y = Y - Y.mean(axis=0)
    nr = T_sp.shape[1]
    modes = []
    for i in range(d):
        v = np.zeros(nr)
        v[i:n_u:d] = 1.0
        modes.append(v)
    rots = [(0, 1)] if d == 2 else [(0, 1), (1, 2), (2, 0)]
    for a, b in rots:  # u_a = -y_b, u_b = y_a: rotation in the (a, b) plane
        v = np.zeros(nr)
        v[a:n_u:d] = -Y[:, b]
        v[b:n_u:d] = Y[:, a]
        modes.append(v)
    Q, _ = np.linalg.qr(np.array(modes).T)
    return Q.T


def near_nullspace(modes: np.ndarray):
    """A PETSc near-nullspace of the given orthonormal modes (k, n), for algebraic multigrid."""
    vecs = []
    for m in modes:
        v = PETSc.Vec().createSeq(len(m), comm=PETSc.COMM_SELF)
        v.array[:] = m
        vecs.append(v)
    return PETSc.NullSpace().create(vectors=vecs, comm=PETSc.COMM_SELF)


class RVEBox:
    """What every RVE solver knows of its box: mesh, BC, degree, dimension, materials, volume and centre.

    Attributes:
        rve_mesh: the RVE mesh.
        bc: periodic, affine or traction.
        degree: displacement degree.
        d: dimension.
        materials: phase tag -> material.
        volume: box volume |Y|.
        centre: box centre (d,), the origin of y in u = (F̄ − I)·y + w.
    """

    rve_mesh: RVEMesh
    bc: str
    degree: int
    d: int
    materials: dict
    volume: float
    centre: np.ndarray

    def _set_box(self, mesh: RVEMesh, materials: dict, *, bc: str, degree: int, tol: float) -> None:
        """Set the box attributes; checks periodicity of the mesh for periodic BCs."""
        self.rve_mesh = mesh
        self.bc = bc
        self.degree = degree
        self.d = mesh.dim
        self.materials = dict(materials)
        lo, hi = mesh.box
        self.volume = float(np.prod(hi - lo))
        self.centre = 0.5 * (lo + hi)
        if bc == "periodic":
            periodic_node_map(mesh.points, tol=tol, strict=True, source=mesh.source)


def build_reduction(X, lo, hi, bc: str, *, tol: float, source: str, n: int, umap=None, pmap=None):
    """Reduction matrix T (n x n_r) of the fluctuation for a BC, on dof blocks at coordinates X.

    Periodic: every block maps to its periodic representative, the block nearest the lower corner is
    fixed. Affine: boundary blocks are removed. Traction: the block nearest the lower corner is fixed
    (the multipliers are added by the caller). Extra dofs ``pmap`` (pressures) are kept as they are.

    Args:
        X: coordinates of the displacement dof blocks (nb, d).
        lo: lower box corner.
        hi: upper box corner.
        bc: periodic | affine | traction.
        tol: relative matching tolerance.
        source: mesh description for messages.
        n: size of the full dof vector.
        umap: full-vector index of displacement dof (block b, component i) at b*d + i (default identity).
        pmap: full-vector indices of extra dofs kept unreduced.

    Returns:
        (T as scipy CSR, number of reduced displacement dofs, fixed block or None).
    """
    nb, d = X.shape
    umap = np.arange(nb * d) if umap is None else umap
    pmap = np.zeros(0, dtype=np.int64) if pmap is None else pmap
    fixed = None
    if bc == "periodic":
        rep, _ = periodic_node_map(X, tol=tol, strict=True, source=source)
        masters = np.unique(rep)
        fixed = int(masters[np.argmin(np.linalg.norm(X[masters] - lo, axis=1))])
        keep = masters[masters != fixed]
    else:
        rep = np.arange(nb)
        scale = (hi - lo).max()
        on_bnd = np.zeros(nb, dtype=bool)
        for i in range(d):
            on_bnd |= (np.abs(X[:, i] - lo[i]) < tol * scale) | (np.abs(X[:, i] - hi[i]) < tol * scale)
        if bc == "affine":
            keep = np.where(~on_bnd)[0]
        else:
            fixed = int(np.argmin(np.linalg.norm(X - lo, axis=1)))
            keep = np.delete(np.arange(nb), fixed)
    col_of = -np.ones(nb, dtype=np.int64)
    col_of[keep] = np.arange(len(keep))
    c = col_of[rep]
    ok = c >= 0
    rows = [umap[np.arange(nb)[ok] * d + i] for i in range(d)] + [pmap]
    nu_r = len(keep) * d
    cols = [c[ok] * d + i for i in range(d)] + [nu_r + np.arange(len(pmap))]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    T = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, nu_r + len(pmap)))
    return T, nu_r, fixed


def mean_gradient_constraints(V, v, d: int) -> np.ndarray:
    """G (n, d²) with G[:, (i,j)] = ∫ ∂_j v_i dx: the constraint ∫ ∇w = 0 of minimal kinematic BCs."""
    msh = V.mesh
    Eij = dolfinx.fem.Constant(msh, np.zeros((d, d)))
    form = dolfinx.fem.form(ufl.inner(ufl.grad(v), Eij) * ufl.dx(domain=msh))
    n = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    G = np.zeros((n, d * d))
    for i in range(d):
        for j in range(d):
            Eij.value[:] = 0.0
            Eij.value[i, j] = 1.0
            vec = dolfinx.fem.petsc.assemble_vector(form)
            G[:, i * d + j] = vec.array
            vec.destroy()
    return G


def destroy_petsc(obj, names) -> None:
    """Destroy PETSc attributes of an RVE object (K, T, KSP, reduced operators)."""
    for name in names:
        o = getattr(obj, name, None)
        if o is not None:
            o.destroy()
            setattr(obj, name, None)
    if getattr(obj, "_Kr", None) is not None and obj._Kr is not getattr(obj, "_Kr_base", None):
        obj._Kr.destroy()
    if getattr(obj, "_Kr_base", None) is not None:
        obj._Kr_base.destroy()
    obj._Kr = obj._Kr_base = None
