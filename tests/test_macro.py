"""FE² macro solver: exactness against single-scale runs, quadratic convergence, ranks, bad input."""

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from helpers import box_mesh, tissue_rve_yaml

from fe2ml.config import MACRO_NEWTON, NewtonOptions
from fe2ml.errors import ConfigError
from fe2ml.laws.analytic import AnalyticLaw
from fe2ml.laws.base import ConstitutiveLaw
from fe2ml.laws.rve import RVELaw
from fe2ml.macro.loads import DirichletSpec, TractionSpec, frames_from_angle, frames_from_axes
from fe2ml.macro.mesh import create_macro_mesh
from fe2ml.macro.problem import MacroProblem
from fe2ml.materials import NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.mesh import make_rve_mesh, read_mesh

COMM = MPI.COMM_WORLD
BIN = Path(sys.executable).parent

BCS = [DirichletSpec("left", (0, 1), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.25 * t),
       DirichletSpec("right", (1,), lambda x, t: 0.05 * t * x[0])]


def _run(prob, steps):
    for k in range(1, steps + 1):
        prob.step(k / steps)
    return prob


@pytest.fixture(scope="module")
def rve_mesh(mesh_dir):
    return read_mesh(generate_mesh("cells_2d", dict(n_cells=2, volume_fraction=0.25, seed=3, h=0.12), mesh_dir,
                                   comm=COMM))


def test_homogeneous_rve_fe2_equals_analytic(rve_mesh):
    mat = NeoHookean(mu=1.0, K=4.0)
    spec = {"generate": "rectangle", "size": [2.0, 1.0], "n": [4, 2]}
    trac = [TractionSpec("top", (0.0, lambda t: -0.05 * t))]
    law = RVELaw(HyperelasticRVE(rve_mesh, {1: mat, 2: mat}))
    fe2 = _run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=law, dirichlet=BCS, tractions=trac), 3)
    ana = _run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=AnalyticLaw({0: mat}, dim=2), dirichlet=BCS,
                            tractions=trac), 3)
    u1, u2 = fe2.u.x.array, ana.u.x.array
    scale = np.abs(u2).max()
    assert scale > 0.1
    assert np.abs(u1 - u2).max() < 1e-8 * scale
    R1, R2 = fe2.reactions()["left"], ana.reactions()["left"]
    assert np.abs(R1 - R2).max() < 1e-8 * np.abs(R2).max()
    # the macro field is not homogeneous (clamped end, transverse load)
    F, _ = ana.cell_averages()
    assert COMM.allreduce(np.ptp(F[:, 0, 0]), op=MPI.MAX) > 1e-2


def test_quadratic_convergence_heterogeneous(rve_mesh):
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=0.1, K=0.5)}
    law = RVELaw(HyperelasticRVE(rve_mesh, mats))
    prob = MacroProblem(COMM, create_macro_mesh(COMM, {"generate": "rectangle", "size": [2.0, 1.0], "n": [3, 2]}),
                        law=law, dirichlet=BCS, newton=dataclasses.replace(MACRO_NEWTON, rtol=1e-12))
    rec = prob.step(1.0)
    r = np.array(rec.residuals[-1])
    assert rec.iterations >= 3
    # estimated convergence order from the last three residuals above round-off
    rr = r[r > 1e-11 * r[0]]
    assert len(rr) >= 3
    order = np.log(rr[-1] / rr[-2]) / np.log(rr[-2] / rr[-3])
    assert order > 1.7, (r, order)


def test_nested_fe2_keeps_the_converged_rve_answers_at_a_steps_first_iterate(rve_mesh):
    # a hyperelastic RVE has no history: the macro Newton keeps the converged P̄ and Ā of a step at the next step's
    # first iterate (one round of RVE solves fewer per step) and reaches the answer of a law that solves there again
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=0.1, K=0.5)}

    class Again(RVELaw):  # solves at every iterate
        def answer_key(self):
            return None

    spec = {"generate": "rectangle", "size": [2.0, 1.0], "n": [3, 2]}
    probs = [_run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=cls(HyperelasticRVE(rve_mesh, mats)),
                               dirichlet=BCS), 3) for cls in (Again, RVELaw)]
    ua, ub = probs[0].u.x.array, probs[1].u.x.array
    assert np.abs(ua).max() > 0.1 and np.abs(ua - ub).max() <= 1e-8 * np.abs(ua).max()
    Ra, Rb = probs[0].reactions()["left"], probs[1].reactions()["left"]
    assert np.abs(Ra - Rb).max() <= 1e-8 * np.abs(Ra).max()
    steps = len(probs[1].history)
    assert probs[0].reused_answers == 0 and probs[1].reused_answers == steps - 1 == 2
    for prob in probs:
        iterates = sum(len(h.residuals[-1]) for h in prob.history)
        kept = prob.reused_answers
        assert prob.law.stats["evaluations"] == (iterates - kept) * prob.n_qp_local
        for h in prob.history:  # still quadratic after the predictor: |r_k| ≤ 10 |r_k−1|² / |r_0| (or at rounding)
            r = h.residuals[-1]
            for k in range(2, len(r)):
                assert r[k] <= 10.0 * r[k - 1] ** 2 / r[0] or r[k] < 1e-12 * r[0], r


def test_the_log_of_a_step_converged_at_its_kept_iterate_holds_the_kept_batch():
    # a step that converged without an evaluation (its first iterate, the last step's state) logs that state again
    from fe2ml.data.recorder import MacroLogger

    class Writer:
        def __init__(self):
            self.rows = []

        def add(self, F, P, A, **kw):
            self.rows.append((F.copy(), kw["step"], kw["converged"], kw["iteration"]))

    w = Writer()
    log = MacroLogger(w, 0)
    F1, F2 = np.eye(2)[None] * 1.1, np.eye(2)[None] * 1.2
    log.step = 1
    log.record(F2 * 0.5, F2, np.zeros((1, 2, 2, 2, 2)), None, None)
    log.record(F1, F1, np.zeros((1, 2, 2, 2, 2)), None, None)
    log.commit()
    log.step = 2
    log.commit()  # converged at its kept first iterate
    log.step = 3
    log.record(F2, F2, np.zeros((1, 2, 2, 2, 2)), None, None)
    log.commit()
    assert [(r[1], r[2], r[3]) for r in w.rows] == [(1, 1, 1), (2, 1, 0), (3, 1, 0)]
    assert np.array_equal(w.rows[1][0], F1) and np.array_equal(w.rows[2][0], F2)


def test_analytic_small_strain_patch_exact():
    """Linear analytic run with affine boundary displacement reproduces the affine field exactly."""
    from fe2ml.materials import LinearElastic

    H = np.array([[0.01, 0.003], [-0.002, 0.005]])
    specs = []
    for b in ("left", "right", "bottom", "top"):
        specs.append(DirichletSpec(b, (0,), lambda x, t: (H[0, 0] * x[0] + H[0, 1] * x[1]) * t))
        specs.append(DirichletSpec(b, (1,), lambda x, t: (H[1, 0] * x[0] + H[1, 1] * x[1]) * t))
    mm = create_macro_mesh(COMM, {"generate": "rectangle", "size": [1.0, 1.0], "n": [3, 3]})
    prob = _run(MacroProblem(COMM, mm, law=AnalyticLaw({0: LinearElastic(E=2.0, nu=0.3)}, dim=2), kinematics="small",
                             dirichlet=specs), 1)
    F, P = prob.cell_averages()
    assert np.abs(F - (np.eye(2) + H)).max() < 1e-12
    C = LinearElastic(E=2.0, nu=0.3).stiffness(2)
    assert np.abs(P - np.einsum("ijkl,kl->ij", C, 0.5 * (H + H.T))).max() < 1e-12


def test_bad_problem_inputs(rve_mesh):
    mat = NeoHookean(mu=1.0, K=4.0)
    mm = create_macro_mesh(COMM, {"generate": "rectangle", "size": [2.0, 1.0], "n": [2, 2]})
    with pytest.raises(ConfigError, match="unknown boundary 'lefty'"):
        MacroProblem(COMM, mm, law=AnalyticLaw({0: mat}, dim=2), dirichlet=[DirichletSpec("lefty", (0,), 0.0)])
    with pytest.raises(ConfigError, match="component 2 does not exist in 2D"):
        MacroProblem(COMM, mm, law=AnalyticLaw({0: mat}, dim=2), dirichlet=[DirichletSpec("left", (2,), 0.0)])
    with pytest.raises(ConfigError, match="empty"):
        MacroProblem(COMM, mm, law=AnalyticLaw({0: mat}, dim=2), dirichlet=[DirichletSpec("hole", (0,), 0.0)])
    mesh3 = create_macro_mesh(COMM, {"generate": "box", "size": [1.0, 1.0, 1.0], "n": [1, 1, 1]})
    with pytest.raises(ConfigError, match="RVE is 2D but the macro mesh is 3D"):
        MacroProblem(COMM, mesh3, law=RVELaw(HyperelasticRVE(rve_mesh, {1: mat, 2: mat})),
                     dirichlet=[DirichletSpec("left", (0, 1, 2), 0.0)])


RUN = """\
    dim: 2
    mesh: {generate: rectangle, size: [2.0, 1.0], n: [4, 2]}
    material:
      kind: rve
      rve:
""" + tissue_rve_yaml(8) + """\
    bcs:
      - {boundary: left, components: [0, 1], value: 0.0}
      - {boundary: right, components: [0], value: "0.3*t"}
    tractions:
      - {boundary: top, value: [0.0, "-0.02*t"]}
    steps: 3
    output: out
"""


def _rows(path):
    with open(path) as f:
        r = list(csv.reader(f))
    return r[0], np.array(r[1:], dtype=float)


@pytest.mark.serial
def test_run_cli_one_and_two_ranks_identical(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(RUN))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([str(BIN / "fe2ml"), "run", str(cfg), "--output", str(tmp_path / "s")], capture_output=True,
                        text=True, env=env, timeout=600)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(cfg), "--output",
                         str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr
    h1, a1 = _rows(tmp_path / "s" / "reactions.csv")
    h2, a2 = _rows(tmp_path / "p" / "reactions.csv")
    assert h1 == h2 and a1.shape == (3, len(h1))
    assert np.abs(a1 - a2).max() <= 1e-10 * np.abs(a1).max()
    s1 = json.loads((tmp_path / "s" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s1["status"] == s2["status"] == "completed" and s2["ranks"] == 2
    assert s1["rve_solves"] == s2["rve_solves"] > 0
    for k in ("rve_or_constitutive", "macro_assembly", "macro_solve"):
        assert k in s1["time_split_s"]
    for f in ("fields.xdmf", "fields.h5", "reactions.png", "config.yaml"):
        assert (tmp_path / "s" / f).exists()
    assert "step 3/3" in r1.stdout  # progress


@pytest.mark.serial
def test_warm_start_changes_only_the_cost_and_quadrature_degree_the_rule(tmp_path):
    # warm_start: false starts every RVE solve from F̄ = I: the same converged answers (to the RVE tolerance), more
    # RVE Newton iterations; quadrature_degree: 2 evaluates the law at 3 points per triangle instead of 1
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run

    results = {}
    for name, extra in (("warm", ""), ("cold", "warm_start: false\n"), ("q2", "quadrature_degree: 2\n")):
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(RUN) + extra)
        results[name] = run(MPI.COMM_SELF, load_run_config(tmp_path / f"{name}.yaml", output=str(tmp_path / name)))
        results[name]["rows"] = _rows(tmp_path / name / "reactions.csv")[1]
    w, c, q = results["warm"], results["cold"], results["q2"]
    assert np.abs(w["rows"] - c["rows"]).max() <= 1e-8 * np.abs(w["rows"]).max()
    assert c["rve_newton_iterations"] > w["rve_newton_iterations"]
    assert q["quadrature_points"] == 3 * w["quadrature_points"]
    assert np.abs(q["rows"] - w["rows"]).max() <= 0.05 * np.abs(w["rows"]).max()  # same problem, other rule


DNS = """\
    # direct numerical simulation of a laminate: the RVE (two horizontal layers) tiled 4 x 2 times at scale 1/4
    dim: 2
    mesh:
      generate: tiled_rve
      n: [4, 2]
      eps: 0.25
      rve:
        mesh: {generate: laminate, dim: 2, fractions: [0.3, 0.7], normal: 1, h: 0.1}
        phases:
          1: {material: linear_elastic, E: 1.0, nu: 0.3}
          2: {material: linear_elastic, E: 0.1, nu: 0.45}
    material:
      kind: analytic
      phases:
        1: {material: linear_elastic, E: 10.0, nu: 0.3}
        2: {material: linear_elastic, E: 2.0, nu: 0.45}
    bcs:
      - {boundary: left, components: [0], value: 0.0}
      - {boundary: bottom, components: [1], value: 0.0}
      - {boundary: right, components: [0], value: "0.01*t"}
    steps: 2
    output: dns
"""


@pytest.mark.serial
def test_dns_tiled_laminate_exact(tmp_path):
    # horizontal layers pulled along them with free top: uniform ε11 = e, σ22 = σ12 = 0 in every layer, so the
    # end force is e Σ_i t_i E_i / (1 - ν_i²) (plane strain); P1 elements on the conforming mesh are exact
    cfg = tmp_path / "dns.yaml"
    cfg.write_text(textwrap.dedent(DNS))
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(cfg)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    h, a = _rows(tmp_path / "dns" / "reactions.csv")
    R = a[:, h.index("right_R1")]
    e = 0.01 * a[:, 0] / 1.0  # domain [0, 4 x 0.25] x [0, 2 x 0.25]
    thick = 2 * 0.25 * np.array([0.3, 0.7])  # total thickness of each phase
    exact = e * (thick[0] * 10.0 / (1 - 0.3**2) + thick[1] * 2.0 / (1 - 0.45**2))
    assert np.allclose(R, exact, rtol=1e-9), (R, exact)
    s = json.loads((tmp_path / "dns" / "summary.json").read_text())
    assert s["rve_solves"] == 0 and s["status"] == "completed"


RUN_BAD = {
    "dns_without_rve": (DNS.split("      rve:\n")[0] + "    material:" + DNS.split("    material:")[1],
                        "mesh.rve: generate tiled_rve with analytic materials needs the RVE to tile"),
    "dns_rve_key_typo": (DNS.replace("      rve:\n", "      rev:\n"), "unknown key(s) rev"),
    "dns_bad_eps": (DNS.replace("eps: 0.25", "eps: -1"), "eps: expected a positive number, got -1"),
    "unknown_boundary": (RUN.replace("boundary: right", "boundary: rite"), "unknown boundary 'rite'"),
    "missing_component": (RUN.replace("components: [0], value", "components: [2], value"),
                          "component(s) [2] do not exist in 2D"),
    "mesh_file_missing": (RUN.replace("{generate: rectangle, size: [2.0, 1.0], n: [4, 2]}", "{file: nope.msh}"),
                          "nope.msh not found"),
    "rve_dim": (RUN.replace("mesh: {generate: cells_2d, n_cells: 2, volume_fraction: 0.25, seed: 3, h: 0.12}",
                            "mesh: {generate: cells_3d}"), "makes 3D meshes but dim is 2"),
    "bad_expression": (RUN.replace('"0.3*t"', '"0.3*tt"'), "unknown name 'tt'"),
    "no_kind": (RUN.replace("kind: rve", "kind: magic"), "material.kind: expected rve, analytic, surrogate or hybrid"),
    "unknown_key": (RUN + "    colour: blue\n", "unknown key(s) colour"),
    "orientation_name": (RUN.replace("kind: rve", 'kind: rve\n      orientation: "atan2(y, q)"'),
                         "material.orientation: unknown name 'q'"),
    "macro_dim": (RUN.replace("dim: 2", "dim: 3", 1), "rectangle makes 2D meshes but dim is 3"),
    "pressure_vector": (RUN + "    pressures: [{boundary: top, value: [1.0, 2.0]}]\n", "pressures[0].value"),
    "pressure_boundary": (RUN + "    pressures: [{boundary: tpo, value: 1.0}]\n", "unknown boundary 'tpo'"),
}


@pytest.mark.serial
@pytest.mark.parametrize("name", sorted(RUN_BAD))
def test_run_bad_input(tmp_path, name):
    text, expected = RUN_BAD[name]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(text))
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(cfg)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "fe2ml: error" in ln]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.serial
def test_impossible_load_keeps_partial_results(tmp_path):
    # t = 1/3 converges (0.1 stretch); beyond, the right end is pushed past the left one: inverted elements
    text = RUN.replace('"0.3*t"', '"0.3*t - 40.0*max(t - 0.34, 0.0)"').replace("steps: 3",
                                                                              "steps: 3\n    newton: {max_cuts: 2}")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(text))
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(cfg)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "failed after 2 step cuts" in r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "failed" and abs(s["t"] - 1 / 3) < 1e-12
    _, rows = _rows(tmp_path / "out" / "reactions.csv")
    assert rows.shape[0] == 1


def _named_rectangle(path):
    """gmsh mesh of [0, 2] x [0, 1] with named boundary curves: clamp (x = 0), pull (x = 2), patch (top, x > 1)."""
    from fe2ml.micro.geometry import _gmsh_start

    gmsh = _gmsh_start()
    geo = gmsh.model.geo
    pts = [geo.addPoint(x, y, 0, 0.2) for x, y in ((0, 0), (2, 0), (2, 1), (1, 1), (0, 1))]
    lines = [geo.addLine(pts[i], pts[(i + 1) % 5]) for i in range(5)]
    surf = geo.addPlaneSurface([geo.addCurveLoop(lines)])
    geo.synchronize()
    gmsh.model.addPhysicalGroup(2, [surf], 1, name="tissue")
    gmsh.model.addPhysicalGroup(1, [lines[4]], 11, name="clamp")
    gmsh.model.addPhysicalGroup(1, [lines[1]], 12, name="pull")
    gmsh.model.addPhysicalGroup(1, [lines[2]], 13, name="patch")
    gmsh.model.mesh.generate(2)
    gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
    gmsh.write(str(path))
    gmsh.clear()


NAMED = """\
    dim: 2
    mesh: {file: rect.msh}
    material:
      kind: analytic
      material: {material: linear_elastic, E: 1.0, nu: 0.3}
    bcs:
      - {boundary: clamp, components: [0, 1], value: 0.0}
      - {boundary: pull, components: [0], value: "0.01*t"}
    tractions:
      - {boundary: patch, value: [0.0, "-0.02*t"]}
    steps: 2
"""


@pytest.mark.serial
def test_imported_mesh_named_boundaries(tmp_path):
    # boundaries named in the mesh file (gmsh physical curves), including part of an edge, on 1 and 2 ranks
    _named_rectangle(tmp_path / "rect.msh")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    for name, text, launcher in (("named", NAMED, []), ("named2", NAMED, [str(BIN / "mpiexec"), "-n", "2"]),
                                 ("box", NAMED.replace("boundary: clamp", "boundary: left")
                                  .replace("boundary: pull", "boundary: right"), [])):
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(text) + f"output: {name}\n")
        r = subprocess.run([*launcher, str(BIN / "fe2ml"), "run", str(tmp_path / f"{name}.yaml")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        h, a = _rows(tmp_path / name / "reactions.csv")
        out[name] = {k: a[:, i] for i, k in enumerate(h)}
    n, n2, b = out["named"], out["named2"], out["box"]
    # the patch is the top edge for x in [1, 2] (length 1): the clamp carries its whole load
    assert np.allclose(np.abs(n["clamp_R2"]), 0.02 * n["t"], rtol=1e-8)
    assert np.allclose(n["clamp_R1"], -n["pull_R1"], rtol=1e-8)  # equilibrium in x
    # named curves and bounding-box faces select the same facets; 1 and 2 ranks agree
    assert np.allclose(n["clamp_R1"], b["left_R1"], rtol=1e-12) and np.allclose(n["pull_u1_mean"], b["right_u1_mean"])
    assert np.allclose(n["clamp_R2"], n2["clamp_R2"], rtol=1e-10)
    assert np.allclose(n["pull_R1"], n2["pull_R1"], rtol=1e-10)
    # an unknown name lists the file's names
    (tmp_path / "bad.yaml").write_text(textwrap.dedent(NAMED).replace("boundary: patch", "boundary: pach"))
    r = subprocess.run([str(BIN / "fe2ml"), "run", str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "unknown boundary 'pach'" in r.stderr and "patch" in r.stderr


def _nh_cauchy(lam, mu, K):
    """Cauchy stress of the neo-Hookean law W = mu/2 (J^-2/3 I1 - 3) + K/2 (J - 1)^2 at F = diag(l1, l2, 1)."""
    F = np.diag([lam[0], lam[1], 1.0])
    J = np.linalg.det(F)
    Fit = np.linalg.inv(F).T
    P = mu * J ** (-2 / 3) * (F - np.trace(F.T @ F) / 3 * Fit) + K * (J - 1) * J * Fit
    return P @ F.T / J


def test_pressure_follows_the_deformation():
    # a block on rollers (left, bottom) with pressure p on its right face, top free: the state is homogeneous,
    # F = diag(l1, l2) with Cauchy sigma11 = -p, sigma22 = 0 (follower), or nominal P11 = -p (dead traction)
    from scipy.optimize import fsolve

    mu, K, p = 1.0, 3.0, 0.4
    mat = NeoHookean(mu=mu, K=K)
    follower = fsolve(lambda lam: _nh_cauchy(lam, mu, K)[[0, 1], [0, 1]] - [-p, 0.0], [0.9, 1.05], xtol=1e-12)
    dead = fsolve(lambda lam: (_nh_cauchy(lam, mu, K) * lam[1])[[0, 1], [0, 1]] - [-p, 0.0], [0.9, 1.05],
                  xtol=1e-12)  # P11 = sigma11 J / l1 = sigma11 l2
    assert abs(follower[0] - dead[0]) > 1e-3  # the two loads differ by far more than the tolerance below
    mm = create_macro_mesh(COMM, {"generate": "rectangle", "size": [1.0, 1.0], "n": [3, 3]})
    rollers = [DirichletSpec("left", (0,), 0.0), DirichletSpec("bottom", (1,), 0.0)]
    from fe2ml.macro.loads import PressureSpec

    for loads, lam in (({"pressures": [PressureSpec("right", lambda t: p * t)]}, follower),
                       ({"tractions": [TractionSpec("right", (lambda t: -p * t, 0.0))]}, dead)):
        prob = _run(MacroProblem(COMM, mm, law=AnalyticLaw({0: mat}, dim=2), dirichlet=rollers, **loads), 4)
        assert abs(prob.mean_displacements()["right"][0] - (lam[0] - 1)) < 1e-9
        F, _ = prob.cell_averages()
        assert np.abs(F - np.diag(lam)).max() < 1e-9
        assert max(r.iterations for r in prob.history) <= 6  # consistent Jacobian of the follower load


def test_ring_pressure_lame():
    # thick-walled tube (quarter ring, symmetry on x = 0 and y = 0) under internal pressure, plane strain:
    # Lamé's u_r = p a^2 (1 + nu) / (E (b^2 - a^2)) ((1 - 2 nu) r + b^2 / r)
    from fe2ml.macro.loads import PressureSpec
    from fe2ml.materials import LinearElastic

    a, b, E, nu, p = 1.0, 1.5, 1.0, 0.3, 0.01
    mm = create_macro_mesh(COMM, {"generate": "ring", "radii": [a, b], "h": 0.08})
    assert {"inner", "outer", "left", "bottom"} <= set(mm.boundaries)
    prob = _run(MacroProblem(COMM, mm, law=AnalyticLaw({0: LinearElastic(E=E, nu=nu)}, dim=2), kinematics="small",
                             degree=2,
                             dirichlet=[DirichletSpec("left", (0,), 0.0), DirichletSpec("bottom", (1,), 0.0)],
                             pressures=[PressureSpec("inner", lambda t: p * t)]), 1)
    # the pressure's resultant on the quarter arc is p a along each axis, carried by the symmetry planes
    R = prob.reactions()
    assert abs(abs(R["left"][0]) - p * a) < 1e-10 and abs(abs(R["bottom"][1]) - p * a) < 1e-10
    X = prob.V.tabulate_dof_coordinates()[:, :2]
    u = prob.u.x.array.reshape(-1, 2)[: len(X)]
    r = np.linalg.norm(X, axis=1)
    ur = np.einsum("ni,ni->n", u, X) / r
    exact = p * a**2 * (1 + nu) / (E * (b**2 - a**2)) * ((1 - 2 * nu) * r + b**2 / r)
    assert np.abs(ur - exact).max() < 3e-3 * exact.max()  # 0.15 %: polygonal arcs
    assert np.abs(u[:, 0] * X[:, 1] - u[:, 1] * X[:, 0]).max() < 2e-3 * exact.max() * b  # no hoop displacement


def test_3d_frames_turn_the_rve_as_the_single_scale_law_with_rotated_fibres():
    # a homogeneous HGO RVE (3D) with fibres along its x axis, turned by a field of frames e1(x), e2(x) that varies
    # from point to point, equals the single-scale HGO law whose fibres follow e1(x): to 1e-8 at every quadrature
    # point (P̄ of the law in its frame, rotated back, against the rotated-fibre law at the same F̄)
    from fe2ml.materials import HolzapfelGasserOgden

    X, cells, ct, ph = box_mesh(3, 2)
    rm = make_rve_mesh(X, cells, ct, ph, source="box")
    base = dict(mu=1.0, K=4.0, k1=2.0, k2=1.0)
    law = RVELaw(HyperelasticRVE(rm, {1: HolzapfelGasserOgden(**base, fibres=((1.0, 0.0, 0.0),))}))
    e1 = lambda X: np.stack([np.cos(X[:, 0]), np.sin(X[:, 0]), 0.3 + X[:, 2]], -1)  # noqa: E731
    e2 = lambda X: np.stack([-np.sin(X[:, 0]), np.cos(X[:, 0]), 0.1 * X[:, 1]], -1)  # noqa: E731
    frames = frames_from_axes(e1, e2)
    mm = create_macro_mesh(COMM, {"generate": "box", "size": [1.0, 1.0, 1.0], "n": [1, 1, 1]})
    bcs = [DirichletSpec("left", (0, 1, 2), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.15 * t),
           DirichletSpec("right", (1,), lambda x, t: 0.05 * t * x[2])]
    prob = _run(MacroProblem(COMM, mm, law=law, dirichlet=bcs, orientation=frames), 2)
    Q = prob.Q
    assert np.allclose(np.einsum("nki,nkj->nij", Q, Q), np.eye(3)) and np.allclose(np.linalg.det(Q), 1.0)
    assert np.ptp(Q[:, :, 0], axis=0).max() > 0.1  # the frames differ between points
    F, P = prob._F_qp(), prob.stress_qp()
    for k in range(len(F)):
        single = AnalyticLaw({0: HolzapfelGasserOgden(**base, fibres=(tuple(Q[k, :, 0]),))}, dim=3)
        Pk, _ = single.evaluate(F[k][None])
        assert np.abs(P[k] - Pk[0]).max() < 1e-8 * np.abs(Pk).max()
    assert max(r.iterations for r in prob.history) <= 6  # the rotated tangent is consistent


def test_orientation_rotates_the_rve_frame(rve_mesh):
    # a homogeneous HGO RVE with fibres along its x axis, turned by material.orientation = 30 degrees, equals the
    # single-scale HGO law with fibres at 30 degrees (P = Q P_rve(Qᵀ F Q) Qᵀ, A rotated alike)
    from fe2ml.materials import HolzapfelGasserOgden

    def hgo(angle):
        a = np.radians(angle)
        return HolzapfelGasserOgden(mu=1.0, K=4.0, k1=2.0, k2=1.0, fibres=((np.cos(a), np.sin(a), 0.0),))

    spec = {"generate": "rectangle", "size": [2.0, 1.0], "n": [4, 2]}
    bcs = [DirichletSpec("left", (0, 1), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.2 * t)]
    trac = [TractionSpec("top", (lambda t: 0.05 * t, lambda t: -0.05 * t))]
    law = RVELaw(HyperelasticRVE(rve_mesh, {1: hgo(0), 2: hgo(0)}))
    fe2 = _run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=law, dirichlet=bcs, tractions=trac,
                            orientation=frames_from_angle(lambda X: np.full(len(X), 30.0))), 2)
    ana = _run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=AnalyticLaw({0: hgo(30)}, dim=2), dirichlet=bcs,
                            tractions=trac), 2)
    ref = _run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=AnalyticLaw({0: hgo(0)}, dim=2), dirichlet=bcs,
                            tractions=trac), 2)
    u1, u2, u0 = fe2.u.x.array, ana.u.x.array, ref.u.x.array
    scale = np.abs(u2).max()
    assert np.abs(u1 - u2).max() < 1e-8 * scale
    assert np.abs(u0 - u2).max() > 1e-3 * scale  # the fibre direction matters here
    assert max(r.iterations for r in fe2.history) <= 6  # the rotated tangent is consistent
    F = fe2._F_qp()
    Q = fe2.Q
    assert np.allclose(Q[:, :, 0], [np.cos(np.pi / 6), np.sin(np.pi / 6)])
    assert np.allclose(np.einsum("nia,nab,njb->nij", Q, fe2.rve_frame(F), Q), F)


def test_orientation_config_in_2d_and_3d(tmp_path):
    from fe2ml.macro.config import load_run_config

    run3 = textwrap.dedent("""\
        dim: 3
        mesh: {generate: box, size: [1.0, 1.0, 1.0], n: [1, 1, 1]}
        material:
          kind: rve
          rve:
            mesh: {generate: centred_cell, volume_fraction: 0.1, h: 0.4}
            phases:
              1: {material: neo_hookean, mu: 1.0, K: 3.0}
              2: {material: neo_hookean, mu: 0.2, K: 1.0}
          orientation: {e1: ["cos(x)", "sin(x)", 0], e2: [0, 0, 2]}
        bcs: [{boundary: left, components: [0, 1, 2], value: 0.0}]
    """)
    (tmp_path / "r3.yaml").write_text(run3)
    frames = load_run_config(tmp_path / "r3.yaml").orientation
    X = np.array([[0.0, 0.0, 0.0], [0.5, 0.2, 0.1]])
    Q = frames(X)
    assert np.allclose(Q[:, :, 0], [[1, 0, 0], [np.cos(0.5), np.sin(0.5), 0]])
    assert np.allclose(Q[:, :, 1], [0, 0, 1]) and np.allclose(np.linalg.det(Q), 1.0)
    for text, msg in ((run3.replace('e2: [0, 0, 2]', 'e2: ["2*cos(x)", "2*sin(x)", 0]'),
                       "e2 is parallel to it at x = [0.0, 0.0, 0.0]"),
                      (run3.replace('{e1: ["cos(x)", "sin(x)", 0], e2: [0, 0, 2]}', '"30"'), "in 3D a mapping"),
                      (run3.replace('e2: [0, 0, 2]', 'e2: [0, 2]'), "material.orientation.e2: expected a list of 3"),
                      (run3.replace('e2: [0, 0, 2]', 'e3: [0, 0, 2]'), "unknown key(s) e3")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_run_config(tmp_path / "bad.yaml").orientation(X)


@pytest.mark.parametrize("case", ["3d_traction", "2d_follower_pressure"])
def test_iterative_macro_solver_gives_the_direct_answer_with_quadratic_newton(case):
    # CG (GMRES with a follower pressure) + GAMG with the rigid-body near-nullspace against MUMPS: the same
    # reactions and displacements to 1e-6, and the same Newton iteration counts (the Krylov tolerance tied to the
    # Newton residual keeps the convergence quadratic)
    from fe2ml.macro.config import MacroSolverOptions
    from fe2ml.macro.loads import PressureSpec

    if case == "3d_traction":
        spec = {"generate": "box", "size": [2.0, 1.0, 1.0], "n": [6, 3, 3]}
        law = AnalyticLaw({0: NeoHookean(mu=1.0, K=10.0)}, dim=3)
        kw = dict(dirichlet=[DirichletSpec("left", (0, 1, 2), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.3 * t)],
                  tractions=[TractionSpec("top", (0.0, 0.0, lambda t: -0.05 * t))])
    else:
        spec = {"generate": "rectangle", "size": [2.0, 1.0], "n": [10, 5]}
        law = AnalyticLaw({0: NeoHookean(mu=1.0, K=10.0)}, dim=2)
        kw = dict(dirichlet=[DirichletSpec("left", (0, 1), 0.0)], pressures=[PressureSpec("top", lambda t: 0.15 * t)])
    runs = {}
    for kind in ("direct", "iterative"):
        prob = MacroProblem(COMM, create_macro_mesh(COMM, spec), law=law, solver=MacroSolverOptions(type=kind), **kw)
        assert prob.solver_kind == kind
        _run(prob, 2)
        runs[kind] = (prob.reactions()["left"], prob.u.x.array.copy(), [h.iterations for h in prob.history],
                      [h.residuals for h in prob.history], prob.krylov_iterations)
        # every solve assembles its matrix but the first of a step after the first step, which lifts the load
        # increment with the last matrix; not with a follower pressure (its Jacobian moves with the load)
        steps = len(prob.history)
        assert all(len(h.residuals) == 1 for h in prob.history) and steps >= 2  # no step cut
        assert prob.matrix_assemblies == sum(runs[kind][2]) - (0 if case == "2d_follower_pressure" else steps - 1)
        prob.close()
    (Rd, ud, itd, _, _), (Ri, ui, iti, resi, kry) = runs["direct"], runs["iterative"]
    assert np.abs(Rd).max() > 1e-3 and np.abs(ud).max() > 1e-2
    assert np.abs(Ri - Rd).max() < 1e-6 * np.abs(Rd).max()
    assert COMM.allreduce(np.abs(ui - ud).max(), op=MPI.MAX) < 1e-6 * COMM.allreduce(np.abs(ud).max(), op=MPI.MAX)
    assert iti == itd and kry > 0
    for r in resi:  # quadratic: each residual at most ~ the square of the last one, relative to the first
        rel = np.asarray(r) / r[0]
        for a, b in zip(rel[1:-1], rel[2:], strict=False):
            assert b < 10 * a**2 + 1e-10, rel


def test_the_lifting_is_skipped_only_where_it_adds_nothing():
    # the residual's lifting adds J (g − u) on the rows next to Dirichlet dofs: only a step's first iterate has
    # g ≠ u; skipping it at the other iterates (and on ranks without such dofs) changes no residual and no iterate
    seen = []

    class Lifts(MacroProblem):
        def _prescribed_increment(self):
            lift = super()._prescribed_increment()
            seen.append(self.comm.allreduce(lift, op=MPI.LOR))
            return lift

    class AlwaysLifts(MacroProblem):
        def _prescribed_increment(self):
            return True

    spec = {"generate": "box", "size": [2.0, 1.0, 1.0], "n": [4, 2, 2]}
    # values that u + (g − u) rounds off: the solve sets the prescribed values exactly
    kw = dict(dirichlet=[DirichletSpec("left", (0, 1, 2), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.3 * t),
                         DirichletSpec("right", (1,), lambda x, t: 0.0137 * t**3 * (1.0 + x[2]) / 3.0)],
              tractions=[TractionSpec("top", (0.0, 0.0, lambda t: -0.05 * t))])
    probs = [_run(cls(COMM, create_macro_mesh(COMM, spec), law=AnalyticLaw({0: NeoHookean(mu=1.0, K=10.0)}, dim=3),
                      **kw), 3) for cls in (Lifts, AlwaysLifts)]
    ua, ub = probs[0].u.x.array, probs[1].u.x.array
    assert np.abs(ua - ub).max() <= 1e-13 * np.abs(ub).max() and np.abs(ub).max() > 0.05
    residuals = []
    for ha, hb in zip(probs[0].history, probs[1].history, strict=True):
        assert np.allclose(ha.residuals[-1], hb.residuals[-1], rtol=1e-12, atol=0.0)
        residuals += [len(r) for r in ha.residuals]
    # the first residual of every Newton lifts, no other
    assert seen == [k == 0 for n in residuals for k in range(n)] and sum(seen) == len(residuals) == 3


def test_macro_solver_option_is_validated(tmp_path):
    from fe2ml.macro.config import load_run_config

    base = ("dim: 2\nmesh: {generate: rectangle, size: [1.0, 1.0], n: [2, 2]}\nmaterial: {kind: analytic, material: "
            "{material: neo_hookean, mu: 1.0, K: 4.0}}\nbcs: [{boundary: left, value: 0.0}]\n")
    for solver, msg in (("{type: cg}", "solver.type: expected auto, direct or iterative"),
                        ("{rtol: 2.0}", "rtol in (0, 1)"), ("{max_it: 0.5}", "solver.max_it: expected an integer"),
                        ("{colour: red}", "unknown key"), ("iterative", "solver: expected a mapping")):
        (tmp_path / "s.yaml").write_text(base + f"solver: {solver}\n")
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_run_config(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(base + "solver: {type: iterative, rtol: 1.0e-6}\n")
    assert load_run_config(tmp_path / "s.yaml").solver.type == "iterative"


def test_krylov_warm_start_saves_iterations_and_an_unconverged_krylov_solve_cuts_the_step():
    # the first increment of a step starts from the last step's increment, scaled: the same answer (to the
    # Krylov tolerance) in fewer iterations; a Krylov solve that stops at max_it is a failed attempt (the step is
    # cut, its reason kept), never an answer
    from fe2ml.errors import SolverError
    from fe2ml.macro.config import MacroSolverOptions

    spec = {"generate": "box", "size": [2.0, 1.0, 1.0], "n": [8, 4, 4]}
    law = AnalyticLaw({0: NeoHookean(mu=1.0, K=10.0)}, dim=3)
    kw = dict(dirichlet=[DirichletSpec("left", (0, 1, 2), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.3 * t)])

    class Cold(MacroProblem):
        def _newton(self, t, guess=None):
            return super()._newton(t, None)

    out = {}
    for name, cls in (("warm", MacroProblem), ("cold", Cold)):
        prob = cls(COMM, create_macro_mesh(COMM, spec), law=law, solver=MacroSolverOptions(type="iterative"), **kw)
        _run(prob, 4)
        out[name] = (prob.reactions()["left"], prob.krylov_iterations, [h.iterations for h in prob.history])
        prob.close()
    (Rw, kw_, itw), (Rc, kc, itc) = out["warm"], out["cold"]
    assert np.abs(Rw - Rc).max() < 1e-6 * np.abs(Rc).max() and itw == itc
    assert kw_ < kc, (kw_, kc)
    prob = MacroProblem(COMM, create_macro_mesh(COMM, spec), law=law,
                        solver=MacroSolverOptions(type="iterative", rtol=1e-10, max_it=2),
                        newton=NewtonOptions(max_cuts=1), **kw)
    with pytest.raises(SolverError, match=r"Krylov solve did not converge \(DIVERGED_(MAX_IT|ITS) after 2 iterations"):
        prob.step(0.5)
    assert prob.t == 0.0 and np.abs(prob.u.x.array).max() == 0.0  # the last converged state, not a partial answer
    prob.close()


def test_a_surrogate_newton_skips_the_tangent_of_its_converged_iterate(tmp_path_factory):
    # the surrogate law's stress-only pass where Newton expects convergence, the tangent computed only where it
    # iterates on, gives the same iterates as a full evaluation at every iterate (to rounding): in 3D with a field of
    # frames (the rotated stress and tangent); the converged iterates cost no tangent, and Newton stays quadratic
    import torch

    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.checkpoint import FORMAT_VERSION, save_checkpoint
    from fe2ml.surrogate.models import PotentialModel

    torch.manual_seed(0)
    m = PotentialModel(3, "finite", hidden=(8, 8), features="isotropic", convex=True).double()
    with torch.no_grad():
        m.p_scale.fill_(2.0)
    path = COMM.bcast(str(tmp_path_factory.mktemp("lazy") / "ck.pt") if COMM.rank == 0 else None)
    if COMM.rank == 0:
        save_checkpoint({"format_version": FORMAT_VERSION, "dim": 3, "kinematics": "finite",
                         "model": {"kind": "potential", "hidden": (8, 8), "features": "isotropic", "convex": True},
                         "members": [m.state_dict()], "stress_floor": 0.05,
                         "bounds": {"feature_min": [-10.0] * 3, "feature_max": [10.0] * 3},
                         "density": {"points": np.zeros((1, 3)), "x_scale": np.ones(3), "scale": 1.0}}, path)
    COMM.barrier()

    class Full(SurrogateLaw):  # a full evaluation at every iterate, the tangent kept for tangent(); no answer kept
        stress, tangent, answer_key = ConstitutiveLaw.stress, ConstitutiveLaw.tangent, ConstitutiveLaw.answer_key

    calls = {"stress": 0, "lazy": 0, "tangent": 0}

    class Counted(SurrogateLaw):
        def stress(self, F, *, with_tangent=False):
            calls["stress"] += 1
            calls["lazy"] += not with_tangent
            return super().stress(F, with_tangent=with_tangent)

        def tangent(self):
            calls["tangent"] += 1
            return super().tangent()

    frames = frames_from_axes(lambda X: np.stack([np.cos(X[:, 0]), np.sin(X[:, 0]), 0.3 + X[:, 2]], -1),
                              lambda X: np.stack([-np.sin(X[:, 0]), np.cos(X[:, 0]), 0.1 * X[:, 1]], -1))
    spec = {"generate": "box", "size": [1.0, 1.0, 1.0], "n": [2, 2, 2]}
    bcs = [DirichletSpec("left", (0, 1, 2), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.2 * t),
           DirichletSpec("right", (1,), lambda x, t: 0.05 * t * x[2])]
    probs = [_run(MacroProblem(COMM, create_macro_mesh(COMM, spec), law=cls(path, dim=3), dirichlet=bcs,
                               orientation=frames), 2) for cls in (Full, Counted)]
    ua, ub = probs[0].u.x.array, probs[1].u.x.array
    assert np.abs(ua - ub).max() <= 1e-10 * np.abs(ua).max() and np.abs(ua).max() > 0.05
    evaluations = 0
    for ha, hb in zip(probs[0].history, probs[1].history, strict=True):
        assert ha.iterations == hb.iterations and len(hb.residuals) == 1  # no step cut
        ra, r = ha.residuals[-1], hb.residuals[-1]
        # the kept stress is the converged one, and the predictor's tangent, one iterate older, lifts the step's
        # increment (the first residual) and moves the later residuals by little
        assert np.allclose(ra, r, rtol=1e-3, atol=1e-12 * r[0])
        evaluations += len(r)
        assert len(r) >= 4
        for k in range(2, len(r)):  # still quadratic: |r_k| ≤ 10 |r_k−1|² / |r_0| (or at rounding)
            assert r[k] <= 10.0 * r[k - 1] ** 2 / r[0] or r[k] < 1e-12 * r[0], r
    # one stress call per iterate, but none at a step's first iterate after the first step (the law has no history:
    # the last step's converged answer is kept there); the first two iterates of a step ask for the tangent with it,
    # later ones only where convergence is not expected; every other solve got its tangent, converged iterates none
    steps = len(probs[1].history)
    assert probs[0].reused_answers == 0 and probs[1].reused_answers == steps - 1 >= 1
    solves = evaluations - steps  # a step's converged iterate has no solve
    assert probs[0].matrix_assemblies == solves and probs[1].matrix_assemblies == solves - (steps - 1)
    assert calls["stress"] == evaluations - (steps - 1) and 1 <= calls["lazy"] <= evaluations - 2 * steps
    assert evaluations - steps - (steps - 1) <= calls["tangent"] < calls["stress"]
