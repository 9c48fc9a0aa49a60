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


def _mpirun(args, **kw):
    return subprocess.Popen([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _wait_steps(out, k, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "checkpoint" / "meta.json"
        if m.exists():
            try:
                if json.loads(m.read_text())["steps"] >= k:
                    return True
            except (json.JSONDecodeError, KeyError):
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
    done = json.loads((tmp_path / "out" / "checkpoint" / "meta.json").read_text())["steps"]
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
    assert p.returncode != 0
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    meta = json.loads((tmp_path / "out" / "checkpoint" / "meta.json").read_text())
    assert s["status"] == "terminated" and meta["steps"] == len(s["steps"]) >= 2


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
