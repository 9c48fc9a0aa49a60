"""Linear elastic materials per phase.

A material gives its full stiffness tensor ``C`` of shape (d, d, d, d) in the dimension of the
problem. Plane strain (d = 2) is the restriction of the 3D tensor to the in-plane indices
(eps_33 = 0), as fixed in the tensor contract: ``C2[i,j,k,l] = C3[i,j,k,l]`` for i,j,k,l < 2.

Voigt notation appears only for input convenience and printed reports. Its ordering is
``VOIGT_ORDER[d]``: (11, 22, 33, 23, 13, 12) in 3D and (11, 22, 12) in 2D, without shear factors
(the Voigt stiffness matrix, ``sigma_voigt = C_voigt @ [e11, e22, e33, 2e23, 2e13, 2e12]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fe2ml.errors import MaterialError

__all__ = [
    "VOIGT_ORDER",
    "AnisotropicLinearElastic",
    "LinearElastic",
    "LinearMaterial",
    "TransverselyIsotropic",
    "from_voigt",
    "isotropic_tensor",
    "to_voigt",
]

VOIGT_ORDER: dict[int, list[tuple[int, int]]] = {
    2: [(0, 0), (1, 1), (0, 1)],
    3: [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)],
}


def to_voigt(C: np.ndarray) -> np.ndarray:
    """Voigt matrix of a minor-symmetric stiffness.

    Args:
        C: stiffness, shape (d, d, d, d).

    Returns:
        Matrix of shape (m, m), m = 3 (d = 2) or 6 (d = 3), ordering ``VOIGT_ORDER[d]``.
    """
    d = C.shape[0]
    idx = VOIGT_ORDER[d]
    return np.array([[C[i, j, k, l] for (k, l) in idx] for (i, j) in idx])


def from_voigt(M: np.ndarray) -> np.ndarray:
    """Full stiffness tensor from a Voigt matrix (ordering ``VOIGT_ORDER``).

    Args:
        M: Voigt stiffness, shape (3, 3) or (6, 6).

    Returns:
        Tensor of shape (d, d, d, d) with minor symmetries.
    """
    M = np.asarray(M, dtype=np.float64)
    d = {3: 2, 6: 3}[M.shape[0]]
    idx = VOIGT_ORDER[d]
    C = np.zeros((d, d, d, d))
    for a, (i, j) in enumerate(idx):
        for b, (k, l) in enumerate(idx):
            for ii, jj in {(i, j), (j, i)}:
                for kk, ll in {(k, l), (l, k)}:
                    C[ii, jj, kk, ll] = M[a, b]
    return C


def isotropic_tensor(lmbda: float, mu: float, d: int) -> np.ndarray:
    """Isotropic stiffness ``C = lambda I⊗I + 2 mu I_sym``, shape (d, d, d, d)."""
    I = np.eye(d)
    return (
        lmbda * np.einsum("ij,kl->ijkl", I, I)
        + mu * (np.einsum("ik,jl->ijkl", I, I) + np.einsum("il,jk->ijkl", I, I))
    )


def _check_tensor(C3: np.ndarray, name: str) -> None:
    if C3.shape != (3, 3, 3, 3) or not np.all(np.isfinite(C3)):
        raise MaterialError(f"{name}: stiffness must be a finite 6x6 Voigt matrix or 3x3x3x3 tensor")
    sym = (
        np.allclose(C3, C3.transpose(1, 0, 2, 3))
        and np.allclose(C3, C3.transpose(0, 1, 3, 2))
        and np.allclose(C3, C3.transpose(2, 3, 0, 1), atol=1e-12 * np.abs(C3).max())
    )
    if not sym:
        raise MaterialError(f"{name}: stiffness must have the major and minor symmetries (Voigt matrix symmetric)")
    M = to_voigt(C3) * np.array([1, 1, 1, 2, 2, 2])[None, :] ** 0.5 * np.array([1, 1, 1, 2, 2, 2])[:, None] ** 0.5
    ev = np.linalg.eigvalsh(0.5 * (M + M.T))
    if ev.min() <= 1e-12 * max(abs(ev.max()), 1e-300):
        raise MaterialError(
            f"{name}: stiffness is not positive definite (smallest Mandel eigenvalue {ev.min():.3g}); "
            "a stable elastic material needs all eigenvalues > 0"
        )


class LinearMaterial(Protocol):
    """Anything that provides a linear elastic stiffness in dimension d."""

    @property
    def name(self) -> str:
        """Label for messages."""
        ...

    def stiffness(self, d: int) -> np.ndarray:
        """Stiffness tensor of shape (d, d, d, d) (plane strain restriction for d = 2)."""
        ...


@dataclass(frozen=True, slots=True)
class LinearElastic:
    """Isotropic linear elastic material.

    Args:
        E: Young's modulus, > 0.
        nu: Poisson's ratio, -1 < nu < 0.5.
        name: label used in error messages.
    """

    E: float
    nu: float
    name: str = "linear_elastic"

    def __post_init__(self) -> None:
        for key in ("E", "nu"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
                raise MaterialError(f"{self.name}: {key} must be a finite number, got {v!r}")
        if self.E <= 0:
            raise MaterialError(f"{self.name}: E must be > 0, got {self.E}")
        if not -1.0 < self.nu < 0.5:
            raise MaterialError(f"{self.name}: nu must satisfy -1 < nu < 0.5, got {self.nu}")

    @property
    def lmbda(self) -> float:
        """First Lamé parameter."""
        return self.E * self.nu / ((1 + self.nu) * (1 - 2 * self.nu))

    @property
    def mu(self) -> float:
        """Shear modulus."""
        return self.E / (2 * (1 + self.nu))

    def stiffness(self, d: int) -> np.ndarray:
        """Stiffness tensor (d, d, d, d); plane strain for d = 2."""
        return isotropic_tensor(self.lmbda, self.mu, d)


@dataclass(frozen=True, slots=True)
class AnisotropicLinearElastic:
    """General anisotropic linear elastic material given by its full 3D stiffness.

    Args:
        C: 3D stiffness as a 6x6 Voigt matrix (ordering 11, 22, 33, 23, 13, 12) or a
            3x3x3x3 tensor; must have major/minor symmetries and be positive definite.
        name: label used in error messages.
    """

    C: np.ndarray = field(repr=False)
    name: str = "anisotropic"

    def __post_init__(self) -> None:
        try:
            C = np.array(self.C, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise MaterialError(f"{self.name}: stiffness must be numeric ({e})") from None
        if C.shape == (6, 6):
            if not np.allclose(C, C.T, atol=1e-12 * np.abs(C).max()):
                raise MaterialError(f"{self.name}: Voigt stiffness must be a symmetric 6x6 matrix")
            C = from_voigt(C)
        _check_tensor(C, self.name)
        C.setflags(write=False)
        object.__setattr__(self, "C", C)

    def stiffness(self, d: int) -> np.ndarray:
        """Stiffness tensor (d, d, d, d); plane strain restriction for d = 2."""
        return np.array(self.C[:d, :d, :d, :d])


def TransverselyIsotropic(
    E_L: float, E_T: float, nu_LT: float, nu_TT: float, G_LT: float, direction=(1.0, 0.0, 0.0),
    name: str = "transversely_isotropic",
) -> AnisotropicLinearElastic:
    """Transversely isotropic material (e.g. a fibre phase) with axis ``direction``.

    Args:
        E_L: Young's modulus along the fibre axis.
        E_T: Young's modulus transverse to the axis.
        nu_LT: Poisson's ratio (transverse contraction under axial load).
        nu_TT: Poisson's ratio in the transverse plane.
        G_LT: axial shear modulus.
        direction: fibre axis (normalised here), length 3.
        name: label used in error messages.

    Returns:
        The equivalent :class:`AnisotropicLinearElastic`.
    """
    vals = dict(E_L=E_L, E_T=E_T, G_LT=G_LT)
    for k, v in vals.items():
        if not isinstance(v, int | float) or v <= 0:
            raise MaterialError(f"{name}: {k} must be > 0, got {v!r}")
    a = np.asarray(direction, dtype=float)
    if a.shape != (3,) or np.linalg.norm(a) == 0:
        raise MaterialError(f"{name}: direction must be a non-zero 3-vector, got {direction!r}")
    a = a / np.linalg.norm(a)
    G_TT = E_T / (2 * (1 + nu_TT))
    # compliance in the frame (L, T1, T2), Voigt order 11,22,33,23,13,12 with engineering shears
    S = np.zeros((6, 6))
    S[0, 0] = 1 / E_L
    S[1, 1] = S[2, 2] = 1 / E_T
    S[0, 1] = S[1, 0] = S[0, 2] = S[2, 0] = -nu_LT / E_L
    S[1, 2] = S[2, 1] = -nu_TT / E_T
    S[3, 3] = 1 / G_TT
    S[4, 4] = S[5, 5] = 1 / G_LT
    try:
        Cl = np.linalg.inv(S)
    except np.linalg.LinAlgError:
        raise MaterialError(f"{name}: parameters give a singular compliance") from None
    if np.linalg.eigvalsh(0.5 * (Cl + Cl.T)).min() <= 0:
        raise MaterialError(f"{name}: parameters give a stiffness that is not positive definite")
    C_loc = from_voigt(Cl)
    # rotation taking e1 to a
    t = np.cross(a, [0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.cross(a, [0.0, 1.0, 0.0])
    t /= np.linalg.norm(t)
    R = np.column_stack([a, t, np.cross(a, t)])
    C = np.einsum("ip,jq,kr,ls,pqrs->ijkl", R, R, R, R, C_loc)
    return AnisotropicLinearElastic(C=C, name=name)
