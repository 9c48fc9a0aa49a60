"""The RVE farm (balanced RVE solves over ranks) and in-run learning (material.learn).

References: the farm's answers against the same RVE solved directly on the owning rank; the balance against the
count of jobs; learning runs against themselves across a restart and across rank counts, and the nested FE² run
against itself on 1 and 2 ranks (the answer of an RVE solve does not depend on the rank that solved it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest
from helpers import box_mesh

from fe2ml.errors import ConfigError
from fe2ml.laws.farm import RVEFarm, assign
from fe2ml.materials import NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.mesh import make_rve_mesh

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------ assignment
def test_assign_keeps_own_jobs_up_to_the_mean_and_spreads_the_rest():
    w = [np.ones(40), np.zeros(0), np.zeros(0), np.ones(2)]  # the flagged points sit on rank 0
    dest = assign(w)
    assert [len(d) for d in dest] == [40, 0, 0, 2] and all((d >= 0).all() and (d < 4).all() for d in dest)
    load = np.zeros(4)
    for r, d in enumerate(dest):
        np.add.at(load, d, w[r])
    assert load.max() / load.mean() <= 1.1 and load.sum() == 42
    assert (dest[3] == 3).all()  # below the mean: a rank keeps its own jobs
    assert (dest[0][:10] == 0).all()  # the owner keeps jobs up to the mean (42 / 4 = 10.5)
    assert all((a == b).all() for a, b in zip(dest, assign(w), strict=True))  # the same on every rank


def test_assign_by_cost_bounds_the_largest_load():
    rng = np.random.default_rng(1)
    w = [rng.uniform(0.5, 3.0, 30), rng.uniform(0.5, 1.0, 5)]
    dest = assign(w)
    load = np.zeros(2)
    for r, d in enumerate(dest):
        np.add.at(load, d, w[r])
    # greedy largest-first: the largest load exceeds the mean by at most one job
    assert load.max() <= load.mean() + max(x.max() for x in w) + 1e-12
    assert abs(load.sum() - sum(x.sum() for x in w)) < 1e-12


# ------------------------------------------------------------------------------------------ the farm
def _rve():
    X, cells, ct, ph = box_mesh(2, 4, phase_fn=lambda c: 1 + (np.linalg.norm(c - 0.5, axis=1) < 0.3))
    return HyperelasticRVE(make_rve_mesh(X, cells, ct, ph, source="test box"),
                           {1: NeoHookean(mu=1.0, K=4.0), 2: NeoHookean(mu=6.0, K=20.0)})


def test_farm_answers_equal_direct_solves_whichever_rank_solves_them():
    """All jobs on rank 0: the farm spreads them over the ranks; P̄, Ā and states equal rank 0's own solves."""
    comm = MPI.COMM_WORLD
    rve = _rve()
    rng = np.random.default_rng(0)
    F = np.eye(2) + 0.06 * rng.uniform(-1, 1, (6, 2, 2)) if comm.rank == 0 else np.zeros((0, 2, 2))
    if comm.rank == 0:
        F[4, 0, 0] = -1.0  # det F̄ < 0: this job fails; the owner gets its message, no rank hangs
    farm = RVEFarm(rve, comm)
    res = farm.solve(F, [None] * len(F), points=np.arange(len(F)) + 100)
    assert len(res) == len(F)
    if comm.rank == 0:
        assert res[4].error is not None and "point 104" in res[4].error
        for k in (0, 1, 2, 3, 5):
            state, _, _, R = rve.solve(F[k], None)
            P, A = rve.homogenized(R)
            assert res[k].error is None
            assert np.abs(res[k].P - P).max() <= 1e-12 * np.abs(P).max()
            assert np.abs(res[k].A - A).max() <= 1e-12 * np.abs(A).max()
            assert np.abs(res[k].state.z - state.z).max() <= 1e-12 * max(np.abs(state.z).max(), 1e-300)
        assert farm.moved == (3 if comm.size == 2 else 0)  # equal costs: half the jobs go to the other rank
    rep = farm.balance_report()
    assert rep["balanced"] == (comm.size > 1)
    if comm.size == 2:  # by count the work is split 3/3 where it was 6/0
        assert rep["unbalanced_max_over_mean"] > 1.9


# ------------------------------------------------------------------------------------------ configs
PLATE = """dim: 2
mesh: {{generate: plate_with_hole, size: [4.0, 2.0], radius: 0.5, h: 0.9, h_hole: 0.35}}
material:
{material}  rve:
{rve}bcs:
  - {{boundary: left, components: [0], value: 0.0}}
  - {{boundary: bottom, components: [1], value: 0.0}}
  - {{boundary: right, components: [0], value: "{value}"}}
steps: {steps}
output: {output}
"""
HOLD = "0.12*min(2*t, 1)"  # pulled in two steps, then held: the learnt model answers the held steps


def _plate(tmp, name, material, tissue_rve, *, value=HOLD, steps=4):
    (tmp / f"{name}.yaml").write_text(PLATE.format(material=material, rve=tissue_rve(4), value=value, steps=steps,
                                                   output=name))
    return tmp / f"{name}.yaml"


@pytest.mark.parametrize("material, msg", [
    ("  kind: hybrid\n  checkpoint: null\n", "checkpoint: null (a cold start) needs material.learn"),
    ("  kind: hybrid\n  checkpoint: ck.pt\n  learn: {min_new: 8}\n", "material.learn.data: a run that starts"),
    ("  kind: hybrid\n  checkpoint: null\n  threshold: {error: 0.01}\n  learn: {members: 1}\n",
     "material.threshold.error: needs 2 or more members"),
    ("  kind: hybrid\n  checkpoint: null\n  learn: {min_new: 0}\n", "material.learn.min_new: expected an integer"),
    ("  kind: hybrid\n  checkpoint: null\n  learn: {epoch: 3}\n", "epoch"),
    ("  kind: hybrid\n  checkpoint: ck.pt\n  learn: {data: log, model: {hidden: [8]}}\n",
     "material.learn.model: the checkpoint's model is refitted"),
    ("  kind: rve\n  balance: 1\n", "material.balance: expected true or false"),
])
def test_learn_and_balance_configs_are_checked(mpi_tmp_path, tissue_rve, material, msg):
    from fe2ml.macro.config import load_run_config

    if MPI.COMM_WORLD.rank == 0:
        (mpi_tmp_path / "ck.pt").write_bytes(b"not read: the config is refused first")
        (mpi_tmp_path / "log").mkdir(exist_ok=True)
    MPI.COMM_WORLD.barrier()
    path = _plate(mpi_tmp_path, f"bad{MPI.COMM_WORLD.rank}", material, tissue_rve)
    with pytest.raises(ConfigError, match="^" + str(path).replace(".", r"\.") + ".*" + msg.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        load_run_config(path)


# ------------------------------------------------------------------------------------------ runs
COLD = ("  kind: hybrid\n  checkpoint: null\n  threshold: {distance: 0.05}\n"
        "  learn: {min_new: 8, first_epochs: 400, epochs: 100, members: 2, warm_lr: 0.002, loss: {relative: true}}\n")


def _q(run: Path):
    with h5py.File(run / "quadrature.h5", "r") as f:
        return {k: (f[k]["P"][()], f[k]["surrogate"][()] if "surrogate" in f[k] else None) for k in f}


def _assert_same(q, q2, rtol, flags=True):
    """Two runs' quadrature data agree at every step: equal surrogate flags, P̄ to ``rtol`` of its largest entry."""
    assert sorted(q) == sorted(q2)
    for step in q:
        if flags:
            assert (q[step][1] == q2[step][1]).all()
        assert np.abs(q[step][0] - q2[step][0]).max() <= rtol * np.abs(q[step][0]).max()


def _run(args, cwd, env=None, ranks=1):
    cmd = ([str(BIN / "mpiexec"), "-n", str(ranks)] if ranks > 1 else []) + [str(BIN / "fe2ml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ, **(env or {})))


@pytest.mark.serial
@pytest.mark.slow
def test_cold_start_learning_run_trains_uses_restarts_and_is_rank_independent(tmp_path, tissue_rve):
    _plate(tmp_path, "cold", COLD, tissue_rve)
    r = _run(["run", "cold.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cold"
    s = json.loads((out / "summary.json").read_text())
    lrn = s["learning"]
    n = s["quadrature_points"]
    # a round after steps 1, 2 and 3 (min_new reached each time), none after the last step
    assert lrn["rounds"] == 3 and lrn["round_steps"] == [1, 2, 3] and lrn["failed_rounds"] == 0
    assert lrn["records_per_round"][0] == n  # the cold first step: every point answered by its RVE
    assert lrn["fallbacks_per_step"][0] == n and lrn["fallbacks_per_step"] == s["fallbacks_per_step"]
    # the held steps lie inside the data of the pulled ones: the learnt model answers most points there
    assert lrn["fallbacks_per_step"][3] < 0.5 * n
    for k in (1, 2, 3):
        m = json.loads((out / "surrogate" / f"round-{k}" / "metrics.json").read_text())
        assert m["round"] == k and m["calibration"] is not None
        assert (out / "surrogate" / f"round-{k}" / "checkpoint.pt").is_file()
    text = (out / "run.log").read_text()
    assert "learning round 1 after step 1" in text and "learning round 3 after step 3" in text
    q = _q(out)
    assert q["step_1"][1].sum() == 0 and q["step_4"][1].sum() > 0  # the surrogate mask of quadrature.h5 agrees

    # killed at the start of step 3 (after round 2), restarted: equal to the uninterrupted run
    _plate(tmp_path, "cold_restart", COLD, tissue_rve)
    r = _run(["run", "cold_restart.yaml"], tmp_path, env={"FE2ML_FAULT": "0:3"})
    assert r.returncode != 0 and "injected fault" in r.stderr
    r = _run(["run", "--restart", "cold_restart"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(q, _q(tmp_path / "cold_restart"), 1e-10)
    s2 = json.loads((tmp_path / "cold_restart" / "summary.json").read_text())["learning"]
    assert s2["records_per_round"] == lrn["records_per_round"] and s2["fallbacks_per_step"] == lrn["fallbacks_per_step"]

    # on 2 ranks: the same records (pooled, sorted), the same fits, the same flags and P̄
    _plate(tmp_path, "cold2", COLD, tissue_rve)
    r = _run(["run", "cold2.yaml"], tmp_path, ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(q, _q(tmp_path / "cold2"), 1e-8)
    w = json.loads((tmp_path / "cold2" / "summary.json").read_text())["rve_work"]
    assert w["balanced"] and len(w["solved_per_rank_s"]) == 2


@pytest.mark.serial
@pytest.mark.slow
def test_nested_fe2_with_balancing_is_rank_independent(tmp_path, tissue_rve):
    _plate(tmp_path, "fe2", "  kind: rve\n", tissue_rve, value="0.1*t", steps=2)
    assert _run(["run", "fe2.yaml"], tmp_path).returncode == 0
    _plate(tmp_path, "fe2_2", "  kind: rve\n", tissue_rve, value="0.1*t", steps=2)
    r = _run(["run", "fe2_2.yaml"], tmp_path, ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_q(tmp_path / "fe2"), _q(tmp_path / "fe2_2"), 1e-10, flags=False)
    w = json.loads((tmp_path / "fe2_2" / "summary.json").read_text())["rve_work"]
    assert w["balanced"] and w["balanced_max_over_mean"] < 1.5


@pytest.mark.serial
def test_a_failed_round_keeps_the_model_and_the_run_goes_on(tmp_path, tissue_rve, monkeypatch):
    import fe2ml.surrogate.train as train_mod
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.run import run

    def diverge(*a, **k):
        raise train_mod.TrainingFailed("member with seed 0: the loss was never finite (train nan)")

    monkeypatch.setattr(train_mod, "fit_members", diverge)
    path = _plate(tmp_path, "fails", COLD, tissue_rve, steps=2)
    s = run(MPI.COMM_SELF, load_run_config(path))
    assert s["status"] == "completed"
    lrn = s["learning"]
    assert lrn["rounds"] == 0 and lrn["failed_rounds"] == 1
    assert lrn["fallbacks_per_step"] == [s["quadrature_points"]] * 2  # no model: the RVEs answered
    text = (tmp_path / "fails" / "run.log").read_text()
    assert "learning round after step 1 failed, the current model stays" in text and "never finite" in text
    assert not (tmp_path / "fails" / "surrogate").exists()
