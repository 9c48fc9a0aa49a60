"""Finite-strain RVE: exactness, consistent tangent, objectivity, Hill-Mandel, limits, cells, bad input."""

from mpi4py import MPI

import numpy as np
import pytest
from helpers import box_mesh

from fe2ml.config import NewtonOptions
from fe2ml.errors import ConfigError, MaterialError, SolverError
from fe2ml.materials import ExpressionEnergy, HolzapfelGasserOgden, LinearElastic, NeoHookean, UFLEnergy
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.mesh import make_rve_mesh, read_mesh

COMM = MPI.COMM_WORLD


def nh_P(F, mu, K):
    """Independent numpy neo-Hookean first Piola stress (3x3, complex-safe)."""
    J = F[0, 0] * (F[1, 1] * F[2, 2] - F[1, 2] * F[2, 1]) - F[0, 1] * (F[1, 0] * F[2, 2] - F[1, 2] * F[2, 0]) \
        + F[0, 2] * (F[1, 0] * F[2, 1] - F[1, 1] * F[2, 0])
    cof = np.array([[F[1, 1] * F[2, 2] - F[1, 2] * F[2, 1], F[1, 2] * F[2, 0] - F[1, 0] * F[2, 2],
                     F[1, 0] * F[2, 1] - F[1, 1] * F[2, 0]],
                    [F[0, 2] * F[2, 1] - F[0, 1] * F[2, 2], F[0, 0] * F[2, 2] - F[0, 2] * F[2, 0],
                     F[0, 1] * F[2, 0] - F[0, 0] * F[2, 1]],
                    [F[0, 1] * F[1, 2] - F[0, 2] * F[1, 1], F[0, 2] * F[1, 0] - F[0, 0] * F[1, 2],
                     F[0, 0] * F[1, 1] - F[0, 1] * F[1, 0]]])  # = J F^{-T}
    I1 = np.sum(F * F)
    return mu * J ** (-2 / 3) * (F - I1 / 3 * cof / J) + K * (J - 1) * cof


def nh_response(F2, mu, K):
    """P (d,d) and A (d,d,d,d) by complex step, plane strain when d = 2."""
    d = F2.shape[0]

    def P(Fd):
        F3 = np.eye(3, dtype=Fd.dtype)
        F3[:d, :d] = Fd
        return nh_P(F3, mu, K)[:d, :d]

    h = 1e-30
    A = np.zeros((d, d, d, d))
    for k in range(d):
        for l in range(d):
            E = np.zeros((d, d), dtype=complex)
            E[k, l] = 1j * h
            A[:, :, k, l] = np.imag(P(F2.astype(complex) + E)) / h
    return np.real(P(F2.astype(complex))), A


def rot2(t):
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def rot3(axis, t):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


@pytest.fixture(scope="module")
def cells_mesh(mesh_dir):
    return read_mesh(generate_mesh("cells_2d", dict(n_cells=4, volume_fraction=0.3, aspect=1.2, seed=5, h=0.06),
                                   mesh_dir, comm=COMM))


MAT = NeoHookean(mu=1.3, K=4.0)


@pytest.mark.parametrize("bc", ["periodic", "affine", "traction"])
def test_homogeneous_2d_large_stretch_rotation(cells_mesh, bc):
    rve = HyperelasticRVE(cells_mesh, {1: MAT, 2: MAT}, bc=bc)
    F = rot2(0.6) @ np.array([[1.35, 0.12], [0.0, 0.8]])
    res = rve.evaluate(F)
    P, A = nh_response(F, MAT.mu, MAT.K)
    assert np.abs(res.P[0] - P).max() < 1e-10 * np.abs(P).max()
    assert np.abs(res.A[0] - A).max() < 1e-10 * np.abs(A).max()


@pytest.mark.parametrize("formulation", ["displacement", "mixed"])
def test_homogeneous_3d_large_stretch_rotation(formulation):
    X, cells, ct, ph = box_mesh(3, 2 if formulation == "mixed" else 3, perturb=0.2, seed=3)
    m = make_rve_mesh(X, cells, ct, ph)
    rve = HyperelasticRVE(m, {1: MAT}, formulation=formulation)
    F = rot3([1, 2, 0.5], 0.7) @ np.array([[1.3, 0.1, 0.0], [0.05, 0.9, 0.02], [0.0, 0.0, 0.95]])
    res = rve.evaluate(F)
    P, A = nh_response(F, MAT.mu, MAT.K)
    assert np.abs(res.P[0] - P).max() < 1e-10 * np.abs(P).max()
    assert np.abs(res.A[0] - A).max() < 1e-10 * np.abs(A).max()


@pytest.mark.parametrize("bc", ["periodic", "traction"])
def test_tangent_equals_finite_difference(cells_mesh, bc):
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: HolzapfelGasserOgden(mu=0.3, K=2.0, k1=2.0, k2=1.5,
                                                                  fibres=[(1.0, 0.4)])}
    rve = HyperelasticRVE(cells_mesh, mats, bc=bc)
    F = np.array([[1.25, 0.1], [-0.05, 0.92]])
    res = rve.evaluate(F, cells=False)
    h = 1e-6
    Afd = np.zeros((2, 2, 2, 2))
    for k in range(2):
        for l in range(2):
            E = np.zeros((2, 2))
            E[k, l] = h
            Pp = rve.evaluate(F + E, states=res.states, cells=False).P[0]
            Pm = rve.evaluate(F - E, states=res.states, cells=False).P[0]
            Afd[:, :, k, l] = (Pp - Pm) / (2 * h)
    assert np.abs(res.A[0] - Afd).max() < 1e-6 * np.abs(res.A[0]).max()
    # major symmetry of the energy-based tangent
    A = res.A[0]
    assert np.abs(A - A.transpose(2, 3, 0, 1)).max() < 1e-10 * np.abs(A).max()


def test_objectivity_2d_and_3d(cells_mesh, mesh_dir):
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=5.0, K=10.0)}
    rve = HyperelasticRVE(cells_mesh, mats)
    F = np.array([[1.2, 0.15], [0.0, 0.9]])
    P = rve.evaluate(F, cells=False).P[0]
    for t in (0.4, 2.5):
        Q = rot2(t)
        PQ = rve.evaluate(Q @ F, cells=False).P[0]
        assert np.abs(PQ - Q @ P).max() < 1e-8 * np.abs(P).max()
    m3 = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.15, h=0.25), mesh_dir, comm=COMM))
    rve3 = HyperelasticRVE(m3, mats)
    F3 = np.array([[1.15, 0.05, 0.0], [0.0, 0.95, 0.1], [0.02, 0.0, 1.05]])
    P3 = rve3.evaluate(F3, cells=False).P[0]
    Q3 = rot3([0.3, -1.0, 0.6], 1.1)
    PQ3 = rve3.evaluate(Q3 @ F3, cells=False).P[0]
    assert np.abs(PQ3 - Q3 @ P3).max() < 1e-8 * np.abs(P3).max()


def test_hill_mandel_and_direct_average(cells_mesh):
    import dolfinx
    import ufl

    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=0.2, K=1.0)}
    rve = HyperelasticRVE(cells_mesh, mats)
    F = np.array([[1.3, 0.0], [0.1, 0.95]])
    state, _, _, R = rve.solve(F)
    Pbar, _ = rve.homogenized(R)
    # direct average of P = dW/dF, written here independently of fe2ml's forms
    u = rve.z
    Fv = ufl.variable(ufl.Identity(2) + ufl.grad(u))
    dx = ufl.Measure("dx", domain=rve.msh, subdomain_data=rve.phase_tags)
    Pavg = np.zeros((2, 2))
    for tag, m in mats.items():
        F3 = ufl.as_matrix([[Fv[0, 0], Fv[0, 1], 0], [Fv[1, 0], Fv[1, 1], 0], [0, 0, 1]])
        J = ufl.det(F3)
        W = m.mu / 2 * (J ** (-2 / 3) * ufl.tr(F3.T * F3) - 3) + m.K / 2 * (J - 1) ** 2
        Pt = ufl.diff(W, Fv)
        for i in range(2):
            for j in range(2):
                Pavg[i, j] += dolfinx.fem.assemble_scalar(dolfinx.fem.form(Pt[i, j] * dx(tag)))
    Pavg /= rve.volume
    assert np.abs(Pavg - Pbar).max() < 1e-10 * np.abs(Pbar).max()
    # Hill-Mandel: <P : δF> = P̄ : δF̄ for δF = δF̄ + ∇δw with δw periodic
    dFbar = np.array([[0.3, -0.7], [0.2, 0.5]])
    V = rve.Vu
    dw = dolfinx.fem.Function(V)
    dw.interpolate(lambda x: np.stack([np.sin(2 * np.pi * x[0]) * np.cos(2 * np.pi * x[1]),
                                       np.cos(4 * np.pi * x[0]) + np.sin(2 * np.pi * x[1])]))
    lhs = 0.0
    for tag, m in mats.items():
        F3 = ufl.as_matrix([[Fv[0, 0], Fv[0, 1], 0], [Fv[1, 0], Fv[1, 1], 0], [0, 0, 1]])
        J = ufl.det(F3)
        W = m.mu / 2 * (J ** (-2 / 3) * ufl.tr(F3.T * F3) - 3) + m.K / 2 * (J - 1) ** 2
        dF = ufl.as_matrix(dFbar.tolist()) + ufl.grad(dw)
        lhs += dolfinx.fem.assemble_scalar(dolfinx.fem.form(ufl.inner(ufl.diff(W, Fv), dF) * dx(tag)))
    lhs /= rve.volume
    assert abs(lhs - np.sum(Pbar * dFbar)) < 1e-8 * np.abs(Pbar).max()


@pytest.mark.parametrize("bc", ["periodic", "affine", "traction"])
def test_small_strain_limit_equals_linear(cells_mesh, bc):
    m1, m2 = NeoHookean(mu=1.0, K=3.0), NeoHookean(mu=6.0, K=9.0)

    def lin(m):
        E = 9 * m.K * m.mu / (3 * m.K + m.mu)
        return LinearElastic(E=E, nu=(3 * m.K - 2 * m.mu) / (2 * (3 * m.K + m.mu)))

    A = HyperelasticRVE(cells_mesh, {1: m1, 2: m2}, bc=bc).evaluate(np.eye(2), cells=False).A[0]
    C = LinearRVE(cells_mesh, {1: lin(m1), 2: lin(m2)}, bc=bc).homogenize().C
    assert np.abs(A - C).max() < 1e-10 * np.abs(C).max()


def test_cell_quantities(cells_mesh):
    F = np.array([[1.2, 0.05], [0.0, 0.97]])
    for cell_mu, softer in ((10.0, False), (0.1, True)):
        mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=cell_mu, K=3 * cell_mu)}
        res = HyperelasticRVE(cells_mesh, mats).evaluate(F)
        c = res.cells[0]
        assert len(c.cell_ids) == cells_mesh.n_cells == 4
        # phase-volume-weighted average of F equals F̄ (periodic BCs)
        vol = c.phase["volume"]
        Favg = np.einsum("p,pij->ij", vol, c.phase["F"]) / vol.sum()
        assert np.abs(Favg[:2, :2] - F).max() < 1e-12
        assert np.isclose(vol.sum(), 1.0)
        # and the cells' volumes add up to the cell phase
        assert np.isclose(c.cell["volume"].sum(), vol[1])
        E_matrix = c.phase["E"][0, 0, 0]
        E_cells = c.cell["E"][:, 0, 0]
        if softer:
            assert np.all(E_cells > E_matrix)
            assert np.all(c.cell["stretch"][:, 0] > 1.2)
        else:
            assert np.all(E_cells < E_matrix)
        assert np.all(c.peak_E >= c.phase["E"][:, 0, 0] - 1e-14)
        # Cauchy stress consistent with P̄ for the whole RVE is not required per cell, but J and W are sane
        assert np.all(c.cell["J"] > 0) and np.all(c.cell["W"] > 0)


@pytest.mark.parametrize("dim", [2, 3])
def test_nearly_incompressible_matrix_converges(mesh_dir, dim):
    if dim == 2:
        m = read_mesh(generate_mesh("cells_2d", dict(n_cells=3, volume_fraction=0.2, seed=1, h=0.07), mesh_dir,
                                    comm=COMM))
    else:
        m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.1, h=0.3), mesh_dir, comm=COMM))
    mats = {1: NeoHookean(mu=1.0, K=1000.0), 2: NeoHookean(mu=0.5, K=50.0)}
    rve = HyperelasticRVE(m, mats)
    assert rve.formulation == "mixed"
    F = np.eye(dim)
    F[0, 0] = 1.3  # isochoric 30 % stretch
    F[1, 1] = 1 / 1.3 if dim == 2 else 1 / np.sqrt(1.3)
    if dim == 3:
        F[2, 2] = 1 / np.sqrt(1.3)
    res = rve.evaluate(F)
    assert res.iterations[0] <= 40
    J = res.cells[0].phase["J"]
    assert abs(J[0] - 1) < 5e-3  # the matrix stays nearly isochoric
    # no locking: the response is close to the incompressible neo-Hookean matrix' uniaxial stress scale
    assert 0.3 < res.P[0][0, 0] < 3.0


def test_expression_energy_matches_builtin(cells_mesh):
    expr = ExpressionEnergy(expr="mu/2*(J**(-2/3)*I1 - 3) + K/2*(J - 1)**2", params={"mu": 1.0, "K": 3.0})
    F = np.array([[1.2, 0.1], [0.0, 0.9]])
    a = HyperelasticRVE(cells_mesh, {1: expr, 2: NeoHookean(mu=2.0, K=5.0)}).evaluate(F, cells=False)
    b = HyperelasticRVE(cells_mesh, {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=2.0, K=5.0)}).evaluate(
        F, cells=False)
    assert np.abs(a.P - b.P).max() < 1e-12 * np.abs(b.P).max()
    assert np.abs(a.A - b.A).max() < 1e-10 * np.abs(b.A).max()


def test_hgo_fibres_tension_only(cells_mesh):
    ground = NeoHookean(mu=1.0, K=3.0)
    hgo = HolzapfelGasserOgden(mu=1.0, K=3.0, k1=5.0, k2=2.0, fibres=[(1.0, 0.0)])
    Ft = np.diag([1.2, 1.0])
    Fc = np.diag([0.85, 1.0])
    r_hgo = HyperelasticRVE(cells_mesh, {1: hgo, 2: hgo})
    r_nh = HyperelasticRVE(cells_mesh, {1: ground, 2: ground})
    assert r_hgo.evaluate(Ft, cells=False).P[0][0, 0] > 1.5 * r_nh.evaluate(Ft, cells=False).P[0][0, 0]
    assert np.allclose(r_hgo.evaluate(Fc, cells=False).P, r_nh.evaluate(Fc, cells=False).P, rtol=1e-12)


def test_bad_inputs(cells_mesh):
    rve = HyperelasticRVE(cells_mesh, {1: MAT, 2: MAT})
    with pytest.raises(ConfigError, match=r"point 1: det F̄ = -0.5 <= 0"):
        rve.evaluate(np.array([np.eye(2), np.diag([1.0, -0.5])]))
    with pytest.raises(ConfigError, match=r"shape \(n, 2, 2\)"):
        rve.evaluate(np.eye(3)[None])
    with pytest.raises(MaterialError, match="unknown name 'zeta'"):
        ExpressionEnergy(expr="zeta*(I1 - 3)", params={"mu": 1.0})
    with pytest.raises(MaterialError, match="only exp.* calls are allowed"):
        ExpressionEnergy(expr="__import__('os').system('ls')", params={})
    with pytest.raises(MaterialError, match="not allowed"):
        ExpressionEnergy(expr="mu*(I1 - 3) if mu else 0", params={"mu": 1.0})
    with pytest.raises(MaterialError, match="must vanish at F = I"):
        ExpressionEnergy(expr="mu*I1", params={"mu": 1.0})
    with pytest.raises(MaterialError, match="syntax error"):
        ExpressionEnergy(expr="mu*(I1 - 3", params={"mu": 1.0})
    with pytest.raises(MaterialError):
        NeoHookean(mu=-1.0, K=1.0)
    with pytest.raises(MaterialError, match="energy"):
        HyperelasticRVE(cells_mesh, {1: MAT, 2: UFLEnergy(fn=lambda F: F)})  # not a scalar
    stubborn = HyperelasticRVE(cells_mesh, {1: MAT, 2: NeoHookean(mu=0.01, K=0.1)},
                               newton=NewtonOptions(max_it=1, max_cuts=1))
    with pytest.raises(SolverError, match=r"point 0: RVE Newton did not converge at F̄ = .* after 1 step halvings"):
        stubborn.evaluate(np.diag([2.0, 0.6]))


def _fd_tangent(rve, F, h=1e-6):
    res = rve.evaluate(F, cells=False)
    d = F.shape[0]
    Afd = np.zeros((d, d, d, d))
    for k in range(d):
        for l in range(d):
            E = np.zeros((d, d))
            E[k, l] = h
            Pp = rve.evaluate(F + E, states=res.states, cells=False).P[0]
            Pm = rve.evaluate(F - E, states=res.states, cells=False).P[0]
            Afd[:, :, k, l] = (Pp - Pm) / (2 * h)
    return res.A[0], Afd


@pytest.mark.parametrize("dim,bc", [(2, "periodic"), (2, "affine"), (3, "periodic"), (3, "affine")])
def test_mixed_formulation_tangent_equals_finite_difference(mesh_dir, dim, bc):
    # the u–p formulation at a heterogeneous state (stiff nearly incompressible matrix, soft cells): Ā against a
    # central difference of P̄, and major symmetry
    if dim == 2:
        m = read_mesh(generate_mesh("cells_2d", dict(n_cells=3, volume_fraction=0.2, seed=1, h=0.12), mesh_dir,
                                    comm=COMM))
        F = np.array([[1.15, 0.08], [-0.03, 0.9]])
    else:
        m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.1, h=0.4), mesh_dir, comm=COMM))
        F = np.array([[1.1, 0.05, 0.0], [0.0, 0.95, 0.04], [0.02, 0.0, 0.98]])
    rve = HyperelasticRVE(m, {1: NeoHookean(mu=1.0, K=200.0), 2: NeoHookean(mu=0.2, K=2.0)}, bc=bc,
                          formulation="mixed")
    A, Afd = _fd_tangent(rve, F)
    assert np.abs(A - Afd).max() < 2e-5 * np.abs(A).max()
    assert np.abs(A - A.transpose(2, 3, 0, 1)).max() < 1e-9 * np.abs(A).max()


@pytest.mark.parametrize("dim", [2, 3])
def test_quadrilateral_and_hexahedral_rves_are_solved_and_periodic(dim):
    # structured quad/hex meshes with a stiff inclusion: Ā equals a central difference of P̄, the phase-averaged F
    # equals F̄ (periodic fluctuation), and the homogenized response sits between the phases
    X, cells, ct, ph = box_mesh(dim, 4, cell_type="quad" if dim == 2 else "hexahedron",
                                phase_fn=lambda c: 1 + (np.linalg.norm(c - 0.5, axis=1) < 0.3))
    m = make_rve_mesh(X, cells, ct, ph, source=f"box {ct}")
    rve = HyperelasticRVE(m, {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=8.0, K=20.0)})
    F = np.eye(dim)
    F[0, 0], F[0, 1] = 1.12, 0.06
    A, Afd = _fd_tangent(rve, F)
    assert np.abs(A - Afd).max() < 1e-5 * np.abs(A).max()
    c = rve.evaluate(F).cells[0]
    vol = c.phase["volume"]
    Favg = np.einsum("p,pij->ij", vol, c.phase["F"]) / vol.sum()
    assert np.abs(Favg[:dim, :dim] - F).max() < 1e-10
    soft = HyperelasticRVE(m, {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=1.0, K=3.0)}).evaluate(F, cells=False)
    stiff = HyperelasticRVE(m, {1: NeoHookean(mu=8.0, K=20.0), 2: NeoHookean(mu=8.0, K=20.0)}).evaluate(F,
                                                                                                     cells=False)
    P = rve.evaluate(F, cells=False).P[0]
    assert soft.P[0][0, 0] < P[0, 0] < stiff.P[0][0, 0]


def test_3d_heterogeneous_fluctuation_is_periodic_and_averages_to_the_macro_gradient(mesh_dir):
    m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.15, h=0.3), mesh_dir, comm=COMM))
    rve = HyperelasticRVE(m, {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=6.0, K=15.0)})
    F = np.array([[1.15, 0.05, 0.0], [0.0, 0.95, 0.08], [0.03, 0.0, 1.04]])
    res = rve.evaluate(F)
    c = res.cells[0]
    vol = c.phase["volume"]
    assert np.abs(np.einsum("p,pij->ij", vol, c.phase["F"]) / vol.sum() - F).max() < 1e-10  # ⟨F⟩ = F̄
    # the fluctuation w = u − (F̄ − I)·y takes equal values at periodic node pairs on opposite faces
    w = (rve.T_sp @ res.states[0].z)[rve.umap].reshape(-1, 3)
    X = rve.Z.sub(0).collapse()[0].tabulate_dof_coordinates() if rve.formulation == "mixed" else \
        rve.Z.tabulate_dof_coordinates()
    lo, hi = m.box
    for axis in range(3):
        on_lo = np.where(np.abs(X[:, axis] - lo[axis]) < 1e-9)[0]
        on_hi = np.where(np.abs(X[:, axis] - hi[axis]) < 1e-9)[0]
        shift = np.zeros(3)
        shift[axis] = hi[axis] - lo[axis]
        pairs = 0
        for i in on_lo:
            j = on_hi[np.argmin(np.linalg.norm(X[on_hi] - (X[i] + shift), axis=1))]
            if np.linalg.norm(X[j] - X[i] - shift) < 1e-9:
                assert np.abs(w[i] - w[j]).max() < 1e-10 * max(np.abs(w).max(), 1e-12)
                pairs += 1
        assert pairs > 10
    assert np.abs(w).max() > 1e-3  # a real fluctuation (heterogeneous)


@pytest.mark.parametrize("dim", [2, 3])
def test_iterative_solver_gives_the_direct_answer(mesh_dir, dim):
    # CG + GAMG on the reduced system (displacement formulation, periodic and affine BCs) against MUMPS: P̄ and Ā
    # to 1e-8, the linear effective stiffness too; saddle-point systems refuse the iterative solver
    from fe2ml.micro.reduction import SolverOptions

    if dim == 2:
        m = read_mesh(generate_mesh("cells_2d", dict(n_cells=3, volume_fraction=0.2, seed=1, h=0.08), mesh_dir,
                                    comm=COMM))
        F = np.array([[1.12, 0.05], [-0.02, 0.95]])
    else:
        m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.15, h=0.3), mesh_dir, comm=COMM))
        F = np.array([[1.1, 0.04, 0.0], [0.0, 0.96, 0.05], [0.02, 0.0, 1.03]])
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=6.0, K=15.0)}
    it = SolverOptions(type="iterative")  # the default rtol (1e-5): C̄ and Ā from the condensed energy
    for bc in ("periodic", "affine"):
        direct = HyperelasticRVE(m, mats, bc=bc, solver=SolverOptions(type="direct")).evaluate(F, cells=False)
        rve = HyperelasticRVE(m, mats, bc=bc, solver=it)
        assert rve.solver == "iterative"
        res = rve.evaluate(F, cells=False)
        assert np.abs(res.P - direct.P).max() < 1e-8 * np.abs(direct.P).max()
        assert np.abs(res.A - direct.A).max() < 1e-8 * np.abs(direct.A).max()
    lin = {1: LinearElastic(E=1.0, nu=0.3), 2: LinearElastic(E=8.0, nu=0.25)}
    C_it = LinearRVE(m, lin, solver=it).homogenize().C
    C_d = LinearRVE(m, lin, solver=SolverOptions(type="direct")).homogenize().C
    assert np.abs(C_it - C_d).max() < 1e-8 * np.abs(C_d).max()
    assert HyperelasticRVE(m, mats).solver == "direct"  # auto: small RVEs are factorised
    with pytest.raises(ConfigError, match="iterative needs periodic or affine BCs"):
        HyperelasticRVE(m, mats, bc="traction", solver=it)


def test_iterative_mixed_solver_gives_the_direct_answer_uniformly_in_the_bulk_modulus(mesh_dir):
    # The mixed (u–p) formulation: MINRES with the block-diagonal field split against MUMPS, P̄ and Ā to 1e-8, and
    # the Krylov iterations per solve nearly independent of K/μ (50 to 2000), which is what the augmented
    # displacement block and the mass-scaled pressure block are for
    from fe2ml.micro.reduction import SolverOptions

    m = read_mesh(generate_mesh("cells_2d", dict(n_cells=3, volume_fraction=0.2, seed=1, h=0.08), mesh_dir,
                                comm=COMM))
    F = np.array([[1.12, 0.05], [-0.02, 0.95]])
    per_solve = []
    for ratio in (50.0, 2000.0):
        mats = {1: NeoHookean(mu=1.0, K=ratio), 2: NeoHookean(mu=0.3, K=0.3 * ratio)}
        direct = HyperelasticRVE(m, mats, formulation="mixed", solver=SolverOptions(type="direct")).evaluate(
            F, cells=False)
        rve = HyperelasticRVE(m, mats, formulation="mixed", solver=SolverOptions(type="iterative"))
        assert rve.solver == "iterative"
        res = rve.evaluate(F, cells=False)
        assert np.abs(res.P - direct.P).max() < 1e-8 * np.abs(direct.P).max()
        assert np.abs(res.A - direct.A).max() < 1e-8 * np.abs(direct.A).max()
        solves = int(res.iterations[0]) + 4  # Newton increments and the d² tangent right-hand sides
        per_solve.append(rve.stats["krylov_its"] / solves)
    assert per_solve[1] < 1.5 * per_solve[0], per_solve


def test_krylov_warm_start_saves_iterations_and_changes_nothing(mesh_dir):
    # Along a load path, the iterative solver starts the tangent's solves from the last point's fluctuation
    # sensitivities and the first Newton increment from their prediction −X ΔF̄: fewer Krylov iterations than from
    # zero, the same P̄ and Ā (to the solver tolerances)
    from fe2ml.micro.reduction import SolverOptions

    m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.15, h=0.2), mesh_dir, comm=COMM))
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=6.0, K=15.0)}
    G = np.array([[0.12, 0.03, 0.0], [0.0, -0.04, 0.02], [0.01, 0.0, -0.03]])
    Fs = np.eye(3) + np.linspace(0.25, 1.0, 4)[:, None, None] * G
    runs = {}
    for warm in (True, False):
        rve = HyperelasticRVE(m, mats, solver=SolverOptions(type="iterative"))
        if not warm:
            base = rve.homogenized

            def cold(R, base=base, rve=rve):
                out = base(R)
                rve._X_sens = None
                return out

            rve.homogenized = cold
        runs[warm] = (rve.evaluate(Fs, cells=False, warm_start=True), rve.stats["krylov_its"])
    (w, its_w), (c, its_c) = runs[True], runs[False]
    assert its_w < 0.9 * its_c, (its_w, its_c)
    assert np.abs(w.P - c.P).max() < 1e-8 * np.abs(c.P).max()
    assert np.abs(w.A - c.A).max() < 1e-8 * np.abs(c.A).max()
