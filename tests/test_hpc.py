"""Cluster workflow: checkpoint/restart, SIGKILL and SIGTERM, a failing rank, check and submit."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tissue_rve_yaml

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.serial

RUN = """\
    dim: 2
    mesh: {generate: rectangle, size: [2.0, 1.0], n: [4, 2]}
    material:
      kind: rve
      rve:
""" + tissue_rve_yaml(8, h=0.1) + """\
    bcs:
      - {boundary: left, components: [0, 1], value: 0.0}
      - {boundary: right, components: [0], value: "0.3*t"}
      - {boundary: right, components: [1], value: "0.05*t"}
    steps: 8
    output: out
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _rows(path):
    with open(path) as f:
        r = list(csv.reader(f))
    return np.array(r[1:], dtype=float)


def _mpirun(args, env=None, **kw):
    return subprocess.Popen([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), *map(str, args)], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _meta(out):
    """meta.json of the checkpoint step ``latest`` points to."""
    step = (out / "checkpoint" / "latest").read_text().strip()
    return json.loads((out / "checkpoint" / step / "meta.json").read_text())


def _wait_steps(out, k, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "checkpoint" / "latest").exists():
            try:
                if _meta(out)["steps"] >= k:
                    return True
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                pass
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    (d / "run.yaml").write_text(textwrap.dedent(RUN))
    p = _mpirun(["run", d / "run.yaml"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return _rows(d / "out" / "reactions.csv")


def test_sigkill_then_restart_identical(tmp_path, reference):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN))
    p = _mpirun(["run", tmp_path / "run.yaml"])
    assert _wait_steps(tmp_path / "out", 3, p)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    done = _meta(tmp_path / "out")["steps"]
    assert 3 <= done < 8
    r = _mpirun(["run", "--restart", tmp_path / "out"])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert f"restarting after step {done}" in out
    rows = _rows(tmp_path / "out" / "reactions.csv")
    assert rows.shape == reference.shape
    assert np.abs(rows - reference).max() <= 1e-12 * np.abs(reference).max()
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "completed" and len(s["steps"]) == 8


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN))
    p = _mpirun(["run", tmp_path / "run.yaml"])
    assert _wait_steps(tmp_path / "out", 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143  # the documented exit status of a terminated run (128 + SIGTERM)
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    meta = _meta(tmp_path / "out")
    assert s["status"] == "terminated" and meta["steps"] == len(s["steps"]) >= 2


def test_a_kill_inside_the_checkpoint_write_restarts_from_the_last_complete_step(tmp_path, reference):
    # rank 0 is killed (SIGKILL) after every rank wrote step 3's files but before the pointer switch: latest stays at
    # step 2. The restart refuses an edited config and a torn checkpoint, then continues to the uninterrupted
    # result, and the log holds every converged record exactly once.
    import shutil

    from fe2ml.data.reader import read_logs

    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN) + "log: {folder: log, cells: false}\n")
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(tmp_path / "run.yaml")],
                       env=dict(ENV, FE2ML_KILL="0:3:checkpoint"), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    ck = tmp_path / "out" / "checkpoint"
    assert (ck / "latest").read_text().strip() == "step-2" and (ck / "step-3" / "rank1.npz").is_file()
    assert sorted(d.name for d in ck.glob("step-*")) == ["step-1", "step-2", "step-3"]  # older steps pruned
    # a checkpoint whose rank files belong to different steps is refused, naming the step folder
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "out", torn)
    shutil.copy(torn / "checkpoint" / "step-2" / "rank1.npz", torn / "checkpoint" / "step-3" / "rank1.npz")
    (torn / "checkpoint" / "latest").write_text("step-3\n")
    r = _mpirun(["run", "--restart", torn])
    out, err = r.communicate(timeout=300)
    assert r.returncode == 2 and "torn checkpoint" in err and "step-3" in err
    # the config edited after the kill: refused (one line, exit 2), then accepted with --allow-changed
    text = (tmp_path / "run.yaml").read_text()
    (tmp_path / "run.yaml").write_text(text.replace('"0.3*t"', '"0.35*t"'))
    r = _mpirun(["run", "--restart", tmp_path / "out"])
    out, err = r.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "changed since the run started" in lines[0] and "run.yaml" in \
        lines[0] and "--allow-changed" in lines[0]
    (tmp_path / "run.yaml").write_text(text)  # restored: the restart continues from step 2
    r = _mpirun(["run", "--restart", tmp_path / "out"])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "restarting after step 2" in out
    rows = _rows(tmp_path / "out" / "reactions.csv")
    assert rows.shape == reference.shape and np.abs(rows - reference).max() <= 1e-12 * np.abs(reference).max()
    log = read_logs([tmp_path / "log"], converged_only=True)
    n_points = 4 * 2 * 2  # quadrature points of the 4 x 2 mesh (triangles, 1 point each)
    pairs = set(zip(log["step"].tolist(), log["point_id"].tolist(), strict=True))
    assert len(log["F"]) == len(pairs)  # no duplicate (step, point) record
    assert {s for s, _ in pairs} == set(range(1, 9)) and len(pairs) == 8 * n_points
    assert "dropped" in (tmp_path / "out" / "run.log").read_text()  # step 3's flushed records were removed


@pytest.mark.slow
def test_chaos_random_kills_then_restarts_until_done(tmp_path):
    # a 2-rank FE² run with a log, killed again and again (SIGKILL at random moments, inside the checkpoint write,
    # halfway through a log flush) and restarted until it completes: the reactions equal the uninterrupted run and
    # the log holds every converged record once, with no torn rows
    from fe2ml.data.reader import read_logs

    rng = np.random.default_rng(int(os.environ.get("FE2ML_CHAOS_SEED", "11")))
    chaos = textwrap.dedent(RUN).replace("steps: 8", "steps: 16") + "log: {folder: log, cells: false}\n"
    (tmp_path / "ref.yaml").write_text(chaos.replace("output: out", "output: ref").replace("folder: log",
                                                                                            "folder: ref_log"))
    p = _mpirun(["run", tmp_path / "ref.yaml"])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    reference = _rows(tmp_path / "ref" / "reactions.csv")
    (tmp_path / "run.yaml").write_text(chaos)
    out = tmp_path / "out"
    p = _mpirun(["run", tmp_path / "run.yaml"])
    assert _wait_steps(out, 1, p)
    time.sleep(rng.uniform(0, 1))
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    kills, done = 1, False
    for attempt in range(10):
        mode = (1, 2, 0, 1, 2, 0)[attempt] if attempt < 6 else None  # six attempts are killed, then it finishes
        env = ENV
        if mode == 1:  # inside the checkpoint write of the next step, on a random rank
            step = _meta(out)["steps"] + 1
            env = dict(ENV, FE2ML_KILL=f"{int(rng.integers(0, 2))}:{step}:checkpoint")
        elif mode == 2:  # halfway through the first log flush (the log flushes before every checkpoint)
            env = dict(ENV, FE2ML_KILL="flush:1")
        p = _mpirun(["run", "--restart", out], env=env)
        if mode == 0:  # at a random moment
            try:
                p.communicate(timeout=rng.uniform(0.3, 1.5))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=600)
        if p.returncode == 0:
            done = True
            break
        kills += 1
    assert done and kills >= 3, (done, kills)
    rows = _rows(out / "reactions.csv")
    assert rows.shape == reference.shape and np.abs(rows - reference).max() <= 1e-10 * np.abs(reference).max()
    log = read_logs([tmp_path / "log"], converged_only=True)
    pairs = set(zip(log["step"].tolist(), log["point_id"].tolist(), strict=True))
    assert len(log["F"]) == len(pairs) == 16 * 16  # every converged record of the 16 steps exactly once
    assert np.isfinite(log["F"]).all() and (np.abs(log["P"]).reshape(len(log["P"]), -1).max(axis=1) > 0).all()


def test_exception_on_one_rank_ends_the_job(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN))
    env = dict(ENV, FE2ML_FAULT="1:2")
    t0 = time.time()
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", str(tmp_path / "run.yaml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 30
    assert "injected fault on rank 1" in p.stderr


def test_restart_errors(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN).replace("steps: 8", "steps: 2"))
    assert subprocess.run([str(BIN / "fe2ml"), "run", str(tmp_path / "run.yaml")], env=ENV,
                          capture_output=True).returncode == 0
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "run", "--restart",
                        str(tmp_path / "out")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint written by 1 rank(s); restart with mpiexec -n 1" in r.stderr
    r = subprocess.run([str(BIN / "fe2ml"), "run", "--restart", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "run folder not found" in r.stderr


@pytest.mark.parametrize("sched,directive", [("slurm", "#SBATCH --ntasks-per-node=4"), ("pbs", "#PBS -l select=2")])
def test_submit_dry_run_scripts_are_valid(tmp_path, sched, directive):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN))
    r = subprocess.run([str(BIN / "fe2ml"), "submit", str(tmp_path / "run.yaml"), "--scheduler", sched, "--nodes",
                        "2", "--ntasks-per-node", "4", "--time", "01:30:00", "--account", "proj1", "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    script = tmp_path / f"run.{sched}.sh"
    text = script.read_text()
    assert directive in text and "OMP_NUM_THREADS=1" in text and "activate" in text and " run " in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run([str(BIN / "fe2ml"), "submit", str(tmp_path / "run.yaml"), "--scheduler", sched, "--time",
                          "90 minutes", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--time: expected HH:MM:SS" in bad.stderr


def test_check_validates_every_kind(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(RUN))
    r = subprocess.run([str(BIN / "fe2ml"), "check", str(tmp_path / "run.yaml")], capture_output=True, text=True)
    assert r.returncode == 0 and "valid run config" in r.stdout
    (tmp_path / "bad.yaml").write_text(textwrap.dedent(RUN).replace("n_cells: 2", "n_cells: -2"))
    r = subprocess.run([str(BIN / "fe2ml"), "check", str(tmp_path / "bad.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and "n_cells" in r.stderr
    (tmp_path / "what.yaml").write_text("hello: 1\n")
    r = subprocess.run([str(BIN / "fe2ml"), "check", str(tmp_path / "what.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot tell the kind" in r.stderr
