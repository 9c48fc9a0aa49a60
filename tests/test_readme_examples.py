"""README examples, executed: every command line of the README's bash blocks, its Python blocks and its YAML
blocks are run in a scratch copy of ``examples/`` and their results checked against bounds, finite differences
and independent computations.

The example configs are run as written except for the resolution keys in ``SHRINK`` (coarser meshes, fewer
points, steps and epochs), so that the whole README runs in a few minutes. Placeholders of the README
(``run.yaml``, ``campaign.yaml``, ``[--step K] ...``) are replaced by the examples in ``PLACEHOLDERS``.
A README command line that no check here knows fails the test, so a new README command needs a new check.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# resolution only: every other key of the example configs is run as written
SHRINK = {
    "rve_cells_2d.yaml": {"mesh.h": 0.05},
    "rve_tissue_finite.yaml": {"mesh.h": 0.08, "load_path.steps": 3, "fields.points": [2]},
    "strip_fe2.yaml": {"mesh.n": [4, 1], "material.rve.mesh.h": 0.1, "steps": 3},
    "strip_surrogate.yaml": {"mesh.n": [4, 1], "material.rve.mesh.h": 0.1, "steps": 3},
    "artery_fe2.yaml": {"mesh.h": 0.2, "material.rve.mesh.h": 0.1, "steps": 2},
    "strip_dns.yaml": {"mesh.rve.mesh.h": 0.1, "steps": 3},
    # the shrunk campaign and training give a surrogate of a few % error: a 1 % gate would send every point to
    # the RVE, so the test's gate is 10 % (the example's 1 % is for the full-size surrogate)
    "strip_hybrid.yaml": {"mesh.n": [4, 1], "material.rve.mesh.h": 0.1, "steps": 3, "material.threshold.error": 0.1},
    "plate_hole_fe2.yaml": {"mesh.h": 1.0, "mesh.h_hole": 0.5, "material.rve.mesh.h": 0.15, "steps": 2},
    "plate_hole_analytic.yaml": {"mesh.h": 0.5, "mesh.h_hole": 0.15, "steps": 3},
    "sample_tissue.yaml": {"rve.mesh.h": 0.1, "design.n": 48, "design.paths": [
        {"type": "uniaxial", "max": 0.25, "steps": 5}, {"type": "biaxial", "max": 0.15, "steps": 3},
        {"type": "shear", "max": 0.3, "steps": 5}]},
    "train_tissue.yaml": {"train.epochs": 600, "train.patience": 200},
    "train_localization.yaml": {"train.epochs": 600, "train.patience": 200},
}
PLACEHOLDERS = [("[--step K] [--points i j] [--fields 0]", "--step 3 --points 0 1 --fields 0"),
                ("fe2ml check run.yaml", "fe2ml check examples/strip_fe2.yaml"),
                ("fe2ml submit run.yaml", "fe2ml submit examples/strip_fe2.yaml"),
                ("fe2ml submit campaign.yaml", "fe2ml submit examples/sample_tissue.yaml")]
# not run here: what runs them
ELSEWHERE = {"bash scripts/test.sh": "the test suite itself (.ci/run)",
             "bash scripts/demo.sh": "tests/test_demo.py runs it with --quick",
             "fe2ml check identify.yaml": "tests/test_family.py::test_check_validates_an_identify_config (it needs "
                                          "a parametric checkpoint and measured data)"}


def _set(cfg, dotted, value):
    *path, last = dotted.split(".")
    for k in path:
        cfg = cfg[k]
    assert last in cfg, f"SHRINK key {dotted} not in the example"  # shrink only what the example sets
    cfg[last] = value


def readme_commands():
    """Command lines of the README's bash blocks, comments stripped, in order."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def _argv(line):
    for a, b in PLACEHOLDERS:
        line = line.replace(a, b)
    argv = shlex.split(line)
    out = []
    for a in argv:
        if a.startswith(".venv/bin/"):
            a = str(BIN / a[len(".venv/bin/"):])
        elif a in ("fe2ml", "mpiexec"):
            a = str(BIN / a)
        out.append(a)
    return out


def _run(argv, cwd, env=ENV, timeout=900):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of examples/ (shrunk) in which the README's command lines are run in order."""
    ws = tmp_path_factory.mktemp("readme")
    (ws / "examples").mkdir()
    for p in (ROOT / "examples").glob("*.yaml"):
        cfg = yaml.safe_load(p.read_text())
        for k, v in SHRINK.get(p.name, {}).items():
            _set(cfg, k, v)
        (ws / "examples" / p.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    # scheduler stand-ins: record what they were given and answer like sbatch/qsub
    fake = ws / "fakebin"
    fake.mkdir()
    for cmd, answer in (("sbatch", "Submitted batch job 4242"), ("qsub", "4242.pbsserver")):
        (fake / cmd).write_text(f'#!/bin/sh\necho "$@" > "{ws}/{cmd}.args"\necho "{answer}"\n')
        (fake / cmd).chmod(0o755)
    results = {}
    for line in readme_commands():
        if line in ELSEWHERE:
            continue
        env = ENV
        if "--restart results/run" in line:
            # an interrupted run to continue: the analytic plate, stopped by an injected fault after step 1
            r = _run([str(BIN / "fe2ml"), "run", "examples/plate_hole_analytic.yaml", "--output", "results/run"],
                     ws, env=dict(ENV, FE2ML_FAULT="0:2"))
            assert r.returncode != 0 and "injected fault" in r.stderr, r.stderr[-2000:]
        if "fe2ml submit" in line and "--dry-run" not in line:
            env = dict(ENV, PATH=f"{fake}:{ENV['PATH']}")
        results[line] = _run(_argv(line), ws, env=env)
    return ws, results


def _reactions(run_dir):
    with open(run_dir / "reactions.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _cells(csv_path):
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return {(int(r["point"]), int(r["cell"])): (float(r["stretch_max"]), float(r["J"])) for r in rows}


def _phase_C(E, nu):
    """Plane-strain isotropic stiffness, Voigt (11, 22, 12) with engineering shear."""
    lam, mu = E * nu / ((1 + nu) * (1 - 2 * nu)), E / (2 * (1 + nu))
    return np.array([[lam + 2 * mu, lam, 0], [lam, lam + 2 * mu, 0], [0, 0, mu]])


def _between_bounds(C, fractions, phases):
    """Voigt (arithmetic) and Reuss (harmonic) bounds: C_R <= C <= C_V in the sense of quadratic forms."""
    CV = sum(f * Cp for f, Cp in zip(fractions, phases, strict=True))
    CR = np.linalg.inv(sum(f * np.linalg.inv(Cp) for f, Cp in zip(fractions, phases, strict=True)))
    return np.linalg.eigvalsh(CV - C).min() > -1e-8 * CV.max() and np.linalg.eigvalsh(C - CR).min() > -1e-8 * CV.max()


# ----------------------------------------------------------------------------------------------------------------
# one check per README command line (matched by a regular expression on the line)

def check_homogenize_linear(ws, r):
    res = json.loads((ws / "out.json").read_text())
    C = np.array(res["voigt"])
    f = [res["phase_fractions"]["1"], res["phase_fractions"]["2"]]
    assert abs(sum(f) - 1) < 1e-9
    assert np.allclose(C, C.T, rtol=0, atol=1e-8 * abs(C).max())
    assert _between_bounds(C, f, [_phase_C(10.0e3, 0.45), _phase_C(1.0e3, 0.3)])
    eps = np.array([0.01, 0.0, 0.0])
    assert np.allclose(np.array(res["stresses"][0])[[0, 1, 0], [0, 1, 1]], C @ eps, rtol=1e-9)
    assert (ws / "rve.png").stat().st_size > 10_000


def check_homogenize_mpi(ws, r):
    # "same numbers": the stress printed by 2 ranks equals the serial JSON
    res = json.loads((ws / "out.json").read_text())
    m = re.search(r"σ̄ = (\[\[.*\]\])", r.stdout)
    assert m and "ranks=2" in r.stdout, r.stdout
    assert np.allclose(np.array(json.loads(m.group(1))), np.array(res["stresses"][0]), rtol=1e-6, atol=1e-6)


def check_homogenize_finite(ws, r):
    res = json.loads((ws / "out" / "tissue.json").read_text())
    F, P, A = (np.array(res[k]) for k in ("F", "P", "A"))
    assert len(F) == 3 and np.allclose(F[:, 0, 0], [1.1, 1.2, 1.3])
    assert np.all(np.diff(P[:, 0, 0]) > 0) and np.all(P[:, 0, 0] > 0)
    # consistent tangent against the secant of the neighbouring points (central difference, O(h^2))
    fd = (P[2, 0, 0] - P[0, 0, 0]) / 0.2
    assert abs(A[1, 0, 0, 0, 0] - fd) < 0.03 * abs(fd)
    # periodic fluctuations average out: the volume average of the phase-averaged F is F̄
    ph = res["cells"][2]["phase"]
    v = np.array(ph["volume"])
    assert np.allclose((v[:, None, None] * np.array(ph["F"])).sum(0)[:2, :2] / v.sum(), F[2], atol=1e-9)
    # the cells are softer than the matrix: on average they stretch more than the RVE
    assert np.mean(np.array(res["cells"][2]["cell"]["stretch"])[:, 0]) > 1.3
    assert (ws / "out" / "tissue_stress.png").is_file() and (ws / "out" / "fields_point2.xdmf").is_file()


def _check_completed_run(run_dir, steps, boundary="right"):
    s = _summary(run_dir)
    assert s["status"] == "completed" and len(s["steps"]) == steps, s["status"]
    R = _reactions(run_dir)
    assert np.all(np.isfinite(R[f"{boundary}_R1"])) and np.all(np.diff(R[f"{boundary}_R1"]) > 0)
    # equilibrium in x (no body force, top and hole free): the clamped end carries the opposite force
    assert np.allclose(R["left_R1"], -R[f"{boundary}_R1"], rtol=1e-6)
    return s, R


def check_run_strip_fe2(ws, r):
    s, R = _check_completed_run(ws / "results" / "strip_fe2", 3)
    from fe2ml.data.reader import read_logs

    log = read_logs([ws / "rve_data" / "strip_fe2"])
    assert len(log["F"]) == 3 * s["quadrature_points"]  # converged states of every step
    assert log["cells/stretch"].shape[:2] == (len(log["F"]), 4)  # 4 cells per RVE
    assert (ws / "results" / "strip_fe2" / "fields.xdmf").is_file()


def check_run_strip_dns(ws, r):
    s, R = _check_completed_run(ws / "results" / "strip_dns", 3)
    assert s["rve_solves"] == 0
    # the resolved strip (RVE tiled at scale 1/2) against FE² with the same RVE: scale separation holds well
    R2 = _reactions(ws / "results" / "strip_fe2")
    assert np.abs(R["right_R1"] / R2["right_R1"] - 1).max() < 0.02


def check_run_artery(ws, r):
    s = _summary(ws / "results" / "artery_fe2")
    assert s["status"] == "completed" and len(s["steps"]) == 2
    R = _reactions(ws / "results" / "artery_fe2")
    cfg = yaml.safe_load((ws / "examples" / "artery_fe2.yaml").read_text())
    (a, b), p = cfg["mesh"]["radii"], 600.0 * R["t"]
    # the follower pressure's resultant on the quarter wall is p times the current height of the inner arc,
    # a + u_y(0, a); the wall dilates, and u_y falls off from the inner to the outer surface
    Ry = np.abs(R["left_R1"])
    assert np.all(Ry > p * (a + R["left_u2_mean"])) and np.all(Ry < p * (a + 2 * R["left_u2_mean"]))
    assert np.all(R["left_u2_mean"] > 0) and np.all(np.diff(R["left_u2_mean"]) > 0) and b > a
    # the RVE frame turns with the wall (orientation): the two symmetry planes carry the same load
    assert np.allclose(np.abs(R["bottom_R2"]), Ry, rtol=1e-2)


def check_localize_artery(ws, r):
    summ = json.loads((ws / "results" / "artery_fe2" / "localization_step2" / "summary.json").read_text())
    (a, b) = yaml.safe_load((ws / "examples" / "artery_fe2.yaml").read_text())["mesh"]["radii"]
    assert summ["max_cell_stretch"] > summ["mean_cell_stretch"] > 1.0
    assert np.linalg.norm(summ["at_x"]) < a + (b - a) / 3  # in the inner third of the wall


def check_run_plate_fe2(ws, r):
    _check_completed_run(ws / "results" / "plate_hole_fe2", 2)


def check_run_plate_analytic(ws, r):
    _check_completed_run(ws / "results" / "plate_hole_analytic", 3)
    assert _summary(ws / "results" / "plate_hole_analytic")["rve_solves"] == 0  # single scale


def _n_design(ws):
    d = yaml.safe_load((ws / "examples" / "sample_tissue.yaml").read_text())["design"]
    return d["n"] + sum(p["steps"] for p in d["paths"])


def check_sample_mpi(ws, r):
    from fe2ml.data.reader import read_logs

    log = read_logs([ws / "rve_data" / "sample_tissue"])
    assert len(log["F"]) == _n_design(ws) and len(set(log["rank"].tolist())) == 2
    assert np.all(np.linalg.det(log["F"]) > 0) and np.all(np.isfinite(log["A"]))
    # principal stretches within the design's range [0.85, 1.25] (Sobol part)
    lam = np.sqrt(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", log["F"], log["F"])))
    sobol = log["step"] < 0  # design points; paths have their step index
    assert sobol.sum() == 48
    assert lam[sobol].min() > 0.85 - 1e-9 and lam[sobol].max() < 1.25 + 1e-9


def check_inspect(ws, r):
    assert str(_n_design(ws)) in r.stdout and (ws / "space.png").stat().st_size > 10_000


def check_sample_again(ws, r):
    # the campaign is complete: the second run resumes and evaluates nothing new
    from fe2ml.data.reader import read_logs

    assert len(read_logs([ws / "rve_data" / "sample_tissue"])["F"]) == _n_design(ws)


def check_train(ws, r):
    m = json.loads((ws / "results" / "surrogate_tissue" / "metrics.json").read_text())
    flat = json.dumps(m)
    assert "nan" not in flat.lower()
    assert (ws / "results" / "surrogate_tissue" / "checkpoint.pt").is_file()
    for png in ("loss.png", "parity_P.png", "parity_A.png"):
        assert (ws / "results" / "surrogate_tissue" / png).is_file()


def check_run_surrogate(ws, r):
    s, R = _check_completed_run(ws / "results" / "strip_surrogate", 3)
    R2 = _reactions(ws / "results" / "strip_fe2")  # the same strip with nested RVE solves
    dev = np.abs(R["right_R1"] - R2["right_R1"]).max() / np.abs(R2["right_R1"]).max()
    assert dev < 0.05, dev


def check_run_hybrid(ws, r):
    from fe2ml.data.reader import read_logs
    from fe2ml.laws.surrogate import SurrogateLaw

    s, R = _check_completed_run(ws / "results" / "strip_hybrid", 3)
    # within the training data (10 %, 20 % stretch) the surrogate answers; at 30 % the RVEs take over
    assert s["fallbacks_per_step"][0] == 0 and s["fallbacks_per_step"][-1] > 0
    log = read_logs([ws / "rve_data" / "strip_hybrid_fallback"])
    a = s["audit"]  # the audit re-solved a sample of the surrogate's points; its records join the fallbacks'
    assert len(log["F"]) == s["fallbacks"] + a["points"] and s["rve_solves"] >= s["fallbacks"]
    assert a["points"] > 0 and 0 <= a["mean_rel_error"] <= a["max_rel_error"] and 0 < a["bound95"] <= 1
    assert a["exceeded"] == (a["max_rel_error"] > a["target"]) and a["target"] == 0.01
    # every logged fallback met a criterion of the gate: outside the box, far from the data, or a predicted
    # error above the threshold; the audited points met none
    from fe2ml.surrogate.gate import relative_spread, stress_magnitude

    law = SurrogateLaw(ws / "results" / "surrogate_tissue" / "checkpoint.pt", dim=2)
    Ps, _ = law.model.evaluate_members(log["F"])
    predicted = law.gate.predicted_error(relative_spread(np.array(Ps), law.gate.floor),
                                         stress_magnitude(np.array(Ps), law.gate.floor))
    met = (law.distance(log["F"]) > 0) | (law.density_distance(log["F"]) > 2.0) | (predicted > 0.1)
    assert met.sum() == s["fallbacks"], (met.sum(), s["fallbacks"])


def check_export(ws, r):
    import torch

    from fe2ml.laws.surrogate import SurrogateLaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        mod = torch.jit.load(str(ws / "m.pt"))
    rng = np.random.default_rng(0)
    F = np.eye(2) + 0.1 * rng.uniform(-1, 1, (5, 2, 2))
    P, A = (t.numpy() for t in mod(torch.tensor(F)))
    P0, A0 = SurrogateLaw(ws / "results" / "surrogate_tissue" / "checkpoint.pt", dim=2,
                          tangent_precision="double").evaluate(F)  # the export evaluates in float64
    assert np.allclose(P, P0, rtol=1e-10, atol=1e-8) and np.allclose(A, A0, rtol=1e-10, atol=1e-8)


def check_localize_exact(ws, r):
    out = ws / "results" / "strip_fe2" / "localization_step3"
    cells = _cells(out / "cells.csv")
    assert {p for p, _ in cells} == {0, 1}
    # the re-solves reproduce the cell stretches the FE² run logged at the same points (last step)
    from fe2ml.data.reader import read_logs

    log = read_logs([ws / "rve_data" / "strip_fe2"])
    summ = json.loads((out / "summary.json").read_text())
    assert summ["max_cell_stretch"] > 1.0 and np.isfinite(summ["max_cell_stretch"])
    last = log["step"] == log["step"].max()
    logged = log["cells/stretch"][last][:, :, 0]
    mine = np.array([[cells[(p, c)][0] for c in range(logged.shape[1])] for p in (0, 1)])
    assert any(np.allclose(mine[0], row, rtol=1e-6) for row in logged)
    assert (out / "micro_point0.xdmf").is_file() and (out / "map_stretch.png").is_file()


def check_train_localization(ws, r):
    assert (ws / "results" / "localization_tissue" / "checkpoint.pt").is_file()


def check_localize_model(ws, r):
    learned = _cells(ws / "results" / "strip_fe2" / "localization_step3_learned" / "cells.csv")
    exact = _cells(ws / "results" / "strip_fe2" / "localization_step3" / "cells.csv")
    for key, (lam, J) in exact.items():  # learned model against the exact RVE re-solves
        assert abs(learned[key][0] - lam) < 0.05 * lam and abs(learned[key][1] - J) < 0.05 * J


def check_check(ws, r):
    assert "is a valid run config" in r.stdout


def check_submit_slurm(ws, r):
    script = Path(re.search(r"(\S+\.slurm\.sh)", r.stdout).group(1))
    text = (script if script.is_absolute() else ws / script).read_text()
    for s in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=32", "#SBATCH --time=04:00:00",
              "#SBATCH --account=proj", "srun", "OMP_NUM_THREADS=1", "run"):
        assert s in text, s
    assert _run(["bash", "-n", str(script if script.is_absolute() else ws / script)], ws).returncode == 0
    assert not (ws / "sbatch.args").exists()  # --dry-run submits nothing


def check_submit_pbs(ws, r):
    assert "4242.pbsserver" in r.stdout
    script = Path((ws / "qsub.args").read_text().split()[-1])
    text = script.read_text()
    for s in ("#PBS -J 0-7", "--part $PART --parts 8", "PBS_ARRAY_INDEX", "sample"):
        assert s in text, s
    assert _run(["bash", "-n", str(script)], ws).returncode == 0


def check_restart(ws, r):
    s = _summary(ws / "results" / "run")
    assert s["status"] == "completed"
    R, R0 = _reactions(ws / "results" / "run"), _reactions(ws / "results" / "plate_hole_analytic")
    assert len(R["t"]) == len(R0["t"]) == 3
    assert np.allclose(R["right_R1"], R0["right_R1"], rtol=1e-10)  # the same as the uninterrupted run


CHECKS = [
    (r"fe2ml homogenize examples/rve_cells_2d.yaml --json", check_homogenize_linear),
    (r"mpiexec -n 2 .*fe2ml homogenize examples/rve_cells_2d.yaml$", check_homogenize_mpi),
    (r"fe2ml homogenize examples/rve_tissue_finite.yaml", check_homogenize_finite),
    (r"mpiexec -n 2 .*fe2ml run examples/strip_fe2.yaml", check_run_strip_fe2),
    (r"mpiexec -n 2 .*fe2ml run examples/strip_dns.yaml", check_run_strip_dns),
    (r"mpiexec -n 2 .*fe2ml run examples/plate_hole_fe2.yaml", check_run_plate_fe2),
    (r"fe2ml run examples/plate_hole_analytic.yaml", check_run_plate_analytic),
    (r"fe2ml run examples/artery_fe2.yaml", check_run_artery),
    (r"fe2ml localize results/artery_fe2", check_localize_artery),
    (r"mpiexec -n 2 .*fe2ml sample examples/sample_tissue.yaml", check_sample_mpi),
    (r"fe2ml inspect rve_data/sample_tissue --plot space.png", check_inspect),
    (r"^\.venv/bin/fe2ml sample examples/sample_tissue.yaml", check_sample_again),
    (r"fe2ml train examples/train_tissue.yaml", check_train),
    (r"fe2ml run examples/strip_surrogate.yaml", check_run_surrogate),
    (r"fe2ml run examples/strip_hybrid.yaml", check_run_hybrid),
    (r"fe2ml export results/surrogate_tissue/checkpoint.pt m.pt", check_export),
    (r"fe2ml localize results/strip_fe2 \[", check_localize_exact),
    (r"fe2ml train examples/train_localization.yaml", check_train_localization),
    (r"fe2ml localize results/strip_fe2 --model", check_localize_model),
    (r"^fe2ml check run.yaml", check_check),
    (r"^fe2ml submit run.yaml --scheduler slurm .*--dry-run", check_submit_slurm),
    (r"^fe2ml submit campaign.yaml --scheduler pbs .*--array 8$", check_submit_pbs),
    (r"^fe2ml run --restart results/run", check_restart),
]


def _check_for(line):
    found = [f for pat, f in CHECKS if re.search(pat, line)]
    assert len(found) == 1, f"README command without exactly one check in {__file__}: {line}"
    return found[0]


@pytest.mark.serial
@pytest.mark.parametrize("line", [c for c in readme_commands() if c not in ELSEWHERE])
def test_readme_command(workspace, line):
    check = _check_for(line)
    ws, results = workspace
    r = results[line]
    assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    check(ws, r)


def test_readme_commands_run_elsewhere():
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/demo.sh" in (ROOT / "tests" / "test_demo.py").read_text()
    assert set(ELSEWHERE) <= set(readme_commands())


# ----------------------------------------------------------------------------------------------------------------
# the README's Python blocks, run in order in one namespace (the second uses the first's mesh)

def test_readme_python_blocks(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    H = np.array([[0.01, 0.004], [0.0, -0.002]])
    F = np.array([[[1.1, 0.05], [0.0, 0.98]]])
    ns = {"H": H, "F": F}
    exec(compile(blocks[0], "README.md (python 1)", "exec"), ns)
    C, mesh = ns["C"], ns["mesh"]
    from fe2ml.materials import to_voigt

    Cv = to_voigt(C)
    vol = np.bincount(mesh.phases, weights=mesh.element_volumes())
    f2 = vol[2] / vol.sum()
    assert _between_bounds(Cv, [1 - f2, f2], [_phase_C(10e3, 0.45), _phase_C(1e3, 0.3)])
    eps = 0.5 * (H + H.T)
    assert np.allclose(ns["sigma"], np.einsum("ijkl,kl->ij", C, eps), rtol=1e-8)
    assert ns["u"].x.array.size > 0 and np.abs(ns["w"].x.array).max() > 0
    exec(compile(blocks[1], "README.md (python 2)", "exec"), ns)
    res, rve = ns["res"], ns["rve"]
    # the consistent tangent against a central difference of P (independent RVE solves)
    h = 1e-6
    dF = np.zeros((1, 2, 2))
    dF[0, 0, 1] = h
    Pp, Pm = rve.evaluate(F + dF).P, rve.evaluate(F - dF).P
    assert np.allclose(res.A[0, :, :, 0, 1], (Pp - Pm)[0] / (2 * h), rtol=1e-5, atol=1e-6 * abs(res.P).max())
    assert (tmp_path / "micro.xdmf").is_file() and len(res.cells) == 1


# ----------------------------------------------------------------------------------------------------------------
# the README's YAML blocks, each run by its command (placeholders filled in, resolution shrunk)

def _readme_yaml(first_key):
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S)]
    return [b for b in blocks if next(iter(b)) == first_key]


def _ti_plane_strain(E_L, E_T, nu_LT, nu_TT, G_LT):
    """Plane-strain Voigt stiffness (11, 22, 12) of a transversely isotropic solid with axis x, from its compliance."""
    S = np.zeros((6, 6))
    S[0, 0], S[1, 1], S[2, 2] = 1 / E_L, 1 / E_T, 1 / E_T
    S[0, 1] = S[1, 0] = S[0, 2] = S[2, 0] = -nu_LT / E_L
    S[1, 2] = S[2, 1] = -nu_TT / E_T
    S[3, 3], S[4, 4], S[5, 5] = 2 * (1 + nu_TT) / E_T, 1 / G_LT, 1 / G_LT
    return np.linalg.inv(S)[np.ix_([0, 1, 5], [0, 1, 5])]


@pytest.mark.serial
def test_readme_yaml_homogenize(tmp_path):
    from fe2ml.micro.geometry import generate_mesh

    cfg = next(b for b in _readme_yaml("dim") if "phases" in b)
    assert cfg["mesh"]["file"] == "path/to/cell.msh"
    msh = generate_mesh("cells_2d", {"n_cells": 4, "volume_fraction": 0.3, "seed": 1, "h": 0.05}, tmp_path / "gen")
    (tmp_path / "path" / "to").mkdir(parents=True)
    shutil.copy(msh, tmp_path / "path" / "to" / "cell.msh")
    (tmp_path / "rve.yaml").write_text(yaml.safe_dump(cfg))
    r = _run([str(BIN / "fe2ml"), "homogenize", "rve.yaml", "--json", "out.json"], tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["n_cells"] == 4  # cell_phases: [2]
    f = [res["phase_fractions"]["1"], res["phase_fractions"]["2"]]
    # (YAML 1.1 reads 5.0e3 as a string; fe2ml accepts it as a number)
    p2 = {k: float(v) for k, v in cfg["phases"][2].items() if k not in ("material", "direction")}
    assert cfg["phases"][2]["direction"] == [1, 0, 0]
    phases = [_phase_C(10.0e3, 0.45), _ti_plane_strain(p2["E_L"], p2["E_T"], p2["nu_LT"], p2["nu_TT"], p2["G_LT"])]
    assert _between_bounds(np.array(res["voigt"]), f, phases)
    assert np.allclose(np.array(res["stresses"][0])[0, 0], np.array(res["voigt"])[0, 0] * 0.01, rtol=1e-9)


@pytest.mark.serial
def test_readme_yaml_run(tmp_path):
    cfg = next(b for b in _readme_yaml("dim") if "material" in b)
    cfg.update(steps=2, output="run")
    cfg["mesh"]["n"] = [4, 1]
    cfg["material"]["rve"]["mesh"]["h"] = 0.1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = _run([str(BIN / "fe2ml"), "run", "run.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _summary(tmp_path / "run")["status"] == "completed"
    R = _reactions(tmp_path / "run")
    assert np.allclose(R["left_R1"], -R["right_R1"], rtol=1e-6)  # equilibrium in x
    # in y the bottom carries the nominal top traction 10 t over the length 4
    assert np.allclose(np.abs(R["bottom_R2"]), 40.0 * R["t"], rtol=1e-6)


@pytest.mark.serial
def test_readme_yaml_sample_and_train(tmp_path):
    from fe2ml.data.reader import read_logs
    from fe2ml.laws.surrogate import SurrogateLaw

    cfg = _readme_yaml("rve")[0]
    assert cfg["rve"]["mesh"] == {"...": None}  # the placeholder, filled in here
    cfg["rve"]["mesh"] = {"generate": "cells_2d", "n_cells": 4, "volume_fraction": 0.3, "seed": 1, "h": 0.1}
    cfg["rve"]["phases"] = {1: {"material": "neo_hookean", "mu": 10e3, "K": 30e3},
                            2: {"material": "neo_hookean", "mu": 1e3, "K": 5e3}}
    cfg["design"]["n"] = 16
    for p in cfg["design"]["paths"]:
        p["steps"] = 3
    cfg["output"] = "log"
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(cfg))
    r = _run([str(BIN / "fe2ml"), "sample", "sample.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_logs([tmp_path / "log"])
    assert len(log["F"]) == 16 + 3 + 3
    d = log["step"] < 0
    F = log["F"][d]
    C = np.einsum("nki,nkj->nij", F, F)
    lam = np.sqrt(np.linalg.eigvalsh(C))
    lo, hi = cfg["design"]["stretch"]
    assert lam.min() >= lo - 1e-9 and lam.max() <= hi + 1e-9
    # F = R U: the rigid rotation angle is within the design's rotation range
    assert np.all(np.linalg.det(F) > 0)
    w, V = np.linalg.eigh(C)
    U = np.einsum("nik,nk,njk->nij", V, np.sqrt(w), V)  # polar decomposition F = R U
    Rot = np.einsum("nij,njk->nik", F, np.linalg.inv(U))
    angle = np.degrees(np.arctan2(Rot[:, 1, 0], Rot[:, 0, 0]))
    a0, a1 = cfg["design"]["rotation"]
    assert angle.min() >= a0 - 1e-6 and angle.max() <= a1 + 1e-6 and np.ptp(angle) > 10
    assert log["cells/stretch"].shape == (22, 4, 3)  # cells: true

    # the same block in the gradient space: bounds and symmetric
    cfg["design"].update(space="gradient", symmetric=True, paths=[])
    cfg["output"] = "log_gradient"
    (tmp_path / "sample_gradient.yaml").write_text(yaml.safe_dump(cfg))
    r = _run([str(BIN / "fe2ml"), "sample", "sample_gradient.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    Fg = read_logs([tmp_path / "log_gradient"])["F"]
    H = Fg - np.eye(2)
    assert len(Fg) == 16 and np.allclose(H, H.transpose(0, 2, 1)) and np.abs(H).max() <= 0.1 + 1e-12

    tcfg = _readme_yaml("data")[0]
    tcfg["data"] = ["log"]
    tcfg["train"].update(epochs=200, patience=100)
    tcfg["output"] = "surrogate"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(tcfg))
    r = _run([str(BIN / "fe2ml"), "train", "train.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    law = SurrogateLaw(tmp_path / "surrogate" / "checkpoint.pt", dim=2)
    P, A = law.evaluate(np.stack([np.eye(2), log["F"][0]]))
    assert np.abs(P[0]).max() < 1e-9 * np.abs(P[1]).max()  # normalised: P(I) = 0
    Am = A.reshape(2, 4, 4)
    assert np.allclose(Am, Am.transpose(0, 2, 1), atol=1e-10 * np.abs(Am).max())  # A = d2W/dF2 is symmetric


# ----------------------------------------------------------------------------------------------------------------
# every configuration key the README documents is used by a test or by an example config that a test runs

def _real_keys():
    """Keys the config parsers accept: string literals of their key checks, generator and material arguments."""
    import inspect

    from fe2ml.materials import MATERIALS
    from fe2ml.micro.geometry import GENERATORS

    keys = set()
    for mod in sorted((ROOT / "fe2ml").rglob("*.py")):  # every config parser, wherever its stage keeps it
        src = mod.read_text()
        for call in re.findall(r"(?:check_keys\(|RUN_KEYS = |allowed = )(.*?)\)\s*\n", src, flags=re.S):
            keys |= set(re.findall(r"\"([a-z_A-Z]\w*)\"", call))
    for fn, _ in GENERATORS.values():
        keys |= {p for p in inspect.signature(fn).parameters if p not in ("comm", "path", "out")}
    for spec in MATERIALS.values():
        keys |= set(spec["required"]) | set(spec["optional"])
    return keys


def _documented_keys():
    keys = set()

    def walk(d):
        if isinstance(d, dict):
            for k, v in d.items():
                keys.add(str(k))
                walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S):
        walk(yaml.safe_load(b))
        keys |= set(re.findall(r"#.*?\b([a-z_]\w*): ", b))  # keys shown in comments
    for span in re.findall(r"`([^`\n]+)`", README):  # inline code and key tables
        keys |= set(re.findall(r"\b([A-Za-z_]\w*)\b", span))
    return keys


def test_every_documented_key_is_exercised():
    documented = _documented_keys() & _real_keys()
    assert len(documented) > 60
    used = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py") if p.name != "test_readme_examples.py")
    used += "\n".join(p.read_text() for p in (ROOT / "examples").glob("*.yaml"))
    missing = sorted(k for k in documented
                     if not re.search(rf"[\"']{k}[\"']|\b{k}:|\b{k}=|\{{{k}:|:\s*{k}\b", used))
    assert not missing, f"README keys no test uses: {missing}"
