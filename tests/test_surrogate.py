"""Surrogate models: physics by construction, closed-form tangent, training, checkpoints, bad input."""

import textwrap

from mpi4py import MPI

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_hyper import nh_response  # noqa: E402

from fe2ml.data.log import LogWriter  # noqa: E402
from fe2ml.errors import ConfigError  # noqa: E402
from fe2ml.surrogate.checkpoint import load_checkpoint  # noqa: E402
from fe2ml.surrogate.closed_form import evaluator  # noqa: E402
from fe2ml.surrogate.models import PlainModel, PotentialModel  # noqa: E402

COMM = MPI.COMM_WORLD
torch.set_default_dtype(torch.float64)


def rot(d, t):
    if d == 2:
        return torch.tensor([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    a = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return torch.tensor(np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K)


MODELS = [("general", False, "finite"), ("isotropic", False, "finite"), ("isotropic", True, "finite"),
          ("general", True, "finite"), ("general", False, "small"), ("anisotropic", False, "finite"),
          ("anisotropic", True, "finite")]
FIBRES = {2: [[1.0, 0.0], [0.6, 0.8]], 3: [[1.0, 0.0, 0.0], [0.3, 1.0, -0.4]]}  # two families, one oblique


def _pm(d, kin, hidden, features, convex):
    """A potential model; anisotropic ones get two fibre families."""
    return PotentialModel(d, kin, hidden=hidden, features=features, convex=convex,
                          fibres=FIBRES[d] if features == "anisotropic" else None)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("features,convex,kin", MODELS)
def test_potential_physics_for_random_weights(d, features, convex, kin):
    torch.manual_seed(3)
    m = _pm(d, kin, (12, 10), features, convex)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.x_scale[:] = 0.5 + torch.rand_like(m.x_scale)
        m.p_scale.fill_(2.5)
    I = torch.eye(d)[None]
    P0, _ = m.stress_tangent(I)
    assert P0.abs().max() < 1e-12  # zero stress at F = I
    assert abs(float(m.energy(I)[0].detach())) < 1e-12  # W(I) = 0
    F = torch.eye(d) + 0.15 * torch.randn(6, d, d)
    P, A = m.stress_tangent(F)
    assert (A - A.permute(0, 3, 4, 1, 2)).abs().max() < 1e-10 * A.abs().max()  # symmetric tangent
    h = 1e-6
    for k in range(d):
        for l in range(d):
            E = torch.zeros(d, d)
            E[k, l] = h
            fd = (m.stress_tangent(F + E)[0] - m.stress_tangent(F - E)[0]) / (2 * h)
            assert (fd - A[:, :, :, k, l]).abs().max() < 1e-6 * A.abs().max()
    if kin == "finite":
        Q = rot(d, 0.7)
        PQ, _ = m.stress_tangent(Q @ F)
        assert (PQ - Q @ P).abs().max() < 1e-11 * P.abs().max()  # objectivity


def _min_rank_one_curvature(m, d, seed, n=200):
    """min over random F (det > 0) and unit a, b of d²W/ds² at s = 0 along F + s a⊗b, relative to |A|."""
    g = torch.Generator().manual_seed(seed)
    F = torch.eye(d) + 0.35 * torch.randn(n, d, d, generator=g, dtype=torch.float64)
    F = F[torch.linalg.det(F) > 0.2]
    a = torch.nn.functional.normalize(torch.randn(len(F), d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(len(F), d, generator=g, dtype=torch.float64), dim=1)
    _, A = m.stress_tangent(F)
    curv = torch.einsum("ni,nj,nijkl,nk,nl->n", a, b, A, a, b)
    return float(curv.min() / A.abs().max())


@pytest.mark.parametrize("features", ["isotropic", "anisotropic"])
@pytest.mark.parametrize("d", [2, 3])
def test_convex_invariant_potential_is_rank_one_convex_and_the_unconstrained_one_is_not(d, features):
    # polyconvex construction: d²W/ds² >= 0 along every F + s a⊗b, for random weights (scaled up to make the
    # networks strongly nonlinear); the same network without the monotonicity in I1, I2 (and the fibre invariants)
    # or not input-convex loses rank-one convexity somewhere
    worst = {}
    for name, convex, monotone in (("polyconvex", True, True), ("icnn_free_inputs", True, False),
                                   ("plain", False, False)):
        lows = []
        for seed in range(6):
            torch.manual_seed(seed)
            m = _pm(d, "finite", (12, 10), features, convex)
            if not monotone and convex:
                m.net.monotone = ()
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(2.0 * torch.randn_like(p))
                m.x_scale[:] = 0.5 + torch.rand_like(m.x_scale)
            lows.append(_min_rank_one_curvature(m, d, seed))
            if name == "polyconvex":  # objective too
                F = torch.eye(d) + 0.2 * torch.randn(5, d, d, dtype=torch.float64)
                P, _ = m.stress_tangent(F)
                Q = rot(d, 0.4)
                assert (m.stress_tangent(Q @ F)[0] - Q @ P).abs().max() < 1e-11 * P.abs().max()
        worst[name] = min(lows)
    assert worst["polyconvex"] >= -1e-10, worst
    assert worst["icnn_free_inputs"] < -1e-4 and worst["plain"] < -1e-4, worst


def _closed_form_case(d, features, convex, kin, plain=False):
    torch.manual_seed(7)
    if plain:
        return PlainModel(d, kin, hidden=(8, 7, 6))
    m = _pm(d, kin, (8, 7, 6), features, convex)
    with torch.no_grad():
        m.x_scale[:] = 0.3 + torch.rand_like(m.x_scale) + (2.0 if features != "general" else 0.0)
        m.p_scale.fill_(1.7)
        if convex:  # small non-negative weights: pre-activations stay below torch's softplus threshold (20), where
            for W in [*m.net.Ws, m.net.W_out]:  # torch's softplus turns linear (1e-9 from the smooth closed form)
                W -= 2.0
            if features == "anisotropic":  # and the monotone input weights of the six fibre inputs
                for V in [*m.net.Vs, m.net.V_out]:
                    V.weight[:, 4:] -= 2.0
    return m


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("features,convex,kin", [*MODELS, ("isotropic", False, "plain")])
def test_closed_form_equals_autograd(d, features, convex, kin):
    # every model kind: the closed form (numpy and torch) against batched automatic differentiation of W (or P)
    plain = kin == "plain"
    m = _closed_form_case(d, features, convex, "finite" if plain else kin, plain)
    F = torch.eye(d) + 0.2 * torch.randn(40, d, d)
    if plain:
        with torch.enable_grad():
            Fg = F.clone().requires_grad_(True)
            P1 = m.stress(Fg)
            A1 = torch.stack([torch.autograd.grad(P1[:, i, j].sum(), Fg, retain_graph=True)[0]
                              for i in range(d) for j in range(d)], 1).reshape(-1, d, d, d, d)
    else:
        P1, A1 = m._autograd(F, False)
    P1, A1 = P1.detach().numpy(), A1.detach().numpy()
    for P2, A2 in (m.numpy_evaluator()(F.numpy()), m.stress_tangent(F), m.evaluate(F.numpy(), batch=7)):
        P2, A2 = np.asarray(P2), np.asarray(A2)
        assert np.abs(P1 - P2).max() < 1e-12 * np.abs(P1).max(), (np.abs(P1 - P2).max(), np.abs(P1).max())
        assert np.abs(A1 - A2).max() < 1e-12 * np.abs(A1).max(), (np.abs(A1 - A2).max(), np.abs(A1).max())
    # and against central differences of the closed-form stress (independent of both)
    f = m.numpy_evaluator()
    h = 1e-6
    F0 = F[:5].numpy()
    _, A = f(F0)
    for k, l in ((0, 0), (0, 1), (d - 1, 0)):
        dF = np.zeros((d, d))
        dF[k, l] = h
        fd = (f(F0 + dF)[0] - f(F0 - dF)[0]) / (2 * h)
        assert np.abs(fd - A[..., k, l]).max() < 1e-6 * np.abs(A).max()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("features,convex,kin", [*MODELS, ("isotropic", False, "plain")])
def test_an_ensemble_chains_its_mean_derivatives_once_and_its_stress_only_pass_skips_the_tangent(d, features,
                                                                                                convex, kin):
    # the ensemble's mean Ā by one chain rule from the members' mean ∂W/∂y, ∂²W/∂y² against the mean of the members'
    # own tangents (each checked against autograd above); the stress-only pass: the same P̄ and members' P̄, no Ā
    from fe2ml.surrogate.checkpoint import EnsembleModel

    plain = kin == "plain"
    members = []
    for seed in range(3):
        m = _closed_form_case(d, features, convex, "finite" if plain else kin, plain)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
            m.p_scale.fill_(1.0 + seed)  # members scale their outputs differently
        members.append(m)
    ens = EnsembleModel(members)
    F = (torch.eye(d) + 0.2 * torch.randn(1100, d, d)).numpy()  # more than one chunk
    own = [m.numpy_evaluator()(F) for m in members]
    P_ref, A_ref = sum(o[0] for o in own) / 3, sum(o[1] for o in own) / 3
    P, A, Ps, ok = ens.evaluate_gate(F, chunk=512)
    assert ok.all()
    assert np.abs(P - P_ref).max() < 1e-13 * np.abs(P_ref).max()
    assert np.abs(A - A_ref).max() < 1e-12 * np.abs(A_ref).max()
    for k in range(3):
        assert np.abs(Ps[k] - own[k][0]).max() < 1e-13 * np.abs(own[k][0]).max()
    P2, A2, Ps2, ok2 = ens.evaluate_gate(F, chunk=512, tangent=False)
    assert A2 is None and ok2.all()
    assert np.abs(P2 - P).max() <= 1e-14 * np.abs(P).max() and np.abs(Ps2 - Ps).max() <= 1e-14 * np.abs(Ps).max()


def test_identical_points_take_one_evaluation_with_every_points_answer():
    # F̄ = I at every point of an undeformed body: one evaluation serves all of them, and gives what the members' own
    # closed forms give point by point; the gate's density query likewise
    from fe2ml.surrogate.checkpoint import EnsembleModel
    from fe2ml.surrogate.gate import Gate, rows_equal

    members = []
    for seed in range(2):
        m = _closed_form_case(3, "isotropic", True, "finite", False)
        torch.manual_seed(200 + seed)
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
        members.append(m)
    ens = EnsembleModel(members)
    F = np.repeat((np.eye(3) + 0.1 * np.arange(9).reshape(3, 3))[None], 700, axis=0)
    assert rows_equal(F) and not rows_equal(F[:1]) and not rows_equal(np.full((3, 2), np.nan))
    G = F.copy()
    G[-1, 0, 0] = np.nextafter(G[-1, 0, 0], 2.0)  # one point differs by one ulp: the point-by-point path
    assert not rows_equal(G)
    own = [m.numpy_evaluator()(F[:3]) for m in members]
    for tangent in (True, False):
        P, A, Ps, ok = ens.evaluate_gate(F, tangent=tangent)
        Pg, Ag, Psg, okg = ens.evaluate_gate(G, tangent=tangent)
        assert ok.all() and okg.all() and P.shape == (700, 3, 3) and Ps.shape == (2, 700, 3, 3)
        assert np.abs(P - sum(o[0][0] for o in own) / 2).max() < 1e-13 * np.abs(P).max()
        scale = np.abs(P).max()
        assert np.abs(P[:-1] - Pg[:-1]).max() < 1e-14 * scale and np.abs(Ps - Psg)[:, :-1].max() < 1e-14 * scale
        if tangent:
            assert np.abs(A - sum(o[1][0] for o in own) / 2).max() < 1e-12 * np.abs(A).max()
            assert np.abs(A[:-1] - Ag[:-1]).max() < 1e-14 * np.abs(A).max()
        else:
            assert A is None
    gate = Gate({"members": [None, None], "stress_floor": 0.05,
                 "bounds": {"feature_min": [-1.0] * 3, "feature_max": [1.0] * 3},
                 "density": {"points": np.random.default_rng(0).uniform(-1, 1, (50, 3)), "x_scale": np.ones(3),
                             "scale": 0.1}})
    x = np.repeat(np.array([[0.3, -0.2, 0.1]]), 40, axis=0)
    d_near = np.sqrt(((gate.tree.data - x[0]) ** 2).sum(axis=1)).min() / 0.1
    answers = []
    for th in (0.5 * d_near, 2.0 * d_near):  # flagged, then not
        gate._anchors = None
        flags = gate.density_flags(x, th)
        gate._anchors = None
        ref = gate.density_flags(np.vstack([x, [[9.0, 9.0, 9.0]]]), th)[:-1]  # the tree query, point by point
        assert np.array_equal(flags, ref) and (flags == flags[0]).all()
        answers.append(bool(flags[0]))
    assert answers == [True, False]


def test_closed_form_at_a_collapsed_point_and_large_activations():
    # J ≤ 0 and pre-activations far beyond the softplus range give finite, exact answers (no overflow)
    for features in ("general", "isotropic", "anisotropic"):
        m = _pm(3, "finite", (6, 5), features, False)
        with torch.no_grad():
            m.net.layers[0].bias.fill_(800.0)
        F = np.array([np.diag([1.2, 1.0, -0.3]), np.eye(3) * 0.0 + np.diag([0.0, 1.0, 1.0])])
        P, A = m.numpy_evaluator()(F)
        P1, A1 = m._autograd(torch.tensor(F), False)
        assert np.isfinite(P).all() and np.isfinite(A).all()
        assert np.abs(P - P1.numpy()).max() < 1e-10 * (1 + np.abs(P).max())


def test_plain_model_tangent_is_its_jacobian():
    m = PlainModel(2, hidden=(8, 8))
    F = torch.eye(2) + 0.1 * torch.randn(5, 2, 2)
    P, A = m.stress_tangent(F)
    h = 1e-6
    E = torch.zeros(2, 2)
    E[0, 1] = h
    fd = (m.stress(F + E) - m.stress(F - E)) / (2 * h)
    assert (fd - A[:, :, :, 0, 1]).abs().max() < 1e-7


def _synthetic_log(folder, n=160, seed=0, fingerprint="nh", mu=1.0, K=3.0, nan_rows=0):
    rng = np.random.default_rng(seed)
    F = np.eye(2) + rng.uniform(-0.15, 0.15, (n, 2, 2))
    P = np.zeros((n, 2, 2))
    A = np.zeros((n, 2, 2, 2, 2))
    for k in range(n):
        P[k], A[k] = nh_response(F[k], mu, K)
    P[:nan_rows] = np.nan
    with LogWriter(folder, f"s{seed}", 0, fingerprint=fingerprint, attrs={"kinematics": "finite", "source_id": "syn",
                                                                          "rve": "{}"}, dim=2) as w:
        w.add(F, P, A, point_id=np.arange(n))
    return F, P, A


TRAIN = """\
    data: [log]
    model: {kind: potential, hidden: [12, 12]}
    loss: {stress: 1.0, tangent: 0.1}
    train: {epochs: 1500, lr: 0.02, patience: 300, seed: 1}
    output: out
"""


@pytest.mark.serial
def test_training_accuracy_reproducibility_and_resume(tmp_path):
    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", nan_rows=3)
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN))
    cfg = load_train_config(tmp_path / "t.yaml")
    r1 = train(MPI.COMM_SELF, cfg)
    assert r1["skipped"] == 3 and r1["records"] == 157
    assert r1["metrics"]["test"]["stress_rel_l2"] < 0.01 and r1["metrics"]["test"]["tangent_rel_l2"] < 0.05
    r2 = train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml", output=str(tmp_path / "out2")))
    assert r1["metrics"] == r2["metrics"]  # reproducible with a fixed seed
    for f in ("checkpoint.pt", "metrics.json", "loss.png", "parity_P.png", "parity_A.png"):
        assert (tmp_path / "out" / f).exists()
    law = SurrogateLaw(tmp_path / "out" / "checkpoint.pt", dim=2)
    F = np.eye(2) + np.array([[0.1, 0.02], [-0.03, -0.05]])
    P, A = law.evaluate(F[None])
    Pe, _ = nh_response(F, 1.0, 3.0)
    assert np.abs(P[0] - Pe).max() < 0.02 * np.abs(Pe).max()
    r3 = train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml", output=str(tmp_path / "out3")),
               resume=str(tmp_path / "out" / "checkpoint.pt"))
    assert r3["resumed_from"] and r3["metrics"]["validation"]["stress_rel_l2"] <= \
        1.05 * r1["metrics"]["validation"]["stress_rel_l2"]


@pytest.mark.serial
def test_torchscript_export_matches(tmp_path):
    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.export import export_checkpoint
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", n=60)
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 30"))
    train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    out = export_checkpoint(tmp_path / "out" / "checkpoint.pt", tmp_path / "m.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated
        mod = torch.jit.load(str(out))
    law = SurrogateLaw(tmp_path / "out" / "checkpoint.pt", dim=2, tangent_precision="double")  # the export: float64
    for n in (1, 7, 50):
        F = np.eye(2) + 0.1 * np.random.default_rng(n).normal(size=(n, 2, 2))
        P, A = mod(torch.as_tensor(F))
        Pr, Ar = law.evaluate(F)
        assert np.abs(P.numpy() - Pr).max() < 1e-12 and np.abs(A.numpy() - Ar).max() < 1e-12
    assert mod.fingerprint == "nh"


@pytest.mark.serial
def test_surrogate_bad_inputs(tmp_path):
    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    with pytest.raises(ConfigError, match="checkpoint not found"):
        SurrogateLaw(tmp_path / "none.pt", dim=2)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        SurrogateLaw(tmp_path / "junk.pt", dim=2)
    _synthetic_log(tmp_path / "log", n=60)
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN).replace("epochs: 600", "epochs: 20"))
    train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    ck = tmp_path / "out" / "checkpoint.pt"
    with pytest.raises(ConfigError, match="checkpoint is for 2D, the run is 3D"):
        SurrogateLaw(ck, dim=3)
    with pytest.raises(ConfigError, match="checkpoint is for finite strain, the run is small"):
        SurrogateLaw(ck, dim=2, kinematics="small")
    with pytest.raises(ConfigError, match="trained on RVE nh"):
        SurrogateLaw(ck, dim=2, fingerprint="other")
    # tiny set, log without tangents with a Sobolev loss: clear errors, checkpoint untouched
    before = ck.read_bytes()
    _synthetic_log(tmp_path / "tiny", n=10, fingerprint="nh")
    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TRAIN).replace("[log]", "[tiny]"))
    with pytest.raises(ConfigError, match="only 10 usable records"):
        train(MPI.COMM_SELF, load_train_config(tmp_path / "tiny.yaml"))
    with LogWriter(tmp_path / "noA", "x", 0, fingerprint="nh", attrs={}, dim=2) as w:
        F = np.eye(2)[None].repeat(30, 0)
        w.add(F, np.zeros((30, 2, 2)), np.full((30, 2, 2, 2, 2), np.nan), point_id=np.arange(30))
    (tmp_path / "noA.yaml").write_text(textwrap.dedent(TRAIN).replace("[log]", "[noA]"))
    with pytest.raises(ConfigError, match="hold no tangents"):
        train(MPI.COMM_SELF, load_train_config(tmp_path / "noA.yaml"))
    assert ck.read_bytes() == before
    (tmp_path / "bad.yaml").write_text(textwrap.dedent(TRAIN).replace("kind: potential", "kind: oracle"))
    with pytest.raises(ConfigError, match="model.kind: expected potential, plain or localization"):
        load_train_config(tmp_path / "bad.yaml")
    # the relative loss's floor: a fraction of the RMS stress in (0, 1], with relative: true only
    for loss, msg in (("{relative: true, floor: 0}", r"loss.floor: expected a fraction of the RMS stress in \(0, 1\]"),
                      ("{relative: true, floor: 2}", r"loss.floor: expected a fraction"),
                      ("{floor: 0.02}", r"loss.floor: applies to the relative loss only")):
        (tmp_path / "floor.yaml").write_text(textwrap.dedent(TRAIN).replace("{stress: 1.0, tangent: 0.1}", loss))
        with pytest.raises(ConfigError, match=msg):
            load_train_config(tmp_path / "floor.yaml")
    (tmp_path / "floor.yaml").write_text(textwrap.dedent(TRAIN).replace("{stress: 1.0, tangent: 0.1}",
                                                                        "{relative: true, floor: 0.02}"))
    assert load_train_config(tmp_path / "floor.yaml").loss == {"stress": 1.0, "tangent": 0.1, "relative": True,
                                                               "floor": 0.02}
    # gate and audit options the checkpoint cannot serve: `fe2ml check` and `fe2ml run` stop with one line, exit 2,
    # nothing written
    from helpers import assert_check_and_run_refuse

    run = textwrap.dedent("""\
        dim: 2
        mesh: {generate: rectangle, size: [1.0, 1.0], n: [2, 2]}
        material:
          kind: KIND
          checkpoint: out/checkpoint.pt
          rve:
            mesh: {generate: cells_2d, n_cells: 2, volume_fraction: 0.2, seed: 4, h: 0.2}
            phases:
              1: {material: neo_hookean, mu: 1.0, K: 3.0}
              2: {material: neo_hookean, mu: 0.3, K: 1.0}
          EXTRA
        bcs: [{boundary: left, components: [0, 1], value: 0.0}]
        output: run_out
    """)
    bad = {"spread_one_member": ("hybrid", "threshold: {spread: 0.02}",
                                 "material.threshold.spread: needs an ensemble of 2 or more members"),
           "error_one_member": ("hybrid", "threshold: {error: 0.01}", "material.threshold.error: needs an ensemble"),
           "unknown_threshold_key": ("hybrid", "threshold: {sprad: 0.02}", "unknown key(s) sprad"),
           "threshold_on_surrogate": ("surrogate", "threshold: {distance: 0.0}", "unknown key(s) threshold"),
           "audit_zero": ("surrogate", "audit: {fraction: 0.0}",
                          "material.audit.fraction: expected a number in (0, 1]"),
           "audit_above_one": ("hybrid", "audit: {fraction: 1.5}", "material.audit.fraction"),
           "device_name": ("surrogate", "device: gpu", "material.device: expected auto, cpu, cuda or cuda:K"),
           "threshold_level": ("hybrid", "threshold: {error: 0.01, level: 0.99}",
                               "material.threshold.level: expected 0.9 or 0.95 (the calibrated levels), got 0.99"),
           "tangent_precision": ("hybrid", "tangent_precision: half",
                                 "material.tangent_precision: expected single or double, got 'half'")}
    if not torch.cuda.is_available():
        bad["device_missing"] = ("hybrid", "device: cuda", "material.device: cuda requested, but this machine has no "
                                                           "CUDA device")
    for name, (kind, extra, msg) in bad.items():
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(run.replace("KIND", kind).replace("EXTRA", extra))
        assert_check_and_run_refuse(cfg_path, msg, tmp_path)


@pytest.mark.serial
def test_hybrid_falls_back_outside_the_training_data(tmp_path, tissue_rve):
    from fe2ml.data.campaign import build_rve, run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.data.log import LogWriter as LW
    from fe2ml.data.reader import read_logs
    from fe2ml.laws.surrogate import HybridLaw, SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.gate import Thresholds
    from fe2ml.surrogate.train import train

    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        rve:
""" + tissue_rve(10, dim=2, volume_fraction=0.2, seed=4, h=0.15, soft=(0.3, 1.0)) + """\
        design: {method: sobol, n: 64, seed: 0, space: gradient, bounds: [-0.1, 0.1]}
        output: log
    """))
    cfg = load_sample_config(tmp_path / "s.yaml")
    run_campaign(MPI.COMM_SELF, cfg)
    (tmp_path / "t.yaml").write_text(textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 150") + "ensemble: 2\n")
    train(MPI.COMM_SELF, load_train_config(tmp_path / "t.yaml"))
    # calibration: factors fitted on the validation split, coverage measured on the test split; recomputed here
    # from the log and the trained ensemble
    from fe2ml.surrogate.gate import relative_error, relative_spread

    ck = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    cal = ck["calibration"]
    assert cal["split"] == "test" and cal["method"] == "split-conformal"
    assert 0 < cal["factor50"] <= cal["factor90"] <= cal["factor95"] == pytest.approx(2 * cal["factor"])
    assert (tmp_path / "out" / "calibration.png").stat().st_size > 1000
    data = read_logs(tmp_path / "log", converged_only=True)
    n = len(data["F"])
    perm = np.random.default_rng(0).permutation(n)  # split: validation 0.15, test 0.15, seed 0 (the defaults)
    n_val, n_test = max(1, round(0.15 * n)), round(0.15 * n)
    te, tr = perm[n_val:n_val + n_test], perm[n_val + n_test:]
    sl = SurrogateLaw(tmp_path / "out" / "checkpoint.pt", dim=2)
    floor = ck["stress_floor"]
    # the offset: the median absolute stress error of the ensemble's mean on (up to 2000) training records, in floors
    Pm = np.mean(sl.model.evaluate_members(data["F"][tr[:2000]])[0], axis=0)
    offset = np.median(np.sqrt(((Pm - data["P"][tr[:2000]]) ** 2).sum(axis=(1, 2)))) / floor
    assert cal["offset"] == pytest.approx(offset, rel=1e-9) and offset > 0
    Ps, _ = sl.model.evaluate_members(data["F"][te])
    spread = relative_spread(np.array(Ps), floor)
    u = spread + offset / (np.sqrt((np.mean(Ps, axis=0) ** 2).sum(axis=(1, 2))) / floor + 1.0)
    err = relative_error(np.mean(Ps, axis=0), data["P"][te], floor)
    assert cal["n"] == len(te)
    for k, cov in zip((1, 2, 3), cal["coverage"], strict=True):
        assert cov == pytest.approx(np.mean(err <= k * cal["factor"] * u))
    assert cal["coverage"][0] <= cal["coverage"][1] <= cal["coverage"][2]
    rve = build_rve(cfg.rve, MPI.COMM_SELF)
    fp = __import__("fe2ml.data.fingerprint", fromlist=["x"]).rve_fingerprint(rve)
    writer = LW(tmp_path / "fallback", "h", 0, fingerprint=fp, attrs={"source_id": "hybrid"}, dim=2)
    law = HybridLaw(tmp_path / "out" / "checkpoint.pt", rve, thresholds=Thresholds(spread=10.0, distance=0.0),
                    writer=writer)
    F = np.array([np.eye(2) + 0.03, np.diag([1.4, 1.0]), np.eye(2) - 0.02, np.array([[1.0, 0.5], [0.0, 1.0]])])
    P, A = law.evaluate(F)
    law.commit()
    assert list(law.flags_last) == [False, True, False, True]
    truth = rve.evaluate(F[[1, 3]], cells=False)
    assert np.abs(P[[1, 3]] - truth.P).max() < 1e-8 * np.abs(truth.P).max()  # true RVE where unsure
    assert law.stats["fallbacks"] == 2 and law.stats["rve_solves"] == 2
    writer.close()
    assert len(read_logs(tmp_path / "fallback")) == 2  # fallback records appended to the log
    # a checkpoint of another RVE is refused
    other = build_rve(cfg.rve, MPI.COMM_SELF)
    other.materials[2] = type(other.materials[2])(mu=0.5, K=1.0)
    with pytest.raises(ConfigError, match="trained on RVE"):
        HybridLaw(tmp_path / "out" / "checkpoint.pt", other)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("features,convex,kin", MODELS)
def test_models_create_every_tensor_on_the_input_device(d, features, convex, kin):
    # a fake device: on "meta" tensors carry shapes only; a dispatch mode records the device of every tensor any
    # operation produces, so a tensor made on the CPU (a torch.eye without device=) is caught, matmuls included
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            return out

    # the closed form's constants are prepared from the weights (on the CPU: meta tensors hold none) and moved to
    # the device once; its evaluations and the training path (autograd with a graph) make every tensor there
    m = _pm(d, kin, (6, 5), features, convex)
    plain = PlainModel(d, kin)
    F = torch.empty(4, d, d, dtype=torch.float64, device="meta")
    for model in (m, plain):
        f = evaluator(model, "torch", device="meta")
        model.to("meta")
        with Devices() as rec:
            P, A = f(F)
            model.stress_tangent(F, create_graph=True)
        assert P.device.type == A.device.type == "meta" and rec.seen == {"meta"}, rec.seen
    # the counter-test: the recorder does see a CPU tensor where one is made
    with Devices() as rec:
        _ = F - torch.eye(d, dtype=torch.float64, device="meta") + torch.zeros((), dtype=torch.float64)
    assert "cpu" in rec.seen


@pytest.mark.serial
def test_training_device_and_dtype_options(tmp_path):
    # dtype: float32 fits in single precision; the checkpoint is float64 and loads for a float64 law; a float32
    # model's tangent still equals a central difference of its stress at a looser tolerance. A CUDA device that this
    # machine lacks is refused before anything is written, by the library and by the CLI (one line, exit 2).
    import subprocess
    import sys
    from pathlib import Path

    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", n=80)
    (tmp_path / "t32.yaml").write_text(textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 200")
                                       + "device: cpu\ndtype: float32\n")
    r = train(MPI.COMM_SELF, load_train_config(tmp_path / "t32.yaml"))
    assert r["metrics"]["test"]["stress_rel_l2"] < 0.1
    ck = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in ck["members"][0].values()
               if v.is_floating_point())
    law = SurrogateLaw(tmp_path / "out" / "checkpoint.pt", dim=2, device="cpu")
    P, A = law.evaluate(np.eye(2)[None] + 0.05)
    assert P.dtype == np.float64 and np.isfinite(A).all()
    m32 = PotentialModel(2, "finite", hidden=(8, 8)).to(torch.float32)
    F = (torch.eye(2, dtype=torch.float32) + 0.1 * torch.randn(4, 2, 2, dtype=torch.float32))
    P32, A32 = m32.stress_tangent(F)
    assert P32.dtype == A32.dtype == torch.float32
    h = 1e-2
    for k in range(2):
        for l_ in range(2):
            dF = torch.zeros(2, 2, dtype=torch.float32)
            dF[k, l_] = h
            fd = (m32.stress_tangent(F + dF)[0] - m32.stress_tangent(F - dF)[0]) / (2 * h)
            assert (fd - A32[:, :, :, k, l_]).abs().max() < 5e-3 * A32.abs().max()
    if torch.cuda.is_available():
        return  # the refusal below is for machines without CUDA
    (tmp_path / "tcuda.yaml").write_text(textwrap.dedent(TRAIN).replace("output: out", "output: out_cuda")
                                         + "device: cuda\n")
    with pytest.raises(ConfigError, match="cuda requested, but this machine has no CUDA device"):
        train(MPI.COMM_SELF, load_train_config(tmp_path / "tcuda.yaml"))
    with pytest.raises(ConfigError, match="no CUDA device"):
        SurrogateLaw(tmp_path / "out" / "checkpoint.pt", dim=2, device="cuda:0")
    r = subprocess.run([str(Path(sys.executable).parent / "fe2ml"), "train", str(tmp_path / "tcuda.yaml")],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "device: cuda requested" in lines[0]
    assert not (tmp_path / "out_cuda").exists()


@pytest.mark.serial
def test_mini_batch_training_fits_as_well_as_full_batch(tmp_path):
    """train.batch_size: one optimiser step per mini-batch; the fit reaches the analytic neo-Hookean response."""
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", n=400)
    text = textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 150")
    (tmp_path / "full.yaml").write_text(text.replace("output: out", "output: full"))
    (tmp_path / "mini.yaml").write_text(text.replace("seed: 1}", "seed: 1, batch_size: 32}")
                                        .replace("output: out", "output: mini"))
    full = train(MPI.COMM_SELF, load_train_config(tmp_path / "full.yaml"))
    mini = train(MPI.COMM_SELF, load_train_config(tmp_path / "mini.yaml"))
    # same epochs, 9 optimiser steps per epoch instead of 1: at least as good, and good in absolute terms
    assert mini["metrics"]["test"]["stress_rel_l2"] < 0.02
    assert mini["metrics"]["test"]["stress_rel_l2"] <= full["metrics"]["test"]["stress_rel_l2"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("seed: 1}", "seed: 1, batch_size: 0}"))
    with pytest.raises(ConfigError, match="train.batch_size: expected a positive integer or null"):
        load_train_config(bad)


@pytest.mark.serial
def test_an_lbfgs_polish_fits_closer_than_the_first_order_fit_alone(tmp_path):
    """train.polish: L-BFGS after Adam, on the same loss; the state of least validation loss is kept."""
    import json

    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", n=200)
    text = textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 200")
    (tmp_path / "adam.yaml").write_text(text.replace("output: out", "output: adam"))
    (tmp_path / "polish.yaml").write_text(text.replace("seed: 1}", "seed: 1, polish: 200}")
                                          .replace("output: out", "output: polish"))
    adam = train(MPI.COMM_SELF, load_train_config(tmp_path / "adam.yaml"))
    pol = train(MPI.COMM_SELF, load_train_config(tmp_path / "polish.yaml"))
    # the analytic neo-Hookean response (test split): the polish is at least 3 times closer
    assert pol["metrics"]["test"]["stress_rel_l2"] < adam["metrics"]["test"]["stress_rel_l2"] / 3
    # the 200 Adam epochs, then 10 polish steps of 20 L-BFGS iterations; the member kept is a polished one
    fit = json.loads((tmp_path / "polish" / "metrics.json").read_text())["fit"]
    assert fit == [{"steps": 210, "polished_from": 200, "kept": fit[0]["kept"]}] and fit[0]["kept"] >= 200
    for bad, msg in (("polish: 5, batch_size: 32", "train.polish .* needs full batches"),
                     ("polish: -1", "train.polish: expected a non-negative integer")):
        (tmp_path / "bad.yaml").write_text(text.replace("seed: 1}", f"seed: 1, {bad}}}"))
        with pytest.raises(ConfigError, match=msg):
            load_train_config(tmp_path / "bad.yaml")


@pytest.mark.serial
def test_streamed_training_reads_tangents_from_the_logs(tmp_path, monkeypatch):
    """train.stream: mini-batches whose tangents a DataLoader reads from the HDF5 logs (with worker processes).

    The fit reaches the analytic neo-Hookean response; it is the same with 0 and 2 workers; records with a
    non-finite tangent are left out where they are read; the training tangents are never read as a whole.
    """
    from fe2ml.data.reader import StreamedField
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    _synthetic_log(tmp_path / "log", n=200, seed=0)
    _synthetic_log(tmp_path / "log", n=200, seed=1)
    rng = np.random.default_rng(5)
    F = np.eye(2) + rng.uniform(-0.15, 0.15, (20, 2, 2))
    P = np.array([nh_response(f, 1.0, 3.0)[0] for f in F])
    A = np.full((20, 2, 2, 2, 2), np.nan)  # a part without tangents: dropped from the batches and the splits
    with LogWriter(tmp_path / "log", "s9", 0, fingerprint="nh", attrs={"kinematics": "finite", "source_id": "syn",
                                                                       "rve": "{}"}, dim=2) as w:
        w.add(F, P, A, point_id=np.arange(20))
    text = textwrap.dedent(TRAIN).replace("epochs: 1500", "epochs: 150")
    reads = []
    base = StreamedField._read

    def counting(self, idx):
        out = base(self, idx)
        reads.append(len(out))
        return out

    monkeypatch.setattr(StreamedField, "_read", counting)
    monkeypatch.setattr("fe2ml.surrogate.train.STREAM_METRIC_RECORDS", 50)  # the train split's metrics: 50 records
    res = {}
    for workers in (0, 2):
        cfg = tmp_path / f"w{workers}.yaml"
        cfg.write_text(text.replace("seed: 1}", f"seed: 1, batch_size: 32, stream: true, workers: {workers}}}")
                       .replace("output: out", f"output: w{workers}"))
        res[workers] = train(MPI.COMM_SELF, load_train_config(cfg))
    r0, r2 = res[0], res[2]
    assert r0["records"] == 420 and r0["skipped"] == 0
    assert r0["metrics"]["test"]["stress_rel_l2"] < 0.02 and r0["metrics"]["test"]["tangent_rel_l2"] < 0.1
    assert np.isfinite(r0["metrics"]["train"]["tangent_rel_l2"])
    assert r0["metrics"] == r2["metrics"]  # the workers read, the sampler (main process) orders: the same fit
    assert r0["metrics"]["train"]["n"] <= 50
    assert max(reads) < 0.5 * 420  # validation, test and 50 training records; the training tangents come in blocks
    bad = tmp_path / "bad.yaml"
    for repl, msg in (("seed: 1, stream: true}", "train.stream reads mini-batches from the logs: it needs "
                                                 "train.batch_size"),
                      ("seed: 1, batch_size: 8, workers: 2}", "train.workers are the processes that read streamed"),
                      ("seed: 1, batch_size: 8, stream: 1}", "train.stream: expected true or false")):
        bad.write_text(text.replace("seed: 1}", repl))
        with pytest.raises(ConfigError, match=msg):
            load_train_config(bad)


def test_members_spread_over_the_gpus_of_a_node():
    """device cuda: member k on GPU k mod n (the members 2 ranks fit at once sit on 2 GPUs); cuda:K and cpu kept."""
    import torch

    from fe2ml.surrogate.train import member_device

    assert [member_device("cuda", k, n_gpus=4).index for k in range(6)] == [0, 1, 2, 3, 0, 1]
    assert member_device("cuda", 3, n_gpus=1) == torch.device("cuda:0")
    assert member_device("cuda:2", 5, n_gpus=4) == torch.device("cuda:2")
    assert member_device("cpu", 5, n_gpus=4) == torch.device("cpu")


def test_split_conformal_quantile_has_its_finite_sample_coverage():
    # exchangeable scores: P(new score <= q) >= level, and <= level + 1/(n + 1) (continuous scores); averaged over
    # many calibration draws from an exponential law, whose CDF 1 − e^{−q} gives each draw's coverage exactly
    from fe2ml.surrogate.train import conformal_quantile

    rng = np.random.default_rng(0)
    for n, level in ((19, 0.9), (39, 0.95), (200, 0.9)):
        cov = np.mean([1.0 - np.exp(-conformal_quantile(rng.exponential(size=n), level)) for _ in range(4000)])
        assert level - 0.005 <= cov <= level + 1.0 / (n + 1) + 0.005, (n, level, cov)
    assert conformal_quantile(np.arange(5.0), 0.95) == float("inf")  # too few points for the level
    # a quantile that ignores the finite-sample correction misses the level at small n
    plain = np.mean([1.0 - np.exp(-np.quantile(rng.exponential(size=19), 0.9)) for _ in range(4000)])
    assert plain < 0.88


def test_magnitude_bins_hold_the_level_among_small_stresses_where_a_pooled_quantile_does_not():
    # scores error/spread 4 times larger where the predicted stress is small (m < 1 of [0, 3]): a pooled 90 %
    # quantile covers about 90 % of all points but far fewer of the small ones; the Mondrian factors (a quantile per
    # magnitude bin) cover >= 90 % within every bin. Coverage exact per draw from the exponential CDF.
    from fe2ml.surrogate.gate import point_factors
    from fe2ml.surrogate.train import _factors, magnitude_bins

    rng = np.random.default_rng(1)
    scale = lambda m: np.where(m < 1.0, 4.0, 1.0)  # noqa: E731
    pooled, binned = [], []
    for _ in range(400):
        m = rng.uniform(0.0, 3.0, 150)
        ratio = scale(m) * rng.exponential(size=150)
        cal = dict(zip(("factor90", "factor95"), _factors(ratio), strict=True))
        cal["bins"] = magnitude_bins(ratio, m)
        assert cal["bins"] is not None and len(cal["bins"]["factor90"]) == 3 and sum(cal["bins"]["n"]) == 150
        # new points from the same law; those of the lowest bin (a function of the magnitude alone)
        new = rng.uniform(0.0, 3.0, 300)
        small = new[new < cal["bins"]["magnitude_edges"][0]]
        f90_pooled = point_factors({"factor90": cal["factor90"], "factor95": cal["factor95"]}, small)[0]
        f90_binned = point_factors(cal, small)[0]
        pooled.append(np.mean(1.0 - np.exp(-f90_pooled / scale(small))))
        binned.append(np.mean(1.0 - np.exp(-f90_binned / scale(small))))
    assert np.mean(binned) >= 0.885 and np.mean(pooled) < 0.8  # Mondrian: >= 0.9 in expectation (400 draws)
    # too few calibration points for 2 bins of MIN_PER_BIN: no bins, every point gets the pooled factors
    assert magnitude_bins(np.ones(50), np.linspace(0, 1, 50)) is None
    f90, f95 = point_factors({"factor90": 2.0, "factor95": 3.0}, np.array([0.1, 5.0]))
    assert list(f90) == [2.0, 2.0] and list(f95) == [3.0, 3.0]
