"""Surrogate models implementing the constitutive contract F̄ (n,d,d) -> P̄ (n,d,d), Ā (n,d,d,d,d).

- :class:`PotentialModel`: a strain energy W(C) from a network of the Green–Lagrange strain E
  (``features: general`` — any anisotropy, objective by construction), of the isotropic invariants
  (``features: isotropic``: I1, I2, J) or of the invariants of C with the RVE's fibre families a_k
  (``features: anisotropic``: I1, I2, J and per family I4 = a·C a = |F a|², K4 = a·cof(C) a = |cof F a|²
  (= I5 − I1 I4 + I2, so I5 = a·C² a is carried) and the tension-only ⟨I4 − 1⟩²), normalised so that W(I) = 0
  and P(I) = 0; P = ∂W/∂F and
  A = ∂²W/∂F² (symmetric tangent, energy consistent): in closed form for inference
  (:mod:`fe2ml.surrogate.closed_form`, numpy on the CPU, torch on an accelerator) and by automatic differentiation
  where training needs the graph.
  ``convex: true`` makes the network input-convex (non-negative hidden-to-hidden and output weights, convex
  non-decreasing activations). With isotropic invariants the energy is polyconvex: I1 = |F|² and
  I2 = |cof F|² are convex in F and cof F, so the network is also made non-decreasing in them (non-negative
  weights on those two inputs in every layer), and J enters through J − 1 and 1 − J, affine in J (Linden et
  al. 2023). With ``general`` strain features the energy is convex in E, which is not polyconvexity.
  With anisotropic invariants the same holds family by family: I4 = |F a|² and ⟨I4 − 1⟩² (a convex,
  non-decreasing function of I4) are convex in F, K4 = |cof F a|² is convex in cof F, and the network is
  non-decreasing in all three (Schröder & Neff 2003; Kalina et al. 2024).
- The stress-free reference (P(I) = 0) is kept by terms that keep polyconvexity: the network's hydrostatic stress
  at F = I is removed by −n (J − 1) (affine in J), and the fibre part 2 (N_I4 − N_K4) a⊗a by adding
  c (K4 − 1) when N_I4 > N_K4 or c (I4 − 1) otherwise, with c = |N_I4 − N_K4| ≥ 0 (both convex); see
  :func:`reference_shift`.
- :class:`PlainModel`: a network F − I -> P (the common baseline), A = ∂P/∂F (closed form or autograd alike).
- ``kinematics: small``: the features are the small strain ε = sym(F − I) (potential) and
  P = ∂W/∂F = σ.

Plane strain (d = 2) embeds F in 3D with F33 = 1 for the invariants.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as Fn

from fe2ml.materials.hyperelastic import fibre_families
from fe2ml.surrogate.closed_form import cofactor3, evaluator, reference_shift
from fe2ml.surrogate.config import FEATURES

__all__ = ["CPU_CHUNK", "FEATURES", "MODEL_KINDS", "PlainModel", "PotentialModel", "build_model", "chunked",
           "reference_shift"]

CPU_CHUNK = 512
"""Points per chunk of a CPU evaluation: the layer Jacobians of a chunk of a (64, 64) 3D network stay in L2."""


def chunked(f, F: np.ndarray, chunk: int = CPU_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """P (n,d,d), A (n,d,d,d,d) of ``f`` evaluated chunk by chunk into preallocated arrays (bounded temporaries)."""
    n, d = len(F), F.shape[-1]
    P, A = np.empty((n, d, d)), np.empty((n, d, d, d, d))
    for i in range(0, n, chunk):
        P[i:i + chunk], A[i:i + chunk] = f(F[i:i + chunk])
    return P, A


def _mlp(n_in, hidden, n_out, convex=False, monotone=()):
    return ICNN(n_in, hidden, n_out, monotone=monotone) if convex else MLP(n_in, hidden, n_out)


class MLP(nn.Module):
    """Softplus multilayer perceptron."""

    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        dims = [n_in, *hidden]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.out = nn.Linear(dims[-1], n_out)

    def forward(self, x):
        for lay in self.layers:
            x = Fn.softplus(lay(x))
        return self.out(x)


class ICNN(nn.Module):
    """Input-convex network: z_{k+1} = softplus(W_k⁺ z_k + V_k x + b_k), output W_out⁺ z + v·x.

    W⁺ = softplus(W) ≥ 0. The inputs listed in ``monotone`` enter every layer with non-negative weights too, so
    the network is also non-decreasing in them (needed to compose it with convex functions of F).
    """

    def __init__(self, n_in, hidden, n_out, monotone=()):
        super().__init__()
        self.monotone = tuple(monotone)
        self.Vs = nn.ModuleList([nn.Linear(n_in, h) for h in hidden])
        self.Ws = nn.ParameterList([nn.Parameter(torch.randn(b, a) * 0.1) for a, b in zip(hidden[:-1], hidden[1:],
                                                                                           strict=True)])
        self.W_out = nn.Parameter(torch.randn(n_out, hidden[-1]) * 0.1)
        self.V_out = nn.Linear(n_in, n_out)

    @torch.no_grad()
    def start_small(self):
        """After a generic initialisation: shift the raw non-negative weights so that softplus(W) ≈ 1/fan-in.

        Xavier-initialised raw weights give softplus(W) ≈ 0.7 everywhere, so the output of an L-layer network of
        width h grows like (0.7 h)^L and its first fits spend thousands of epochs pushing every weight down.
        """
        for W in [*self.Ws, self.W_out]:
            W.add_(float(np.log(np.expm1(1.0 / W.shape[1]))))
        if self.monotone:
            m = list(self.monotone)
            for V in [*self.Vs, self.V_out]:
                V.weight[:, m] += float(np.log(np.expm1(1.0 / V.weight.shape[1])))

    def _input(self, V: nn.Linear, x):
        """V x + b with non-negative weights on the monotone inputs."""
        if not self.monotone:
            return V(x)
        mask = torch.zeros(V.weight.shape[1], dtype=torch.bool, device=V.weight.device)
        mask[list(self.monotone)] = True
        weight = torch.where(mask, Fn.softplus(V.weight), V.weight)
        return x @ weight.T + V.bias

    def forward(self, x):
        z = Fn.softplus(self._input(self.Vs[0], x))
        for W, V in zip(self.Ws, self.Vs[1:], strict=True):
            z = Fn.softplus(z @ Fn.softplus(W).T + self._input(V, x))
        return z @ Fn.softplus(self.W_out).T + self._input(self.V_out, x)


def _det3(F):
    """Determinant of (..., 3, 3) by cofactors (smooth second derivatives)."""
    return (F[..., 0, 0] * (F[..., 1, 1] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 1])
            - F[..., 0, 1] * (F[..., 1, 0] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 0])
            + F[..., 0, 2] * (F[..., 1, 0] * F[..., 2, 1] - F[..., 1, 1] * F[..., 2, 0]))


def _embed3(F):
    """(..., d, d) -> (..., 3, 3) with F33 = 1 for d = 2."""
    d = F.shape[-1]
    if d == 3:
        return F
    F3 = Fn.pad(F, (0, 1, 0, 1))  # out of place (vmap-safe)
    e33 = torch.zeros(3, 3, dtype=F.dtype, device=F.device)
    e33[2, 2] = 1.0
    return F3 + e33


class _Base(nn.Module):
    """Common: buffers for normalisation, batched P and A by autograd."""

    def __init__(self, dim: int, kinematics: str):
        super().__init__()
        self.dim = dim
        self.kinematics = kinematics
        self.register_buffer("p_scale", torch.tensor(1.0, dtype=torch.float64))

    def stress_tangent(self, F: torch.Tensor, *, create_graph: bool = False):
        """P (n,d,d) and A (n,d,d,d,d) for F (n,d,d)."""
        raise NotImplementedError

    def numpy_evaluator(self):
        """The closed form in numpy, F (n,d,d) ndarray -> (P, A) ndarrays (:mod:`fe2ml.surrogate.closed_form`).

        The weights are copied: build it again after the model changes.
        """
        return evaluator(self, "numpy")

    def evaluate(self, F, *, batch: int | None = None):
        """Numpy in/out contract evaluation by the closed form, on the model's device; float64 numpy out.

        ``batch``: points per chunk (default :data:`CPU_CHUNK` on the CPU, where small chunks stay in cache, and
        65536 on an accelerator, where large chunks fill it; the chunk bounds the memory of the tangent either way).
        """
        ref = self.p_scale
        d = self.dim
        F = np.asarray(F, dtype=np.float64)
        if len(F) == 0:  # a rank without points
            return np.zeros((0, d, d)), np.zeros((0, d, d, d, d))
        if ref.device.type == "cpu":
            return chunked(self.numpy_evaluator(), F, batch or CPU_CHUNK)
        f = evaluator(self, "torch")

        def on_device(G):
            P, A = f(torch.as_tensor(G, device=ref.device))
            return P.cpu().numpy(), A.cpu().numpy()

        return chunked(on_device, F, batch or 65536)


class PotentialModel(_Base):
    """Hyperelastic potential network, W(I) = 0 and P(I) = 0 by construction.

    Args:
        dim: 2 or 3.
        kinematics: ``finite`` or ``small``.
        hidden: hidden layer widths.
        features: ``general`` (components of E or ε), ``isotropic`` (I1, I2, J) or ``anisotropic`` (I1, I2, J and
            I4, K4, ⟨I4 − 1⟩² per fibre family); the invariants need finite kinematics.
        convex: input-convex network (polyconvex with invariant features: non-decreasing in every convex
            invariant too).
        fibres: the fibre families a_k in the RVE frame (``anisotropic`` only): 2- or 3-vectors, normalised here
            (2-vectors lie in the plane of a plane-strain RVE).
    """

    def __init__(self, dim: int, kinematics: str = "finite", hidden=(16, 16), features: str = "general",
                 convex: bool = False, fibres=None):
        super().__init__(dim, kinematics)
        if features not in FEATURES:
            raise ValueError(f"features: expected {', '.join(FEATURES)}, got {features!r}")
        if features != "general" and kinematics == "small":
            raise ValueError(f"{features} invariant features need finite kinematics")
        fib = fibre_families([{"fibres": fibres}]) if features == "anisotropic" else []
        if features == "anisotropic" and not fib:
            raise ValueError("features anisotropic needs the fibre families of the RVE (none given)")
        if features != "anisotropic" and fibres:
            raise ValueError(f"fibres apply to features anisotropic only (features is {features})")
        self.features = features
        self.convex = convex
        self.fibres = fib
        d = dim
        self.idx = [(i, j) for i in range(d) for j in range(i, d)]
        n_in = len(self.idx) if features == "general" else 4 + 3 * len(fib)
        # polyconvexity: non-decreasing in I1 − 3, I2 − 3 (inputs 0, 1) and every fibre invariant (inputs 4...),
        # free in J − 1 and 1 − J (inputs 2, 3)
        monotone = () if features == "general" else (0, 1, *range(4, n_in))
        self.net = _mlp(n_in, list(hidden), 1, convex, monotone=monotone)
        self.register_buffer("x_scale", torch.ones(n_in, dtype=torch.float64))
        if fib:  # a buffer (it moves with the model); general/isotropic state dicts stay as they were
            self.register_buffer("a", torch.tensor(fib, dtype=torch.float64))
        self.double()

    def features_of(self, F):
        """Unscaled network inputs (n, n_in) (used for the training-data bounds)."""
        return self._feat(F)

    def _feat(self, F):
        d = self.dim
        if self.features == "general":
            if self.kinematics == "small":
                H = F - torch.eye(d, dtype=F.dtype, device=F.device)
                E = 0.5 * (H + H.transpose(-1, -2))
            else:
                E = 0.5 * (F.transpose(-1, -2) @ F - torch.eye(d, dtype=F.dtype, device=F.device))
            x = torch.stack([E[..., i, j] * (1.0 if i == j else 2.0 ** 0.5) for i, j in self.idx], -1)
            return x
        F3 = _embed3(F)
        C = F3.transpose(-1, -2) @ F3
        I1 = C.diagonal(dim1=-2, dim2=-1).sum(-1)
        I2 = 0.5 * (I1**2 - (C @ C).diagonal(dim1=-2, dim2=-1).sum(-1))
        J = _det3(F3)
        cols = [I1 - 3.0, I2 - 3.0, J - 1.0, 1.0 - J]
        if self.features == "anisotropic":
            a = self.a.to(F.dtype)
            Fa = F3 @ a.T                                   # (..., 3, K)
            Ga = cofactor3(F3) @ a.T
            for k in range(a.shape[0]):
                I4 = (Fa[..., k] ** 2).sum(-1)
                cols += [I4 - 1.0, (Ga[..., k] ** 2).sum(-1) - 1.0, torch.relu(I4 - 1.0) ** 2]
        return torch.stack(cols, -1)

    def _y_gradient(self, g0):
        """Gradient in the unscaled features y (J once) from the gradient in the scaled inputs x (1, n_in)."""
        s = self.x_scale
        gx = g0[0] / s
        return [gx[0], gx[1], gx[2] - gx[3], *gx[4:]]

    def _reference(self):
        """Network value and gradient at the reference state (x = 0), differentiable in the weights."""
        x0 = torch.zeros(1, self.x_scale.shape[0], dtype=self.x_scale.dtype, device=self.x_scale.device,
                         requires_grad=True)
        n0 = self.net(x0).sum()
        g0 = torch.autograd.grad(n0, x0, create_graph=True)[0]
        return n0, g0

    def energy(self, F, ref=None):
        """W(F) (n,) including the normalisation terms (W(I) = 0, P(I) = 0)."""
        y = self._feat(F)
        x = y / self.x_scale
        n0, g0 = self._reference() if ref is None else ref
        # stress-free reference: remove the linear part of the network at the reference state
        if self.features == "general":
            lin = (x * g0).sum(-1)
        else:
            # P(I) = 0 by polyconvexity-preserving terms (Linden et al. 2023 for the isotropic part): −s·y with the
            # J column of y taken once (x3 = J − 1, x4 = 1 − J enter with opposite signs)
            shift = torch.stack(reference_shift(self._y_gradient(g0), len(self.fibres)))
            yr = torch.cat([y[..., :3], y[..., 4:]], -1)
            lin = yr @ shift
        return self.p_scale * (self.net(x).squeeze(-1) - n0 - lin)

    def stress_tangent(self, F, *, create_graph=False):
        """P = ∂W/∂F and A = ∂²W/∂F² (closed form without a graph, batched autograd with one)."""
        if not create_graph:
            return evaluator(self, "torch")(F)
        return self._autograd(F, create_graph)

    def _autograd(self, F, create_graph):
        """P and A by batched autograd (one backward pass per tangent column)."""
        with torch.enable_grad():
            F = F.detach().requires_grad_(True)
            W = self.energy(F).sum()
            P = torch.autograd.grad(W, F, create_graph=True)[0]
            A = _columns(P, F, self.dim, create_graph)
        return (P, A) if create_graph else (P.detach(), A.detach())


def _columns(P, F, d, create_graph):
    """A[n, i, j, k, l] = ∂P_ij/∂F_kl by d² batched backward passes."""
    rows = []
    for i in range(d):
        for j in range(d):
            g = torch.autograd.grad(P[:, i, j].sum(), F, create_graph=create_graph, retain_graph=True)[0]
            rows.append(g)
    return torch.stack(rows, 1).reshape(len(F), d, d, d, d)


class PlainModel(_Base):
    """Baseline network F − I -> P (no physics constraints); A by autograd (not symmetric in general)."""

    def __init__(self, dim: int, kinematics: str = "finite", hidden=(16, 16)):
        super().__init__(dim, kinematics)
        self.net = MLP(dim * dim, list(hidden), dim * dim)
        self.register_buffer("x_scale", torch.ones(dim * dim, dtype=torch.float64))
        self.double()

    def features_of(self, F):
        """Unscaled network inputs (n, d²)."""
        return (F - torch.eye(self.dim, dtype=F.dtype, device=F.device)).reshape(-1, self.dim * self.dim)

    def stress(self, F):
        """P (n,d,d)."""
        d = self.dim
        x = (F - torch.eye(d, dtype=F.dtype, device=F.device)).reshape(-1, d * d) / self.x_scale
        return self.p_scale * self.net(x).reshape(-1, d, d)

    def stress_tangent(self, F, *, create_graph=False):
        """P and A = ∂P/∂F (closed form without a graph, autograd with one)."""
        if not create_graph:
            return evaluator(self, "torch")(F)
        with torch.enable_grad():
            F = F.detach().requires_grad_(True)
            P = self.stress(F)
            A = _columns(P, F, self.dim, create_graph)
        return (P, A) if create_graph else (P.detach(), A.detach())


MODEL_KINDS = ("potential", "plain")


def build_model(kind: str, dim: int, kinematics: str, **kw) -> _Base:
    """Construct a model from its kind and arguments (as stored in checkpoints)."""
    if kind == "potential":
        return PotentialModel(dim, kinematics, **kw)
    if kind == "plain":
        return PlainModel(dim, kinematics, **{k: v for k, v in kw.items() if k == "hidden"})
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")
