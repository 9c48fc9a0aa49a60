"""The constitutive contract, checked on every law: shapes, consistent tangent, commit/rollback, objectivity.

Every law of :mod:`fe2ml.laws` maps F̄ (n, d, d) to P̄ (n, d, d) and Ā = ∂P̄/∂F̄ (n, d, d, d, d). The references are
independent of each law: Ā against a central difference of the law's own P̄, and frame indifference
P̄(QF̄) = Q P̄(F̄) at finite strain (small strain: a superposed infinitesimal rotation changes nothing).
"""

import numpy as np
import pytest
import torch
from helpers import box_mesh

from fe2ml.data.fingerprint import rve_fingerprint
from fe2ml.laws.analytic import AnalyticLaw
from fe2ml.laws.base import ConstitutiveLaw, FormLaw
from fe2ml.laws.rve import LinearRVELaw, RVELaw
from fe2ml.laws.surrogate import HybridLaw, SurrogateLaw
from fe2ml.materials import LinearElastic, NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.mesh import make_rve_mesh
from fe2ml.surrogate.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from fe2ml.surrogate.gate import Thresholds, relative_spread
from fe2ml.surrogate.models import PotentialModel

D = 2
HYPER = {1: NeoHookean(mu=1.0, K=4.0), 2: NeoHookean(mu=6.0, K=20.0)}
LINEAR = {1: LinearElastic(E=1.0, nu=0.3), 2: LinearElastic(E=8.0, nu=0.25)}
F_POINTS = np.array([[[1.08, 0.03], [-0.02, 0.97]], [[0.95, 0.06], [0.04, 1.04]], [[1.0, 0.0], [0.0, 1.0]]])


def _rve_mesh():
    X, cells, ct, ph = box_mesh(D, 4, phase_fn=lambda c: 1 + (np.linalg.norm(c - 0.5, axis=1) < 0.3))
    return make_rve_mesh(X, cells, ct, ph, source="test box")


def _checkpoint(path, rve, members):
    """A checkpoint of ``members`` random potential networks (objective features, P(I) = 0 by construction)."""
    states = []
    for k in range(members):
        torch.manual_seed(k)
        m = PotentialModel(D, "finite", hidden=(8, 8)).double()
        for prm in m.parameters():
            if prm.dim() > 1:
                torch.nn.init.normal_(prm, std=0.5)
        states.append(m.state_dict())
    x = PotentialModel(D, "finite", hidden=(8, 8)).features_of(torch.as_tensor(F_POINTS)).detach().numpy()
    # an empty training box far away: the box criterion flags every point when its threshold is 0, none at inf
    ck = {"format_version": FORMAT_VERSION, "model": {"kind": "potential", "hidden": (8, 8)}, "members": states,
          "dim": D, "kinematics": "finite", "rve_fingerprint": rve_fingerprint(rve),
          "bounds": {"feature_min": (x.max(0) + 10).tolist(), "feature_max": (x.max(0) + 10).tolist()},
          "stress_floor": 0.05, "density": {"points": x, "x_scale": np.ones(x.shape[1]), "scale": 1.0}}
    save_checkpoint(ck, path)
    return path


@pytest.fixture(scope="module")
def laws(tmp_path_factory):
    """name -> factory of a fresh law (every law of fe2ml, on a small two-phase RVE)."""
    mesh = _rve_mesh()
    tmp = tmp_path_factory.mktemp("laws")
    hyper_rve = HyperelasticRVE(mesh, HYPER)
    ck1 = _checkpoint(tmp / "one.pt", hyper_rve, 1)
    ck2 = _checkpoint(tmp / "two.pt", hyper_rve, 2)
    return {
        "rve": lambda: RVELaw(HyperelasticRVE(mesh, HYPER)),
        "linear_rve": lambda: LinearRVELaw(LinearRVE(mesh, LINEAR)),
        "surrogate": lambda: SurrogateLaw(ck1, dim=D),
        "hybrid_surrogate": lambda: HybridLaw(ck2, HyperelasticRVE(mesh, HYPER),
                                              thresholds=Thresholds(spread=1e9, distance=np.inf, density=1e9)),
        "hybrid_fallback": lambda: HybridLaw(ck2, HyperelasticRVE(mesh, HYPER),
                                             thresholds=Thresholds(distance=0.0, density=1e9)),
        "analytic": lambda: AnalyticLaw({0: HYPER[1]}, dim=D),
        "analytic_small": lambda: AnalyticLaw({0: LINEAR[1]}, dim=D),
    }


NAMES = ["rve", "linear_rve", "surrogate", "hybrid_surrogate", "hybrid_fallback", "analytic", "analytic_small"]


@pytest.mark.parametrize("name", NAMES)
def test_every_law_returns_float64_stress_and_tangent_of_the_contract_shapes(laws, name):
    law = laws[name]()
    assert isinstance(law, ConstitutiveLaw)
    assert law.dim == D and law.kinematics in ("finite", "small")
    P, A = law.evaluate(F_POINTS)
    assert P.shape == (3, D, D) and A.shape == (3, D, D, D, D)
    assert P.dtype == np.float64 and A.dtype == np.float64
    assert np.all(np.isfinite(P)) and np.all(np.isfinite(A))
    assert np.abs(P[2]).max() < 1e-8 * max(np.abs(A[2]).max(), 1.0)  # stress-free reference state
    assert law.stats["evaluations"] == 3
    P0, A0 = law.evaluate(np.zeros((0, D, D)))  # a rank may own no points
    assert P0.shape == (0, D, D) and A0.shape == (0, D, D, D, D)
    assert set(law.stats) >= {"evaluations", "rve_solves", "time_s", "fallbacks", "fallbacks_per_step"}


@pytest.mark.parametrize("name", [*NAMES, "hybrid_mixed"])
def test_stress_then_tangent_equals_one_evaluation(laws, name):
    # the macro Newton's split: stress() at every iterate, tangent() only where it iterates on; the hybrid_mixed law
    # sends the largest deformation to the RVE and answers the others with the surrogate
    if name == "hybrid_mixed":
        law = laws["hybrid_surrogate"]()
        law.thresholds = Thresholds(spread=float(np.sort(relative_spread(
            np.stack(law.model.evaluate_members(F_POINTS)[0]), law.gate.floor))[1]), distance=np.inf, density=1e9)
        ref = laws["hybrid_surrogate"]()
        ref.thresholds = law.thresholds
    else:
        law, ref = laws[name](), laws[name]()
    P_ref, A_ref = ref.evaluate(F_POINTS)
    P = law.stress(F_POINTS)
    A = law.tangent()
    scale = np.abs(A_ref).max()
    assert np.abs(P - P_ref).max() <= 1e-12 * scale and np.abs(A - A_ref).max() <= 1e-12 * scale
    assert law.stats["evaluations"] == 3 and law.stats["rve_solves"] == ref.stats["rve_solves"]
    if name == "hybrid_mixed":
        assert 0 < law.stats["rve_solves"] < 3 and np.array_equal(law.surrogate_mask(), ref.surrogate_mask())
    A = A.copy()  # the law's own array may be reused by the next call
    P2 = law.stress(F_POINTS, with_tangent=True)  # both in one pass (a hybrid: the same points within a step)
    A2 = law.tangent()
    assert np.abs(P2 - P_ref).max() <= 1e-12 * scale and np.abs(A2 - A_ref).max() <= 1e-12 * scale


def test_a_surrogate_promises_its_answer_until_its_model_or_parameters_change(laws):
    # answer_key: equal keys promise equal answers at equal F̄ (the macro Newton keeps the converged stress of a
    # step for the next step's first iterate); a new checkpoint (a learning round) changes the key, and laws
    # without the promise give none
    law = laws["surrogate"]()
    key = law.answer_key()
    P0 = law.stress(F_POINTS).copy()
    law.commit()
    law.stress(F_POINTS[::-1])  # anything in between
    law.commit()
    assert law.answer_key() == key and np.array_equal(law.stress(F_POINTS), P0)
    law.use_checkpoint(law.ck)
    assert law.answer_key() != key and law.answer_key() != laws["surrogate"]().answer_key()
    # the hybrid promises its answer only where the surrogate answered every point of its last evaluation (there a
    # restarted run's gate, at the same F̄, flags none either); where the RVE answered one, its gate decides afresh
    # at a step's first iterate, as a restarted run does
    hyb = laws["hybrid_surrogate"]()
    P1 = hyb.stress(F_POINTS).copy()
    key = hyb.answer_key()
    hyb.commit()
    assert key is not None and hyb.answer_key() == key and hyb.surrogate_mask().all()
    assert np.array_equal(hyb.stress(F_POINTS), P1) and hyb.answer_key() == key
    fb = laws["hybrid_fallback"]()
    fb.stress(F_POINTS)
    assert not fb.surrogate_mask().all() and fb.answer_key() is None
    fb.commit()
    assert fb.answer_key() is None
    # nested FE²: a hyperelastic RVE has no history (its promise is tested in test_macro), except where the log
    # keeps every Newton iterate; the linear RVE law makes none
    rve = laws["rve"]()
    assert rve.answer_key() is not None and rve.answer_key() != laws["rve"]().answer_key()

    class EveryIterate:
        all_iterations = True

    rve.recorder = EveryIterate()
    assert rve.answer_key() is None and laws["linear_rve"]().answer_key() is None


@pytest.mark.parametrize("name", NAMES)
def test_tangent_equals_a_central_difference_of_the_stress(laws, name):
    law = laws[name]()
    F0 = F_POINTS[:2]
    _, A = law.evaluate(F0)
    h = 1e-5
    A_fd = np.zeros_like(A)
    for k in range(D):
        for m in range(D):
            dF = np.zeros((D, D))
            dF[k, m] = h
            Pp, _ = law.evaluate(F0 + dF)
            Pm, _ = law.evaluate(F0 - dF)
            A_fd[:, :, :, k, m] = (Pp - Pm) / (2 * h)
    assert np.abs(A - A_fd).max() < 1e-5 * np.abs(A).max()


@pytest.mark.parametrize("name", NAMES)
def test_rollback_returns_to_the_committed_state_and_commit_keeps_the_trial_one(laws, name):
    law = laws[name]()
    F1 = F_POINTS[:2]
    F2 = F1 + np.array([[0.15, -0.05], [0.05, 0.1]])
    P1, A1 = law.evaluate(F1)
    law.commit()
    committed = law.state_arrays()
    law.evaluate(F2)  # trial states at F2, not committed
    after_trial = law.state_arrays()
    assert set(after_trial) == set(committed)
    for key in committed:
        assert np.array_equal(after_trial[key], committed[key]), key
    law.rollback()
    P1b, A1b = law.evaluate(F1)
    scale = np.abs(A1).max()
    assert np.abs(P1b - P1).max() < 1e-8 * scale and np.abs(A1b - A1).max() < 1e-6 * scale
    if isinstance(law, RVELaw):  # the committed warm starts are those of F1, restorable into a fresh law
        assert np.allclose(committed["F"], F1)
        fresh = laws[name]()
        fresh.load_state_arrays(committed)
        assert np.allclose(fresh.state_arrays()["F"], F1)
        assert np.abs(fresh.evaluate(F1)[0] - P1).max() < 1e-8 * scale
    law.evaluate(F2)
    law.commit()
    if isinstance(law, RVELaw):
        assert np.allclose(law.state_arrays()["F"], F2)


@pytest.mark.parametrize("name", NAMES)
def test_a_rotation_leaves_the_material_unchanged(laws, name):
    law = laws[name]()
    F = F_POINTS[:2]
    P, A = law.evaluate(F)
    scale = np.abs(A).max()
    if law.kinematics == "finite":
        t = 0.7
        Q = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        PQ, AQ = law.evaluate(np.einsum("ij,njk->nik", Q, F))
        assert np.abs(PQ - np.einsum("ij,njk->nik", Q, P)).max() < 1e-7 * scale
        assert np.abs(AQ - np.einsum("ia,kc,najcl->nijkl", Q, Q, A)).max() < 1e-5 * scale
    else:  # P̄ = C̄ : sym(F̄ − I): a superposed infinitesimal rotation (skew) changes nothing
        W = np.array([[0.0, 0.01], [-0.01, 0.0]])
        PW, AW = law.evaluate(F + W)
        assert np.abs(PW - P).max() < 1e-12 * scale and np.abs(AW - A).max() < 1e-12 * scale


def test_the_hybrid_law_answers_with_the_rve_where_it_falls_back(laws):
    fallback, rve, surrogate = laws["hybrid_fallback"](), laws["rve"](), laws["hybrid_surrogate"]()
    P_fb, A_fb = fallback.evaluate(F_POINTS)
    P_rve, A_rve = rve.evaluate(F_POINTS)
    P_s, _ = surrogate.evaluate(F_POINTS)
    assert fallback.stats["rve_solves"] == 3 and surrogate.stats["rve_solves"] == 0
    assert np.abs(P_fb - P_rve).max() < 1e-8 * np.abs(A_rve).max()
    assert np.abs(P_s - P_rve).max() > 1e-3 * np.abs(P_rve).max()  # the random networks are not the RVE
    fallback.commit()
    fallback.evaluate(F_POINTS)  # a second sub-step of the same load step
    fallback.commit()
    fallback.finish_step()
    assert fallback.stats["fallbacks_per_step"] == [6] and fallback.stats["fallbacks"] == 6
    # the hybrid's warm starts and statistics survive a checkpoint round trip
    fresh = laws["hybrid_fallback"]()
    fresh.load_state_arrays(fallback.state_arrays())
    assert sorted(fresh.states) == sorted(fallback.states) and fresh.stats["fallbacks_per_step"] == [6]
    assert all(np.array_equal(fresh.states[k].z, fallback.states[k].z) for k in fresh.states)
    assert fresh.stats["fallback_reasons"] == fallback.stats["fallback_reasons"]


def test_the_analytic_law_is_a_form_law_and_refuses_pointwise_evaluation_of_several_phases():
    law = AnalyticLaw(HYPER, dim=D)
    assert isinstance(law, FormLaw) and law.phases == (1, 2)
    with pytest.raises(Exception, match="pointwise evaluation needs one material"):
        law.evaluate(F_POINTS)
    with pytest.raises(Exception, match="mix of hyperelastic and linear"):
        AnalyticLaw({1: HYPER[1], 2: LINEAR[2]}, dim=D)


def _F_of_E(E):
    """F = sqrt(I + 2E): the stretch with Green–Lagrange strain E."""
    w, V = np.linalg.eigh(np.eye(D) + 2 * np.asarray(E))
    return V @ np.diag(np.sqrt(w)) @ V.T


def test_the_gate_is_per_point_refuses_what_it_cannot_evaluate_and_sees_empty_corners_of_the_box(tmp_path):
    from fe2ml.errors import ConfigError

    rve = HyperelasticRVE(_rve_mesh(), HYPER)
    # training records along the diagonal E11 = E22 = e, E12 = 0: the box spans [-0.1, 0.1] in E11, E22, but its
    # corner (0.1, -0.1) lies far from every record
    E = [np.diag([e, e]) for e in np.linspace(-0.1, 0.1, 41)]
    m = PotentialModel(D, "finite", hidden=(8, 8))
    x = m.features_of(torch.as_tensor(np.array([_F_of_E(e) for e in E]))).detach().numpy()
    nn = np.min([np.linalg.norm(x[i] - np.delete(x, i, 0), axis=1).min() for i in range(len(x))])
    ck = load_checkpoint(_checkpoint(tmp_path / "two.pt", rve, 2))
    ck["bounds"] = {"feature_min": x.min(0).tolist(), "feature_max": x.max(0).tolist()}
    ck["density"] = {"points": x, "x_scale": np.ones(x.shape[1]), "scale": float(nn)}
    save_checkpoint(ck, tmp_path / "line.pt")
    law = HybridLaw(tmp_path / "line.pt", rve, thresholds=Thresholds(distance=0.0, density=2.0))
    on_line, corner = _F_of_E(np.diag([0.05, 0.05])), _F_of_E(np.diag([0.1, -0.1]) * 0.99)
    F = np.array([on_line, corner])
    assert law.distance(F).max() == 0.0  # both inside the box
    assert law.density_distance(F)[0] < 1.0 < 2.0 < law.density_distance(F)[1]
    law.evaluate(F)
    assert list(law.flags_last) == [False, True] and list(law.reasons_last["density"]) == [False, True]
    # per point: a point's flag does not depend on the other points of the batch (threshold between the spreads)
    G = np.array([on_line, corner, np.diag([1.2, 0.9]), np.eye(D) + 0.01])
    Ps, _ = law.model.evaluate_members(G)
    cut = float(np.median(relative_spread(np.array(Ps), law.gate.floor)))
    spread_law = HybridLaw(tmp_path / "line.pt", rve, thresholds=Thresholds(spread=cut, distance=np.inf,
                                                                            density=np.inf))
    spread_law.evaluate(G)
    together = list(spread_law.flags_last)
    alone = []
    for k in range(len(G)):
        spread_law.rollback()  # a new step: the points of the last evaluation are not held at the RVE
        spread_law.evaluate(G[k:k + 1])
        alone.append(bool(spread_law.flags_last[0]))
    assert together == alone and 0 < sum(together) < len(G)
    # a non-finite prediction always falls back
    Fn = F.copy()
    Fn[0, 0, 0] = np.nan
    _, _, Ps, finite = law.model.evaluate_gate(Fn)
    assert list(finite) == [False, True]
    assert list(law.flags(Fn, Ps, finite)["nonfinite"]) == [True, False]
    # criteria the checkpoint cannot evaluate are refused
    with pytest.raises(ConfigError, match="spread: needs an ensemble of 2 or more members; the checkpoint has 1"):
        HybridLaw(_checkpoint(tmp_path / "one.pt", rve, 1), rve, thresholds=Thresholds(spread=0.02))
    with pytest.raises(ConfigError, match="error: the checkpoint has no calibration"):
        HybridLaw(tmp_path / "line.pt", rve, thresholds=Thresholds(error=0.01))


def test_density_flags_across_iterations_equal_a_fresh_tree_query_every_time():
    # the anchored shortcut (triangle inequality) must flag exactly the points a full query flags: points drifting
    # by small Newton-like moves, a jump of some points far away, a new point set of another size
    from fe2ml.surrogate.gate import Gate

    rng = np.random.default_rng(3)
    recs = rng.uniform(-1, 1, (400, 6))
    ck = {"members": [None, None], "stress_floor": 0.1, "calibration": None,
          "bounds": {"feature_min": recs.min(0), "feature_max": recs.max(0)},
          "density": {"points": recs / 0.5, "x_scale": np.full(6, 0.5), "scale": 0.3}}
    gate, fresh = Gate(ck), Gate(ck)
    x = rng.uniform(-1.3, 1.3, (2000, 6))
    thr = float(np.median(fresh.density_distance(x)))  # about half the points flagged
    queried = []

    class Counting:  # the gate's tree, counting the points it is asked about
        def __init__(self, tree):
            self.tree = tree

        def query(self, q, **kw):
            queried.append(len(q))
            return self.tree.query(q, **kw)

    gate.tree = Counting(gate.tree)
    for it in range(12):
        if it == 6:
            x[:100] += 3.0  # far outside the data
        elif it == 9:
            x = rng.uniform(-1.3, 1.3, (1500, 6))
        else:
            x = x + 1e-3 * rng.standard_normal(x.shape)
        got = gate.density_flags(x, thr)
        want = fresh.density_distance(x) > thr
        assert np.array_equal(got, want), it
        assert want.any() and not want.all()
    # the first evaluation and the new point set query all points; the drifting ones mostly the flagged ones only
    assert queried[0] == 2000 and queried[9] == 1500 and max(queried[1:6]) < 0.6 * 2000, queried


def test_the_error_criterion_bounds_at_the_chosen_conformal_level(tmp_path):
    # error criterion = factor(level) x relative spread > threshold (+ the offset term where the calibration has one);
    # the spread recomputed here from the members' stresses (std over members / (|mean| + floor)), the factors set in
    # the calibration
    from fe2ml.errors import ConfigError

    rve = HyperelasticRVE(_rve_mesh(), HYPER)
    ck = load_checkpoint(_checkpoint(tmp_path / "two.pt", rve, 2))
    ck["calibration"] = {"method": "split-conformal", "factor": 1.5, "factor50": 1.0, "factor90": 2.0,
                         "factor95": 3.0, "bins": None}
    save_checkpoint(ck, tmp_path / "cal.pt")
    G = np.eye(D) + np.random.default_rng(3).uniform(-0.08, 0.08, (40, D, D))
    law = HybridLaw(tmp_path / "cal.pt", rve, thresholds=Thresholds(distance=np.inf, density=None))
    Ps = np.array(law.model.evaluate_members(G)[0])
    mean = Ps.mean(axis=0)
    spread = (np.sqrt(((Ps - mean) ** 2).sum(axis=(2, 3)).mean(axis=0))
              / (np.sqrt((mean**2).sum(axis=(1, 2))) + law.gate.floor))
    cut = float(np.median(2.5 * spread))  # between the two bounds: the levels flag different points
    flagged = {}
    for level, factor in ((0.9, 2.0), (0.95, 3.0)):
        hl = HybridLaw(tmp_path / "cal.pt", rve, thresholds=Thresholds(error=cut, distance=np.inf, density=None,
                                                                       level=level))
        _, _, Ps_, ok = hl.model.evaluate_gate(G)
        flagged[level] = hl.flags(G, Ps_, ok)["error"]
        assert np.array_equal(flagged[level], factor * spread > cut)
    assert flagged[0.9].sum() < flagged[0.95].sum() and not (flagged[0.9] & ~flagged[0.95]).any()
    with pytest.raises(ConfigError, match="level: expected 0.9 or 0.95"):
        HybridLaw(tmp_path / "cal.pt", rve, thresholds=Thresholds(error=0.01, level=0.99))
    # with an offset (the calibration's typical absolute error, in floors): u = spread + offset / (|mean|/floor + 1),
    # so the bound rises where the stress is small
    ck["calibration"]["offset"] = 0.5
    save_checkpoint(ck, tmp_path / "off.pt")
    u = spread + 0.5 / (np.sqrt((mean**2).sum(axis=(1, 2))) / law.gate.floor + 1.0)
    cut = float(np.median(2.0 * u))
    hl = HybridLaw(tmp_path / "off.pt", rve, thresholds=Thresholds(error=cut, distance=np.inf, density=None))
    _, _, Ps_, ok = hl.model.evaluate_gate(G)
    got = hl.flags(G, Ps_, ok)["error"]
    assert np.array_equal(got, 2.0 * u > cut) and got.any() and not got.all()
    assert not np.array_equal(got, 2.0 * spread > cut)  # the offset changed which points are flagged
