"""Families of tissues: parametric campaigns, parametric surrogates W(F̄; p), runs with parameters, identification.

References are independent of what is tested: finite differences for the tangent, ∂P̄/∂p and the forward
sensitivities of the macro problem; the RVE solved directly with the parameters a record claims; exact recovery of
parameters from noise-free data; the nominal coverage of the Laplace interval when the model is exact.
"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from fe2ml.errors import ConfigError
from tests.helpers import assert_check_and_run_refuse

EXE = str(Path(sys.executable).parent / "fe2ml")
BASE = """\
  dim: 2
  kinematics: finite
  mesh: {generate: cells_2d, n_cells: 1, volume_fraction: 0.25, seed: 0, h: 0.12}
  phases:
    1: {material: neo_hookean, mu: 10.0, K: 30.0}
    2: {material: neo_hookean, mu: 3.0, K: 20.0}
"""
PARAMS = "parameters:\n  phases.2.mu: [1.0, 8.0]\n  mesh.volume_fraction: [0.15, 0.35]\n"
NESTED = "".join("  " + line + "\n" for line in BASE.splitlines())
STRIP = ("dim: 2\nmesh: {generate: rectangle, size: [4.0, 1.0], n: [4, 1]}\n"
         "bcs:\n  - {boundary: left, components: [0], value: 0.0}\n"
         "  - {boundary: bottom, components: [1], value: 0.0}\n"
         "  - {boundary: right, components: [0], value: \"0.8*t\"}\nsteps: 3\n")


def _w(path: Path, text: str, shared: bool = True) -> Path:
    """Write a config: once on rank 0 into a folder the ranks share, on every rank into a per-rank tmp_path."""
    if MPI.COMM_WORLD.rank == 0 or not shared:
        path.write_text(text)
    MPI.COMM_WORLD.barrier()
    return path


def _sample_yaml(folder: Path, n=48, sets=4, extra="") -> Path:
    return _w(folder / "sample.yaml", f"rve:\n{BASE}{PARAMS}parameter_sets: {sets}\n"
              f"design: {{method: sobol, n: {n}, space: stretch, stretch: [0.85, 1.3], rotation: [-30, 30]}}\n"
              f"output: log\n{extra}")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A parametric campaign (4 parameter sets) and a small polyconvex parametric surrogate trained on it."""
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    comm = MPI.COMM_WORLD
    folder = Path(comm.bcast(str(tmp_path_factory.mktemp("family")) if comm.rank == 0 else None, root=0))
    cfg = load_sample_config(_sample_yaml(folder, n=96))
    out = run_campaign(comm, cfg)
    _w(folder / "train.yaml", "data: [log]\nmodel: {kind: potential, hidden: [16, 16], features: isotropic, "
       "convex: true}\nloss: {stress: 1.0, tangent: 0.1}\nsplit: {validation: 0.15, test: 0.15, seed: 0}\n"
       "train: {epochs: 400, lr: 0.01, patience: 400, seed: 0}\nensemble: 2\noutput: sur\n")
    train(comm, load_train_config(folder / "train.yaml"))
    comm.barrier()
    _w(folder / "strip.yaml", STRIP + "material:\n  kind: surrogate\n  checkpoint: sur/checkpoint.pt\n"
       "  parameters: {phases.2.mu: 3.0, mesh.volume_fraction: 0.25}\n  rve:\n" + NESTED + "output: r_strip\n")
    return folder, cfg, out


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("params, msg", [
    ("parameters:\n  phases.3.mu: [1, 2]\n", "parameter 'phases.3.mu' does not exist in the RVE config"),
    ("parameters:\n  mesh.volume_fractions: [0.1, 0.2]\n", "does not exist in the RVE config"),
    ("parameters:\n  phases.2.mu: [4.0, 2.0]\n", "has lo >= hi"),
    ("parameters:\n  phases.2.mu: [2.0, 2.0]\n", "has lo >= hi"),
    ("parameters:\n  phases.2.material: [1, 2]\n", "is not a number"),
    ("parameters:\n  fibre.angle: [0, 60]\n", "has no phase with fibres"),
    ("parameters:\n  phases.2.mu: [-1.0, 2.0]\n", "parameter set"),  # a set with mu <= 0: the RVE config is invalid
    ("parameter_sets: 4\n", "parameter_sets without parameters"),
    ("parameter_points: shared\n", "parameter_points without parameters"),
    ("parameters:\n  phases.2.mu: [1, 2]\nparameter_points: paired\n", "parameter_points: expected dealt or shared"),
    ("parameters:\n  phases.2.mu: [1, 2]\nparameter_sets: 100\n", "every set needs at least one point"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, params, msg):
    from fe2ml.data.config import load_sample_config

    p = _w(tmp_path / "s.yaml", f"rve:\n{BASE}{params}design: {{method: sobol, n: 16}}\noutput: log\n", shared=False)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_sample_config(p)


@pytest.mark.serial
def test_bad_parameter_name_cli_exits_2_with_one_line(tmp_path):
    p = _w(tmp_path / "s.yaml", f"rve:\n{BASE}parameters:\n  phases.9.mu: [1, 2]\n"
           "design: {method: sobol, n: 16}\noutput: log\n")
    for cmd in ("check", "sample"):
        r = subprocess.run([EXE, cmd, str(p)], capture_output=True, text=True, cwd=tmp_path)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "phases.9.mu" in err[0], r.stderr
    assert not (tmp_path / "log").exists()


def test_family_fingerprint_ignores_how_the_base_is_written(tmp_path):
    from fe2ml.micro.parameters import family_fingerprint, parse_parameter_box

    box = {"phases.2.mu": [1.0, 8.0]}
    a = {"dim": 2, "kinematics": "finite", "mesh": {"generate": "cells_2d", "n_cells": 1, "volume_fraction": 0.25,
                                                    "h": 0.12},
         "phases": {1: {"material": "neo_hookean", "mu": 10.0, "K": 30.0},
                    2: {"material": "neo_hookean", "mu": 3.0, "K": 20.0}}}
    b = json.loads(json.dumps(a))  # string phase keys
    del b["kinematics"]
    b["phases"]["1"]["mu"] = "10.0e0"  # YAML 1.1 reads 10.0e0 as a string
    b["phases"]["2"]["mu"] = 5.5  # the parameter's own base value does not matter
    c = json.loads(json.dumps(a))
    c["phases"]["1"]["mu"] = 11.0  # another matrix: another family
    fps = [family_fingerprint(parse_parameter_box(box, r, "p", tmp_path, tmp_path / "x.yaml"), 2) for r in (a, b, c)]
    assert fps[0] == fps[1] != fps[2]


def test_parameter_sets_cover_the_box_and_round_integers(tmp_path):
    from fe2ml.micro.parameters import parameter_sets, parse_parameter_box

    raw = {"dim": 2, "mesh": {"generate": "cells_2d", "n_cells": 2, "seed": 0},
           "phases": {1: {"material": "linear_elastic", "E": 1.0, "nu": 0.3}}}
    box = parse_parameter_box({"mesh.seed": [0, 3], "phases.1.E": [1.0, 2.0]}, raw, "p", tmp_path, tmp_path / "x")
    P = parameter_sets(box, 64, 0)
    assert set(np.unique(P[:, 0])) == {0.0, 1.0, 2.0, 3.0}  # every seed, integers only
    assert P[:, 1].min() >= 1.0 and P[:, 1].max() <= 2.0 and np.ptp(P[:, 1]) > 0.9


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("features, convex", [("general", False), ("general", True), ("isotropic", True),
                                              ("isotropic", False)])
def test_parametric_potential_reference_tangent_and_parameter_derivative(features, convex):
    from fe2ml.surrogate.models import PotentialModel, stress_parameter_derivative, with_parameters

    torch.manual_seed(1)
    m = PotentialModel(2, "finite", (12, 12), features, convex, parameters=["a", "b"])
    with torch.no_grad():
        m.p_mean[:] = torch.tensor([2.0, 0.3])
        m.x_scale[-2:] = torch.tensor([1.5, 0.1])
    rng = np.random.default_rng(0)
    p = np.column_stack([rng.uniform(1, 4, 6), rng.uniform(0.1, 0.5, 6)])
    eye = np.repeat(np.eye(2)[None], 6, 0)
    P0, _ = m.evaluate(with_parameters(eye, p))
    W0 = m.energy(torch.as_tensor(with_parameters(eye, p))).detach().numpy()
    assert np.abs(W0).max() < 1e-12 and np.abs(P0).max() < 1e-12  # W(I; p) = 0, P(I; p) = 0 for every p
    F = np.eye(2) + 0.15 * rng.standard_normal((6, 2, 2))
    P, A = m.evaluate(with_parameters(F, p))
    h = 1e-6
    for k in range(2):
        for l_ in range(2):
            Fp, Fm = F.copy(), F.copy()
            Fp[:, k, l_] += h
            Fm[:, k, l_] -= h
            fd = (m.evaluate(with_parameters(Fp, p))[0] - m.evaluate(with_parameters(Fm, p))[0]) / (2 * h)
            assert np.abs(A[..., k, l_] - fd).max() < 1e-6 * max(1.0, np.abs(A).max())
    G = stress_parameter_derivative(m, torch.as_tensor(with_parameters(F, p))).numpy()
    for j in range(2):
        pp, pm = p.copy(), p.copy()
        pp[:, j] += h
        pm[:, j] -= h
        fd = (m.evaluate(with_parameters(F, pp))[0] - m.evaluate(with_parameters(F, pm))[0]) / (2 * h)
        assert np.abs(G[..., j] - fd).max() < 1e-6 * max(1.0, np.abs(G).max())
        assert np.abs(fd).max() > 1e-8  # p does change the stress
    # objectivity: W(QF; p) = W(F; p)
    Q = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    W1 = m.energy(torch.as_tensor(with_parameters(F, p))).detach().numpy()
    W2 = m.energy(torch.as_tensor(with_parameters(Q @ F, p))).detach().numpy()
    assert np.allclose(W1, W2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d, features, convex", [(2, "general", False), (3, "general", True), (2, "isotropic", True),
                                                 (3, "isotropic", True), (2, "isotropic", False)])
def test_a_parametric_model_bound_to_constant_parameters_is_the_same_function_with_a_closed_form(d, features, convex):
    # the gates, additive terms and output scale of the context folded into plain weights: P̄ and Ā of the folded
    # model's closed form equal the parametric model's automatic differentiation at that p (random weights, a
    # continuous and a categorical parameter)
    from fe2ml.surrogate.models import PotentialModel, with_parameters

    torch.manual_seed(2)
    m = PotentialModel(d, "finite", (12, 12), features, convex, parameters=["a", "s"], levels={"s": [0.0, 1.0, 2.0]})
    with torch.no_grad():
        for q in m.parameters():
            q.add_(0.3 * torch.randn_like(q))
        m.p_mean[:] = torch.tensor([2.0, 0.0])
        m.x_scale[-2:] = torch.tensor([1.5, 1.0])
    rng = np.random.default_rng(4)
    F = np.eye(d) + rng.uniform(-0.2, 0.2, (40, d, d))
    for p in ([2.7, 1.0], [1.1, 2.0]):
        P0, A0 = m.evaluate(with_parameters(F, np.tile(p, (40, 1))))
        b = m.bound(p)
        assert not b.parameters_ and b.numpy_evaluator() is not None
        P1, A1 = b.evaluate(F)
        assert np.abs(P1 - P0).max() <= 1e-7 * np.abs(P0).max() and np.abs(A1 - A0).max() <= 1e-7 * np.abs(A0).max()
    if convex:  # still input-convex: the folded non-negative weights are non-negative
        assert all(torch.all(torch.nn.functional.softplus(W) >= 0) for W in b.net.Ws)


def test_the_ensemble_at_constant_parameters_answers_by_the_folded_closed_form(family):
    # SurrogateLaw with constant parameters (the folded members' closed form) equals the same parameters bound per
    # point (the autograd path): P̄, Ā and ∂P̄/∂p
    from fe2ml.laws.surrogate import SurrogateLaw

    folder, _, _ = family
    law = SurrogateLaw(folder / "sur" / "checkpoint.pt", dim=2)
    F = np.eye(2) + np.random.default_rng(5).uniform(-0.15, 0.15, (3000, 2, 2))
    law.set_parameters(np.array([3.0, 0.25]))
    assert law.model._bound is not None
    P1, A1 = law.evaluate(F)
    G1 = law.parameter_derivative(F)  # central differences of the folded closed forms
    law.set_parameters(np.tile([3.0, 0.25], (3000, 1)))
    assert law.model._bound is None
    P0, A0 = law.evaluate(F)
    G0 = law.parameter_derivative(F)  # automatic differentiation
    assert np.abs(P1 - P0).max() <= 1e-7 * np.abs(P0).max() and np.abs(A1 - A0).max() <= 1e-7 * np.abs(A0).max()
    for j in range(2):
        assert np.abs(G1[..., j] - G0[..., j]).max() <= 1e-6 * np.abs(G0[..., j]).max()


def test_partially_convex_network_is_convex_in_x_for_every_p_and_not_in_p():
    """The PICNN with its gates: second differences along random lines in x are >= 0 for any fixed c; along c they
    are not sign-constrained (the free branch)."""
    from fe2ml.surrogate.models import ICNN

    torch.manual_seed(3)
    net = ICNN(4, [16, 16], 1, monotone=(0, 1), n_ctx=2).double()
    with torch.no_grad():  # move away from the neutral start so that the gates do something
        for prm in net.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(-2, 2, 41, dtype=torch.float64)
    worst_x, worst_c = np.inf, np.inf
    for _ in range(30):
        x0, dx = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
        c0, dc = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fx = net(x0 + t[:, None] * dx, c0.expand(len(t), 2)).squeeze(-1)
            fc = net(x0.expand(len(t), 4), c0 + t[:, None] * dc).squeeze(-1)
        worst_x = min(worst_x, float((fx[2:] - 2 * fx[1:-1] + fx[:-2]).min()))
        worst_c = min(worst_c, float((fc[2:] - 2 * fc[1:-1] + fc[:-2]).min()))
        # non-decreasing in the monotone inputs
        with torch.no_grad():
            e0 = torch.zeros(4, dtype=torch.float64)
            e0[0] = 1.0
            f0 = net(x0 + t[:, None] * e0, c0.expand(len(t), 2)).squeeze(-1)
        assert float((f0[1:] - f0[:-1]).min()) >= -1e-12
    assert worst_x >= -1e-10
    assert worst_c < -1e-6  # the counter-test: the parameter branch is free (this check can fail)


# ---------------------------------------------------------------------------------------------- campaign
def test_parametric_campaign_logs_each_records_parameters_and_resumes(family):
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.reader import read_logs
    from fe2ml.micro.config import build_rve, load_rve_mesh
    from fe2ml.micro.parameters import parameter_sets, rve_with

    folder, cfg, out = family
    comm = MPI.COMM_WORLD
    data = read_logs(folder / "log", converged_only=True)
    sets = parameter_sets(cfg.parameters, cfg.parameter_sets, cfg.design["seed"])
    got = np.unique(data["p"], axis=0)
    assert len(got) == len(sets) and np.allclose(np.sort(got, axis=0), np.sort(sets, axis=0))
    assert len(np.unique(data["point_id"])) == len(data["F"]) == 96  # one record per (set, point), ids unique
    assert data.fingerprint.startswith("family-") and json.loads(data.attrs[0]["parameters"]) == list(
        cfg.parameters.names)
    # a record's stress is that of the RVE with the record's parameters (solved again here, directly)
    if comm.rank == 0:
        for k in (0, len(data["F"]) - 1):
            rc = rve_with(cfg.parameters, data["p"][k], "test", 2)
            rve = build_rve(rc, load_rve_mesh(rc))
            _, _, _, R = rve.solve(data["F"][k], None)
            P, _ = rve.homogenized(R)
            assert np.allclose(P, data["P"][k], rtol=1e-6, atol=1e-9)
    again = run_campaign(comm, cfg)
    if comm.rank == 0:
        assert out["new"] == 96 and again["new"] == 0 and again["skipped"] == 96


def test_a_parametric_log_needs_parameters_for_every_record(tmp_path):
    from fe2ml.data.log import LogWriter
    from fe2ml.data.schema import LogError

    w = LogWriter(tmp_path / "log", f"t{MPI.COMM_WORLD.rank}", 0, fingerprint="family-x", attrs={}, dim=2,
                  parameters=["a"])
    with pytest.raises(LogError, match="needs its 1 parameter"):
        w.add(np.eye(2)[None], np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 2, 2)), point_id=[0])
    w.add(np.eye(2)[None], np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 2, 2)), point_id=[0], p=[1.5])
    w.close()


# ---------------------------------------------------------------------------------------------- surrogate
def test_parametric_surrogate_trains_and_checkpoint_carries_its_box(family):
    from fe2ml.surrogate.checkpoint import load_checkpoint

    folder, cfg, _ = family
    ck = load_checkpoint(folder / "sur" / "checkpoint.pt")
    assert ck["model"]["parameters"] == list(cfg.parameters.names)
    assert ck["parameters"]["box"] == cfg.parameters.as_dict()
    assert ck["rve_fingerprint"].startswith("family-")
    assert ck["metrics"]["test"]["stress_rel_l2"] < 0.1
    assert len(ck["bounds"]["feature_min"]) == 4 + 2  # the gate's box covers p as well as the invariants


def test_runs_with_constant_and_field_parameters(family):
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    text = (folder / "strip.yaml").read_text()
    _w(folder / "field_const.yaml", text.replace("phases.2.mu: 3.0", "phases.2.mu: \"3.0 + 0*x\"")
       .replace("r_strip", "r_field_const"))
    _w(folder / "field.yaml", text.replace("phases.2.mu: 3.0", "phases.2.mu: \"1.5 + 1.5*x\"")
       .replace("r_strip", "r_field"))
    _w(folder / "soft.yaml", text.replace("phases.2.mu: 3.0", "phases.2.mu: 1.5").replace("r_strip", "r_soft"))
    R = {}
    for name in ("strip", "field_const", "field", "soft"):
        s = run(comm, load_run_config(folder / f"{name}.yaml"))
        comm.barrier()  # rank 0 writes the outputs
        assert comm.rank != 0 or s["status"] == "completed", s
        with open(folder / f"r_{name}" / "reactions.csv") as f:
            R[name] = np.array([float(r["right_R1"]) for r in csv.DictReader(f)])
    assert np.allclose(R["strip"], R["field_const"], rtol=1e-12)  # a constant field is the constant
    assert np.abs(R["field"] - R["strip"]).max() > 1e-4 * np.abs(R["strip"]).max()  # the field is used
    assert np.abs(R["soft"] - R["strip"]).max() > 1e-4 * np.abs(R["strip"]).max()


@pytest.mark.serial
@pytest.mark.parametrize("mat, msg", [
    ("  parameters: {phases.2.mu: 3.0}\n", "missing ['mesh.volume_fraction']"),
    ("  parameters: {phases.2.mu: 3.0, mesh.volume_fraction: 0.25, phases.1.mu: 2}\n", "unknown parameter(s)"),
    ("  parameters: {phases.2.mu: 30.0, mesh.volume_fraction: 0.25}\n", "outside the trained [1, 8]"),
    ("", "the checkpoint is parametric"),
])
def test_bad_run_parameters_refused(family, tmp_path, mat, msg):
    folder, _, _ = family
    _w(tmp_path / "r.yaml", STRIP + f"material:\n  kind: surrogate\n  checkpoint: {folder}/sur/checkpoint.pt\n{mat}"
       "output: run_out\n")
    assert_check_and_run_refuse(tmp_path / "r.yaml", msg, tmp_path)


@pytest.mark.serial
def test_parametric_hybrid_needs_valid_rves_over_its_field_and_the_same_family(family, tmp_path):
    folder, _, _ = family
    hyb = (STRIP + f"material:\n  kind: hybrid\n  checkpoint: {folder}/sur/checkpoint.pt\n"
           "  parameters: {phases.2.mu: \"2 - x\", mesh.volume_fraction: 0.25}\n  rve:\n" + NESTED
           + "output: run_out\n")
    _w(tmp_path / "h.yaml", hyb)  # μ_c = 2 − x reaches −2 on the strip x in [0, 4]: no RVE there
    assert_check_and_run_refuse(tmp_path / "h.yaml", "the field spans phases.2.mu in [-2, 2]", tmp_path)
    other = hyb.replace("\"2 - x\"", "2.0").replace("mu: 10.0, K: 30.0", "mu: 12.0, K: 30.0")
    _w(tmp_path / "o.yaml", other)
    assert_check_and_run_refuse(tmp_path / "o.yaml", "its RVE family", tmp_path)


@pytest.mark.serial
def test_parametric_hybrid_outside_the_box_answers_with_the_rve_of_those_parameters(family, tmp_path):
    """μ_c = 9 lies outside the trained [1, 8]: every point falls back, and the result is the nested FE² of the RVE
    with μ_c = 9 (run independently here)."""
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    _w(tmp_path / "h.yaml", STRIP + f"material:\n  kind: hybrid\n  checkpoint: {folder}/sur/checkpoint.pt\n"
       "  parameters: {phases.2.mu: 9.0, mesh.volume_fraction: 0.25}\n  rve:\n" + NESTED + "output: r_h\n")
    _w(tmp_path / "f.yaml", STRIP + "material:\n  kind: rve\n  rve:\n" + NESTED.replace("mu: 3.0", "mu: 9.0")
       + "output: r_f\n")
    # the same parameters as a field: each fallback is solved on the RVE family's solver of its point's parameters
    _w(tmp_path / "g.yaml", (tmp_path / "h.yaml").read_text().replace("mu: 9.0", "mu: \"9.0 + 0*x\"")
       .replace("r_h", "r_g"))
    sh = run(comm, load_run_config(tmp_path / "h.yaml"))
    sg = run(comm, load_run_config(tmp_path / "g.yaml"))
    run(comm, load_run_config(tmp_path / "f.yaml"))
    for s in (sh, sg):
        assert s["fallbacks"] > 0 and all(n == s["quadrature_points"] for n in s["fallbacks_per_step"])
    R = {}
    for n in ("h", "g", "f"):
        with open(tmp_path / f"r_{n}" / "reactions.csv") as f:
            R[n] = np.array([float(r["right_R1"]) for r in csv.DictReader(f)])
    assert np.allclose(R["h"], R["f"], rtol=1e-8)
    assert np.allclose(R["g"], R["f"], rtol=1e-8)


def test_parametric_hybrid_with_a_field_answers_each_fallback_with_the_rve_of_its_parameters(family):
    """μ_c = 6.5 + x and φ = 0.2 + 0.02 x on the strip x in [0, 4]: the points beyond x = 1.5 lie outside the trained
    μ_c in [1, 8] and fall back, each to the RVE of its own parameters, on its own mesh (on 2 ranks, the farm moves
    jobs with their parameters); a logged fallback or audit record is that RVE's answer (solved again here, directly,
    on an RVE built from scratch with the record's parameters)."""
    from fe2ml.data.reader import read_logs
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run
    from fe2ml.micro.config import build_rve, load_rve_mesh
    from fe2ml.micro.parameters import rve_with

    folder, cfg, _ = family
    comm = MPI.COMM_WORLD
    _w(folder / "hf.yaml", STRIP + "material:\n  kind: hybrid\n  checkpoint: sur/checkpoint.pt\n  log: fb\n"
       "  audit: {fraction: 1.0}\n  parameters: {phases.2.mu: \"6.5 + x\", mesh.volume_fraction: \"0.2 + 0.02*x\"}\n"
       "  rve:\n"
       + NESTED + "output: r_hf\n")
    s = run(comm, load_run_config(folder / "hf.yaml"))
    comm.barrier()
    if comm.rank != 0:
        return
    assert s["status"] == "completed" and s["fallbacks"] > 0
    data = read_logs(folder / "fb", converged_only=True)
    mu = data["p"][:, 0]
    audited = data["step"] >= 0  # the audit's records (the points the surrogate answered, at each step's end)
    assert data.fingerprint.startswith("family-") and (~audited).sum() == s["fallbacks"] and audited.any()
    assert mu[~audited].max() > 8.0 and len(np.unique(mu)) > 3  # outside the box, and many RVEs
    assert mu[audited].max() <= 8.0  # the surrogate answered inside the box only
    vf = data["p"][:, 1]  # a field of the mesh parameter too: a mesh per value, and RVE states of different sizes
    assert np.all((mu >= 6.5) & (mu <= 10.5)) and np.all((vf >= 0.2) & (vf <= 0.28)) and len(np.unique(vf)) > 3
    pick = np.concatenate([np.flatnonzero(~audited)[[0, -1]], np.flatnonzero(audited)[[0, -1]]])
    for k in pick:
        rc = rve_with(cfg.parameters, data["p"][k], "test", 2)
        rve = build_rve(rc, load_rve_mesh(rc))
        _, _, _, R = rve.solve(data["F"][k], None)
        P, A = rve.homogenized(R)
        assert np.allclose(P, data["P"][k], rtol=1e-7, atol=1e-9)
        assert np.allclose(A, data["A"][k], rtol=1e-6, atol=1e-8 * np.abs(A).max())


def test_hybrid_state_arrays_carry_rve_states_of_different_sizes(family, tmp_path):
    """A run checkpoint keeps the fallback points' RVE warm starts; with a field of mesh parameters their sizes differ
    from point to point. Saved (npz, as a run checkpoint does) and restored, every state is the same; the layout of
    earlier checkpoints (one row per point) still loads."""
    from fe2ml.laws.surrogate import HybridLaw
    from fe2ml.micro.config import build_rve, load_rve_mesh
    from fe2ml.micro.finite import RVEState
    from fe2ml.micro.parameters import rve_with
    from fe2ml.surrogate.deploy import read_checkpoint

    folder, cfg, _ = family
    ck = folder / "sur" / "checkpoint.pt"
    rc = rve_with(cfg.parameters, [3.0, 0.25], "test", 2)
    rve = build_rve(rc, load_rve_mesh(rc))
    fp = read_checkpoint(ck)["rve_fingerprint"]
    law = HybridLaw(ck, rve, fingerprint=fp)
    rng = np.random.default_rng(0)
    law.states = {3: RVEState(F=np.eye(2), z=rng.random(5), lam=np.zeros(0)),
                  7: RVEState(F=np.eye(2) * 1.1, z=rng.random(9), lam=np.zeros(0)),
                  8: RVEState(F=np.eye(2) * 0.9, z=rng.random(1), lam=np.zeros(0))}
    np.savez(tmp_path / "s.npz", **law.state_arrays())
    with np.load(tmp_path / "s.npz") as d:
        back = HybridLaw(ck, rve, fingerprint=fp)
        back.load_state_arrays({k: d[k] for k in d.files})
    assert sorted(back.states) == [3, 7, 8]
    for k, s in law.states.items():
        b = back.states[k]
        assert np.array_equal(b.F, s.F) and np.array_equal(b.z, s.z) and b.lam.size == 0
    old = {"ids": np.array([1, 2]), "F": np.stack([np.eye(2)] * 2), "z": np.arange(6.0).reshape(2, 3),
           "lam": np.zeros((2, 0)), "fallbacks_per_step": np.array([2]), "reason_names": np.array(["box"]),
           "reason_counts": np.array([2])}
    back.load_state_arrays(old)
    assert np.array_equal(back.states[2].z, [3.0, 4.0, 5.0]) and back.stats["fallbacks"] == 2


def test_rve_family_answers_as_rves_built_with_each_parameter_vector(tmp_path):
    """One solver per mesh, its phases' values set per parameter vector: P̄ and Ā equal those of an RVE built from
    scratch with those parameters, in any order of the vectors (moduli, volume fraction, an HGO fibre angle)."""
    from fe2ml.micro.config import build_rve, load_rve_mesh
    from fe2ml.micro.family import RVEFamily
    from fe2ml.micro.parameters import parse_parameter_box, rve_with

    base = {"dim": 2, "kinematics": "finite",
            "mesh": {"generate": "cells_2d", "n_cells": 1, "volume_fraction": 0.25, "seed": 0, "h": 0.15,
                     "out_dir": str(tmp_path / "m")},
            "phases": {1: {"material": "hgo", "mu": 10.0, "K": 30.0, "k1": 20.0, "k2": 2.0,
                           "fibres": [[1.0, 0.0], [1.0, 0.0]]},
                       2: {"material": "neo_hookean", "mu": 3.0, "K": 20.0}}}
    box = parse_parameter_box({"phases.2.mu": [1.0, 8.0], "mesh.volume_fraction": [0.15, 0.35],
                               "fibre.angle": [0.0, 60.0], "phases.1.k1": [5.0, 40.0]}, base, "t", tmp_path,
                              tmp_path / "t.yaml")
    fam = RVEFamily(box, 2)
    F = np.array([[1.15, 0.1], [0.02, 0.93]])
    ps = [[2.0, 0.25, 30.0, 20.0], [7.0, 0.25, 10.0, 35.0], [2.0, 0.3, 50.0, 8.0], [7.0, 0.25, 10.0, 35.0],
          [2.0, 0.25, 30.0, 20.0]]
    for p in ps:
        rve = fam.rve(p)
        _, _, _, R = rve.solve(F, None)
        P, A = rve.homogenized(R)
        rc = rve_with(box, p, "t", 2)
        fresh = build_rve(rc, load_rve_mesh(rc))
        _, _, _, R = fresh.solve(F, None)
        P0, A0 = fresh.homogenized(R)
        assert np.allclose(P, P0, rtol=1e-10, atol=1e-12) and np.allclose(A, A0, rtol=1e-9, atol=1e-10)
        fresh.close()
    assert fam.built == 2  # one solver per volume fraction; moduli and fibres change values only
    P_by_p = {}
    for p in ps[:2]:
        rve = fam.rve(p)
        _, _, _, R = rve.solve(F, None)
        P_by_p[tuple(p)] = rve.homogenized(R)[0]
    assert np.abs(P_by_p[tuple(ps[0])] - P_by_p[tuple(ps[1])]).max() > 1e-2  # the values did change
    with pytest.raises(ConfigError, match="cannot replace"):
        fam.rve(ps[0]).set_materials({1: rve_with(box, ps[0], "t", 2).materials[2],
                                      2: rve_with(box, ps[0], "t", 2).materials[2]})
    fam.close()
    # a bulk modulus that switches formulation (auto: K/μ >= 50 is mixed, P2–P0: another solver), and an energy
    # expression's parameter
    nh = {"material": "neo_hookean", "mu": 10.0, "K": 30.0}
    energy = {"material": "energy", "W": "c1*(I1b - 3) + K/2*(J - 1)**2", "params": {"c1": 1.5, "K": 20.0}}
    for phases, ranges, ps, built in (
            ({1: nh, 2: {**nh, "mu": 3.0}}, {"phases.1.K": [20.0, 2000.0], "phases.2.mu": [0.5, 3.0]},
             ([30.0, 1.5], [1000.0, 1.5], [600.0, 2.5], [30.0, 2.5]), 2),
            ({1: nh, 2: energy}, {"phases.2.params.c1": [0.5, 3.0]}, ([1.5], [2.5], [1.5]), 1)):
        base["phases"] = phases
        box = parse_parameter_box(ranges, base, "t", tmp_path, tmp_path / "t.yaml")
        fam = RVEFamily(box, 2)
        for p in ps:
            rve = fam.rve(p)
            rc = rve_with(box, p, "t", 2)
            fresh = build_rve(rc, load_rve_mesh(rc))
            got = []
            for r in (rve, fresh):
                _, _, _, R = r.solve(F, None)
                got.append(r.homogenized(R))
            assert rve.formulation == fresh.formulation == ("mixed" if p[0] >= 500 else "displacement")
            assert np.allclose(got[0][0], got[1][0], rtol=1e-10, atol=1e-12)
            assert np.allclose(got[0][1], got[1][1], rtol=1e-9, atol=1e-10)
            fresh.close()
        assert fam.built == built
        fam.close()


# ---------------------------------------------------------------------------------------------- identify
def _identify_yaml(folder: Path, name: str, data: str, extra: str = "") -> Path:
    return _w(folder / f"{name}.yaml", "run: strip.yaml\nunknowns: {phases.2.mu: {start: 5.0}, "
              f"mesh.volume_fraction: {{start: 0.2}}}}\ndata: {{file: {data}, columns: [right_R1, right_u2_mean]}}\n"
              f"output: {name}\n{extra}")


def _truth_csv(folder: Path, y, name: str, times) -> str:
    if MPI.COMM_WORLD.rank == 0:
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "right_R1", "right_u2_mean"])
            w.writerows([[t, *row] for t, row in zip(times, y, strict=True)])
    MPI.COMM_WORLD.barrier()
    return name


def test_forward_sensitivities_match_finite_differences(family):
    from fe2ml.identify import ForwardModel, load_identify_config

    folder, _, _ = family
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", [1 / 3, 2 / 3, 1.0])
    cfg = load_identify_config(_identify_yaml(folder, "id_fd", "ones.csv"))
    fwd = ForwardModel(MPI.COMM_WORLD, cfg)
    th = np.array([3.0, 0.25])
    y, J = fwd(th)
    for j in range(2):
        fd = _central_difference(fwd, th, j)
        assert np.abs(J[..., j] - fd).max() <= 1e-5 * np.abs(fd).max() and np.abs(fd).max() > 0


def _central_difference(fwd, th, j, rel=1e-5):
    """d y / d θ_j of a forward model by central differences of whole runs."""
    h = rel * th[j]
    tp, tm = th.copy(), th.copy()
    tp[j] += h
    tm[j] -= h
    return (fwd(tp, jacobian=False)[0] - fwd(tm, jacobian=False)[0]) / (2 * h)


def test_point_displacements_and_their_sensitivities_match_finite_differences(family):
    # data.points: the displacement at a named point inside the strip, by the probe (one owning rank, on 2 ranks too)
    # and its forward sensitivities, against central differences of whole runs
    from fe2ml.identify import ForwardModel, load_identify_config

    folder, _, _ = family
    if MPI.COMM_WORLD.rank == 0:
        (folder / "pts.csv").write_text("t,right_R1,A_u1,A_u2,B_u2\n1.0,1.0,1.0,1.0,1.0\n")
    MPI.COMM_WORLD.barrier()
    p = _w(folder / "id_pts.yaml", "run: strip.yaml\nunknowns: {phases.2.mu: {start: 5.0}, mesh.volume_fraction: "
           "{start: 0.2}}\ndata: {file: pts.csv, columns: [right_R1, A_u1, A_u2, B_u2], "
           "points: {A: [2.5, 0.7], B: [1.0, 0.0]}}\noutput: id_pts\n")
    fwd = ForwardModel(MPI.COMM_WORLD, load_identify_config(p))
    th = np.array([3.0, 0.25])
    y, J = fwd(th)
    # the right face moves 0.8 in x with the left face fixed: A (x = 2.5) moves 2.5/4 of it in a near-uniform strip;
    # B (on the bottom, u2 = 0 there) does not move vertically
    assert abs(y[1] - 0.8 * 2.5 / 4) < 0.05 * 0.8 and abs(y[3]) < 1e-12 and y[2] < 0
    for j in range(2):
        fd = _central_difference(fwd, th, j)
        assert np.all(np.abs(J[:, j] - fd) <= 1e-5 * np.abs(fd) + 1e-9) and np.abs(fd[2]) > 1e-6
    bad = _w(folder / "id_out.yaml", p.read_text().replace("A: [2.5, 0.7]", "A: [5.0, 0.7]"))
    with pytest.raises(ConfigError, match=re.escape("data.points.A: [5.0, 0.7] lies outside the macro mesh")):
        ForwardModel(MPI.COMM_WORLD, load_identify_config(bad))


def test_identify_recovers_exact_parameters_and_its_interval_covers_at_nominal_rate(family):
    """Data from the surrogate itself at p*: noise free, the estimate is p* to 1e-6; with 1 % noise in 20 draws, the
    Laplace 95 % intervals (noise level estimated) cover p* in at least 17 (the model is exact here, so what is
    tested is the uncertainty quantification, not the surrogate)."""
    from fe2ml.identify import ForwardModel, identify, load_identify_config

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    times = [1 / 3, 2 / 3, 1.0]
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", times)
    truth = np.array([3.0, 0.25])
    fwd = ForwardModel(comm, load_identify_config(_identify_yaml(folder, "id_t", "ones.csv")))
    y = fwd(truth, jacobian=False)[0].reshape(3, 2)
    cfg = load_identify_config(_identify_yaml(folder, "id_exact", _truth_csv(folder, y, "exact.csv", times)))
    rep = identify(comm, cfg)
    assert np.allclose(rep["estimate"], truth, rtol=1e-6)
    assert rep["forward_runs"] <= 12 and rep["converged"]
    rng = np.random.default_rng(5)
    cover = []
    for k in range(20):
        noisy = y * (1 + 0.01 * rng.standard_normal(y.shape))
        cfg = load_identify_config(_identify_yaml(folder, f"id_{k}", _truth_csv(folder, noisy, f"n{k}.csv", times)))
        rep = identify(comm, cfg)
        iv = np.array(rep["interval95"])
        cover.append((iv[:, 0] <= truth) & (truth <= iv[:, 1]))
        assert rep["noise"]["estimated"] and 0.002 < rep["noise"]["relative"] < 0.03
    cover = np.array(cover)
    assert cover.mean(axis=0).min() >= 0.85, cover.mean(axis=0)
    if comm.rank == 0:
        assert (folder / "id_0" / "identify.png").is_file() and (folder / "id_0" / "identify.json").is_file()


@pytest.mark.parametrize("edit, msg", [
    (("columns: [right_R1, right_u2_mean]", "columns: [top_R1]"), "do not match the run's boundaries"),
    (("columns: [right_R1, right_u2_mean]", "columns: [left_R3]"), "do not match the run's boundaries"),
    (("phases.2.mu: {start: 5.0}", "phases.1.mu: {start: 5.0}"), "not a parameter of the checkpoint"),
    (("phases.2.mu: {start: 5.0}", "phases.2.mu: {start: 50.0}"), "outside the trained box"),
    (("file: ones.csv", "file: missing.csv"), "not found"),
    (("file: ones.csv", "file: offstep.csv"), "are not load steps of the run"),
    (("file: ones.csv", "file: nocol.csv"), "has no column(s) ['right_u2_mean']"),
    (("right_u2_mean]", "C_u1]"), "do not match the run's boundaries or data.points"),
    (("output: bad", "mcmc: -1\noutput: bad"), "mcmc: expected the number of posterior samples"),
    (("right_u2_mean]}", "right_u2_mean], points: {A: [1.0]}}"), "data.points.A: expected 2 coordinates"),
    (("right_u2_mean]}", "right_u2_mean], points: {A_1: [1.0, 0.5]}}"), "a point name is a letter followed"),
])
def test_bad_identify_configs_are_one_line_errors(family, edit, msg):
    from fe2ml.identify import load_identify_config

    folder, _, _ = family
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", [1 / 3, 2 / 3, 1.0])
    _truth_csv(folder, np.ones((1, 2)), "offstep.csv", [0.5])
    if MPI.COMM_WORLD.rank == 0:
        (folder / "nocol.csv").write_text("t,right_R1\n1.0,2.0\n")
    MPI.COMM_WORLD.barrier()
    p = _identify_yaml(folder, "bad", "ones.csv")
    _w(p, p.read_text().replace(*edit))
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_identify_config(p)


@pytest.mark.serial
def test_check_validates_an_identify_config(family):
    # fe2ml check knows identify configs (key unknowns): a valid one passes, a bad column is one error line, exit 2
    folder, _, _ = family
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", [1 / 3, 2 / 3, 1.0])
    good = _identify_yaml(folder, "chk", "ones.csv", "check: true\n")
    r = subprocess.run([EXE, "check", str(good)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "is a valid identify config" in r.stdout, r.stderr
    bad = _w(folder / "chk_bad.yaml", good.read_text().replace("columns: [right_R1, right_u2_mean]",
                                                             "columns: [top_R1]"))
    r = subprocess.run([EXE, "check", str(bad)], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "do not match the run's boundaries" in lines[0], r.stderr


def test_metropolis_samples_a_known_gaussian_and_ess_matches_an_ar1_chain():
    # the sampler against an exact target (a correlated Gaussian, and a box that cuts it), and the effective sample
    # size against the AR(1) process's exact integrated autocorrelation time (1 + φ) / (1 − φ)
    from fe2ml.identify import _ess, _metropolis

    C = np.array([[1.0, 0.8], [0.8, 1.0]]) * 0.04
    Ci = np.linalg.inv(C)
    rep = _metropolis(MPI.COMM_SELF, lambda t: -0.5 * float(t @ Ci @ t), np.zeros(2), C, 20000, ["a", "b"])
    X = np.array(rep["chain"])
    assert 0.2 < rep["acceptance"] < 0.6
    assert np.abs(X.mean(0)).max() < 0.05 * 0.2 * 3  # 3 standard errors at ESS ~ 1000
    assert np.allclose(np.cov(X.T), C, rtol=0.1, atol=0.1 * 0.04)
    box = _metropolis(MPI.COMM_SELF, lambda t: -np.inf if t[0] < 0 else -0.5 * float(t @ Ci @ t), np.full(2, 0.1), C,
                      20000, ["a", "b"])
    # truncating a at 0 truncates its marginal N(0, σ²) there: a half-normal, mean σ √(2/π)
    Xb = np.array(box["chain"])
    assert Xb[:, 0].min() >= 0 and abs(Xb[:, 0].mean() - 0.2 * np.sqrt(2 / np.pi)) < 0.15 * 0.2 * np.sqrt(2 / np.pi)
    rng = np.random.default_rng(1)
    for phi in (0.0, 0.9):
        x = np.zeros(20000)
        e = rng.standard_normal(20000)
        for i in range(1, 20000):
            x[i] = phi * x[i - 1] + e[i]
        assert abs(_ess(x) / (20000 * (1 - phi) / (1 + phi)) - 1) < 0.2


def test_identify_mcmc_agrees_with_the_laplace_posterior_where_the_model_is_nearly_linear(family):
    from fe2ml.identify import ForwardModel, identify, load_identify_config

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    times = [1 / 3, 2 / 3, 1.0]
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", times)
    y = ForwardModel(comm, load_identify_config(_identify_yaml(folder, "id_m0", "ones.csv")))(
        np.array([3.0, 0.25]), jacobian=False)[0].reshape(3, 2)
    noisy = y * (1 + 0.01 * np.random.default_rng(11).standard_normal(y.shape))
    p = _identify_yaml(folder, "id_mcmc", _truth_csv(folder, noisy, "m.csv", times),
                       "mcmc: 400\nnoise: {relative: 0.01}\n")
    rep = identify(comm, load_identify_config(p))
    mc = rep["mcmc"]
    assert mc["samples"] == 400 and len(mc["chain"]) == 400 and 0.1 < mc["acceptance"] < 0.7
    sd = np.array(rep["std"])
    assert np.all(np.abs(np.array(mc["mean"]) - rep["estimate"]) < 0.6 * sd)
    assert np.all(np.abs(np.array(mc["std"]) / sd - 1) < 0.4), (mc["std"], sd)
    if comm.rank == 0:
        assert "mcmc" in json.loads((folder / "id_mcmc" / "identify.json").read_text())


def test_a_tight_gaussian_prior_holds_its_parameter(family):
    """prior: {mean, std} enters the misfit and the Laplace precision: with std = 1e-4 the estimate of mu_c stays at
    the prior mean (data from mu_c = 3 say otherwise) and its posterior std is at most the prior's."""
    from fe2ml.identify import ForwardModel, identify, load_identify_config

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    times = [1 / 3, 2 / 3, 1.0]
    _truth_csv(folder, np.ones((3, 2)), "ones.csv", times)
    fwd = ForwardModel(comm, load_identify_config(_identify_yaml(folder, "id_p0", "ones.csv")))
    y = fwd(np.array([3.0, 0.25]), jacobian=False)[0].reshape(3, 2)
    p = _identify_yaml(folder, "id_prior", _truth_csv(folder, y, "exact_p.csv", times))
    _w(p, p.read_text().replace("phases.2.mu: {start: 5.0}",
                                "phases.2.mu: {start: 5.0, prior: {mean: 4.0, std: 1.0e-4}}"))
    rep = identify(comm, load_identify_config(p))
    assert abs(rep["estimate"][0] - 4.0) < 5e-4 and rep["std"][0] <= 1.0e-4 * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------- realizations
SEEDS_RVE = """\
  dim: 2
  kinematics: finite
  mesh: {generate: cells_2d, n_cells: 2, volume_fraction: 0.3, seed: 0, h: 0.12}
  phases:
    1: {material: neo_hookean, mu: 10.0, K: 30.0}
    2: {material: neo_hookean, mu: 1.0, K: 10.0}
"""


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A campaign over four realizations (mesh.seed 0..3, one parameter set each) and its surrogate."""
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    comm = MPI.COMM_WORLD
    folder = Path(comm.bcast(str(tmp_path_factory.mktemp("seeds")) if comm.rank == 0 else None, root=0))
    _w(folder / "sample.yaml", f"rve:\n{SEEDS_RVE}parameters:\n  mesh.seed: [0, 3]\nparameter_sets: 4\n"
       "parameter_points: shared\n"
       "design: {method: sobol, n: 32, space: stretch, stretch: [0.9, 1.25], rotation: [-30, 30]}\noutput: log\n")
    run_campaign(comm, load_sample_config(folder / "sample.yaml"))
    _w(folder / "train.yaml", "data: [log]\nmodel: {kind: potential, hidden: [16, 16], features: general}\n"
       "loss: {stress: 1.0, tangent: 0.1}\nsplit: {validation: 0.15, test: 0.15, seed: 0}\n"
       "train: {epochs: 300, lr: 0.01, patience: 300, seed: 0}\nensemble: 1\noutput: sur\n")
    train(comm, load_train_config(folder / "train.yaml"))
    comm.barrier()
    return folder


def test_seed_campaign_has_one_set_per_realization_and_the_model_is_categorical(seeds):
    from fe2ml.data.reader import read_logs
    from fe2ml.surrogate.checkpoint import load_checkpoint

    data = read_logs(seeds / "log", converged_only=True)
    assert sorted(np.unique(data["p"][:, 0]).tolist()) == [0.0, 1.0, 2.0, 3.0]
    # parameter_points: shared: every realization at the same 32 F̄ (point id = set index * 32 + design index)
    ids = data["point_id"]
    F_of = [dict(zip((ids[data["p"][:, 0] == k] % 32).tolist(), data["F"][data["p"][:, 0] == k], strict=True))
            for k in range(4)]
    assert all(sorted(F_of[k]) == list(range(32)) for k in range(4))
    assert all(np.array_equal(F_of[k][i], F_of[0][i]) for k in range(1, 4) for i in range(32))
    ck = load_checkpoint(seeds / "sur" / "checkpoint.pt")
    assert ck["model"]["levels"] == {"mesh.seed": [0.0, 1.0, 2.0, 3.0]}


def test_realizations_run_gives_the_spread_of_the_single_realization_runs(seeds):
    """material.realizations: all against four separate runs, one per seed (material.parameters: {mesh.seed: k}):
    the mean and the standard deviation (ddof = 1) of the reaction at every step agree to 1e-10."""
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.realizations import run_realizations
    from fe2ml.macro.run import run

    comm = MPI.COMM_WORLD
    head = STRIP + f"material:\n  kind: surrogate\n  checkpoint: {seeds}/sur/checkpoint.pt\n"
    _w(seeds / "all.yaml", head + "  realizations: all\noutput: r_all\n")
    s = run_realizations(comm, load_run_config(seeds / "all.yaml"))
    R = []
    for k in range(4):
        _w(seeds / f"one{k}.yaml", head + f"  parameters: {{mesh.seed: {k}}}\noutput: r_one{k}\n")
        run(comm, load_run_config(seeds / f"one{k}.yaml"))
        comm.barrier()  # rank 0 writes the outputs
        with open(seeds / f"r_one{k}" / "reactions.csv") as f:
            R.append([float(r["right_R1"]) for r in csv.DictReader(f)])
    R = np.array(R)
    if comm.rank == 0:
        assert s["realizations"] == [0, 1, 2, 3]
        with open(seeds / "r_all" / "realizations.csv") as f:
            rows = list(csv.DictReader(f))
        m = np.array([float(r["right_R1_mean"]) for r in rows])
        sd = np.array([float(r["right_R1_std"]) for r in rows])
        assert np.allclose(m, R.mean(0), rtol=1e-10) and np.allclose(sd, R.std(0, ddof=1), rtol=1e-8)
        assert sd[-1] > 1e-4 * abs(m[-1])  # the realizations differ
        for name in ("realizations.png", "realizations.h5", "summary.json"):
            assert (seeds / "r_all" / name).is_file()


@pytest.mark.serial
@pytest.mark.parametrize("mat, msg", [
    ("  realizations: [0, 7]\n", "seed(s) [7] were not trained"),
    ("  realizations: [1]\n", "at least 2 realizations"),
    ("  parameters: {mesh.seed: 9}\n", "seed 9 was not trained"),
    ("  parameters: {mesh.seed: \"x\"}\n", "a realization seed is a trained integer, not a field"),
])
def test_bad_realizations_refused(seeds, tmp_path, mat, msg):
    _w(tmp_path / "r.yaml", STRIP + f"material:\n  kind: surrogate\n  checkpoint: {seeds}/sur/checkpoint.pt\n{mat}"
       "output: run_out\n")
    assert_check_and_run_refuse(tmp_path / "r.yaml", msg, tmp_path)


@pytest.mark.serial
def test_realizations_need_a_seed_checkpoint(family, tmp_path):
    folder, _, _ = family
    _w(tmp_path / "r.yaml", STRIP + f"material:\n  kind: surrogate\n  checkpoint: {folder}/sur/checkpoint.pt\n"
       "  realizations: all\n  parameters: {phases.2.mu: 3.0, mesh.volume_fraction: 0.25}\noutput: run_out\n")
    assert_check_and_run_refuse(tmp_path / "r.yaml", "the checkpoint has no realizations", tmp_path)


@pytest.mark.serial
def test_homogenize_realizations_matches_seed_by_seed_homogenization(tmp_path):
    """`homogenize --realizations 4 --cells 2 4`: the reported mean and std of C̄ equal those of the four seeds
    homogenized one by one (plain `homogenize --json` of the config with that seed and number of cells)."""
    rve = ("dim: 2\nmesh: {generate: cells_2d, n_cells: 2, volume_fraction: 0.3, seed: 0, h: 0.1}\nphases:\n"
           "  1: {material: linear_elastic, E: 10.0, nu: 0.3}\n  2: {material: linear_elastic, E: 1.0, nu: 0.3}\n")
    _w(tmp_path / "rve.yaml", rve)
    r = subprocess.run([EXE, "homogenize", "rve.yaml", "--realizations", "4", "--cells", "2", "4", "--json",
                        "rep.json"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert (tmp_path / "rep_realizations.png").is_file()
    for row in rep["rows"]:
        c = row["n_cells"]
        vals = []
        for s in range(4):
            h = 0.1 * (2 / c) ** 0.5
            _w(tmp_path / f"s{s}_{c}.yaml", rve.replace("seed: 0", f"seed: {s}").replace("n_cells: 2", f"n_cells: {c}")
               .replace("h: 0.1", f"h: {h!r}"))
            r1 = subprocess.run([EXE, "homogenize", f"s{s}_{c}.yaml", "--json", f"s{s}_{c}.json"], capture_output=True,
                                text=True, cwd=tmp_path)
            assert r1.returncode == 0, r1.stderr
            vals.append(json.loads((tmp_path / f"s{s}_{c}.json").read_text())["C"][0][0][0][0])
        assert np.isclose(row["mean"]["C1111"], np.mean(vals), rtol=1e-10)
        assert np.isclose(row["std"]["C1111"], np.std(vals, ddof=1), rtol=1e-8) and row["std"]["C1111"] > 0
    r = subprocess.run([EXE, "homogenize", "rve.yaml", "--realizations", "1"], capture_output=True, text=True,
                       cwd=tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "at least 2 realizations" in err[0]


def test_fe2_correction_moves_the_estimate_towards_the_fe2_truth(family):
    """Data from nested FE² at p* (noise free): the surrogate's own estimate is biased by its error; with
    ``correct: 2`` (nested FE² at the estimate, the discrepancy held fixed, the search repeated) the estimate moves
    towards p*."""
    from fe2ml.identify import identify, load_identify_config
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run

    folder, _, _ = family
    comm = MPI.COMM_WORLD
    _w(folder / "truth_fe2.yaml", STRIP + "material:\n  kind: rve\n  rve:\n" + NESTED + "output: r_truth\n")
    run(comm, load_run_config(folder / "truth_fe2.yaml"))
    comm.barrier()  # rank 0 writes the outputs
    with open(folder / "r_truth" / "reactions.csv") as f:
        rows = list(csv.DictReader(f))
    y = np.array([[float(r["right_R1"]), float(r["right_u2_mean"])] for r in rows])
    p = _identify_yaml(folder, "id_corr", _truth_csv(folder, y, "fe2.csv", [1 / 3, 2 / 3, 1.0]), "correct: 2\n")
    rep = identify(comm, load_identify_config(p))
    truth = np.array([3.0, 0.25])
    e_sur = np.abs(np.array(rep["surrogate_only"]["estimate"]) - truth) / truth
    e_cor = np.abs(np.array(rep["estimate"]) - truth) / truth
    assert len(rep["fe2_corrections"]) == 2
    assert np.linalg.norm(e_cor) < np.linalg.norm(e_sur), (e_sur, e_cor)


def test_fibre_angle_parameter_sets_both_families(tmp_path):
    from fe2ml.micro.parameters import parse_parameter_box, rve_with

    raw = {"dim": 2, "kinematics": "finite", "mesh": {"generate": "cells_2d", "n_cells": 1, "seed": 0},
           "phases": {1: {"material": "hgo", "mu": 1.0, "K": 3.0, "k1": 2.0, "k2": 1.0, "fibres": [[1.0, 0.0]]},
                      2: {"material": "neo_hookean", "mu": 0.5, "K": 2.0}}}
    box = parse_parameter_box({"fibre.angle": [0, 60]}, raw, "p", tmp_path, tmp_path / "x.yaml")
    cfg = rve_with(box, [30.0], "p", 2)
    a = np.array(cfg.materials[1].fibres)
    a = a[:, :2] if a.shape[1] == 3 and np.allclose(a[:, 2], 0) else a  # stored as 3-vectors in the plane
    assert np.allclose(a, [[np.cos(np.pi / 6), np.sin(np.pi / 6)], [np.cos(np.pi / 6), -np.sin(np.pi / 6)]])
    assert raw["phases"][1]["fibres"] == [[1.0, 0.0]]  # the base is not modified
