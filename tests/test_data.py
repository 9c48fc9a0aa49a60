"""HDF5 log: round trip, ranks, crash safety and resume, fingerprints, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from helpers import tissue_rve_yaml

from fe2ml.data.log import SCHEMA_VERSION, LogError, LogWriter
from fe2ml.data.reader import RVEDataset, read_logs
from fe2ml.errors import ConfigError

COMM = MPI.COMM_WORLD
BIN = Path(sys.executable).parent


class FakeCells:
    def __init__(self, rng, nc, npf):
        keys = {"volume": (), "F": (3, 3), "E": (3, 3), "stretch": (3,), "J": (), "W": (), "sigma": (3, 3),
                "von_mises": (), "sigma_max": ()}
        self.cell = {k: rng.normal(size=(nc, *s)) for k, s in keys.items()}
        self.cell["phase"] = rng.integers(1, 3, nc)
        self.phase = {k: rng.normal(size=(npf, *s)) for k, s in keys.items()}
        self.peak_E = rng.normal(size=npf)
        self.peak_von_mises = rng.normal(size=npf)


def test_round_trip_bit_identical(mpi_tmp_path):
    rng = np.random.default_rng(COMM.rank)
    n, d = 37, 2
    F = np.eye(d) + rng.normal(scale=0.1, size=(n, d, d))
    P = rng.normal(size=(n, d, d))
    A = rng.normal(size=(n, d, d, d, d))
    cells = [FakeCells(rng, 3, 2) for _ in range(n)]
    x = rng.normal(size=(n, 2))
    folder = mpi_tmp_path / "log"
    with LogWriter(folder, "t", COMM.rank, fingerprint="abc", attrs={"source_kind": "campaign", "source_id": "s1",
                                                                     "kinematics": "finite", "rve": "{}"},
                   dim=d, n_cells=3, n_phases=2, flush_every=10) as w:
        for k in range(0, n, 7):
            sl = slice(k, min(k + 7, n))
            w.add(F[sl], P[sl], A[sl], point_id=np.arange(n)[sl], step=3, iteration=1, converged=1, x=x[sl],
                  rank=COMM.rank, newton_its=4, cells=cells[sl])
    COMM.barrier()
    data = read_logs(w.path)
    assert len(data) == n
    assert np.array_equal(data["F"], F) and np.array_equal(data["P"], P) and np.array_equal(data["A"], A)
    assert np.array_equal(data["cells/stretch"], np.array([c.cell["stretch"] for c in cells]))
    assert np.array_equal(data["phases/peak_E"], np.array([c.peak_E for c in cells]))
    assert np.array_equal(data["x"][:, :2], x) and np.all(np.isnan(data["x"][:, 2]))
    assert np.all(data["step"] == 3) and np.all(data["rank"] == COMM.rank)
    a = data.attrs[0]
    for key in ("schema_version", "fingerprint", "created", "fe2ml_version", "versions", "dim", "source_kind"):
        assert key in a
    assert int(a["schema_version"]) == SCHEMA_VERSION and "numpy" in json.loads(a["versions"])
    # all ranks' parts merge when read as a folder
    allp = read_logs(folder)
    assert len(allp) == n * COMM.size


def test_other_fingerprint_refused_and_reader_filters(mpi_tmp_path):
    folder = mpi_tmp_path / "fp"
    if COMM.rank == 0:
        with LogWriter(folder, "a", 0, fingerprint="one", attrs={"source_id": "x"}, dim=2) as w:
            w.add(np.eye(2)[None], np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 2, 2)), point_id=[0])
    COMM.barrier()
    with pytest.raises(LogError, match="another RVE"):
        LogWriter(folder, f"b{COMM.rank}", COMM.rank, fingerprint="two", attrs={}, dim=2)
    other = mpi_tmp_path / "fp2"
    if COMM.rank == 0:
        with LogWriter(other, "c", 0, fingerprint="two", attrs={"source_id": "y"}, dim=2) as w:
            w.add(np.eye(2)[None], np.ones((1, 2, 2)), np.zeros((1, 2, 2, 2, 2)), point_id=[0])
    COMM.barrier()
    with pytest.raises(LogError, match="several RVE fingerprints"):
        read_logs([folder, other])
    assert read_logs([folder, other], fingerprint="two")["P"][0, 0, 0] == 1.0
    with pytest.raises(LogError, match="no log part matches"):
        read_logs(folder, source="zzz")


def test_corrupt_truncated_and_schema(mpi_tmp_path):
    folder = mpi_tmp_path / "bad"
    if COMM.rank == 0:
        with LogWriter(folder, "a", 0, fingerprint="f", attrs={}, dim=2) as w:
            w.add(np.eye(2)[None].repeat(5, 0), np.zeros((5, 2, 2)), np.zeros((5, 2, 2, 2, 2)), point_id=range(5))
        raw = w.path.read_bytes()
        (folder / "trunc.h5").write_bytes(raw[: len(raw) // 3])
        (mpi_tmp_path / "garbage.h5").write_bytes(b"not hdf5 at all" * 100)
        import h5py

        other = mpi_tmp_path / "v99.h5"
        with h5py.File(other, "w") as f:
            f.attrs["schema_version"] = 99
            f.attrs["fingerprint"] = "f"
    COMM.barrier()
    with pytest.raises(LogError, match="corrupt or truncated"):
        read_logs(folder / "trunc.h5")
    with pytest.raises(LogError, match="corrupt or truncated"):
        read_logs(mpi_tmp_path / "garbage.h5")
    with pytest.raises(LogError, match="schema version 99 is not supported"):
        read_logs(mpi_tmp_path / "v99.h5")
    # the intact part is untouched
    assert len(read_logs(w.path if COMM.rank == 0 else sorted(folder.glob("part-*.h5"))[0])) == 5


def test_disk_full_keeps_flushed_records(mpi_tmp_path, monkeypatch):
    folder = mpi_tmp_path / f"full{COMM.rank}"
    w = LogWriter(folder, "a", 0, fingerprint="f", attrs={}, dim=2, flush_every=4)
    ones = np.eye(2)[None].repeat(4, 0)
    w.add(ones, np.zeros((4, 2, 2)), np.zeros((4, 2, 2, 2, 2)), point_id=range(4))  # flushed
    import h5py

    real = h5py.Dataset.__setitem__

    def full(self, key, val):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(LogError, match="No space left on device.*4 records of earlier flushes are intact"):
        w.add(ones, np.zeros((4, 2, 2)), np.zeros((4, 2, 2, 2, 2)), point_id=range(4, 8))
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    w.close()
    data = read_logs(w.path)
    assert len(data) == 4 and np.array_equal(data["point_id"], np.arange(4))


def test_unwritable_folder(mpi_tmp_path):
    blocker = mpi_tmp_path / f"file{COMM.rank}"
    blocker.write_text("x")
    with pytest.raises(LogError, match="cannot create the log folder"):
        LogWriter(blocker / "sub", "a", 0, fingerprint="f", attrs={}, dim=2)


def test_torch_dataset_lazy(mpi_tmp_path):
    torch = pytest.importorskip("torch")
    folder = mpi_tmp_path / f"ds{COMM.rank}"
    rng = np.random.default_rng(1)
    F = np.eye(2) + rng.normal(scale=0.1, size=(20, 2, 2))
    with LogWriter(folder, "a", 0, fingerprint="f", attrs={}, dim=2) as w:
        w.add(F[:12], F[:12] * 2, np.zeros((12, 2, 2, 2, 2)), point_id=range(12))
    with LogWriter(folder, "b", 0, fingerprint="f", attrs={}, dim=2) as w:
        w.add(F[12:], F[12:] * 2, np.zeros((8, 2, 2, 2, 2)), point_id=range(12, 20))
    ds = RVEDataset(folder)
    assert len(ds) == 20 and ds._files == {}  # nothing opened yet
    items = [ds[i] for i in range(20)]
    got = np.sort(np.array([it["F"].numpy() for it in items]).reshape(20, -1), axis=0)
    assert np.array_equal(got, np.sort(F.reshape(20, -1), axis=0))
    assert torch.allclose(items[3]["P"], 2 * items[3]["F"])


SAMPLE = """\
    rve:
""" + tissue_rve_yaml(6, dim=2, volume_fraction=0.2, seed=4) + """\
    design:
      method: sobol
      n: 16
      seed: 3
      space: gradient
      bounds: [-0.15, 0.15]
      paths: [{type: uniaxial, max: 0.2, steps: 4}]
    output: log
    flush_every: 4
"""


@pytest.mark.serial
def test_campaign_one_vs_two_ranks_and_inspect(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(textwrap.dedent(SAMPLE))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([str(BIN / "fe2ml"), "sample", str(cfg), "--output", str(tmp_path / "one")],
                        capture_output=True, text=True, env=env, timeout=600)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "sample", str(cfg), "--output",
                         str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr
    a, b = read_logs(tmp_path / "one"), read_logs(tmp_path / "two")
    assert len(a) == len(b) == 20 and len(b.parts) == 2
    ia, ib = np.argsort(a["point_id"]), np.argsort(b["point_id"])
    assert np.array_equal(a["point_id"][ia], np.arange(20))
    assert np.array_equal(a["F"][ia], b["F"][ib])
    assert np.abs(a["P"][ia] - b["P"][ib]).max() < 1e-9 * np.abs(a["P"]).max()
    assert a.fingerprint == b.fingerprint and "cells/stretch" in a.arrays
    r = subprocess.run([str(BIN / "fe2ml"), "inspect", str(tmp_path / "two"), "--plot", str(tmp_path / "s.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "20 records in 2 part(s)" in r.stdout and (tmp_path / "s.png").exists()


@pytest.mark.serial
def test_campaign_sigkill_then_resume(tmp_path):
    text = textwrap.dedent(SAMPLE).replace("n: 16", "n: 400").replace("flush_every: 4", "flush_every: 8")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text)
    out = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(BIN / "fe2ml"), "sample", str(cfg), "--output", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    n_seen = 0
    while time.time() - t0 < 120:
        time.sleep(0.3)
        try:
            n_seen = len(read_logs(out))
        except (LogError, OSError, KeyError):
            n_seen = 0
        if n_seen >= 24:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n_seen >= 24
    data = read_logs(out)  # opens after SIGKILL
    n_kill = len(data)
    assert n_seen <= n_kill < 404 and n_kill % 8 == 0
    assert len(np.unique(data["point_id"])) == n_kill and np.all(np.isfinite(data["P"]))
    r = subprocess.run([str(BIN / "fe2ml"), "sample", str(cfg), "--output", str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{n_kill} already logged" in r.stdout
    final = read_logs(out)
    assert len(final) == 404 and np.array_equal(np.sort(final["point_id"]), np.arange(404))


SAMPLE_BAD = {
    "method": (SAMPLE.replace("method: sobol", "method: random_walk"), "unknown sampling method 'random_walk'"),
    "detF": (SAMPLE.replace("bounds: [-0.15, 0.15]", "bounds: [-1.5, 1.5]"), "bounds give det F̄ <= 0"),
    "bounds_shape": (SAMPLE.replace("bounds: [-0.15, 0.15]", "bounds: [0.1]"), "expected [lo, hi]"),
    "unknown_key": (SAMPLE.replace("flush_every: 4", "flush_every: 4\n    speed: fast"), "unknown key(s) speed"),
    "volume_gradient": (SAMPLE.replace("method: sobol", "method: sobol\n      volume: [0.9, 1.1]"),
                        "volume: only for space: stretch"),
    "path_type": (SAMPLE.replace("type: uniaxial", "type: twist"),
                  "expected one of uniaxial, biaxial, shear, pure_shear, got 'twist'"),
}


@pytest.mark.serial
@pytest.mark.parametrize("name", sorted(SAMPLE_BAD))
def test_sample_bad_input(tmp_path, name):
    text, expected = SAMPLE_BAD[name]
    cfg = tmp_path / "s.yaml"
    cfg.write_text(textwrap.dedent(text))
    r = subprocess.run([str(BIN / "fe2ml"), "sample", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.serial
def test_sample_into_folder_of_other_rve_refused(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(textwrap.dedent(SAMPLE).replace("n: 16", "n: 2").replace("paths: [{type: uniaxial, max: 0.2, "
                                                                               "steps: 4}]", "paths: []"))
    assert subprocess.run([str(BIN / "fe2ml"), "sample", str(cfg)], capture_output=True, timeout=300).returncode == 0
    before = read_logs(tmp_path / "log")
    cfg.write_text(cfg.read_text().replace("mu: 0.2", "mu: 0.3"))
    r = subprocess.run([str(BIN / "fe2ml"), "sample", str(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds records of another RVE" in r.stderr
    after = read_logs(tmp_path / "log")
    assert np.array_equal(before["P"], after["P"])


def test_design_spaces_are_valid():
    from fe2ml.data.design import design_points

    base = {"method": "lhs", "n": 50, "seed": 1, "space": "stretch", "bounds": [-0.1, 0.1], "symmetric": False,
            "stretch": [0.8, 1.2], "rotation": [-20.0, 20.0], "paths": []}
    for d in (2, 3):
        F, tags = design_points(base, d)
        lam = np.sqrt(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F)))
        assert F.shape == (50, d, d) and np.all(tags == -1)
        assert lam.min() >= 0.8 - 1e-12 and lam.max() <= 1.2 + 1e-12
    # volume: det F̄ uniform in the range, the first principal stretches still in theirs
    for d in (2, 3):
        F, _ = design_points({**base, "method": "sobol", "n": 64, "volume": [0.97, 1.05]}, d)
        J = np.linalg.det(F)
        assert J.min() >= 0.97 - 1e-12 and J.max() <= 1.05 + 1e-12 and J.min() < 0.98 and J.max() > 1.04
        lam = np.sort(np.sqrt(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F))), axis=1)
        assert lam[:, 0].min() < 0.97 and lam[:, -1].max() > 1.12  # far from identity, yet near-isochoric
    # named paths, pure_shear: F11 = 1 + s, F22 = 1/(1 + s), isochoric
    from fe2ml.micro.config import load_path

    P = np.array(load_path("pure_shear", 0.2, 4, 3))
    assert np.allclose(np.linalg.det(P), 1.0) and np.allclose(P[:, 0, 0], [1.05, 1.1, 1.15, 1.2])
    assert np.allclose(P[:, 2, 2], 1.0)
    with pytest.raises(ConfigError, match="load path type 'twist'"):
        load_path("twist", 0.2, 4, 2)
    F, _ = design_points({**base, "space": "gradient", "symmetric": True}, 3)
    assert np.allclose(F, F.transpose(0, 2, 1)) and np.abs(F - np.eye(3)).max() <= 0.1
    with pytest.raises(ConfigError):
        from fe2ml.data.config import load_sample_config

        load_sample_config("/nonexistent.yaml")


@pytest.mark.serial
def test_a_part_killed_while_being_created_leaves_no_unreadable_h5(tmp_path):
    # SIGKILL after the HDF5 file is opened and before its header is written: readers must not meet a truncated part
    code = ("from fe2ml.data.log import LogWriter\n"
            f"LogWriter({str(tmp_path / 'log')!r}, 'k', 0, fingerprint='fp', attrs={{}}, dim=2)\n")
    r = subprocess.run([str(BIN / "python"), "-c", code], env=dict(os.environ, FE2ML_KILL="create"),
                       capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert list((tmp_path / "log").glob("*.h5")) == []  # only the hidden, never-renamed file
    assert len(list((tmp_path / "log").glob(".*.creating"))) == 1
    with LogWriter(tmp_path / "log", "t", 0, fingerprint="fp", attrs={}, dim=2) as w:
        w.add(np.eye(2)[None], np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 2, 2)), point_id=[0])
    assert len(read_logs(tmp_path / "log")["F"]) == 1


def test_a_torn_flush_is_read_up_to_the_last_complete_record(tmp_path):
    # a kill between the per-dataset resizes of a flush: some datasets longer than others, rows never written
    import logging

    import h5py

    from fe2ml.data.log import LogWriter
    from fe2ml.data.reader import read_logs

    rng = np.random.default_rng(0)
    F = np.eye(2) + 0.1 * rng.normal(size=(12, 2, 2))
    P = rng.normal(size=(12, 2, 2))
    with LogWriter(tmp_path / "log", "t", 0, fingerprint="fp", attrs={}, dim=2, flush_every=100) as w:
        w.add(F, P, np.ones((12, 2, 2, 2, 2)), point_id=np.arange(12))
    part = next((tmp_path / "log").glob("*.h5"))
    with h5py.File(part, "r+") as f:
        f["F"].resize(16, axis=0)  # allocated, never written: fill values
        f["P"].resize(15, axis=0)
        f["point_id"].resize(14, axis=0)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fe2ml.data.reader")
    logger.addHandler(handler)
    try:
        data = read_logs(tmp_path / "log")
    finally:
        logger.removeHandler(handler)
    assert len(data["F"]) == 12 and len(data["P"]) == 12 and len(data["point_id"]) == 12
    assert np.array_equal(data["F"], F) and np.array_equal(data["P"], P)  # aligned, no zero or NaN rows
    assert any(part.name in r.getMessage() and "4 torn record row(s) dropped" in r.getMessage() for r in records)
    # the reported case: F longer than P (a kill after F's resize): the P extent bounds every field
    with h5py.File(part, "r+") as f:
        for k in ("F", "P", "point_id"):
            f[k].resize(12, axis=0)
        f["P"].resize(8, axis=0)
    data = read_logs(tmp_path / "log")
    assert len(data["F"]) == 8 and np.array_equal(data["F"], F[:8]) and np.array_equal(data["P"], P[:8])


@pytest.mark.serial
@pytest.mark.slow
def test_chaos_campaign_killed_again_and_again_holds_exactly_the_design(tmp_path):
    # a 2-rank campaign killed halfway through log flushes and at random moments, resumed until it completes: the
    # log holds every design point exactly once, no torn (NaN or zero) rows
    text = textwrap.dedent(SAMPLE).replace("n: 16", "n: 400").replace("flush_every: 4", "flush_every: 8")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text)
    out = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = np.random.default_rng(2)
    kills, done = 0, False
    for attempt in range(10):
        kill = (f"flush:{int(rng.integers(1, 4))}", "flush:1", None, "flush:3", None)[attempt] if attempt < 5 else ""
        e = dict(env, FE2ML_KILL=kill) if kill else env
        p = subprocess.Popen([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "sample", str(cfg), "--output",
                              str(out)], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        if kill is None:  # a random moment
            try:
                p.wait(timeout=rng.uniform(0.5, 2.0))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=600)
        if p.returncode == 0:
            done = True
            break
        kills += 1
    assert done and kills >= 3, (done, kills)
    final = read_logs(out)
    assert np.array_equal(np.sort(final["point_id"]), np.arange(404))  # 400 Sobol points + the 4-step path
    assert np.isfinite(final["P"]).all() and (np.abs(final["P"]).reshape(404, -1).max(axis=1) > 0).all()
