"""The compiled chain rule of the invariant networks (fe2ml/surrogate/invariants.c): it builds here, answers as
automatic differentiation of the torch model and as the numpy closed form, and where it cannot be built the numpy
closed form answers instead."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_deploy import _member  # noqa: E402

from fe2ml.surrogate import kernels  # noqa: E402
from fe2ml.surrogate.closed_form import chunked, evaluator  # noqa: E402

# (dim, fibre directions, input-convex): no family (isotropic), one, two
CASES = [(3, [], True), (2, [], False), (3, [[1.0, 0.0, 0.0]], True), (2, [[0.8, 0.6]], False),
         (3, [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], True), (3, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], False)]


def _model(d, fibres, convex, seed=0):
    """Random weights, input and stress scales (test_deploy's members: the ICNN's pre-activations stay where torch's
    softplus is smooth)."""
    kw = {"features": "anisotropic", "fibres": fibres} if fibres else {"features": "isotropic"}
    return _member("potential", d, "finite", {"hidden": (12, 10), "convex": convex, **kw}, seed)


def _F(d, n=400, seed=3):
    """Stretches and shears of up to 25 %: fibres in tension and in compression."""
    return np.eye(d) + np.random.default_rng(seed).uniform(-0.25, 0.25, (n, d, d))


@pytest.fixture
def numpy_only(monkeypatch):
    """The closed form without the compiled kernel, as where it cannot be built."""
    monkeypatch.setattr(kernels, "_loaded", {"lib": None})


def test_the_kernel_builds_with_the_compiler_the_macro_forms_need():
    assert kernels.invariant_kernel([[1.0, 0.0, 0.0]]) is not None
    assert kernels.invariant_kernel(np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2]]) is None  # more families than it takes


@pytest.mark.parametrize("d, fibres, convex", CASES)
def test_the_compiled_chain_rule_answers_as_automatic_differentiation(d, fibres, convex):
    m = _model(d, fibres, convex)
    f = evaluator(m)
    assert "kernel" in f.prepare.__code__.co_freevars  # the compiled path
    F = _F(d)
    P, A = f(F)
    # independent: torch's automatic differentiation of the member's energy
    Pr, Ar = (x.detach().numpy() for x in m._autograd(torch.as_tensor(F), False))
    assert np.abs(P - Pr).max() <= 1e-12 * np.abs(Pr).max()
    assert np.abs(A - Ar).max() <= 1e-11 * np.abs(Ar).max()
    # the fibres are stretched and shortened in this sample: both branches of ⟨I4 − 1⟩ are checked
    for a in np.asarray(fibres, dtype=float).reshape(-1, d):
        I4 = np.einsum("nij,j->ni", F, a)
        I4 = (I4 * I4).sum(-1)
        assert (I4 > 1.0).sum() > 50 and (I4 < 1.0).sum() > 50


@pytest.mark.parametrize("d, fibres, convex", CASES)
def test_the_compiled_and_the_numpy_closed_forms_agree(d, fibres, convex, monkeypatch):
    m = _model(d, fibres, convex, seed=1)
    F = _F(d, seed=4)
    compiled = evaluator(m)
    P1, A1 = chunked(compiled, F, 64)                   # the tangent written into the caller's array
    monkeypatch.setattr(kernels, "_loaded", {"lib": None})
    plain = evaluator(m)
    assert "kernel" not in plain.prepare.__code__.co_freevars
    P0, A0 = plain(F)
    assert np.abs(P1 - P0).max() <= 1e-13 * np.abs(P0).max()
    assert np.abs(A1 - A0).max() <= 1e-13 * np.abs(A0).max()
    # strided and single-precision input; the features the gate reads
    P2, A2 = compiled(F[::2].astype(np.float32))
    P3, A3 = plain(F[::2].astype(np.float32))
    assert np.abs(P2 - P3).max() <= 1e-13 * np.abs(P3).max() and np.abs(A2 - A3).max() <= 1e-13 * np.abs(A3).max()
    y1, y0 = compiled.prepare(F)["y"], plain.prepare(F)["y"]
    assert np.abs(y1 - y0).max() <= 1e-14


def test_without_a_compiler_the_numpy_closed_form_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # a $CC this machine lacks: the next compiler builds it
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.invariant_kernel([[1.0, 0.0, 0.0]]) is not None
    # none at all
    monkeypatch.setattr(kernels, "_compilers", lambda: [[str(tmp_path / "no-such-compiler")], ["false"]])
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.invariant_kernel([[1.0, 0.0, 0.0]]) is None
    m = _model(3, [[1.0, 0.0, 0.0]], True)
    f = evaluator(m)
    assert "kernel" not in f.prepare.__code__.co_freevars
    F = _F(3, n=50)
    Pr, Ar = (x.detach().numpy() for x in m._autograd(torch.as_tensor(F), False))
    P, A = f(F)
    assert np.abs(P - Pr).max() <= 1e-12 * np.abs(Pr).max() and np.abs(A - Ar).max() <= 1e-11 * np.abs(Ar).max()
    # FE2ML_KERNELS=0 turns the kernel off where it could be built
    monkeypatch.undo()
    monkeypatch.setenv("FE2ML_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.invariant_kernel([[1.0, 0.0, 0.0]]) is None


def test_a_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.invariant_kernel([[1.0, 0.0, 0.0]]) is not None
    built = list((tmp_path / "fe2ml").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.invariant_kernel([[0.0, 1.0, 0.0]]) is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "fe2ml").iterdir()] == [stamp]


def test_derivatives_of_the_wrong_shape_are_refused():
    k = kernels.invariant_kernel([[1.0, 0.0, 0.0]])
    F, y, dy = k.features(_F(3, n=5))
    assert y.shape == (5, 6) and dy.shape == (5, 6, 9)
    with pytest.raises(ValueError, match="expected"):
        k.tangent(F, np.zeros((5, 3)), np.zeros((5, 3, 3)))
