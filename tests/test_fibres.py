"""Fibre-reinforced surrogates: anisotropic invariant features learn an HGO law that strain features cannot follow,
the fibre families come from the RVE, and mismatches are refused with one line."""

import json
import textwrap

from mpi4py import MPI

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import assert_check_and_run_refuse  # noqa: E402
from test_hyper import nh_P  # noqa: E402

from fe2ml.data.log import LogWriter  # noqa: E402
from fe2ml.errors import ConfigError  # noqa: E402

MU, K, K1, K2 = 1.0, 3.0, 4.0, 2.0
A2 = np.array([1.0, 0.0, 0.0])


def hgo_P(F3, a=A2):
    """Independent HGO first Piola stress (3x3, complex-safe): neo-Hookean matrix + k1 x e^{k2 x²} 2 F a⊗a, x > 0."""
    Fa = F3 @ a
    x = Fa @ Fa - 1.0
    fib = 2.0 * K1 * x * np.exp(K2 * x * x) * np.outer(Fa, a) if np.real(x) > 0 else 0.0 * F3
    return nh_P(F3, MU, K) + fib


def hgo_response(F2):
    """P (2,2), A (2,2,2,2) in plane strain by complex step."""
    def P(Fd):
        F3 = np.eye(3, dtype=Fd.dtype)
        F3[:2, :2] = Fd
        return hgo_P(F3)[:2, :2]

    h = 1e-30
    A = np.zeros((2, 2, 2, 2))
    for k in range(2):
        for l in range(2):
            E = np.zeros((2, 2), dtype=complex)
            E[k, l] = 1j * h
            A[:, :, k, l] = np.imag(P(F2.astype(complex) + E)) / h
    return np.real(P(F2.astype(complex))), A


RVE_DESC = {"materials": {"1": {"type": "HolzapfelGasserOgden", "mu": MU, "K": K, "k1": K1, "k2": K2,
                                "fibres": [[1.0, 0.0, 0.0]]}}}


def _hgo_log(folder, n=240, seed=0, desc=RVE_DESC):
    """Stretches on both sides of I4 = 1 (fibre compression and tension), random orientations."""
    rng = np.random.default_rng(seed)
    F = np.empty((n, 2, 2))
    for k in range(n):
        t = rng.uniform(-np.pi, np.pi)
        R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        F[k] = np.diag(rng.uniform(0.9, 1.12, 2)) @ R.T
        F[k] = R @ F[k]
    P = np.zeros((n, 2, 2))
    A = np.zeros((n, 2, 2, 2, 2))
    for k in range(n):
        P[k], A[k] = hgo_response(F[k])
    with LogWriter(folder, f"s{seed}", 0, fingerprint="hgo", attrs={"kinematics": "finite", "source_id": "syn",
                                                                     "rve": json.dumps(desc)}, dim=2) as w:
        w.add(F, P, A, point_id=np.arange(n))
    return F, P, A


TRAIN = """\
    data: [log]
    model: {kind: potential, hidden: [16, 16], features: anisotropic, convex: true}
    loss: {stress: 1.0, tangent: 0.1}
    train: {epochs: 1500, lr: 0.03, patience: 300, seed: 0}
    output: out
"""

RUN = """\
dim: 2
mesh: {generate: rectangle, size: [1.0, 1.0], n: [2, 2]}
material:
  kind: surrogate
  checkpoint: out/checkpoint.pt
  rve:
    mesh: {generate: cells_2d, n_cells: 2, volume_fraction: 0.2, seed: 4, h: 0.2}
    phases:
      1: PHASE
      2: {material: neo_hookean, mu: 0.3, K: 1.0}
bcs: [{boundary: left, components: [0, 1], value: 0.0}]
output: run_out
"""


def _one_line_error(tmp_path, name, text, msg):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert_check_and_run_refuse(path, msg, tmp_path)


@pytest.mark.serial
def test_anisotropic_features_fit_hgo_and_the_fibres_come_from_the_rve(tmp_path):
    from fe2ml.surrogate.checkpoint import load_checkpoint
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.models import PotentialModel
    from fe2ml.surrogate.train import train

    F, P, _ = _hgo_log(tmp_path / "log")
    I4 = F[:, 0, 0] ** 2 + F[:, 1, 0] ** 2
    assert 0.3 < np.mean(I4 > 1.0) < 0.7  # the design covers both sides of the switch
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN))
    r = train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    ck = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ck["model"]["fibres"] == [[1.0, 0.0, 0.0]] and ck["model"]["convex"] is True
    assert r["metrics"]["test"]["stress_rel_l2"] < 0.03, r["metrics"]
    # isotropic invariants cannot tell stretch along the fibre from stretch across it; the HGO stresses differ
    iso = PotentialModel(2, features="isotropic")
    Fs = np.array([np.diag([1.1, 1.0]), np.diag([1.0, 1.1])])
    x = iso.features_of(torch.as_tensor(Fs)).numpy()
    assert np.abs(x[0] - x[1]).max() < 1e-14
    assert abs(hgo_response(Fs[0])[0][0, 0] - hgo_response(Fs[1])[0][1, 1]) > 0.5
    # the fibre families of a run's RVE must be the checkpoint's: one line, exit 2, nothing written
    _one_line_error(tmp_path, "other_fibres", RUN.replace(
        "PHASE", "{material: hgo, mu: 1.0, K: 3.0, k1: 4.0, k2: 2.0, fibres: [[0.0, 1.0]]}"),
        "its anisotropic model has fibre families [[1.0, 0.0, 0.0]], material.rve has [[0.0, 1.0, 0.0]]")
    _one_line_error(tmp_path, "no_fibres", RUN.replace("PHASE", "{material: neo_hookean, mu: 1.0, K: 3.0}"),
                    "material.rve has none (NeoHookean)")


@pytest.mark.serial
def test_anisotropic_features_need_fibres(tmp_path):
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _hgo_log(tmp_path / "log", n=40, desc={"materials": {"1": {"type": "NeoHookean", "mu": 1.0, "K": 3.0}}})
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN))
    with pytest.raises(ConfigError, match=r"model.features: anisotropic needs fibre directions, and the RVE of the "
                                          r"data \(hgo\) has none \(materials: NeoHookean\)"):
        train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    (tmp_path / "b.yaml").write_text(textwrap.dedent(TRAIN).replace("anisotropic", "orthotropic"))
    with pytest.raises(ConfigError, match="features: expected general, isotropic, anisotropic, got 'orthotropic'"):
        load_train_config(tmp_path / "b.yaml")
