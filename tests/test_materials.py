import numpy as np
import pytest

from fe2ml.errors import MaterialError
from fe2ml.materials import (
    AnisotropicLinearElastic,
    LinearElastic,
    TransverselyIsotropic,
    from_voigt,
    to_voigt,
)


def test_isotropic_matches_textbook():
    m = LinearElastic(E=2.0, nu=0.25)
    C = m.stiffness(3)
    lam, mu = 2 * 0.25 / (1.25 * 0.5), 2 / 2.5
    assert np.isclose(C[0, 0, 0, 0], lam + 2 * mu)
    assert np.isclose(C[0, 0, 1, 1], lam)
    assert np.isclose(C[0, 1, 0, 1], mu)
    # uniaxial stress: inverse of Voigt (with engineering shear) gives 1/E and -nu/E
    S = np.linalg.inv(to_voigt(C))
    assert np.isclose(S[0, 0], 1 / 2.0) and np.isclose(S[0, 1], -0.25 / 2.0)
    # plane strain is the in-plane restriction
    assert np.allclose(m.stiffness(2), C[:2, :2, :2, :2])


@pytest.mark.parametrize("E,nu", [(-1.0, 0.3), (0.0, 0.3), (1.0, 0.5), (1.0, 0.7), (1.0, -1.0), ("a", 0.3)])
def test_isotropic_rejects_invalid(E, nu):
    with pytest.raises(MaterialError):
        LinearElastic(E=E, nu=nu)


def test_voigt_roundtrip_and_symmetries():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    M = A @ A.T + 6 * np.eye(6)
    C = from_voigt(M)
    assert np.allclose(to_voigt(C), M)
    assert np.allclose(C, C.transpose(1, 0, 2, 3)) and np.allclose(C, C.transpose(2, 3, 0, 1))


def test_anisotropic_validation():
    M = np.eye(6)
    M[0, 1] = 2.0  # not symmetric
    with pytest.raises(MaterialError, match="symmetric"):
        AnisotropicLinearElastic(C=M)
    M = np.eye(6)
    M[0, 0] = -1.0
    with pytest.raises(MaterialError, match="positive definite"):
        AnisotropicLinearElastic(C=M)
    with pytest.raises(MaterialError):
        AnisotropicLinearElastic(C=np.eye(5))


def test_transversely_isotropic_engineering_constants():
    m = TransverselyIsotropic(E_L=10.0, E_T=2.0, nu_LT=0.3, nu_TT=0.4, G_LT=1.5, direction=(0, 1, 0))
    S = np.linalg.inv(to_voigt(m.C))
    assert np.isclose(1 / S[1, 1], 10.0)  # axis along y
    assert np.isclose(1 / S[0, 0], 2.0) and np.isclose(1 / S[2, 2], 2.0)
    assert np.isclose(-S[1, 0] / S[1, 1], 0.3)
    assert np.isclose(1 / S[5, 5], 1.5)  # shear 12 contains the axis
    with pytest.raises(MaterialError):
        TransverselyIsotropic(E_L=-1, E_T=2.0, nu_LT=0.3, nu_TT=0.4, G_LT=1.5)
