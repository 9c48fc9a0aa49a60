"""RVE homogenization: exactness, laminates, bounds, Hill's order, convergence, symmetries."""

from mpi4py import MPI

import numpy as np
import pytest
from helpers import box_mesh, laminate_exact

from fe2ml.materials import LinearElastic, TransverselyIsotropic, to_voigt
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.mesh import make_rve_mesh, read_mesh

COMM = MPI.COMM_WORLD
MANDEL = {2: np.array([1, 1, np.sqrt(2)]), 3: np.array([1, 1, 1, np.sqrt(2), np.sqrt(2), np.sqrt(2)])}


def mandel(C):
    d = C.shape[0]
    w = MANDEL[d]
    return to_voigt(C) * np.outer(w, w)


def rel(A, B):
    return np.abs(A - B).max() / np.abs(B).max()


@pytest.fixture(scope="module")
def cells_mesh(mesh_dir):
    return read_mesh(generate_mesh("cells_2d", dict(n_cells=5, volume_fraction=0.3, aspect=1.3, seed=4, h=0.04),
                                   mesh_dir, comm=COMM))


ANISO = TransverselyIsotropic(E_L=20.0, E_T=3.0, nu_LT=0.3, nu_TT=0.35, G_LT=2.0, direction=(1.0, 1.0, 0.3))


@pytest.mark.parametrize("bc", ["periodic", "affine", "traction"])
@pytest.mark.parametrize("degree", [1, 2])
def test_homogeneous_irregular_2d_exact(cells_mesh, bc, degree):
    mats = {1: ANISO, 2: ANISO}
    res = LinearRVE(cells_mesh, mats, bc=bc, degree=degree).homogenize()
    assert rel(res.C, ANISO.stiffness(2)) < 1e-10


@pytest.mark.parametrize("bc", ["periodic", "affine", "traction"])
@pytest.mark.parametrize("ct", ["tetra", "hexahedron"])
def test_homogeneous_irregular_3d_exact(bc, ct):
    X, cells, ct_, ph = box_mesh(3, 4, cell_type=ct, perturb=0.25 if ct == "tetra" else 0.15, seed=1,
                                 lengths=[1.0, 0.7, 1.3])
    m = make_rve_mesh(X, cells, ct_, ph)
    res = LinearRVE(m, {1: ANISO}, bc=bc).homogenize()
    assert rel(res.C, ANISO.stiffness(3)) < 1e-10
    assert np.isclose(res.volume, 0.91) and np.isclose(res.mesh_volume, 0.91)


@pytest.mark.parametrize("dim", [2, 3])
def test_laminate_exact(mesh_dir, dim):
    fr = [0.35, 0.65]
    m = read_mesh(generate_mesh("laminate", dict(dim=dim, fractions=fr, n_periods=1, normal=0,
                                                 h=0.15 if dim == 3 else 0.08), mesh_dir, comm=COMM))
    mats = {1: LinearElastic(E=1.0, nu=0.3), 2: ANISO if dim == 3 else LinearElastic(E=12.0, nu=0.2)}
    res = LinearRVE(m, mats, bc="periodic").homogenize()
    exact = laminate_exact([mats[1].stiffness(dim), mats[2].stiffness(dim)], fr, 0, dim)
    assert rel(res.C, exact) < 1e-8
    # not trivially equal to either bound
    voigt = fr[0] * mats[1].stiffness(dim) + fr[1] * mats[2].stiffness(dim)
    assert rel(voigt, exact) > 1e-2


def _bulk_2d(C):
    return (C[0, 0, 0, 0] + C[0, 0, 1, 1] + C[1, 1, 0, 0] + C[1, 1, 1, 1]) / 4


def test_bounds_and_hill_order(cells_mesh):
    m1, m2 = LinearElastic(E=1.0, nu=0.3), LinearElastic(E=15.0, nu=0.25)
    mats = {1: m1, 2: m2}
    v = cells_mesh.element_volumes()
    f2 = v[cells_mesh.phases == 2].sum() / v.sum()
    f1 = 1 - f2
    C = {bc: LinearRVE(cells_mesh, mats, bc=bc).homogenize().C for bc in ("affine", "periodic", "traction")}
    C1, C2 = m1.stiffness(2), m2.stiffness(2)
    CV = f1 * C1 + f2 * C2
    SR = f1 * np.linalg.inv(mandel(C1)) + f2 * np.linalg.inv(mandel(C2))
    CR = np.linalg.inv(SR)
    for bc, Cb in C.items():
        M = mandel(Cb)
        assert np.allclose(M, M.T, atol=1e-10 * np.abs(M).max()), bc  # major symmetry, not symmetrised
        assert np.linalg.eigvalsh(mandel(CV) - M).min() > -1e-10, f"{bc} above Voigt"
        assert np.linalg.eigvalsh(M - CR).min() > -1e-10, f"{bc} below Reuss"
    # Hill's order in the energy norm: affine >= periodic >= traction
    assert np.linalg.eigvalsh(mandel(C["affine"]) - mandel(C["periodic"])).min() > -1e-10
    assert np.linalg.eigvalsh(mandel(C["periodic"]) - mandel(C["traction"])).min() > -1e-10
    assert np.abs(mandel(C["affine"]) - mandel(C["traction"])).max() > 1e-3  # the order is not trivial
    # Hashin-Shtrikman bounds on the plane-strain bulk modulus (well-ordered phases)
    k1, k2 = m1.lmbda + m1.mu, m2.lmbda + m2.mu
    mu1, mu2 = m1.mu, m2.mu
    k_lo = k1 + f2 / (1 / (k2 - k1) + f1 / (k1 + mu1))
    k_hi = k2 + f1 / (1 / (k1 - k2) + f2 / (k2 + mu2))
    kp = _bulk_2d(C["periodic"])
    assert k_lo < kp < k_hi
    # HS shear bounds for the (near-isotropic) random arrangement, on the isotropic projection
    mu_lo = mu1 + f2 / (1 / (mu2 - mu1) + f1 * (k1 + 2 * mu1) / (2 * mu1 * (k1 + mu1)))
    mu_hi = mu2 + f1 / (1 / (mu1 - mu2) + f2 * (k2 + 2 * mu2) / (2 * mu2 * (k2 + mu2)))
    Cp = C["periodic"]
    mu_iso = 0.5 * (Cp[0, 1, 0, 1] + (Cp[0, 0, 0, 0] + Cp[1, 1, 1, 1] - 2 * Cp[0, 0, 1, 1]) / 4)
    assert mu_lo < mu_iso < mu_hi


def test_mesh_convergence(mesh_dir):
    mats = {1: LinearElastic(E=1.0, nu=0.3), 2: LinearElastic(E=10.0, nu=0.3)}
    Cs = []
    for h in (0.1, 0.05, 0.025, 0.0125):
        m = read_mesh(generate_mesh("centred_cell", dict(dim=2, volume_fraction=0.3, h=h), mesh_dir, comm=COMM))
        Cs.append(LinearRVE(m, mats).homogenize().voigt)
    diffs = [np.abs(Cs[i + 1] - Cs[i]).max() for i in range(3)]
    assert diffs[1] < 0.7 * diffs[0] and diffs[2] < 0.7 * diffs[1], diffs


def _eval(func, pts):
    import dolfinx.geometry as geo

    msh = func.function_space.mesh
    tree = geo.bb_tree(msh, msh.topology.dim)
    p3 = np.zeros((len(pts), 3))
    p3[:, : pts.shape[1]] = pts
    coll = geo.compute_colliding_cells(msh, geo.compute_collisions_points(tree, p3), p3)
    cells = np.array([coll.links(i)[0] for i in range(len(pts))], dtype=np.int32)
    return func.eval(p3, cells)


@pytest.mark.parametrize("bc", ["periodic", "affine", "traction"])
def test_fluctuation_bc_and_direct_average(cells_mesh, bc):
    """w satisfies its BC; stress by direct volume integration equals C̄:ε̄ and is symmetric."""
    import dolfinx
    import ufl

    mats = {1: LinearElastic(E=1.0, nu=0.3), 2: ANISO}
    rve = LinearRVE(cells_mesh, mats, bc=bc, degree=2)
    H = np.array([[0.013, -0.021], [0.004, -0.007]])
    w, u = rve.fluctuation(H)
    msh = rve.msh
    s = np.linspace(0.013, 0.987, 23)
    lo = np.zeros_like(s)
    hi = np.ones_like(s)
    for i in range(2):
        a = np.stack([lo, s] if i == 0 else [s, lo], axis=1)
        b = np.stack([hi, s] if i == 0 else [s, hi], axis=1)
        wa, wb = _eval(w, a), _eval(w, b)
        if bc == "periodic":
            assert np.abs(wa - wb).max() < 1e-12
            assert np.abs(wa).max() > 1e-5  # non-trivial fluctuation
        elif bc == "affine":
            assert np.abs(wa).max() < 1e-14 and np.abs(wb).max() < 1e-14
    if bc == "traction":
        for i in range(2):
            for j in range(2):
                gij = dolfinx.fem.assemble_scalar(dolfinx.fem.form(w.dx(j)[i] * ufl.dx(domain=msh)))
                assert abs(gij) < 1e-12
    # direct average of σ = C:ε(u) over the phases
    dx = ufl.Measure("dx", domain=msh, subdomain_data=rve.phase_tags)
    eps = ufl.sym(ufl.grad(u))
    sig = np.zeros((2, 2))
    for tag, mat in mats.items():
        C = dolfinx.fem.Constant(msh, mat.stiffness(2))
        i, j, k, l = ufl.indices(4)
        s_ = ufl.as_tensor(C[i, j, k, l] * eps[k, l], (i, j))
        for a in range(2):
            for b in range(2):
                sig[a, b] += dolfinx.fem.assemble_scalar(dolfinx.fem.form(s_[a, b] * dx(tag)))
    sig /= rve.volume
    assert rel(sig, rve.stress(H)) < 1e-9
    assert abs(sig[0, 1] - sig[1, 0]) < 1e-12 * np.abs(sig).max()
    # macro strain is the average strain (periodic and traction BCs, and affine)
    epsavg = np.array([[dolfinx.fem.assemble_scalar(dolfinx.fem.form(eps[a, b] * ufl.dx(domain=msh)))
                        for b in range(2)] for a in range(2)])
    assert np.abs(epsavg - 0.5 * (H + H.T)).max() < 1e-12


def test_repeated_homogenization_reuses_forms(cells_mesh):
    mats = {1: LinearElastic(E=1.0, nu=0.3), 2: LinearElastic(E=5.0, nu=0.3)}
    rve = LinearRVE(cells_mesh, mats)
    C1 = rve.homogenize().C
    form_id = id(rve.a_form)
    C2 = rve.homogenize().C
    assert id(rve.a_form) == form_id
    assert np.array_equal(C1, C2)


def test_rigid_modes_of_the_reduced_space_are_translations_and_rotations():
    """GAMG's near-nullspace: orthonormal, d + d(d-1)/2 modes, mapped to the full space they are rigid motions of
    every node except the fixed block (periodic: the images carry their master's value)."""
    import scipy.sparse as sp  # noqa: F401

    from fe2ml.micro.reduction import build_reduction, rigid_modes

    for d in (2, 3):
        g = np.linspace(0.0, 1.0, 4)
        X = np.array(np.meshgrid(*[g] * d, indexing="ij")).reshape(d, -1).T
        T, n_u, fixed = build_reduction(X, np.zeros(d), np.ones(d), "affine", tol=1e-8, source="grid", n=len(X) * d)
        M = rigid_modes(T, X, n_u)
        k = d + d * (d - 1) // 2
        assert M.shape == (k, n_u) and np.allclose(M @ M.T, np.eye(k), atol=1e-12)
        inner = np.abs(T @ np.ones(n_u)).reshape(-1, d).sum(1) > 0  # the blocks the affine space keeps
        Xi = X[inner] - X[inner].mean(0)
        # the span of the modes holds the translation e_0 and the rotation in the (0, 1) plane of the inner nodes
        t = np.zeros((inner.sum(), d))
        t[:, 0] = 1.0
        r = np.zeros((inner.sum(), d))
        r[:, 0], r[:, 1] = -Xi[:, 1], Xi[:, 0]
        for u in (t, r):
            full = np.zeros((len(X), d))
            full[inner] = u
            red = np.asarray(T.T @ full.ravel()) / np.maximum(np.asarray(T.T @ np.ones(len(X) * d)), 1)
            assert np.linalg.norm(red - M.T @ (M @ red)) < 1e-10 * np.linalg.norm(red)


@pytest.mark.serial
def test_near_incompressible_matrix_stays_inside_the_hashin_shtrikman_bounds(tmp_path, caplog):
    # soft cells in a stiff matrix with nu = 0.45: with linear tetrahedra the bulk modulus locks far above the HS
    # upper bound; the default degree (auto: 2 from nu >= 0.4) is inside both bounds, and degree 1 is warned about
    import logging

    from fe2ml.micro.config import build_rve, load_rve_mesh, parse_homogenize

    def cfg(extra):
        raw = {"dim": 3, "mesh": {"generate": "cells_3d", "n_cells": 4, "volume_fraction": 0.25, "seed": 1, "h": 0.3,
                                  "out_dir": str(tmp_path)},
               "phases": {1: {"material": "linear_elastic", "E": 10.0, "nu": 0.45},
                          2: {"material": "linear_elastic", "E": 1.0, "nu": 0.3}}, **extra}
        return parse_homogenize(raw, tmp_path / "rve.yaml", "rve.yaml", tmp_path, require_points=False)

    def km(E, nu):
        return E / (3 * (1 - 2 * nu)), E / (2 * (1 + nu))

    (k_m, g_m), (k_c, g_c) = km(10.0, 0.45), km(1.0, 0.3)
    with caplog.at_level(logging.WARNING, logger="fe2ml"):
        auto = cfg({})
        assert auto.degree == 2 and not [r for r in caplog.records if "lock" in r.getMessage()]
        p1 = cfg({"degree": 1})
        assert p1.degree == 1 and any("degree 1 with nearly incompressible phase(s) (phase 1: nu = 0.45)"
                                      in r.getMessage() for r in caplog.records)
    out = {}
    for name, c in (("auto", auto), ("p1", p1)):
        rve = build_rve(c, load_rve_mesh(c, comm=MPI.COMM_SELF))
        C = rve.homogenize().C
        v = rve.rve_mesh.element_volumes()
        fc = v[rve.rve_mesh.phases == 2].sum() / v.sum()
        fm = 1.0 - fc
        k = np.einsum("iijj", C) / 9                                   # hydrostatic response
        g = (np.einsum("ijij", C) - np.einsum("iijj", C) / 3) / 10     # isotropic projection's shear modulus
        out[name] = (k, g)
    # HS bounds (3D, well-ordered phases: the matrix is stiffer in bulk and shear), derived independently
    k_hi = k_m + fc / (1 / (k_c - k_m) + 3 * fm / (3 * k_m + 4 * g_m))
    k_lo = k_c + fm / (1 / (k_m - k_c) + 3 * fc / (3 * k_c + 4 * g_c))
    z_m, z_c = g_m / 6 * (9 * k_m + 8 * g_m) / (k_m + 2 * g_m), g_c / 6 * (9 * k_c + 8 * g_c) / (k_c + 2 * g_c)
    g_hi = g_m + fc / (1 / (g_c - g_m) + fm / (g_m + z_m))
    g_lo = g_c + fm / (1 / (g_m - g_c) + fc / (g_c + z_c))
    k, g = out["auto"]
    assert k_lo < k < k_hi and g_lo < g < g_hi, (k_lo, k, k_hi, g_lo, g, g_hi)
    assert out["p1"][0] > 1.1 * k_hi  # the counter-test: P1 locks
