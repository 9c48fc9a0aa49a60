"""Localization: exact re-solves and the learned model against standalone RVE solves and run records."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from helpers import crafted_checkpoints, tissue_rve_yaml

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.serial

RVE = tissue_rve_yaml(4, n_cells=3, seed=2)


def _run(tmp_path, name, bcs, localize=True):
    cfg = tmp_path / f"{name}.yaml"
    text = ("dim: 2\nmesh: {generate: rectangle, size: [2.0, 1.0], n: [3, 2]}\nmaterial:\n  kind: rve\n  rve:\n"
            + textwrap.indent(textwrap.dedent(RVE), "    ") + "bcs:\n" + bcs + "\nsteps: 2\n"
            + f"localize: {'true' if localize else 'false'}\noutput: {name}\n")
    cfg.write_text(text)
    r = subprocess.run([str(BIN / "fe2ml"), "run", str(cfg)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return tmp_path / name


def _localize(run_dir, *args):
    r = subprocess.run([str(BIN / "fe2ml"), "localize", str(run_dir), *map(str, args)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r


HOMOGENEOUS = "\n".join(  # affine displacement on the whole boundary: F̄ is exactly uniform
    f'  - {{boundary: {b}, components: [{c}], value: "{v}"}}' for b in ("left", "right", "bottom", "top")
    for c, v in ((0, "(0.15*x + 0.05*y)*t"), (1, "(0.02*x - 0.04*y)*t")))
CLAMPED = """\
  - {boundary: left, components: [0, 1], value: 0.0}
  - {boundary: right, components: [0], value: "0.3*t"}
  - {boundary: right, components: [1], value: "0.1*t"}"""


def test_homogeneous_macro_state_equals_standalone_rve(tmp_path):
    from fe2ml.data.campaign import build_rve
    from fe2ml.localization import read_quadrature
    from fe2ml.micro.config import parse_homogenize

    run = _run(tmp_path, "hom", HOMOGENEOUS)
    r = _localize(run)
    assert r.returncode == 0, r.stderr
    out = run / "localization_step2"
    stretch = np.load(out / "stretch.npy")
    J = np.load(out / "J.npy")
    assert np.ptp(stretch, axis=0).max() < 1e-8 and np.ptp(J, axis=0).max() < 1e-8  # same at every point
    _, _, _, F, _ = read_quadrature(run, 2)
    import yaml

    rcfg = parse_homogenize(yaml.safe_load(textwrap.dedent(RVE)) | {"dim": 2}, tmp_path / "x.yaml", "rve", tmp_path,
                            require_points=False)
    rve = build_rve(rcfg, MPI.COMM_SELF)
    c = rve.evaluate(F[0]).cells[0]
    assert np.abs(stretch[0] - c.cell["stretch"][:, 0]).max() < 1e-8
    assert np.abs(J[0] - c.cell["J"]).max() < 1e-8
    for f in ("cells.csv", "points.xdmf", "points.h5", "map_stretch.png", "hist_stretch.png", "summary.json"):
        assert (out / f).exists()


def test_localize_reproduces_run_records_and_averages(tmp_path):
    run = _run(tmp_path, "clamped", CLAMPED)
    r = _localize(run, "--fields", 0)
    assert r.returncode == 0, r.stderr
    out = run / "localization_step2"
    s = json.loads((out / "summary.json").read_text())
    assert s["max_abs_diff_to_recorded_stretch"] < 1e-8  # re-solve == what the run computed
    from fe2ml.localization import read_quadrature

    _, _, _, F, _ = read_quadrature(run, 2)
    assert np.ptp(F[:, 0, 0]) > 1e-3  # the macro state is heterogeneous
    phaseF = np.load(out / "phase_F.npy")
    vol = np.load(out / "phase_volume.npy")
    Favg = np.einsum("np,npij->nij", vol, phaseF)[:, :2, :2] / vol.sum(axis=1)[:, None, None]
    assert np.abs(Favg - F).max() < 1e-10  # volume-weighted phase averages of F equal F̄ (periodic BCs)
    assert (out / "micro_point0.xdmf").exists()
    # earlier step, subset of points
    r = _localize(run, "--step", 1, "--points", 0, 3)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "localization_step1" / "summary.json").read_text())["points"] == 2


def test_learned_localization_and_bad_input(tmp_path):
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    (tmp_path / "s.yaml").write_text("rve:\n  dim: 2\n" + textwrap.indent(textwrap.dedent(RVE), "  ")
                                     + "design: {method: sobol, n: 96, seed: 0, space: stretch, stretch: [0.85, 1.2]}\n"
                                       "output: log\n")
    run_campaign(MPI.COMM_SELF, load_sample_config(tmp_path / "s.yaml"))
    (tmp_path / "t.yaml").write_text("data: [log]\nmodel: {kind: localization, hidden: [32, 32]}\n"
                                     "train: {epochs: 3000, lr: 0.005, patience: 400, seed: 0}\noutput: loc\n")
    rep = train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    m = rep["metrics"]["test"]
    assert m["stretch_rel"] < 0.03 and m["J_rel"] < 0.03  # held-out relative error <= 3 %
    # measured on what varies (λ − 1, J − 1): a constant model, the mean of the data, must fail these bounds
    from fe2ml.data.reader import read_logs

    data = read_logs(tmp_path / "log", converged_only=True)
    lam1, J1 = data["cells/stretch"][..., 0] - 1, data["cells/J"] - 1
    const = {k: float(np.linalg.norm(v - v.mean()) / np.linalg.norm(v)) for k, v in (("lam", lam1), ("J", J1))}
    assert min(const.values()) > 0.3, const
    assert m["stretch_minus_1_rel_l2"] < 0.15 and m["J_minus_1_rel_l2"] < 0.15, m
    run = _run(tmp_path, "clamped", CLAMPED, localize=False)
    r = _localize(run, "--model", tmp_path / "loc" / "checkpoint.pt")
    assert r.returncode == 0, r.stderr
    learned = np.load(run / "localization_step2_learned" / "stretch.npy")
    r = _localize(run)
    exact = np.load(run / "localization_step2" / "stretch.npy")
    assert np.abs(learned - exact).max() / exact.max() < 0.03
    assert np.linalg.norm(learned - exact) / np.linalg.norm(exact - 1) < 0.15  # on λ − 1
    for args, msg in (((tmp_path / "nope",), "run folder not found"), ((run, "--step", 7), "converged steps 1..2"),
                      ((run, "--points", 99), "--points: indices must be in 0..11"),
                      ((run, "--model", tmp_path / "none.pt"), "checkpoint not found"),
                      *(((run, "--model", c), "was not loaded (loading it would run code from the file)")
                        for c in crafted_checkpoints(tmp_path, tmp_path / "MARKER"))):
        r = subprocess.run([str(BIN / "fe2ml"), "localize", *map(str, args)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "MARKER").exists()  # a crafted checkpoint's code never runs
