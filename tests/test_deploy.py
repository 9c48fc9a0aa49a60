"""A surrogate deployed without torch: the numpy checkpoint reader against torch.load, the numpy ensemble against
automatic differentiation of the torch members, refusals, and a whole surrogate run that never imports torch."""

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import crafted_checkpoints

from fe2ml.errors import ConfigError
from fe2ml.surrogate.checkpoint import FORMAT_VERSION, EnsembleModel, load_checkpoint, save_checkpoint
from fe2ml.surrogate.deploy import NumpyEnsemble, read_checkpoint, read_torch_file, torch_free
from fe2ml.surrogate.models import PlainModel, PotentialModel

ROOT = Path(__file__).resolve().parents[1]

# (kind, dim, kinematics, model arguments): every non-parametric network the closed form serves
KINDS = {
    "general MLP 3D": ("potential", 3, "finite", {"hidden": (8, 8)}),
    "general MLP 2D small strain, one layer": ("potential", 2, "small", {"hidden": (8,)}),
    "general ICNN 3D": ("potential", 3, "finite", {"hidden": (8, 8), "convex": True}),
    "isotropic ICNN 3D": ("potential", 3, "finite", {"hidden": (8, 8, 8), "features": "isotropic", "convex": True}),
    "isotropic MLP 2D": ("potential", 2, "finite", {"hidden": (8, 8), "features": "isotropic"}),
    "anisotropic ICNN 3D": ("potential", 3, "finite", {"hidden": (8, 8), "features": "anisotropic", "convex": True,
                                                       "fibres": [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]}),
    "anisotropic MLP 2D": ("potential", 2, "finite", {"hidden": (8, 8), "features": "anisotropic",
                                                      "fibres": [[0.8, 0.6]]}),
    "plain 3D": ("plain", 3, "finite", {"hidden": (8, 8)}),
}


def _member(kind, d, kin, margs, seed):
    """A member with random weights, input scales and stress scale (non-trivial everywhere)."""
    torch.manual_seed(seed)
    m = (PotentialModel(d, kin, **margs) if kind == "potential" else PlainModel(d, kin, **margs)).double()
    with torch.no_grad():
        for prm in m.net.parameters():
            prm.copy_(0.5 * torch.randn_like(prm))
        if margs.get("convex"):  # small non-negative weights: pre-activations stay below torch's softplus threshold
            for W in [*m.net.Ws, m.net.W_out]:  # (20), where autograd's softplus turns linear (1e-9 from the
                W -= 2.0  # smooth closed form)
            for V in [*m.net.Vs, m.net.V_out]:
                V.weight[:, list(m.net.monotone)] -= 2.0
        m.x_scale.copy_(0.5 + torch.rand_like(m.x_scale))
        m.p_scale.fill_(1.7)
    return m


def _checkpoint(path, name, members=2):
    kind, d, kin, margs = KINDS[name]
    ms = [_member(kind, d, kin, margs, s) for s in range(members)]
    ck = {"format_version": FORMAT_VERSION, "model": {"kind": kind, **margs}, "members": [m.state_dict() for m in ms],
          "dim": d, "kinematics": kin, "rve_fingerprint": "abc", "stress_floor": 0.05,
          "bounds": {"feature_min": [0.0, -1.0], "feature_max": [1.0, 2.0]},
          "density": {"points": np.arange(6.0).reshape(3, 2), "x_scale": np.ones(2), "scale": np.float64(1.5)},
          "calibration": None, "metrics": {"validation": {"stress_rel_l2": 0.01}, "epochs": 3, "tag": "x"}}
    save_checkpoint(ck, path)
    return ms


def _same(a, b, where="checkpoint"):
    """a (read without torch) holds what b (torch.load) holds: numpy arrays for tensors, equal values and dtypes."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), where
        for k in b:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(b, torch.Tensor | np.ndarray):
        y = b.numpy() if isinstance(b, torch.Tensor) else b
        assert isinstance(a, np.ndarray) and a.dtype == y.dtype and a.shape == y.shape, where
        assert np.array_equal(a, y), where
    else:
        assert type(a) is type(b) and a == b, where


def _F(d, n=300, seed=1):
    rng = np.random.default_rng(seed)
    F = np.eye(d) + rng.uniform(-0.15, 0.15, (n, d, d))
    F[0] = np.eye(d)
    return F


@pytest.mark.parametrize("name", list(KINDS))
def test_the_numpy_reader_gives_what_torch_load_gives(tmp_path, name):
    _checkpoint(tmp_path / "ck.pt", name)
    _same(read_checkpoint(tmp_path / "ck.pt"), load_checkpoint(tmp_path / "ck.pt"))


def test_the_numpy_reader_keeps_strided_views_and_every_numeric_dtype(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    obj = {"t": base.t(), "slice": base[1:, 2:5], "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
           **{str(dt): torch.arange(5).to(dt) for dt in (torch.float32, torch.int64, torch.int32, torch.int16,
                                                          torch.int8, torch.uint8, torch.bool, torch.float16)}}
    torch.save(obj, tmp_path / "x.pt")
    back = read_torch_file(tmp_path / "x.pt")
    for k, v in obj.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k


@pytest.mark.parametrize("name", list(KINDS))
def test_the_numpy_ensemble_answers_as_automatic_differentiation_of_the_torch_members(tmp_path, name):
    ms = _checkpoint(tmp_path / "ck.pt", name)
    ck = read_checkpoint(tmp_path / "ck.pt")
    assert torch_free(ck)
    ens = NumpyEnsemble(ck)
    d = ck["dim"]
    F = _F(d)
    P, A, Ps, ok = ens.evaluate_gate(F)
    assert ok.all()
    # independent: autograd of each member's energy (potential) or of its stress network (plain)
    Ft = torch.as_tensor(F)
    ref = [m.stress_tangent(Ft, create_graph=True) if isinstance(m, PlainModel) else m._autograd(Ft, False)
           for m in ms]
    Pr = [r[0].detach().numpy() for r in ref]
    Ar = np.mean([r[1].detach().numpy() for r in ref], axis=0)
    scale_P, scale_A = np.abs(Pr).max(), np.abs(Ar).max()
    assert np.abs(Ps - np.array(Pr)).max() <= 1e-11 * scale_P
    assert np.abs(P - np.mean(Pr, axis=0)).max() <= 1e-11 * scale_P
    assert np.abs(A - Ar).max() <= 1e-10 * scale_A
    # stress-only pass, and one F for all points (F̄ = I before the first step)
    P2, A2, _, _ = ens.evaluate_gate(F, tangent=False)
    assert A2 is None and np.array_equal(P2, P)
    P3, A3 = ens.evaluate(np.repeat(F[1:2], 5, axis=0))
    assert np.allclose(P3, P[1], rtol=0, atol=1e-14 * scale_P) and np.allclose(A3, A[1], rtol=0, atol=1e-14 * scale_A)
    # the gate's features: the torch members' own inputs
    x = ms[0].features_of(Ft).detach().numpy()
    assert np.abs(ens.features(F) - x).max() <= 1e-14 * max(np.abs(x).max(), 1.0)


def test_the_numpy_ensemble_gives_the_torch_ensembles_bits(tmp_path):
    _checkpoint(tmp_path / "ck.pt", "anisotropic ICNN 3D", members=3)
    ck = load_checkpoint(tmp_path / "ck.pt")
    margs = {k: v for k, v in ck["model"].items() if k != "kind"}
    torch_ens = EnsembleModel.from_states(ck["model"]["kind"], 3, "finite", margs, ck["members"])
    F = _F(3, 1200)
    for a, b in zip(NumpyEnsemble(read_checkpoint(tmp_path / "ck.pt")).evaluate_gate(F),
                    torch_ens.evaluate_gate(F), strict=True):
        assert np.array_equal(a, b)


def test_weights_that_do_not_fit_are_refused_without_torch(tmp_path):
    _checkpoint(tmp_path / "ck.pt", "general MLP 3D")
    ck = load_checkpoint(tmp_path / "ck.pt")
    for change, what in ((lambda st: st.pop("net.out.bias"), "missing: net.out.bias"),
                         (lambda st: st.update({"net.extra": torch.zeros(2)}), "unexpected: net.extra"),
                         (lambda st: st.update({"net.layers.1.weight": torch.zeros(8, 9)}),
                          "of another shape: net.layers.1.weight")):
        st = dict(ck["members"][1])
        change(st)
        save_checkpoint({**ck, "members": [ck["members"][0], st]}, tmp_path / "bad.pt")
        with pytest.raises(ConfigError, match=f"weights do not fit the potential model .*{what}"):
            read_checkpoint(tmp_path / "bad.pt")


def test_hostile_files_are_refused_before_anything_is_built(tmp_path):
    marker = tmp_path / "MARKER"
    for path in crafted_checkpoints(tmp_path, marker):
        with pytest.raises(ConfigError, match=r"Python objects .*\((__builtin__|builtins)\.exec\) and was not loaded"):
            read_checkpoint(path)
        assert not marker.exists()
    # an older fe2ml's checkpoint with numpy objects pickled inside: refused too, with the fix
    torch.save({"format_version": 2, "x": np.ones(3)}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="re-save it with `fe2ml export --resave"):
        read_checkpoint(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "list.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ConfigError, match="not an fe2ml surrogate checkpoint"):
        read_checkpoint(tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")


@pytest.mark.serial
def test_a_surrogate_run_on_the_cpu_never_imports_torch(tmp_path):
    _checkpoint(tmp_path / "ck.pt", "isotropic ICNN 3D")
    (tmp_path / "run.yaml").write_text(textwrap.dedent("""\
        dim: 3
        mesh: {generate: box, size: [1.0, 1.0, 1.0], n: [2, 2, 2]}
        material: {kind: surrogate, checkpoint: ck.pt}
        bcs:
          - {boundary: left, components: [0, 1, 2], value: 0.0}
          - {boundary: right, components: [0], value: "0.02*t"}
        steps: 2
        output: out
        """))
    code = textwrap.dedent("""
        import sys
        from fe2ml.cli import main
        rc = main(["run", "run.yaml"])
        print("torch imported" if "torch" in sys.modules else "no torch", rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "no torch 0", r.stdout + r.stderr
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("name", list(KINDS))
def test_a_single_precision_tangent_keeps_the_stress_and_rounds_the_tangent_only(tmp_path, name):
    # the float32 products of the tangent against the float64 closed form (itself checked against autograd above)
    _checkpoint(tmp_path / "ck.pt", name)
    ck = read_checkpoint(tmp_path / "ck.pt")
    F = _F(ck["dim"])
    P, A, Ps, ok = NumpyEnsemble(ck).evaluate_gate(F)
    P1, A1, Ps1, ok1 = NumpyEnsemble(ck, tangent="single").evaluate_gate(F)
    assert np.array_equal(P1, P) and np.array_equal(Ps1, Ps) and np.array_equal(ok1, ok)
    assert A1.dtype == np.float64
    assert np.abs(A1 - A).max() <= 1e-6 * np.abs(A).max()
    if len(KINDS[name][3]["hidden"]) > 1:  # a layer Jacobian exists: the float32 products were used
        assert not np.array_equal(A1, A)
    with pytest.raises(ValueError, match="tangent precision: expected one of single, double, got 'half'"):
        NumpyEnsemble(ck, tangent="half")


@pytest.mark.serial  # fe2ml run in this process, in the rank's own folder
def test_a_single_precision_tangent_converges_to_the_same_state_in_as_many_newton_iterations(tmp_path):
    import json

    from fe2ml.cli import main

    _checkpoint(tmp_path / "ck.pt", "isotropic ICNN 3D")
    runs = {}
    for prec in ("single", "double"):
        (tmp_path / f"{prec}.yaml").write_text(textwrap.dedent(f"""\
            dim: 3
            mesh: {{generate: box, size: [1.0, 1.0, 1.0], n: [3, 2, 2]}}
            material: {{kind: surrogate, checkpoint: ck.pt, tangent_precision: {prec}}}
            bcs:
              - {{boundary: left, components: [0, 1, 2], value: 0.0}}
              - {{boundary: right, components: [0], value: "0.15*t"}}
              - {{boundary: right, components: [1], value: "0.05*t"}}
            steps: 2
            output: {prec}
            """))
        assert main(["run", str(tmp_path / f"{prec}.yaml")]) == 0
        s = json.loads((tmp_path / prec / "summary.json").read_text())
        runs[prec] = (s["steps"], np.loadtxt(tmp_path / prec / "reactions.csv", delimiter=",", skiprows=1))
    (s1, r1), (s2, r2) = runs["single"], runs["double"]
    assert [s["newton_iterations"] for s in s1] == [s["newton_iterations"] for s in s2]
    for a, b in zip(s1, s2, strict=True):  # the same residual histories, down to the tangent's float32 rounding
        ra, rb = np.array(a["residuals"][-1]), np.array(b["residuals"][-1])
        assert ra[-1] < 1e-8 * ra[0]
        assert np.allclose(ra, rb, rtol=1e-4, atol=1e-6 * rb[0])
    assert np.abs(r1 - r2).max() <= 1e-9 * np.abs(r2).max()
